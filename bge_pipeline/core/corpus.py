"""The public-domain State of the Union segments shipped with the package, and the seed's `segments` table."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Optional

import numpy as np
import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

SAMPLE = "sotu_sample.jsonl.gz"
# The 40,743-segment corpus, where this checkout sits beside the project's shared folder (benchmarks, tests).
SHARED_CORPUS = Path(__file__).resolve().parents[3] / "shared" / "data" / "sotu_segments.jsonl"
OLD_DIMENSIONS = 1536


@dataclass(frozen=True)
class Segment:
    """One row of a corpus: only `text` is required of a file; the SOTU corpus carries the rest."""

    id: int
    text: str
    source: str = ""
    year: Optional[int] = None
    speaker: str = ""


def load_segments(path: Optional[Path] = None, limit: Optional[int] = None) -> list[Segment]:
    """Segments from a JSONL file (plain or gzip), by default the 1,000-segment sample in the package."""
    if path is None:
        handle = gzip.open(resources.files("bge_pipeline.data").joinpath(SAMPLE).open("rb"), "rt", encoding="utf-8")
    elif str(path).endswith(".gz"):
        handle = gzip.open(path, "rt", encoding="utf-8")
    else:
        handle = open(path, encoding="utf-8")
    segments: list[Segment] = []
    with handle:
        for number, line in enumerate(handle, start=1):
            if limit is not None and len(segments) >= limit:
                break
            if not line.strip():
                continue
            row = json.loads(line)
            if not isinstance(row.get("text"), str):
                raise ValueError(f"{path or SAMPLE} line {number}: every row needs a `text` string")
            segments.append(
                Segment(
                    id=row.get("id", number),  # the line number where a file has no ids
                    text=row["text"],
                    source=row.get("source", ""),
                    year=row.get("year"),
                    speaker=row.get("speaker", ""),
                )
            )
    return segments


def old_model_vectors(count: int, dimensions: int = OLD_DIMENSIONS, chunk_rows: int = 10_000) -> Iterator[np.ndarray]:
    """Stand-ins for the guide's GTE-Qwen2-1.5B vectors (which no package here ships): seeded random unit vectors,
    made a chunk at a time (a million 1536-dim vectors are 6 GB at once)."""
    rng = np.random.default_rng(1536)
    for start in range(0, count, chunk_rows):
        vectors = rng.standard_normal((min(chunk_rows, count - start), dimensions)).astype(np.float32)
        yield vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def create_seed_table(
    conn: psycopg.Connection,
    segments: list[Segment],
    table: str = "segments",
    schema: str = "public",
    old_dimensions: int = OLD_DIMENSIONS,
    old_index: bool = True,
) -> None:
    """The guide's starting point: `segments` with `embedding vector(1536)` and its IVFFLAT (vector_l2_ops) index."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    register_vector(conn)
    ident = sql.Identifier(schema, table)
    conn.execute(sql.SQL("DROP TABLE IF EXISTS {t} CASCADE").format(t=ident))
    conn.execute(
        sql.SQL(
            """
            CREATE TABLE {t} (
                id bigint PRIMARY KEY, source text, year integer, speaker text, text text,
                embedding vector({d})
            )
            """
        ).format(t=ident, d=sql.Literal(old_dimensions))
    )
    # Binary COPY: formatting 1,536 floats a row as text would be most of the seeding's time.
    statement = sql.SQL("COPY {t} (id, source, year, speaker, text, embedding) FROM STDIN (FORMAT BINARY)")
    with conn.cursor().copy(statement.format(t=ident)) as copy:
        copy.set_types(["bigint", "text", "integer", "text", "text", "vector"])
        rows = iter(segments)
        for vectors in old_model_vectors(len(segments), old_dimensions):
            for vector, segment in zip(vectors, rows):  # vectors first: zip stops there without taking a row
                copy.write_row((segment.id, segment.source, segment.year, segment.speaker, segment.text, vector))
    if old_index:
        # 100 lists of 1536-dim centres outgrow the default 64 MB past ~20k rows: more, for this transaction only.
        with conn.transaction():
            conn.execute("SET LOCAL maintenance_work_mem = '1GB'")
            conn.execute(
                sql.SQL("CREATE INDEX {i} ON {t} USING ivfflat (embedding vector_l2_ops) WITH (lists = 100)").format(
                    i=sql.Identifier(f"idx_{table}_text_embedding_ivfflat"), t=ident
                )
            )
