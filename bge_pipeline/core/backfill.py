"""Phase 2's engine: read, encode and write batches of NULL rows, overlapped, resumable, retried."""

from __future__ import annotations

import hashlib
import logging
import random
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

import numpy as np
import psycopg
import sqlalchemy.exc

from bge_pipeline.core import sql
from bge_pipeline.core.database import Database, scalar
from bge_pipeline.core.encoder import Encoder, EncoderSource, resolve_encoder
from bge_pipeline.core.sql import Table

T = TypeVar("T")
TRANSIENT_ERRORS = (psycopg.OperationalError, sqlalchemy.exc.OperationalError, sqlalchemy.exc.DisconnectionError)
PROGRESS_LOG_SECONDS = 10.0
MAX_SWEEPS = 3


class BatchFailedError(RuntimeError):
    """A batch still failed after its retries; the message names the batch."""


@dataclass
class Batch:
    number: int
    ids: list[Any]
    texts: list[str]

    @property
    def hashes(self) -> list[str]:
        # md5 of the text's UTF-8 bytes, as the write computes it (convert_to): the write only lands if the text is
        # still the one encoded, whatever the database's encoding (md5(text) hashes the server's own bytes).
        return [hashlib.md5(text.encode("utf-8")).hexdigest() for text in self.texts]

    @property
    def label(self) -> str:
        return f"batch {self.number} (ids {self.ids[0]}..{self.ids[-1]}, {len(self.ids)} rows)"


def write_vectors(
    conn: psycopg.Connection, table: Table, column: str, batch: Batch, vectors: np.ndarray | Sequence[np.ndarray]
) -> int:
    """Write one batch's vectors in one statement; returns the rows written (a row whose text changed is not)."""
    conn.execute(sql.WRITE_BY_ID)
    params = {"ids": batch.ids, "vectors": list(vectors), "hashes": batch.hashes}
    return conn.execute(sql.write_batch(table, column), params).rowcount


@dataclass
class BackfillStats:
    """What one backfill did, in the units a user asks about."""

    rows_pending_before: int = 0
    rows_embedded: int = 0
    rows_skipped_null_text: int = 0
    rows_total: int = 0
    batches: int = 0
    retries: int = 0
    seconds: float = 0.0
    encode_seconds: float = 0.0
    write_seconds: float = 0.0
    texts_encoded: int = 0  # distinct texts: a batch's identical texts are encoded once
    rows_copied: int = 0  # vectors cast from the live column when only VECTOR_TYPE changed
    batch_rows_per_second: list[float] = field(default_factory=list)
    encoder: Optional[Encoder] = None  # None when there was nothing to encode: the model was never loaded

    @property
    def rows_per_second(self) -> float:
        return self.rows_embedded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Backfill:
    """Embeds every row of `buckets` whose text is set and whose `column` is NULL."""

    db: Database
    encoder: EncoderSource
    table: Table
    column: str
    partitions: int
    buckets: Sequence[int]
    batch_rows: int = 1000
    max_retries: int = 3
    retry_base_seconds: float = 1.0
    log: logging.Logger = field(default_factory=lambda: logging.getLogger(__name__))
    on_batch: Optional[Callable[[Batch, BackfillStats], None]] = None
    stats: BackfillStats = field(default_factory=BackfillStats)

    def run(self) -> BackfillStats:
        started = time.perf_counter()
        with self._partition_locks():
            total, _with_text, pending, skipped = self._retrying("counting rows", self._count)
            self.stats.rows_total, self.stats.rows_pending_before = total, pending
            self.stats.rows_skipped_null_text = skipped
            self._progress = _Progress(self.log, pending, started)
            for _sweep in range(MAX_SWEEPS):
                # A second sweep picks up rows that writers added behind the cursor or whose text changed.
                if self._sweep() == 0 or self._retrying("counting rows", self._count)[2] == 0:
                    break
        self.stats.seconds = time.perf_counter() - started
        return self.stats

    def _sweep(self) -> int:
        embedded_before = self.stats.rows_embedded
        with ThreadPoolExecutor(1, "bge-read") as reader, ThreadPoolExecutor(1, "bge-write") as writer:
            next_read = reader.submit(self._read, None, 1)
            pending_write: Optional[Future[_Written]] = None
            while True:
                batch = next_read.result()
                if batch is None:
                    break
                # Overlap: the next batch is read and the last one written while this one encodes.
                next_read = reader.submit(self._read, batch.ids[-1], batch.number + 1)
                if self.stats.encoder is None:
                    self.stats.encoder = resolve_encoder(self.encoder)
                encode_started = time.perf_counter()
                vectors = self.stats.encoder.encode(batch.texts, progress=self._progress.advance)
                self.stats.texts_encoded += len(set(batch.texts))  # what encode() ran the model on
                encode_seconds = time.perf_counter() - encode_started
                self.stats.encode_seconds += encode_seconds
                if pending_write is not None:
                    self._record(pending_write.result())
                pending_write = writer.submit(self._write, batch, vectors, encode_seconds)
            if pending_write is not None:
                self._record(pending_write.result())
        return self.stats.rows_embedded - embedded_before

    def _record(self, written: "_Written") -> None:
        self.stats.write_seconds += written.seconds
        self.stats.rows_embedded += written.rows
        self.stats.batches += 1
        slowest = max(written.encode_seconds, written.seconds, 1e-9)
        self.stats.batch_rows_per_second.append(len(written.batch.ids) / slowest)
        if self.on_batch:
            self.on_batch(written.batch, self.stats)

    def _count(self) -> tuple[int, int, int, int]:
        with self.db.connect() as conn:
            row = conn.execute(sql.count_rows(self.table, self.column, self.partitions, list(self.buckets))).fetchone()
        assert row is not None  # an aggregate returns one row
        total, with_text, pending, skipped = (int(value) for value in row)
        return total, with_text, pending, skipped

    def _read(self, after: Any, number: int) -> Optional[Batch]:
        statement = sql.select_pending_batch(
            self.table, self.column, self.partitions, list(self.buckets), after is not None
        )
        params = {"scope": list(self.buckets), "limit": self.batch_rows, "after": after}

        def read() -> list[tuple[Any, str]]:
            with self.db.connect() as conn:
                return conn.execute(statement, params).fetchall()

        rows = self._retrying(f"reading batch {number}", read)
        if not rows:
            return None
        return Batch(number, [row[0] for row in rows], [row[1] for row in rows])

    def _write(self, batch: Batch, vectors: np.ndarray, encode_seconds: float) -> "_Written":
        started = time.perf_counter()

        def write() -> int:
            with self.db.connect() as conn:
                return write_vectors(conn, self.table, self.column, batch, vectors)

        rows = self._retrying(f"writing {batch.label}", write)
        return _Written(batch, rows, time.perf_counter() - started, encode_seconds)

    def _retrying(self, what: str, action: Callable[[], T]) -> T:
        for attempt in range(self.max_retries + 1):
            try:
                return action()
            except TRANSIENT_ERRORS as error:
                if attempt == self.max_retries:
                    raise BatchFailedError(
                        f"{what} failed after {self.max_retries} retries: {type(error).__name__}: "
                        f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}"
                    ) from error
                delay = self.retry_base_seconds * 2**attempt * (1 + random.random() / 4)
                self.stats.retries += 1
                self.log.warning(f"{what} failed ({type(error).__name__}); retry {attempt + 1} in {delay:.1f}s")
                time.sleep(delay)
        raise AssertionError("unreachable")

    @contextmanager
    def _partition_locks(self) -> Iterator[None]:
        """Session advisory locks, one per bucket, taken in ascending order so two runs never deadlock; a run on
        a bucket that another run holds waits, then finds nothing left to do."""
        with self.db.connect(autocommit=True) as conn:
            for bucket in sorted(self.buckets):
                if not scalar(conn, sql.ADVISORY_TRY_LOCK, (self.table.lock_key, bucket)):
                    self.log.info(f"Partition {bucket} is being backfilled by another run: waiting for it")
                    conn.execute(sql.ADVISORY_LOCK, (self.table.lock_key, bucket))
            try:
                yield
            finally:
                try:
                    for bucket in self.buckets:
                        conn.execute(sql.ADVISORY_UNLOCK, (self.table.lock_key, bucket))
                except psycopg.Error:
                    pass  # the session is gone (server restart): its locks went with it


@dataclass
class _Written:
    batch: Batch
    rows: int
    seconds: float
    encode_seconds: float


class _Progress:
    """Logs rows done / total, rate and ETA at most every PROGRESS_LOG_SECONDS, from inside a batch too."""

    def __init__(self, log: logging.Logger, total: int, started: float) -> None:
        self.log, self.total, self.started = log, total, started
        self.done = 0
        self.last_logged = started

    def advance(self, rows: int) -> None:
        self.done += rows
        now = time.perf_counter()
        if now - self.last_logged >= PROGRESS_LOG_SECONDS:
            self.last_logged = now
            rate = self.done / max(now - self.started, 1e-9)
            remaining = max(self.total - self.done, 0)
            eta = remaining / rate if rate > 0 else float("inf")
            self.log.info(f"Encoded {self.done:,} / {self.total:,} rows, {rate:,.0f} rows/s, ETA {eta:,.0f}s")
