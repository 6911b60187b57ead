"""What the migration will cost before it starts: rows, seconds per phase, locks, and the disk it needs.

Read-only: counts and catalog sizes from the database, the encoder's rate measured on a sample of the table's own
texts, and documented rates (measured on this project's 2-core machine, docs/performance.md) for the database
work. Disk is the figure users fear most: every row's UPDATE writes a new row version (the old one stays until
VACUUM) and new entries in every index, beside the new column, its index and the backup.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import MigrationError
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import Encoder
from bge_pipeline.core.int8_gate import SAMPLE_TEXTS as INT8_SAMPLE_TEXTS
from bge_pipeline.core.int8_gate import is_int8, measure_int8
from bge_pipeline.core.migration import HNSW_DEFAULTS, IndexSpec, MigrationTarget, describe_options
from bge_pipeline.core.quality import bounded_queries

# Rows written a second by one backfill writer, 384-dim vectors into a table that keeps the guide's old IVFFLAT
# index (each UPDATE also inserts into it): 12,639 measured, rounded down.
WRITE_ROWS_PER_SECOND = 12_000
# IVFFLAT build seconds per row x dimension x list: 100,000 x 384 with 316 lists took 4.9 s (maintenance_work_mem 1GB).
INDEX_SECONDS_PER_ROW_DIMENSION_LIST = 4.9 / (100_000 * 384 * 316)
# HNSW build seconds per row x dimension x ef_construction: 100,000 x 384 at m=16, ef_construction=64 took 35.7 s
# (vector) and 38.6 s (halfvec) in `bench --index` (docs/performance.md).
HNSW_SECONDS_PER_ROW_DIMENSION_EF = 38.0 / (100_000 * 384 * 64)
# An HNSW element: its vector, 2m neighbours on layer 0 (6-byte item pointers, a few on upper layers) and headers;
# with the 1.1 below this gives 2,015 / 1,170 bytes a row for vector / halfvec(384), against 2,047 / 1,170 measured.
HNSW_ELEMENT_OVERHEAD_BYTES = 96
# Copying the old vectors into the backup table (CREATE TABLE AS): sequential read and write.
COPY_BYTES_PER_SECOND = 200 * 2**20
VECTOR_HEADER_BYTES = 8  # pgvector's vector and halfvec: 4-byte varlena header, 2-byte dimension count, 2 unused
COMPONENT_BYTES = {"vector": 4, "halfvec": 2}
TUPLE_OVERHEAD_BYTES = 32  # heap tuple header and line pointer, for the backup table's rows
SAMPLE_TEXTS = 64
# The quality checks: exact-search comparisons a second (384 dims; index_recall's 100 queries over 20,000 rows took
# 4 s) and the agreement check's fixed cost (its 20,000-row sample read and searched: 11.6 s).
EXACT_COMPARISONS_PER_SECOND = 500_000
AGREEMENT_CHECK_SECONDS = 12.0


def vector_bytes(dimensions: int, vector_type: str = "vector") -> int:
    return COMPONENT_BYTES[vector_type] * dimensions + VECTOR_HEADER_BYTES


def index_bytes(spec: IndexSpec, rows: int, dimensions: int) -> int:
    """The index's size on `rows` vectors: IVFFLAT stores each vector once (plus the lists' centers); HNSW each
    vector with its neighbour lists."""
    vector = vector_bytes(dimensions, spec.vector_type)
    if spec.method == "hnsw":
        m = spec.m or HNSW_DEFAULTS["m"]
        return int(rows * 1.1 * (vector + 2 * m * 6 + HNSW_ELEMENT_OVERHEAD_BYTES))
    return int((rows * 1.1 + spec.options(rows)["lists"]) * vector)


def index_seconds(spec: IndexSpec, rows: int, dimensions: int) -> float:
    if spec.method == "hnsw":
        return (
            rows
            * dimensions
            * (spec.ef_construction or HNSW_DEFAULTS["ef_construction"])
            * HNSW_SECONDS_PER_ROW_DIMENSION_EF
        )
    return rows * dimensions * spec.options(rows)["lists"] * INDEX_SECONDS_PER_ROW_DIMENSION_LIST


@dataclass
class Phase:
    name: str
    does: str
    locks: str
    seconds: float


@dataclass
class Plan:
    table: str
    model: str
    dimensions: int
    rows_total: int
    rows_with_text: int
    rows_pending: int
    vector_type: str
    index_type: str
    index_parameters: dict[str, int]
    converting_from: Optional[str]  # the live column, when only VECTOR_TYPE changes: copied by a cast
    encode_texts_per_second: Optional[float]
    encode_device: Optional[str]
    bytes_by_part: dict[str, int]
    free_bytes: Optional[int]
    phases: list[Phase] = field(default_factory=list)
    int8: Optional[dict[str, Any]] = None  # the int8 gate's figures, when the encoder runs int8

    @property
    def bytes_needed(self) -> int:
        return sum(self.bytes_by_part.values())

    @property
    def estimated_seconds(self) -> float:
        return sum(phase.seconds for phase in self.phases)

    @property
    def fits(self) -> Optional[bool]:
        """Whether the free space holds the migration; None where the server's disk cannot be seen from here."""
        return None if self.free_bytes is None else self.bytes_needed <= self.free_bytes

    def as_dict(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "bytes_needed": self.bytes_needed,
            "estimated_seconds": round(self.estimated_seconds, 1),
            "fits": self.fits,
        }

    def lines(self) -> list[str]:
        rate = (
            f"{self.encode_texts_per_second:,.1f} texts/s measured on {self.encode_device}"
            if self.encode_texts_per_second
            else "not measured (nothing to encode)"
        )
        free = (
            "unknown (the server's disk is not visible from here)" if self.free_bytes is None else _mib(self.free_bytes)
        )
        lines = [
            f"table           {self.table}: {self.rows_total:,} rows, {self.rows_with_text:,} with text, "
            f"{self.rows_pending:,} to embed",
            f"model           {self.model} ({self.vector_type}({self.dimensions})), encoder {rate}",
            f"index           {self.index_type.upper()} {self.vector_type}_cosine_ops, "
            f"{describe_options(self.index_parameters)}",
        ]
        if self.int8:
            verdict = "passes" if self.int8["passed"] else "REFUSED: Phase 1 will not start"
            lines.append(
                f"int8 gate       neighbour agreement@10 {self.int8['neighbour_agreement']:.3f} (floor "
                f"{self.int8['floor']}), judged nDCG@10 {self.int8['ndcg_int8']:.3f} int8 / "
                f"{self.int8['ndcg_float']:.3f} float: {verdict}"
            )
        for phase in self.phases:
            lines.append(f"{phase.name:<15} ~{phase.seconds:,.0f} s  {phase.does}; locks: {phase.locks}")
        parts = ", ".join(f"{name} {_mib(size)}" for name, size in self.bytes_by_part.items())
        verdict = {True: "fits", False: "DOES NOT FIT", None: "cannot be checked"}[self.fits]
        lines += [
            f"disk            {_mib(self.bytes_needed)} needed ({parts}); free {free}: {verdict}",
            f"total           ~{self.estimated_seconds:,.0f} s",
        ]
        return lines


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def free_bytes(database: Database) -> Optional[int]:
    """Free space where the data lives: known for the embedded server, unknown for a DATABASE_URL server."""
    if database.database_url:
        return None
    folder = Path(database.embedded_pgdata)
    return shutil.disk_usage(folder if folder.exists() else Path.cwd()).free


def measure_encoder(encoder: Encoder, texts: list[str]) -> float:
    """Texts/s on the table's own texts, after a warm-up (the first pass pays for kernel and graph setup)."""
    encoder.encode(texts[:8])
    started = time.perf_counter()
    encoder.encode(texts)
    return len(texts) / max(time.perf_counter() - started, 1e-9)


def plan_migration(database: Database, migration: MigrationTarget, encoder: Optional[Encoder] = None) -> Plan:
    """The plan for the configured table and model; with `encoder`, its rate measured on sampled texts."""
    with database.connect() as conn:
        state = migration.read_state(conn)
        table = state.table
        column = migration.writable_column(state) or table.staging_column
        exists = column in state.columns
        counts = conn.execute(sql.count_rows(table, column if exists else table.text_column)).fetchone()
        total, with_text, missing, _ = counts or (0, 0, 0, 0)
        pending = missing if exists else with_text
        old = state.columns.get(table.live_column)
        old_dimensions = old.vector_dimensions if old is not None and column != table.live_column else None
        old_vectors = scalar(conn, sql.count_vectors(table, table.live_column)) if old_dimensions else 0
        heap_bytes, index_bytes_now = conn.execute(sql.TABLE_SIZES, (table.schema, table.name)).fetchone() or (0, 0)
        migrated = column == table.live_column
        gated = encoder is not None and is_int8(encoder.backend)  # the int8 gate samples more of the table
        sampled = INT8_SAMPLE_TEXTS if gated else SAMPLE_TEXTS
        texts = [row[0] for row in conn.execute(sql.sample_texts(table), (sampled,)).fetchall()]
    source = migration.conversion_source(state)
    encoding = encoder is not None and bool(texts) and pending > 0 and not source
    rate = measure_encoder(encoder, texts[:SAMPLE_TEXTS]) if encoding and encoder is not None else None
    int8 = measure_int8(encoder, texts, migration.int8_min_agreement) if encoding and encoder and gated else None
    spec = migration.index
    live_index = state.search_index(column, spec.method)
    indexed = live_index is not None and spec.met_by(live_index, column)
    new_vectors = pending * vector_bytes(migration.dimensions, migration.vector_type)
    share = pending / max(total, 1)
    backup = (
        old_vectors * (vector_bytes(old_dimensions, old.typname) + TUPLE_OVERHEAD_BYTES)
        if old is not None and old_dimensions and migration.keep_old_embeddings
        else 0
    )
    bytes_by_part = {
        "new column": new_vectors,
        # Every UPDATE leaves the old row version until VACUUM and adds entries to every index on the table.
        "row versions": int(heap_bytes * share),
        "index entries": int(index_bytes_now * share),
        "new index": 0 if indexed else index_bytes(spec, with_text, migration.dimensions),
        "backup": backup,
    }
    bytes_by_part["WAL headroom"] = int((bytes_by_part["new column"] + bytes_by_part["new index"] + backup) * 0.5)
    # A cast copy has no encoder to wait for: it runs at the write rate.
    backfill_rate = WRITE_ROWS_PER_SECOND if source else min(rate or WRITE_ROWS_PER_SECOND, WRITE_ROWS_PER_SECOND)
    backfill_seconds = pending / backfill_rate if pending else 0.0
    build_seconds = 0.0 if indexed else index_seconds(spec, with_text, migration.dimensions)
    replacing = (
        f", then DROP INDEX CONCURRENTLY the {live_index.method.upper()} one it replaces"
        if live_index is not None and live_index.method != spec.method
        else ""
    )
    done = "nothing: done"
    phases = [
        Phase(
            "phase 1",
            done if exists else f"add {column} {migration.vector_type}({migration.dimensions})",
            "ACCESS EXCLUSIVE for milliseconds",
            0.0 if exists else 0.1,
        ),
        Phase(
            "phase 2",
            f"copy {pending:,} vectors from {source} as {migration.vector_type} (no encoding), batches of "
            f"{migration.batch_rows:,}"
            if source
            else f"embed {pending:,} rows in batches of {migration.batch_rows:,}",
            "ROW EXCLUSIVE: only the rows of each batch, one commit a batch",
            backfill_seconds,
        ),
        Phase(
            "index",
            done
            if indexed
            else f"CREATE INDEX CONCURRENTLY USING {spec.method} ({describe_options(spec.options(with_text))}){replacing}",
            "SHARE UPDATE EXCLUSIVE: reads and writes go on",
            build_seconds,
        ),
        Phase(
            "backup",
            f"copy {old_vectors:,} old vectors" if backup else done,
            "ACCESS SHARE: reads and writes go on",
            backup / COPY_BYTES_PER_SECOND,
        ),
        Phase(
            "phase 3",
            done if migrated else "drop the old column, rename the new one and its index",
            "ACCESS EXCLUSIVE, one transaction",
            0.0 if migrated else 0.5,
        ),
    ]
    if not migrated:
        queries = bounded_queries(100, with_text)
        phases.append(
            Phase(
                "checks",
                f"recall ({queries} exact searches), old-vs-new agreement (a 20,000-row sample), self-retrieval",
                "ACCESS SHARE: reads and writes go on",
                queries * with_text / EXACT_COMPARISONS_PER_SECOND + AGREEMENT_CHECK_SECONDS,
            )
        )
    return Plan(
        table=f"{table.schema}.{table.name}",
        model=migration.model,
        dimensions=migration.dimensions,
        rows_total=total,
        rows_with_text=with_text,
        rows_pending=pending,
        vector_type=migration.vector_type,
        index_type=spec.method,
        index_parameters=spec.options(with_text),
        converting_from=source,
        int8=int8.as_dict() if int8 else None,
        encode_texts_per_second=rate,
        encode_device=encoder.device if rate and encoder else None,
        bytes_by_part=bytes_by_part,
        free_bytes=free_bytes(database),
        phases=phases,
    )


def check_room(database: Database, migration: MigrationTarget) -> Plan:
    """Phase 1's guard: the plan, refused where the visible free space cannot hold what it needs."""
    plan = plan_migration(database, migration)
    if migration.disk_check and plan.fits is False:
        parts = ", ".join(f"{name} {_mib(size)}" for name, size in plan.bytes_by_part.items() if size)
        raise MigrationError(
            f"Not enough disk for the migration of {plan.table}: {_mib(plan.bytes_needed)} needed ({parts}), "
            f"{_mib(plan.free_bytes or 0)} free: free some space, set KEEP_OLD_EMBEDDINGS=false to skip the backup, "
            "or DISK_CHECK=false to go ahead anyway"
        )
    return plan
