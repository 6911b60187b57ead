"""`bge-pipeline bench --index`: IVFFLAT and HNSW, each over vector and halfvec, measured on the user's own vectors.

Each of the four combinations gets a throwaway table `bge_bench_index_<method>_<type>` (id, embedding) filled by
binary COPY with the same vectors and VACUUM ANALYZEd, and is then measured:

- build: CREATE INDEX CONCURRENTLY as the embedding_index asset runs it (its session settings, its parameters);
- size: the table's bytes (pg_table_size) and the index's (pg_relation_size);
- recall@10 and query latency: each held-out query through `search.retrieve` with RERANK_TOP_K candidates, at the
  probes or ef_search the search path picks, against exact search on the same table, so halfvec is judged on its
  own rounded vectors. A hit as close as the exact 10th counts: a duplicate of the 10th row is not a miss;
- writes: 2,000 new rows inserted in batches of 100, one transaction each, with the index in place.

The vectors are a deterministic sample of the configured model's column when DATABASE_URL names a table that holds
enough of them; otherwise corpus texts encoded with the configured model (the packaged all-MiniLM-L6-v2 when
bge-small is not cached; --model names another). The queries are held out: no query is in the table. The tables
live in a fresh embedded PostgreSQL, or on DATABASE_URL, where each is dropped once measured, even on failure.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import psycopg
from pgvector import HalfVector
from psycopg import sql as psql
from tqdm import tqdm

from bge_pipeline.cli.measure import Output, bench_database, corpus_path
from bge_pipeline.cli.models import demo_settings, packaged_model_path
from bge_pipeline.core import sql
from bge_pipeline.core.catalog import MigrationError
from bge_pipeline.core.corpus import load_segments
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import Encoder, encoder_for
from bge_pipeline.core.migration import HNSW_DEFAULTS, IndexSpec, MigrationTarget
from bge_pipeline.core.search import Hit, SearchTarget, as_array, exact_search, iterative_scans, retrieve
from bge_pipeline.core.settings import INDEXABLE_DIMENSIONS, Settings
from bge_pipeline.core.shape_model import resolve_model

DEFAULT_ROWS = 10_000
DEFAULT_QUERIES = 200
RECALL_K = 10
# A row at the exact 10th's distance is as right as the 10th (duplicate vectors); 1e-6 absorbs float rounding only.
TIE_TOLERANCE = 1e-6
WARMUP_QUERIES = 10  # a service runs warm: the first queries would otherwise time reading the index from disk
WRITE_ROWS = 2_000
WRITE_BATCH_ROWS = 100
# Written vectors are stored ones nudged by this much per component, renormalised: an exact copy of a stored vector
# becomes one more heap pointer on HNSW's existing element, a cheaper write than a real new row.
WRITE_NOISE = 0.005
# Fewer and each of the guide's (at least) 100 IVFFLAT lists holds a handful of vectors: the figures would describe
# no table at the size that needs an index, so the corpus is measured instead.
MIN_TABLE_VECTORS = 1_000
SAMPLE_SEED = 10
MIN_PASSAGE_WORDS = 4  # a shorter "sentence" is mostly a split abbreviation ("Mr.")
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+")
BENCH_SCHEMA = "public"
BENCH_COLUMN = "embedding"
RECALL_TOLERANCE = 0.01
SIMILAR_LATENCY = 1.25  # a p99 within 25% of the other's is "similar": runs on a shared machine vary that much

# --- the statements this command adds (core/sql.py holds the pipeline's own) --------------------------------

SERVER_VERSION = psql.SQL("SHOW server_version")

# (schema, table): the bytes the rows take, heap, TOAST and maps; its indexes apart.
TABLE_BYTES = psql.SQL("SELECT pg_table_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))")
# (schema, index): the bytes of the index alone.
INDEX_BYTES = psql.SQL("SELECT pg_relation_size(to_regclass(format('%%I.%%I', %s::text, %s::text)))")


def create_bench_table(table: sql.Table, vector_type: str, dimensions: int) -> psql.Composed:
    """Ids and vectors only: the table's bytes are the vectors' bytes, as far as a heap allows."""
    return psql.SQL("CREATE TABLE {t} ({id} bigint PRIMARY KEY, {c} {type}({d}))").format(
        t=table.ident,
        id=table.id,
        c=psql.Identifier(BENCH_COLUMN),
        type=psql.Identifier(vector_type),
        d=psql.Literal(dimensions),
    )


def copy_bench_rows(table: sql.Table) -> psql.Composed:
    return psql.SQL("COPY {t} ({id}, {c}) FROM STDIN (FORMAT BINARY)").format(
        t=table.ident, id=table.id, c=psql.Identifier(BENCH_COLUMN)
    )


def vacuum_analyze(table: sql.Table) -> psql.Composed:
    return psql.SQL("VACUUM ANALYZE {t}").format(t=table.ident)


def insert_bench_rows(table: sql.Table) -> psql.Composed:
    """A batch of new rows in one statement; a halfvec column takes the vectors by pgvector's assignment cast."""
    return psql.SQL(
        "INSERT INTO {t} ({id}, {c}) SELECT * FROM unnest(%(ids)b::bigint[], %(vectors)b::vector[])"
    ).format(t=table.ident, id=table.id, c=psql.Identifier(BENCH_COLUMN))


# --- what is measured on ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchVectors:
    """The vectors the indexes are built on, and the held-out queries, none of which is among them."""

    rows: np.ndarray
    queries: np.ndarray
    source: str  # "table", or "corpus encoded with <model>"
    detail: str  # where exactly they came from, for people

    @property
    def dimensions(self) -> int:
        return int(self.rows.shape[1])


@dataclass(frozen=True)
class TableSample:
    """The configured table's vectors, or why it cannot stand for the user's data."""

    vectors: Optional[np.ndarray]  # None: the table cannot be measured
    detail: str  # where the vectors came from, or why there are none


def load_vectors(args: argparse.Namespace, settings: Settings, out: Output) -> BenchVectors:
    """The configured table's vectors where DATABASE_URL has enough of them, else encoded corpus texts."""
    wanted = args.rows + args.queries
    sample = table_sample(settings, wanted) if settings.database_url else TableSample(None, "no DATABASE_URL")
    if sample.vectors is not None:
        rows, queries = hold_out(sample.vectors, args.rows, args.queries)
        return BenchVectors(rows, queries, "table", sample.detail)
    out.line(f"Source: corpus texts, encoded now ({sample.detail})")
    vectors, model = corpus_vectors(args, settings, wanted)
    rows, queries = hold_out(vectors, args.rows, args.queries)
    return BenchVectors(rows, queries, f"corpus encoded with {model}", f"{len(vectors):,} distinct corpus texts")


def table_sample(settings: Settings, count: int) -> TableSample:
    """Up to `count` vectors of the configured model's column, the same ones each run; or why there are none."""
    migration = MigrationTarget.from_settings(settings)
    database = Database.from_settings(settings)
    try:
        with database.connect() as conn:
            state = migration.read_state(conn)
            column = migration.writable_column(state)
            if column is None:
                return TableSample(
                    None, f"{state.table.name} has no column of EMBEDDING_MODEL={migration.model!r} vectors"
                )
            found = conn.execute(sql.sample_vectors(state.table, column), (count,)).fetchall()
    except MigrationError as error:  # no such table or column, or one another model owns: the corpus stands in
        return TableSample(None, str(error))
    finally:
        database.dispose()
    where = f"{state.table.schema}.{state.table.name}.{column}"
    if len(found) < MIN_TABLE_VECTORS:
        return TableSample(None, f"{where} holds {len(found):,} vectors, fewer than {MIN_TABLE_VECTORS:,}")
    vectors = np.stack([as_array(vector) for _id, vector in found])
    return TableSample(vectors, f"{len(found):,} vectors sampled from {where}")


def hold_out(vectors: np.ndarray, rows: int, queries: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows to index, queries kept out of them): as asked where there are enough, else a tenth held out."""
    held = queries if len(vectors) >= rows + queries else min(queries, len(vectors) // 10)
    return vectors[held : held + rows], vectors[:held]


def corpus_vectors(args: argparse.Namespace, settings: Settings, count: int) -> tuple[np.ndarray, str]:
    """`count` distinct corpus texts encoded, and the name of the model that encoded them."""
    texts = corpus_texts(corpus_path(args.corpus), count)
    encoder = load_encoder(args, settings)
    with tqdm(
        total=len(texts), desc="encoding", unit="text", disable=args.no_progress, leave=False, file=sys.stderr
    ) as bar:
        vectors = encoder.encode(texts, progress=bar.update)
    return vectors, model_label(encoder.name)


def corpus_texts(path: Optional[Path], count: int) -> list[str]:
    """Up to `count` distinct texts, a deterministic sample: the corpus's segments, and when more are asked than it
    has, the runs of consecutive sentences within them too: real text, never a repeat."""
    segments = [segment.text for segment in load_segments(path)]
    pool = list(dict.fromkeys(segments))
    if len(pool) < count:
        pool = list(dict.fromkeys(pool + [run for text in segments for run in sentence_runs(text)]))
    chosen = np.random.default_rng(SAMPLE_SEED).permutation(len(pool))[:count]
    return [pool[i] for i in chosen]


def sentence_runs(text: str) -> list[str]:
    """Each run of consecutive sentences (or clauses) in `text` short of the whole, of a few words at least."""
    parts = SENTENCE_END.split(text.strip())
    runs = (
        " ".join(parts[start : start + length])
        for length in range(1, len(parts))
        for start in range(len(parts) - length + 1)
    )
    return [run for run in runs if len(run.split()) >= MIN_PASSAGE_WORDS]


def load_encoder(args: argparse.Namespace, settings: Settings) -> Encoder:
    """--model as the other bench modes load it (at its own dimension; shape:bge-small allowed), else the
    configured model, or the packaged MiniLM where that is bge-small and not cached here."""
    device = args.device or settings.embedding_device
    backend = (args.backend or settings.embedding_backend).split(",")[0].strip()
    if args.model:
        encoder = Encoder.load(resolve_model(args.model), None, device, settings.embedding_batch_size, backend)
        encoder.name = args.model
        return encoder
    return encoder_for(demo_settings(settings).replace(embedding_device=device, embedding_backend=backend))


def model_label(model: str) -> str:
    """The model as a person would name it: the packaged MiniLM's folder is a long path into the venv."""
    return "the packaged all-MiniLM-L6-v2" if model == packaged_model_path() else model


def written_vectors(vectors: np.ndarray, count: int) -> np.ndarray:
    """`count` vectors like the indexed ones, none equal to any: stored vectors, each nudged a little."""
    rng = np.random.default_rng(SAMPLE_SEED)
    nudged = vectors[rng.integers(0, len(vectors), count)] + rng.normal(0, WRITE_NOISE, (count, vectors.shape[1]))
    return (nudged / np.linalg.norm(nudged, axis=1, keepdims=True)).astype(np.float32)


# --- one combination ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Combination:
    """One index type over one vector type, measured: the row of the table and of the JSON."""

    index_type: str
    vector_type: str
    build_seconds: float
    table_bytes: int
    index_bytes: int
    recall_at_10: float
    query_p50_ms: float
    query_p99_ms: float
    write_rows_per_second: float
    parameters: dict[str, int]


@dataclass(frozen=True)
class QueryFigures:
    """What the held-out queries found and how long they took."""

    recall_at_10: float
    p50_ms: float
    p99_ms: float
    search_setting: Optional[int]  # the probes (IVFFLAT) or ef_search (HNSW) that retrieve used


def index_specs(settings: Settings, dimensions: int, out: Output) -> list[IndexSpec]:
    """The four combinations at the configured build parameters, less any type pgvector cannot index this wide."""
    specs = []
    for method in sql.INDEX_METHODS:
        for vector_type in sql.VECTOR_TYPES:
            if dimensions > INDEXABLE_DIMENSIONS[vector_type]:
                limit = INDEXABLE_DIMENSIONS[vector_type]
                out.line(f"{method}/{vector_type}: skipped, pgvector indexes {vector_type} up to {limit:,} dims")
                continue
            specs.append(
                IndexSpec(method, vector_type, settings.ivfflat_lists, settings.hnsw_m, settings.hnsw_ef_construction)
            )
    if not specs:
        raise ValueError(
            f"pgvector indexes at most {max(INDEXABLE_DIMENSIONS.values()):,} dims; these have {dimensions:,}"
        )
    return specs


def bench_table(spec: IndexSpec) -> sql.Table:
    # No text column: the search statements select one, so the id stands in for it.
    name = f"bge_bench_index_{spec.method}_{spec.vector_type}"
    return sql.Table(BENCH_SCHEMA, name, "id", "id", BENCH_COLUMN, BENCH_COLUMN)


def measure_combination(
    conn: psycopg.Connection, spec: IndexSpec, data: BenchVectors, writes: np.ndarray, limit: int, iterative: bool
) -> Combination:
    """Fill a table, build the index, then measure its size, its queries and writes with it; drop the table."""
    table = bench_table(spec)
    index = table.index_name(BENCH_COLUMN, spec.method)
    options = spec.options(len(data.rows))
    try:
        fill_table(conn, table, spec.vector_type, data.rows)
        build_seconds = build_index(conn, table, index, spec, options)
        table_bytes = scalar(conn, TABLE_BYTES, (table.schema, table.name))
        index_bytes = scalar(conn, INDEX_BYTES, (table.schema, index))
        target = search_target(conn, table, index, spec, options, iterative)
        queries = measure_queries(conn, target, data.queries, limit)
        write_rate = measure_writes(conn, table, writes, first_id=len(data.rows) + 1)
    finally:
        conn.execute(sql.drop_table(table.schema, table.name))
    return Combination(
        index_type=spec.method,
        vector_type=spec.vector_type,
        build_seconds=round(build_seconds, 3),
        table_bytes=int(table_bytes),
        index_bytes=int(index_bytes),
        recall_at_10=round(queries.recall_at_10, 4),
        query_p50_ms=round(queries.p50_ms, 2),
        query_p99_ms=round(queries.p99_ms, 2),
        write_rows_per_second=round(write_rate, 1),
        parameters=index_parameters(spec, options, queries.search_setting),
    )


def fill_table(conn: psycopg.Connection, table: sql.Table, vector_type: str, vectors: np.ndarray) -> None:
    """A fresh table of `vectors` (ids from 1), by binary COPY, vacuumed and analysed as a settled table would be."""
    conn.execute(sql.drop_table(table.schema, table.name))  # a killed earlier run's
    conn.execute(create_bench_table(table, vector_type, vectors.shape[1]))
    # The halfvec binary dumper takes HalfVector objects only; the vector one takes arrays as they are.
    as_value = HalfVector if vector_type == "halfvec" else np.asarray
    with conn.cursor().copy(copy_bench_rows(table)) as copy:
        copy.set_types(["bigint", vector_type])
        for number, vector in enumerate(vectors, start=1):
            copy.write_row((number, as_value(vector)))
    conn.execute(vacuum_analyze(table))


def build_index(
    conn: psycopg.Connection, table: sql.Table, index: str, spec: IndexSpec, options: dict[str, int]
) -> float:
    """Seconds to build the index with the session settings the embedding_index asset gives its build."""
    for statement in sql.INDEX_BUILD_SETTINGS:
        conn.execute(statement)
    try:
        started = time.perf_counter()
        conn.execute(sql.create_index(table, BENCH_COLUMN, index, spec.method, spec.vector_type, options))
        return time.perf_counter() - started
    finally:
        for statement in sql.INDEX_BUILD_RESET:
            conn.execute(statement)


def search_target(
    conn: psycopg.Connection, table: sql.Table, index: str, spec: IndexSpec, options: dict[str, int], iterative: bool
) -> SearchTarget:
    """What search.search_target would find for this table (it reads only the configured one)."""
    return SearchTarget(
        table=table,
        column=BENCH_COLUMN,
        index=index,
        lists=options.get("lists"),
        estimated_rows=int(scalar(conn, sql.ESTIMATED_ROWS, (table.schema, table.name))),
        iterative_scan=iterative,
        method=spec.method,
        vector_type=spec.vector_type,
    )


def measure_queries(conn: psycopg.Connection, target: SearchTarget, queries: np.ndarray, limit: int) -> QueryFigures:
    """Each query as the search path runs it (`limit` candidates, the first 10 judged) against exact search."""
    for query in queries[:WARMUP_QUERIES]:
        timed_retrieve(conn, target, query, limit)
    recalls, seconds = [], []
    setting = None
    for query in queries:
        found, setting, elapsed = timed_retrieve(conn, target, query, limit)
        with conn.transaction():
            exact = exact_search(conn, target, query, RECALL_K)
        recalls.append(recall_at_k(found, exact))
        seconds.append(elapsed)
    return QueryFigures(
        recall_at_10=float(np.mean(recalls)),
        p50_ms=float(np.percentile(seconds, 50)) * 1000,
        p99_ms=float(np.percentile(seconds, 99)) * 1000,
        search_setting=setting,
    )


def timed_retrieve(
    conn: psycopg.Connection, target: SearchTarget, query: np.ndarray, limit: int
) -> tuple[list[Hit], Optional[int], float]:
    """retrieve in its own transaction (which scopes its settings, as search's connection does), timed whole."""
    started = time.perf_counter()
    with conn.transaction():
        hits, setting = retrieve(conn, target, query, limit)
    return hits, setting, time.perf_counter() - started


def recall_at_k(found: Sequence[Hit], exact: Sequence[Hit], k: int = RECALL_K) -> float:
    """The share of the first k hits at most as far as the exact k-th: by distance, so a tie is not a miss."""
    if not exact:
        return 1.0
    cutoff = exact[:k][-1].distance + TIE_TOLERANCE
    return sum(hit.distance <= cutoff for hit in found[:k]) / min(k, len(exact))


def measure_writes(conn: psycopg.Connection, table: sql.Table, vectors: np.ndarray, first_id: int) -> float:
    """Rows/s inserting `vectors` under new ids, a transaction per batch of WRITE_BATCH_ROWS, as an application would."""
    statement = insert_bench_rows(table)
    started = time.perf_counter()
    for start in range(0, len(vectors), WRITE_BATCH_ROWS):
        batch = vectors[start : start + WRITE_BATCH_ROWS]
        with conn.transaction():
            conn.execute(
                statement, {"ids": list(range(first_id + start, first_id + start + len(batch))), "vectors": list(batch)}
            )
    return len(vectors) / (time.perf_counter() - started)


def index_parameters(spec: IndexSpec, options: dict[str, int], search_setting: Optional[int]) -> dict[str, int]:
    """The build's parameters and the search's setting, as a user would set them."""
    if spec.method == "ivfflat":
        return {**options, "probes": search_setting or 0}
    return {**HNSW_DEFAULTS, **options, "ef_search": search_setting or 0}


# --- the recommendation -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Recommendation:
    """The settings to use (INDEX_TYPE, VECTOR_TYPE) and the figures that favour them."""

    index_type: str
    vector_type: str
    reason: str

    @property
    def line(self) -> str:
        return f"Recommendation: INDEX_TYPE={self.index_type} VECTOR_TYPE={self.vector_type}. {self.reason}"


def recommend(results: Sequence[Combination]) -> Recommendation:
    """The index and vector type the figures favour, with the figures that say so."""
    by = {(result.index_type, result.vector_type): result for result in results}
    reference = "vector" if ("ivfflat", "vector") in by and ("hnsw", "vector") in by else "halfvec"
    method, method_reason = choose_method(by[("ivfflat", reference)], by[("hnsw", reference)])
    full, half = by.get((method, "vector")), by[(method, "halfvec")]
    vector_type, type_reason = choose_vector_type(full, half) if full else ("halfvec", "vector cannot index this wide")
    return Recommendation(method, vector_type, f"{method_reason}. {type_reason}.")


def choose_method(ivfflat: Combination, hnsw: Combination) -> tuple[str, str]:
    """hnsw where it finds more at a similar or lower p99; ivfflat where it finds as much: it builds and writes
    cheaper. Both cases name the costs, so the other choice can be made knowingly."""
    gain = hnsw.recall_at_10 - ivfflat.recall_at_10
    recall = f"recall@10 {hnsw.recall_at_10:.3f} against ivfflat's {ivfflat.recall_at_10:.3f}"
    latency = f"p99 {hnsw.query_p99_ms:.1f} ms against {ivfflat.query_p99_ms:.1f} ms"
    costs = (
        f"hnsw writes {hnsw.write_rows_per_second:,.0f} rows/s against ivfflat's {ivfflat.write_rows_per_second:,.0f} "
        f"and builds in {hnsw.build_seconds:.2f} s against {ivfflat.build_seconds:.2f} s"
    )
    if gain > RECALL_TOLERANCE and hnsw.query_p99_ms <= ivfflat.query_p99_ms * SIMILAR_LATENCY:
        return "hnsw", (
            f"hnsw: {recall} at {latency}, but {costs}: pick ivfflat instead where the table takes heavy writes or "
            f"is rebuilt often and ivfflat's recall is enough"
        )
    if gain > RECALL_TOLERANCE:
        return "hnsw", (
            f"hnsw: {recall}, though at {latency}; {costs}: pick ivfflat instead where latency or writes matter "
            f"more than {gain:.3f} of recall"
        )
    return "ivfflat", (
        f"ivfflat: hnsw's {recall} is no more than {RECALL_TOLERANCE} better, at {latency}, and {costs}: pick "
        f"hnsw where ivfflat's recall falls short on the whole table (rerun with --rows near its size)"
    )


def choose_vector_type(full: Combination, half: Combination) -> tuple[str, str]:
    """halfvec where its recall is within RECALL_TOLERANCE of vector's: it halves the column and the index."""
    loss = full.recall_at_10 - half.recall_at_10
    saving = (
        f"{half.index_type} index {mib(half.index_bytes)} MiB against {mib(full.index_bytes)} "
        f"({half.index_bytes / max(full.index_bytes, 1):.2f}x), table {mib(half.table_bytes)} MiB against "
        f"{mib(full.table_bytes)} ({half.table_bytes / max(full.table_bytes, 1):.2f}x)"
    )
    recall = f"recall@10 {half.recall_at_10:.3f} against vector's {full.recall_at_10:.3f}"
    if loss <= RECALL_TOLERANCE:
        return "halfvec", f"halfvec: {recall}, within {RECALL_TOLERANCE}, in fewer bytes: {saving}"
    return "vector", f"vector: halfvec's {recall} loses more than {RECALL_TOLERANCE}, to save {saving}"


def mib(size: int) -> str:
    """Bytes as MiB, the unit of the table."""
    return f"{size / 2**20:,.1f}"


# --- the command --------------------------------------------------------------------------------------------

HEADER = (
    f"{'index':<8} {'type':<8} {'build s':>8} {'table MiB':>10} {'index MiB':>10} {'recall@10':>9} "
    f"{'p50 ms':>8} {'p99 ms':>8} {'writes rows/s':>14}  parameters"
)


def table_row(result: Combination) -> str:
    """One combination's line under HEADER."""
    shown = " ".join(f"{name}={value}" for name, value in result.parameters.items())
    return (
        f"{result.index_type:<8} {result.vector_type:<8} {result.build_seconds:>8.2f} {mib(result.table_bytes):>10} "
        f"{mib(result.index_bytes):>10} {result.recall_at_10:>9.3f} {result.query_p50_ms:>8.2f} "
        f"{result.query_p99_ms:>8.2f} {result.write_rows_per_second:>14,.0f}  {shown}"
    )


def machine_facts(conn: psycopg.Connection, pgvector: str) -> dict[str, Any]:
    """What the figures depend on besides the data."""
    return {
        "cpu_count": os.cpu_count(),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "postgresql": scalar(conn, SERVER_VERSION),
        "pgvector": pgvector,
    }


def run_index_bench(args: argparse.Namespace, settings: Settings, out: Output) -> dict[str, Any]:
    """The four combinations on the same vectors and queries, a table of their figures, and a recommendation."""
    data = load_vectors(args, settings, out)
    if len(data.queries) == 0:
        raise ValueError(f"only {len(data.rows):,} vectors: too few to hold any out as queries")
    specs = index_specs(settings, data.dimensions, out)
    with bench_database(settings) as (url, description):
        out.line(
            f"Vectors: {len(data.rows):,} rows + {len(data.queries):,} held-out queries, {data.dimensions} dims, "
            f"{data.detail} ({data.source}); database: {description}"
        )
        out.line(
            f"Queries: search.retrieve with RERANK_TOP_K={settings.rerank_top_k} candidates at the search path's "
            f"probes / ef_search, recall@10 against exact search on the same table; writes: {WRITE_ROWS:,} rows "
            f"in batches of {WRITE_BATCH_ROWS}"
        )
        results, facts = measure_all(url, specs, data, settings.rerank_top_k, out)
    recommendation = recommend(results)
    out.line(recommendation.line)
    out.line(
        f"Machine: {facts['cpu_count']} CPUs, load average {facts['load_average_1m']}, "
        f"PostgreSQL {facts['postgresql']}, pgvector {facts['pgvector']}"
    )
    return {
        "mode": "index",
        "rows": len(data.rows),
        "queries": len(data.queries),
        "dimensions": data.dimensions,
        "source": data.source,
        "source_detail": data.detail,
        "candidates": settings.rerank_top_k,
        "write_rows": WRITE_ROWS,
        "write_batch_rows": WRITE_BATCH_ROWS,
        "combinations": [asdict(result) for result in results],
        "recommendation": recommendation.line,
        "recommended_index_type": recommendation.index_type,
        "recommended_vector_type": recommendation.vector_type,
        **facts,
    }


def measure_all(
    url: str, specs: Sequence[IndexSpec], data: BenchVectors, limit: int, out: Output
) -> tuple[list[Combination], dict[str, Any]]:
    """Each combination in turn on one connection, its row printed as soon as it is measured; the machine facts."""
    database = Database(database_url=url)
    writes = written_vectors(data.rows, WRITE_ROWS)
    try:
        pgvector = database.ensure_pgvector()
        with database.connect(autocommit=True) as conn:
            facts = machine_facts(conn, pgvector)
            out.line(HEADER)
            results = []
            for spec in specs:
                results.append(measure_combination(conn, spec, data, writes, limit, iterative_scans(pgvector)))
                out.line(table_row(results[-1]))
    finally:
        database.dispose()
    return results, facts
