"""What the tests ask of Dagster and of the database, in the words a user would use."""

from __future__ import annotations

from typing import Any, Optional

import dagster as dg
import numpy as np
import psycopg

from bge_pipeline.core.settings import Settings
from bge_pipeline.defs.definitions import build_definitions

# The definitions as Dagster loads them with the default settings (8 partitions); each test brings its resources.
DEFAULT_DEFINITIONS = build_definitions(Settings.from_mapping({}), from_environment=False)
ALL_ASSETS_AND_CHECKS = [*DEFAULT_DEFINITIONS.assets, *DEFAULT_DEFINITIONS.asset_checks]  # type: ignore[misc]

# Two encodings of one text by a float runtime agree to rounding: bit for bit on torch fp32, but bf16 products
# (what `auto` picks on AMX CPUs) round differently with each pass's shape: cosine >= 0.99998 measured over 2,000
# SOTU segments. Two different texts' vectors are far apart (the closest pair of those 2,000: cosine 0.970), so a
# vector at or above this belongs to its text and one below it does not.
SAME_TEXT_COSINE = 0.9995


def same_text_rows(stored: np.ndarray, expected: np.ndarray) -> np.ndarray:
    """Whether each stored unit vector is its expected one to float runtimes' rounding."""
    return np.sum(stored * expected, axis=1) >= SAME_TEXT_COSINE


def materialize(
    resources: dict[str, Any],
    selection: "str | dg.AssetSelection" = "embeddings*",
    partition_key: Optional[str] = None,
    instance: Optional[dg.DagsterInstance] = None,
    raise_on_error: bool = True,
) -> dg.ExecuteInProcessResult:
    """The in-process equivalent of `dagster asset materialize -m bge_pipeline --select SELECTION`."""
    return dg.materialize(
        ALL_ASSETS_AND_CHECKS,
        selection=selection,
        resources=resources,
        partition_key=partition_key,
        instance=instance,
        raise_on_error=raise_on_error,
    )


def columns(conn: psycopg.Connection, table: str = "segments") -> dict[str, str]:
    """Column name -> declared type, as `\\d segments` shows them."""
    rows = conn.execute(
        "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped",
        (table,),
    ).fetchall()
    return dict(rows)


def indexes(conn: psycopg.Connection, table: str = "segments") -> dict[str, str]:
    return dict(conn.execute("SELECT indexname, indexdef FROM pg_indexes WHERE tablename = %s", (table,)).fetchall())


def vectors(conn: psycopg.Connection, column: str = "embedding", table: str = "segments") -> dict[int, np.ndarray]:
    """id -> vector (NULLs left out)."""
    rows = conn.execute(
        psycopg.sql.SQL("SELECT id, {c}::text FROM {t} WHERE {c} IS NOT NULL").format(
            c=psycopg.sql.Identifier(column), t=psycopg.sql.Identifier(table)
        )
    ).fetchall()
    return {row[0]: np.array([float(x) for x in row[1].strip("[]").split(",")], dtype=np.float32) for row in rows}


def step_error(result: dg.ExecuteInProcessResult) -> str:
    """The failed step's own error message (`Module.Error: text`), not Dagster's wrapper around it."""
    error = next(event for event in result.all_events if event.is_step_failure).event_specific_data.error
    while error.cause is not None:
        error = error.cause
    return error.message


def check_results(result: dg.ExecuteInProcessResult) -> dict[str, bool]:
    return {evaluation.check_name: evaluation.passed for evaluation in result.get_asset_check_evaluations()}


def metadata(result: dg.ExecuteInProcessResult, asset: str) -> dict[str, Any]:
    events = result.asset_materializations_for_node(asset)
    return {key: value.value for key, value in events[-1].metadata.items()}
