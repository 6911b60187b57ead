"""The guide's verification, as figures: column type, populated/missing counts, the model and the index."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

from bge_pipeline.core import sql
from bge_pipeline.core.database import Database
from bge_pipeline.core.migration import MigrationTarget


@dataclass
class Verification:
    column: str
    data_type: Optional[str]
    declared_type: Optional[str]
    recorded_model: Optional[str]
    total: int
    populated: int
    missing: int
    staging_column_left: bool
    index: Optional[str]
    index_operator_class: Optional[str]
    index_lists: Optional[int]

    @property
    def complete(self) -> bool:
        return (
            self.missing == 0
            and not self.staging_column_left
            and self.declared_type is not None
            and self.index_operator_class == sql.INDEX_OPCLASS
        )

    def as_dict(self) -> dict:
        return {**asdict(self), "complete": self.complete}

    def lines(self) -> list[str]:
        return [
            f"column          {self.column} | {self.data_type} ({self.declared_type})",
            f"model           {self.recorded_model}",
            f"rows with text  total={self.total:,} populated={self.populated:,} missing={self.missing:,}",
            f"staging column  {'still present' if self.staging_column_left else 'gone (swapped)'}",
            f"index           {self.index} ({self.index_operator_class}, lists={self.index_lists})",
            f"migration       {'complete' if self.complete else 'NOT complete'}",
        ]


def verify(db: Database, migration: MigrationTarget) -> Verification:
    """Run the guide's verification queries against the live column."""
    with db.connect() as conn:
        state = migration.read_state(conn)
        table = state.table
        live = table.live_column
        column_row = conn.execute(sql.VERIFY_COLUMN, (table.schema, table.name, live)).fetchone()
        if column_row:
            total, populated, missing = conn.execute(sql.verify_counts(table, live)).fetchone()
        else:
            with_text = conn.execute(sql.count_rows(table, table.text_column)).fetchone()[1]
            total, populated, missing = with_text, 0, with_text
    recorded = state.models.get(live)
    index = state.index(table.index_name(live))
    column = state.columns.get(live)
    return Verification(
        column=live,
        data_type=column_row[1] if column_row else None,
        declared_type=column.type if column else None,
        recorded_model=recorded.model if recorded else None,
        total=total,
        populated=populated,
        missing=missing,
        staging_column_left=state.has(table.staging_column),
        index=index.name if index else None,
        index_operator_class=index.opclass if index else None,
        index_lists=index.lists if index else None,
    )
