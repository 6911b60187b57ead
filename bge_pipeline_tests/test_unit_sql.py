"""Unit tier: SQL composition, identifier names, the IVFFLAT lists formula and connection strings; no database."""

from __future__ import annotations

import re
from typing import Callable

import pytest
from psycopg import sql as pgsql

from bge_pipeline.core import sql
from bge_pipeline.core.backup import _quoted, libpq_environment
from bge_pipeline.core.database import redact, sqlalchemy_url
from bge_pipeline.core.migration import MigrationTarget, ivfflat_lists
from bge_pipeline.core.settings import Settings
from bge_pipeline.core.sql import Table

pytestmark = pytest.mark.unit

HOSTILE = 'a"; DROP TABLE x; --'
QUOTED_HOSTILE = '"a""; DROP TABLE x; --"'
# A double-quoted identifier (with "" as an escaped quote) or a single-quoted literal (with '' escaped).
QUOTED_PART = re.compile(r'"(?:[^"]|"")*"' + r"|'(?:[^']|'')*'")


def table(name: str = "segments", schema: str = "public", **columns: str) -> Table:
    return Table(
        schema=schema,
        name=name,
        id_column=columns.get("id_column", "id"),
        text_column=columns.get("text_column", "text"),
        live_column=columns.get("live_column", "embedding"),
        staging_column=columns.get("staging_column", "embedding_384"),
        id_type=columns.get("id_type", "bigint"),
    )


def render(statement: pgsql.Composable) -> str:
    return statement.as_string(None)


def size(name: str) -> int:
    return len(name.encode())


# --- identifiers PostgreSQL would truncate ----------------------------------------------------------------


def test_short_names_are_kept_whole() -> None:
    t = table()
    assert t.index_name("embedding_384") == "segments_embedding_384_ivfflat_idx"
    assert t.backup_table(1536) == "segments_embedding_backup_1536"


def test_name_of_exactly_63_bytes_is_kept_and_64_is_hashed() -> None:
    suffix = "_embedding_ivfflat_idx"
    fits = table("t" * (63 - len(suffix)))
    assert fits.index_name("embedding") == fits.name + suffix
    over = table("t" * (64 - len(suffix)))
    hashed = over.index_name("embedding")
    assert hashed != over.name + suffix
    assert size(hashed) <= 63


def test_long_index_names_differing_only_at_the_end_stay_distinct() -> None:
    # Plain truncation to 63 bytes made these equal, and the swap's index rename then failed.
    t = table("a_very_long_embeddings_table_name_that_fills_most_of_the_limit")
    live, staging = t.index_name("embedding"), t.index_name("embedding_384")
    assert live != staging
    assert size(live) <= 63 and size(staging) <= 63
    assert t.index_name("embedding") == live  # stable: the same name every time, across runs


def test_long_backup_names_differing_only_in_dimensions_stay_distinct() -> None:
    t = table("b" * 60)
    names = {t.backup_table(dimensions) for dimensions in (384, 768, 1024, 1536)}
    assert len(names) == 4
    assert all(size(name) <= 63 for name in names)


def test_hashed_names_of_multibyte_table_names_stay_valid_and_short() -> None:
    for name in ("é" * 31, "x" + "é" * 31, "表" * 21):
        t = table(name)
        for made in (t.index_name("embedding_384"), t.backup_table(1536)):
            assert size(made) <= 63
            assert made.encode().decode() == made
            assert "\ufffd" not in made


def test_bucket_expr_hashes_integer_ids_as_bigint() -> None:
    for id_type in ("smallint", "integer", "bigint"):
        rendered = render(table(id_type=id_type).bucket_expr(8))
        assert rendered == 'mod(mod(hashint8extended("id"::bigint, 0), 8) + 8, 8)'


def test_bucket_expr_hashes_other_ids_as_text() -> None:
    rendered = render(table(id_type="uuid", id_column="Doc Id").bucket_expr(16))
    assert rendered == 'mod(mod(hashtextextended("Doc Id"::text, 0), 16) + 16, 16)'


def test_lock_key_names_schema_and_table() -> None:
    assert table("segments", schema="app").lock_key == "bge_pipeline:app.segments"


# --- every composed statement quotes what settings name -----------------------------------------------------

STATEMENTS: dict[str, Callable[[Table, str], pgsql.Composable]] = {
    "add_vector_column": lambda t, c: sql.add_vector_column(t, c, 384, "halfvec"),
    "comment_column": lambda t, c: sql.comment_column(t, c, "model x"),
    "drop_column": sql.drop_column,
    "clear_column": sql.clear_column,
    "count_rows": lambda t, c: sql.count_rows(t, c, 8, [1, 2]),
    "count_pending": sql.count_pending,
    "select_pending_batch": lambda t, c: sql.select_pending_batch(t, c, 8, [0], after=True),
    "write_batch": sql.write_batch,
    "count_wrong_dimensions": sql.count_wrong_dimensions,
    "count_vectors": sql.count_vectors,
    "create_index": lambda t, c: sql.create_index(t, c, t.index_name(c), "ivfflat", "vector", {"lists": 100}),
    "create_hnsw_index": lambda t, c: sql.create_index(t, c, t.index_name(c, "hnsw"), "hnsw", "halfvec", {"m": 8}),
    "copy_by_cast": lambda t, c: sql.copy_by_cast(t, t.live_column, c, "halfvec", 8),
    "drop_index": lambda t, c: sql.drop_index(t, t.index_name(c)),
    "lock_table": lambda t, c: sql.lock_table(t),
    "rename_column": lambda t, c: sql.rename_column(t, c, t.live_column),
    "rename_index": lambda t, c: sql.rename_index(t, t.index_name(c), t.index_name(t.live_column)),
    "create_backup_table": lambda t, c: sql.create_backup_table(t, t.backup_table(1536), c),
    "restore_from_backup": lambda t, c: sql.restore_from_backup(t, t.backup_table(1536), c, c),
    "analyze": lambda t, c: sql.analyze(t),
    "nearest_neighbours": lambda t, c: sql.nearest_neighbours(t, c, "halfvec"),
    "ann_candidates": lambda t, c: sql.ann_candidates(t, c, "vector"),
    "sample_rows": sql.sample_rows,
    "rows_present": sql.rows_present,
    "sample_vectors": sql.sample_vectors,
    "verify_counts": sql.verify_counts,
    "vectors_by_id": lambda t, c: sql.vectors_by_id(t.schema, t.name, t.id_column, c),
    "count_table": lambda t, c: sql.count_table(t.schema, t.name),
    "drop_table": lambda t, c: sql.drop_table(t.schema, t.name),
    "create_stale_vector_trigger": lambda t, c: pgsql.SQL("; ").join(sql.create_stale_vector_trigger(t, [c])),
    "drop_stale_vector_trigger": lambda t, c: pgsql.SQL("; ").join(sql.drop_stale_vector_trigger(t)),
}


@pytest.mark.parametrize("name", sorted(STATEMENTS))
def test_statement_quotes_hostile_identifiers(name: str) -> None:
    hostile = Table(
        schema=HOSTILE,
        name=HOSTILE,
        id_column=HOSTILE + "id",
        text_column=HOSTILE + "text",
        live_column=HOSTILE + "live",
        staging_column=HOSTILE,
    )
    rendered = render(STATEMENTS[name](hostile, HOSTILE))
    assert "DROP TABLE x" in rendered  # the name is there...
    outside_quotes = QUOTED_PART.sub("<quoted>", rendered)
    assert "DROP TABLE x" not in outside_quotes  # ...but only ever inside quotes
    assert '"a"";' in rendered  # the quote inside the name is doubled, not left to end the identifier


def test_hostile_table_renders_as_one_schema_qualified_identifier() -> None:
    hostile = table(HOSTILE, schema=HOSTILE)
    assert render(sql.lock_table(hostile)) == f"LOCK TABLE {QUOTED_HOSTILE}.{QUOTED_HOSTILE} IN ACCESS EXCLUSIVE MODE"


def test_column_comment_is_a_quoted_literal() -> None:
    rendered = render(sql.comment_column(table(), "embedding_384", "it's'; DROP TABLE x; --"))
    assert rendered == """COMMENT ON COLUMN "public"."segments"."embedding_384" IS 'it''s''; DROP TABLE x; --'"""


def test_ivfflat_index_uses_the_cosine_operator_class() -> None:
    t = table()
    rendered = render(
        sql.create_index(t, "embedding_384", t.index_name("embedding_384"), "ivfflat", "vector", {"lists": 250})
    )
    assert 'USING ivfflat ("embedding_384" vector_cosine_ops) WITH ("lists" = 250)' in rendered
    assert rendered.startswith("CREATE INDEX CONCURRENTLY IF NOT EXISTS")


def test_hnsw_halfvec_index_uses_halfvec_cosine_ops_and_only_the_parameters_given() -> None:
    t = table()
    name = t.index_name("embedding_384", "hnsw")
    assert name == "segments_embedding_384_hnsw_idx"
    rendered = render(sql.create_index(t, "embedding_384", name, "hnsw", "halfvec", {"m": 24, "ef_construction": 100}))
    assert 'USING hnsw ("embedding_384" halfvec_cosine_ops) WITH ("m" = 24, "ef_construction" = 100)' in rendered
    defaults = render(sql.create_index(t, "embedding_384", name, "hnsw", "halfvec", {}))
    assert defaults.endswith("halfvec_cosine_ops)")  # no WITH (): pgvector's own defaults


@pytest.mark.parametrize(
    ("method", "vector_type"), [("diskann", "vector"), ("hnsw", "sparsevec"), ("hnsw", "x); DROP")]
)
def test_unknown_index_methods_and_vector_types_are_never_composed(method: str, vector_type: str) -> None:
    t = table()
    with pytest.raises(ValueError, match="INDEX_TYPE|VECTOR_TYPE"):
        sql.create_index(t, "embedding_384", "i", method, vector_type, {})


def test_search_casts_the_query_to_the_columns_type() -> None:
    rendered = render(sql.nearest_neighbours(table(), "embedding", "halfvec"))
    assert rendered.count("::halfvec") == 2 and "::vector" not in rendered


# --- the guide's IVFFLAT lists formula ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rows", "lists"),
    [(0, 100), (5000, 100), (10_000, 100), (250_000, 500), (999_999, 999), (2_000_000, 1000)],
)
def test_ivfflat_lists_follows_the_guides_formula(rows: int, lists: int) -> None:
    assert ivfflat_lists(rows) == lists == min(1000, max(100, int(rows**0.5)))


@pytest.mark.parametrize("rows", [0, 250_000, 2_000_000])
def test_ivfflat_lists_override_wins(rows: int) -> None:
    assert ivfflat_lists(rows, 37) == 37
    assert ivfflat_lists(rows, 4000) == 4000


def test_migration_target_carries_the_settings() -> None:
    settings = Settings.from_mapping(
        {"EMBEDDING_TABLE": "docs", "EMBEDDING_COLUMN": "vec", "EMBEDDING_DIMENSIONS": "768", "IVFFLAT_LISTS": "42"}
    )
    target = MigrationTarget.from_settings(settings)
    assert (target.table, target.embedding_column, target.dimensions) == ("docs", "vec", 768)
    assert target.staging_column == settings.staging_column == "vec_768"
    assert target.ivfflat_lists == 42


# --- connection strings: secrets stay out of logs and command lines -----------------------------------------


def test_redact_hides_the_password() -> None:
    redacted = redact("postgresql+psycopg://app:s3cret@db.example:5432/prod")
    assert "s3cret" not in redacted
    assert "app" in redacted and "db.example" in redacted and "prod" in redacted


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg2://u@h/db", "postgresql+psycopg2://u@h/db"),
    ],
)
def test_sqlalchemy_url_names_psycopg3_for_bare_urls(url: str, expected: str) -> None:
    assert sqlalchemy_url(url) == expected


def test_libpq_environment_carries_the_password_for_pg_dump() -> None:
    env = libpq_environment("postgresql+psycopg://app:s3cret@db.example:6543/prod")
    assert env == {
        "PGHOST": "db.example",
        "PGPORT": "6543",
        "PGUSER": "app",
        "PGDATABASE": "prod",
        "PGPASSWORD": "s3cret",
    }


def test_libpq_environment_reads_a_unix_socket_host() -> None:
    env = libpq_environment("postgresql://postgres:@/postgres?host=/tmp/pg-socket")
    assert env["PGHOST"] == "/tmp/pg-socket"
    assert "PGPASSWORD" not in env  # empty values are left out, not set to ""


def test_pg_dump_table_argument_is_quoted() -> None:
    assert _quoted(HOSTILE) == QUOTED_HOSTILE
    assert _quoted("Segments") == '"Segments"'
