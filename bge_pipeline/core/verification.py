"""The guide's verification, as figures: which phase the table is in, with the facts that matter in that phase."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Optional

from bge_pipeline.core import sql
from bge_pipeline.core.catalog import Index, MigrationError, TableState
from bge_pipeline.core.database import Database
from bge_pipeline.core.migration import MigrationTarget

NOT_STARTED = "not started"
BACKFILLING = "phase 2: backfilling"
READY_TO_SWAP = "phase 2 done: ready to swap"
SWAPPED = "phase 3 done: swapped"
OTHER_MODEL = "staging column of another model"


@dataclass
class ColumnFacts:
    """One vector column as the guide's queries see it."""

    column: str
    declared_type: Optional[str]
    recorded_model: Optional[str]
    rows_with_text: int
    populated: int
    missing: int
    index: Optional[str]
    index_method: Optional[str]
    index_operator_class: Optional[str]
    index_lists: Optional[int]
    index_parameters: list[str] = field(default_factory=list)

    def lines(self, label: str) -> list[str]:
        index = (
            f"{self.index} ({', '.join([str(self.index_method), str(self.index_operator_class), *self.index_parameters])})"
            if self.index
            else "none"
        )
        return [
            f"{label:<15} {self.column} {self.declared_type or '(missing)'}, model {self.recorded_model or 'not recorded'}",
            f"{'':<15} rows with text {self.rows_with_text:,}: populated {self.populated:,}, missing {self.missing:,}",
            f"{'':<15} index {index}",
        ]


@dataclass
class Verification:
    phase: str
    model: str
    live: Optional[ColumnFacts]
    staging: Optional[ColumnFacts]

    @property
    def complete(self) -> bool:
        live = self.live
        return (
            self.phase == SWAPPED
            and live is not None
            and live.missing == 0
            and live.index_operator_class in sql.COSINE_OPCLASSES
        )

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "complete": self.complete}

    def lines(self) -> list[str]:
        lines = [f"phase           {self.phase} (EMBEDDING_MODEL={self.model})"]
        if self.live:
            lines += self.live.lines("live column")
        if self.staging:
            lines += self.staging.lines("staging column")
        return [*lines, f"migration       {'complete' if self.complete else 'NOT complete'}"]


def _facts(conn: Any, state: TableState, column: str, index_type: str) -> Optional[ColumnFacts]:
    table = state.table
    found = state.columns.get(column)
    if found is None:
        return None
    with_text, populated, missing = conn.execute(sql.verify_counts(table, column)).fetchone()
    recorded = state.models.get(column)
    index: Optional[Index] = state.search_index(column, index_type) or next(iter(state.indexes_on(column)), None)
    return ColumnFacts(
        column=column,
        declared_type=found.type,
        recorded_model=recorded.model if recorded else None,
        rows_with_text=with_text,
        populated=populated,
        missing=missing,
        index=index.name if index else None,
        index_method=index.method if index else None,
        index_operator_class=index.opclass if index else None,
        index_lists=index.lists if index else None,
        index_parameters=list(index.options) if index else [],
    )


def verify(db: Database, migration: MigrationTarget) -> Verification:
    """Run the guide's verification queries on the live column, and on the staging column while there is one."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        table = state.table
        live = _facts(conn, state, table.live_column, migration.index_type)
        staging = _facts(conn, state, table.staging_column, migration.index_type)
        try:
            column = migration.writable_column(state)
        except MigrationError:
            return Verification(OTHER_MODEL, migration.model, live, staging)
    if column is None:
        phase = NOT_STARTED
    elif column == table.live_column:
        phase = SWAPPED
    elif staging is not None and staging.missing == 0:
        phase = READY_TO_SWAP
    else:
        phase = BACKFILLING
    return Verification(phase, migration.model, live, staging)
