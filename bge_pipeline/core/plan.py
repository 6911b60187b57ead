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
from bge_pipeline.core.migration import MigrationTarget, ivfflat_lists
from bge_pipeline.core.quality import bounded_queries

# Rows written a second by one backfill writer, 384-dim vectors into a table that keeps the guide's old IVFFLAT
# index (each UPDATE also inserts into it): 12,639 measured, rounded down.
WRITE_ROWS_PER_SECOND = 12_000
# IVFFLAT build seconds per row x dimension x list: 100,000 x 384 with 316 lists took 4.9 s (maintenance_work_mem 1GB).
INDEX_SECONDS_PER_ROW_DIMENSION_LIST = 4.9 / (100_000 * 384 * 316)
# Copying the old vectors into the backup table (CREATE TABLE AS): sequential read and write.
COPY_BYTES_PER_SECOND = 200 * 2**20
VECTOR_HEADER_BYTES = 8  # pgvector's vector: 4-byte varlena header, 2-byte dimension count, 2 unused
TUPLE_OVERHEAD_BYTES = 32  # heap tuple header and line pointer, for the backup table's rows
SAMPLE_TEXTS = 64
# The quality checks: exact-search comparisons a second (384 dims; index_recall's 100 queries over 20,000 rows took
# 4 s) and the agreement check's fixed cost (its 20,000-row sample read and searched: 11.6 s).
EXACT_COMPARISONS_PER_SECOND = 500_000
AGREEMENT_CHECK_SECONDS = 12.0


def vector_bytes(dimensions: int) -> int:
    return 4 * dimensions + VECTOR_HEADER_BYTES


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
    ivfflat_lists: int
    encode_texts_per_second: Optional[float]
    encode_device: Optional[str]
    bytes_by_part: dict[str, int]
    free_bytes: Optional[int]
    phases: list[Phase] = field(default_factory=list)

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
            f"model           {self.model} ({self.dimensions} dims), encoder {rate}",
            f"index           IVFFLAT vector_cosine_ops, lists={self.ivfflat_lists}",
        ]
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
        heap_bytes, index_bytes = conn.execute(sql.TABLE_SIZES, (table.schema, table.name)).fetchone() or (0, 0)
        migrated = column == table.live_column
        indexed = any(index.serves(column) for index in state.indexes_on(column))
        texts = [row[0] for row in conn.execute(sql.sample_texts(table), (SAMPLE_TEXTS,)).fetchall()]
    rate = measure_encoder(encoder, texts) if encoder is not None and texts and pending else None
    lists = ivfflat_lists(with_text, migration.ivfflat_lists)
    new_vectors = pending * vector_bytes(migration.dimensions)
    share = pending / max(total, 1)
    backup = (
        old_vectors * (vector_bytes(old_dimensions) + TUPLE_OVERHEAD_BYTES)
        if old_dimensions and migration.keep_old_embeddings
        else 0
    )
    bytes_by_part = {
        "new column": new_vectors,
        # Every UPDATE leaves the old row version until VACUUM and adds entries to every index on the table.
        "row versions": int(heap_bytes * share),
        "index entries": int(index_bytes * share),
        "new index": 0 if indexed else int((with_text * 1.1 + lists) * vector_bytes(migration.dimensions)),
        "backup": backup,
    }
    bytes_by_part["WAL headroom"] = int((bytes_by_part["new column"] + bytes_by_part["new index"] + backup) * 0.5)
    backfill_seconds = pending / min(rate or WRITE_ROWS_PER_SECOND, WRITE_ROWS_PER_SECOND) if pending else 0.0
    index_seconds = 0.0 if indexed else with_text * migration.dimensions * lists * INDEX_SECONDS_PER_ROW_DIMENSION_LIST
    done = "nothing: done"
    phases = [
        Phase(
            "phase 1",
            done if exists else f"add {column} vector({migration.dimensions})",
            "ACCESS EXCLUSIVE for milliseconds",
            0.0 if exists else 0.1,
        ),
        Phase(
            "phase 2",
            f"embed {pending:,} rows in batches of {migration.batch_rows:,}",
            "ROW EXCLUSIVE: only the rows of each batch, one commit a batch",
            backfill_seconds,
        ),
        Phase(
            "index",
            done if indexed else f"CREATE INDEX CONCURRENTLY, lists={lists}",
            "SHARE UPDATE EXCLUSIVE: reads and writes go on",
            index_seconds,
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
        ivfflat_lists=lists,
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
