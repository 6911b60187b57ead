"""Quality asset checks: index recall, old-vs-new neighbour agreement and self-retrieval, with their figures."""

import time
from typing import Optional

import dagster as dg
import numpy as np
import psycopg
import psycopg.sql

from bge_pipeline import sql
from bge_pipeline.assets.index import embedding_index
from bge_pipeline.assets.swap import live_embedding_column
from bge_pipeline.catalog import MigrationError, TableState
from bge_pipeline.database import DatabaseResource
from bge_pipeline.encoder import EncoderResource
from bge_pipeline.migration import MigrationResource
from bge_pipeline.search import SearchError, SearchTarget, as_array, exact_search, retrieve, search, search_target
from bge_pipeline.settings import current_settings

MIN_RECALL = 0.95
MIN_SELF_RETRIEVAL = 0.9


class IndexRecallConfig(dg.Config):
    """How the recall check samples; `probes` and `iterative_scan` override the search path's (to test a setting)."""

    sample_rows: int = 100
    k: int = 10
    candidates: Optional[int] = None  # None: RERANK_TOP_K, what the search path retrieves
    probes: Optional[int] = None  # None: the probes search_segments would use
    iterative_scan: Optional[bool] = None  # None: on where pgvector >= 0.8
    min_recall: float = MIN_RECALL


class AgreementConfig(dg.Config):
    sample_rows: int = 50
    k: int = 10


class SelfRetrievalConfig(dg.Config):
    sample_rows: int = 20
    k: int = 10
    min_fraction: float = MIN_SELF_RETRIEVAL


def _target(database: DatabaseResource, migration: MigrationResource) -> SearchTarget:
    with database.connect() as conn:
        return search_target(conn, migration)


def _sample(database: DatabaseResource, target: SearchTarget, rows: int) -> list[tuple[int, np.ndarray]]:
    with database.connect() as conn:
        found = conn.execute(sql.sample_vectors(target.table, target.column), (rows,)).fetchall()
    return [(int(row[0]), as_array(row[1])) for row in found]


def _unavailable(error: Exception) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description=str(error))


@dg.asset_check(
    asset=embedding_index,
    description="Recall@10 of the index with the search path's probes against exact search, on sampled rows; warns below 0.95.",
)
def index_recall(
    config: IndexRecallConfig, database: DatabaseResource, migration: MigrationResource
) -> dg.AssetCheckResult:
    try:
        target = _target(database, migration)
    except (SearchError, MigrationError) as error:
        return _unavailable(error)
    candidates = max(config.candidates or current_settings().rerank_top_k, config.k)
    sample = _sample(database, target, config.sample_rows)
    recalls: list[float] = []
    probes_used: Optional[int] = None
    started = time.perf_counter()
    for row_id, vector in sample:
        with database.connect() as conn:
            approximate, probes_used = retrieve(
                conn,
                target,
                vector,
                candidates,
                probes=config.probes,
                iterative_scan=config.iterative_scan,
                complete=config.probes is None and config.iterative_scan is None,
            )
        with database.connect() as conn:  # a transaction of its own: index scans stay off only for it
            exact = exact_search(conn, target, vector, config.k)
        truth = {hit.id for hit in exact}
        found = {hit.id for hit in approximate[: config.k]}
        recalls.append(len(truth & found) / len(truth) if truth else 1.0)
    recall = float(np.mean(recalls)) if recalls else 1.0
    passed = recall >= config.min_recall
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"recall@{config.k} {recall:.3f} over {len(recalls)} sampled rows"
            + ("" if passed else f": below {config.min_recall}; raise ivfflat.probes or rebuild with more lists")
        ),
        metadata={
            f"recall_at_{config.k}": dg.MetadataValue.float(round(recall, 4)),
            f"min_recall_at_{config.k}": dg.MetadataValue.float(round(min(recalls), 4) if recalls else 1.0),
            "sampled_rows": dg.MetadataValue.int(len(recalls)),
            "candidates": dg.MetadataValue.int(candidates),
            "probes": dg.MetadataValue.int(probes_used or 0),
            "lists": dg.MetadataValue.int(target.lists or 0),
            "iterative_scan": dg.MetadataValue.bool(
                target.iterative_scan if config.iterative_scan is None else config.iterative_scan
            ),
            "column": dg.MetadataValue.text(target.column),
            "seconds": dg.MetadataValue.float(round(time.perf_counter() - started, 3)),
        },
    )


def _old_vectors(state: TableState, new_column: str) -> Optional[tuple[str, str]]:
    """(relation, column) holding the previous model's vectors: the live column before the swap, its backup after."""
    table = state.table
    live = state.columns.get(table.live_column)
    if new_column != table.live_column and live is not None and live.typname == "vector":
        return table.name, table.live_column
    backups = sorted(name for name in state.models if name.startswith(table.backup_table_prefix))
    return (backups[0], table.live_column) if backups else None


def _neighbours(conn: psycopg.Connection, statement: psycopg.sql.Composed, row_id: int, vector: np.ndarray, k: int) -> set[int]:
    for setting in sql.DISABLE_INDEX_SCANS:
        conn.execute(setting)
    rows = conn.execute(statement, {"id": row_id, "query": vector, "limit": k}).fetchall()
    return {int(row[0]) for row in rows}


@dg.asset_check(
    asset=embedding_index,
    description="Overlap of each sampled row's 10 nearest neighbours under the old vectors and the new ones; reported, never failing.",
)
def old_new_agreement(
    config: AgreementConfig, database: DatabaseResource, migration: MigrationResource
) -> dg.AssetCheckResult:
    with database.connect() as conn:
        state = migration.read_state(conn)
    try:
        new_column = migration.writable_column(state)
    except MigrationError as error:
        return dg.AssetCheckResult(passed=True, description=f"nothing to compare: {error}")
    old = _old_vectors(state, new_column) if new_column else None
    if new_column is None or old is None:
        return dg.AssetCheckResult(
            passed=True,
            description="nothing to compare: no old vectors are left (no old column and no backup table)",
        )
    table = state.table
    relation, old_column = old
    new_target = SearchTarget(table, new_column, None, None, 0, False)
    sample = _sample(database, new_target, config.sample_rows)
    ids = [row_id for row_id, _ in sample]
    with database.connect() as conn:
        old_vectors = {
            int(r[0]): as_array(r[1])
            for r in conn.execute(sql.vectors_by_id(table.schema, relation, table.id_column, old_column), (ids,))
        }
    old_query = sql.neighbour_ids(table.schema, relation, table.id_column, old_column)
    new_query = sql.neighbour_ids(table.schema, table.name, table.id_column, new_column)
    overlaps = []
    for row_id, vector in sample:
        if row_id not in old_vectors:
            continue
        with database.connect() as conn:
            before = _neighbours(conn, old_query, row_id, old_vectors[row_id], config.k)
            after = _neighbours(conn, new_query, row_id, vector, config.k)
        overlaps.append(len(before & after) / config.k)
    agreement = float(np.mean(overlaps)) if overlaps else 0.0
    return dg.AssetCheckResult(
        passed=True,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{agreement:.1%} of the {config.k} nearest neighbours agree between {relation}.{old_column} (old) and "
            f"{table.name}.{new_column} (new), over {len(overlaps)} rows. Low agreement is not a failure: different "
            "models rank neighbours differently. The demo's old vectors are seeded random stand-ins (no package ships "
            "the old model), so its agreement is about chance, ~0."
        ),
        metadata={
            f"neighbour_agreement_at_{config.k}": dg.MetadataValue.float(round(agreement, 4)),
            "sampled_rows": dg.MetadataValue.int(len(overlaps)),
            "old_vectors": dg.MetadataValue.text(f"{relation}.{old_column}"),
            "new_vectors": dg.MetadataValue.text(f"{table.name}.{new_column}"),
        },
    )


@dg.asset_check(
    asset=live_embedding_column,
    description="Sampled rows' own texts, searched through the query path, find their row in the top 10.",
)
def self_retrieval(
    config: SelfRetrievalConfig,
    database: DatabaseResource,
    migration: MigrationResource,
    encoder: EncoderResource,
) -> dg.AssetCheckResult:
    try:
        target = _target(database, migration)
    except (SearchError, MigrationError) as error:
        return _unavailable(error)
    with database.connect() as conn:
        rows = conn.execute(sql.sample_rows(target.table, target.column), (config.sample_rows,)).fetchall()
    rows = [(int(r[0]), r[1]) for r in rows if r[1] and r[1].strip()]
    model = encoder.get()
    # One batch for all the sampled texts: the check costs one encode, not one per row.
    vectors = model.encode([text for _, text in rows], prefix=encoder.query_prefix)
    candidates = max(current_settings().rerank_top_k, config.k)
    found, missed = 0, []
    for (row_id, text), vector in zip(rows, vectors):
        outcome = search(
            text, database, migration, model, candidates=candidates, top_k=config.k, query_vector=vector
        )
        if any(hit.id == row_id for hit in outcome.hits):
            found += 1
        else:
            missed.append(row_id)
    fraction = found / len(rows) if rows else 1.0
    passed = fraction >= config.min_fraction
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{found} of {len(rows)} sampled rows found themselves in the top {config.k}"
        + ("" if not missed else f"; missed ids {missed[:10]}"),
        metadata={
            f"self_retrieval_at_{config.k}": dg.MetadataValue.float(round(fraction, 4)),
            "sampled_rows": dg.MetadataValue.int(len(rows)),
            "rows_missed": dg.MetadataValue.int(len(missed)),
            "column": dg.MetadataValue.text(target.column),
        },
    )
