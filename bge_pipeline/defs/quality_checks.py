"""Quality asset checks: index recall, old-vs-new neighbour agreement and self-retrieval, with their figures."""

from typing import Optional

import dagster as dg

from bge_pipeline.core import quality
from bge_pipeline.core.catalog import MigrationError
from bge_pipeline.core.search import SearchError, SearchTarget, search_target
from bge_pipeline.defs.assets.index import embedding_index
from bge_pipeline.defs.assets.swap import live_embedding_column
from bge_pipeline.defs.resources import DatabaseResource, EncoderResource, MigrationResource, RerankerResource


class IndexRecallConfig(dg.Config):
    """How the recall check samples; `probes` and `iterative_scan` override the search path's (to test a setting)."""

    sample_rows: int = 100
    k: int = 10
    candidates: Optional[int] = None  # None: RERANK_TOP_K, what the search path retrieves
    probes: Optional[int] = None  # None: the probes (ef_search for HNSW) search_segments would use
    iterative_scan: Optional[bool] = None  # None: on where pgvector >= 0.8
    min_recall: float = quality.MIN_RECALL


class AgreementConfig(dg.Config):
    sample_rows: int = 50
    k: int = 10


class SelfRetrievalConfig(dg.Config):
    sample_rows: int = 20
    k: int = 10
    min_fraction: float = quality.MIN_SELF_RETRIEVAL


def _target(database: DatabaseResource, migration: MigrationResource) -> SearchTarget:
    with database.get().connect() as conn:
        return search_target(conn, migration.target())


def _remedy(target: SearchTarget) -> str:
    if target.method == "hnsw":
        return "rebuild with a larger HNSW_EF_CONSTRUCTION or HNSW_M"
    return "raise ivfflat.probes or rebuild with more lists (IVFFLAT_LISTS)"


def _unavailable(error: Exception) -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.WARN, description=str(error))


@dg.asset_check(
    asset=embedding_index,
    description="Recall@10 of the index with the search path's probes (IVFFLAT) or ef_search (HNSW) against exact "
    "search, with sampled rows as "
    "queries: up to 100, fewer on large tables (at most 10M exact comparisons, at least 20 queries), so it costs "
    "the same at 1M rows as at 100k; warns below 0.95.",
)
def index_recall(
    config: IndexRecallConfig, database: DatabaseResource, migration: MigrationResource, reranker: RerankerResource
) -> dg.AssetCheckResult:
    try:
        target = _target(database, migration)
    except (SearchError, MigrationError) as error:
        return _unavailable(error)
    candidates = max(config.candidates or reranker.rerank_top_k, config.k)
    recall = quality.index_recall(
        database.get(), target, config.sample_rows, config.k, candidates, config.probes, config.iterative_scan
    )
    passed = recall.mean >= config.min_recall
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"recall@{config.k} {recall.mean:.3f} over {recall.sampled_rows} sampled rows"
            + ("" if passed else f": below {config.min_recall}; {_remedy(target)}")
        ),
        metadata={
            f"recall_at_{config.k}": dg.MetadataValue.float(round(recall.mean, 4)),
            f"min_recall_at_{config.k}": dg.MetadataValue.float(round(recall.lowest, 4)),
            "sampled_rows": dg.MetadataValue.int(recall.sampled_rows),
            "candidates": dg.MetadataValue.int(candidates),
            "probes": dg.MetadataValue.int(recall.probes or 0),
            "lists": dg.MetadataValue.int(target.lists or 0),
            "index_method": dg.MetadataValue.text(target.method or "none"),
            "iterative_scan": dg.MetadataValue.bool(
                target.iterative_scan if config.iterative_scan is None else config.iterative_scan
            ),
            "column": dg.MetadataValue.text(target.column),
            "seconds": dg.MetadataValue.float(round(recall.seconds, 3)),
        },
    )


@dg.asset_check(
    asset=embedding_index,
    description="Overlap of each sampled row's 10 nearest neighbours under the old vectors and the new ones, "
    "neighbours taken among a fixed 20,000-row sample (the whole table below that); reported, never failing.",
)
def old_new_agreement(
    config: AgreementConfig, database: DatabaseResource, migration: MigrationResource
) -> dg.AssetCheckResult:
    target = migration.target()
    with database.get().connect() as conn:
        state = target.read_state(conn)
    try:
        new_column = target.writable_column(state)
    except MigrationError as error:
        return dg.AssetCheckResult(passed=True, description=f"nothing to compare: {error}")
    old = quality.old_vectors(state, new_column) if new_column else None
    if new_column is None or old is None:
        return dg.AssetCheckResult(
            passed=True,
            description="nothing to compare: no old vectors are left (no old column and no backup table)",
        )
    agreement = quality.neighbour_agreement(database.get(), state, new_column, old, config.sample_rows, config.k)
    relation, old_column = old
    return dg.AssetCheckResult(
        passed=True,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            f"{agreement.share:.1%} of the {config.k} nearest neighbours agree between {relation}.{old_column} (old) "
            f"and {state.table.name}.{new_column} (new), over {agreement.sampled_rows} rows. Low agreement is not a "
            "failure: different models rank neighbours differently. The demo's old vectors are seeded random "
            "stand-ins (no package ships the old model), so its agreement is about chance, ~0."
        ),
        metadata={
            f"neighbour_agreement_at_{config.k}": dg.MetadataValue.float(round(agreement.share, 4)),
            "sampled_rows": dg.MetadataValue.int(agreement.sampled_rows),
            "old_vectors": dg.MetadataValue.text(f"{relation}.{old_column}"),
            "new_vectors": dg.MetadataValue.text(f"{state.table.name}.{new_column}"),
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
    reranker: RerankerResource,
) -> dg.AssetCheckResult:
    try:
        target = _target(database, migration)
    except (SearchError, MigrationError) as error:
        return _unavailable(error)
    found = quality.self_retrieval(
        database.get(),
        migration.target(),
        encoder.get(),
        encoder.query_prefix,
        config.sample_rows,
        config.k,
        candidates=max(reranker.rerank_top_k, config.k),
    )
    passed = found.share >= config.min_fraction
    hits = found.sampled_rows - len(found.missed)
    return dg.AssetCheckResult(
        passed=passed,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"{hits} of {found.sampled_rows} sampled rows found themselves in the top {config.k}"
        + ("" if not found.missed else f"; missed ids {found.missed[:10]}"),
        metadata={
            f"self_retrieval_at_{config.k}": dg.MetadataValue.float(round(found.share, 4)),
            "sampled_rows": dg.MetadataValue.int(found.sampled_rows),
            "rows_missed": dg.MetadataValue.int(len(found.missed)),
            "column": dg.MetadataValue.text(target.column),
        },
    )
