"""Hostile input: texts of every kind PostgreSQL accepts, odd tables, and configuration that must be refused."""

from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bge_pipeline.core.catalog import MigrationError
from bge_pipeline.core.encoder import DimensionMismatchError, ModelLoadError
from bge_pipeline.core.settings import SettingsError
from bge_pipeline_tests.faultkit import (
    DIMENSIONS,
    assert_vectors_match_texts,
    column_types,
    indexes,
    migrate,
    plain,
    read_rows,
    settings_for,
    snapshot,
)

pytestmark = pytest.mark.pgvector

HOSTILE_TEXTS: dict[int, Optional[str]] = {
    1: None,
    2: "",
    3: "   \t\n  ",
    4: "\u200b\u200b",  # zero-width spaces only
    5: "lorem ipsum dolor sit amet " * 3704,  # 100,000 characters
    6: "".join(chr(code) for code in range(1, 32)) + "\x7f\u0080\u009f\ufffd\ufeff\uffff",  # control and binary-looking
    7: "\\x00\\xff\\xde\\xad\\xbe\\xef %s %(x)s {} $1 $$ '' \"\" ; -- /* */",  # escapes and placeholders, as text
    8: "'); DROP TABLE segments; --",
    9: "中华人民共和国宪法。日本国憲法。대한민국 헌법",  # CJK
    10: "مرحبا بالعالم، هذا نص عربي",  # Arabic, right to left
    11: "שלום עולם",  # Hebrew
    12: "नमस्ते दुनिया",  # Devanagari, combining vowel signs
    13: "e\u0301e\u0302e\u0303 Z\u0351\u0352\u0353a\u0354\u0355l\u0356g\u0357o\u0358",  # combining marks, zalgo
    14: "👩\u200d👩\u200d👧\u200d👦 🇫🇷 🏳️\u200d🌈 👍🏽",  # emoji with ZWJ, flags, skin tones
    15: "Ελληνικά και русский текст и ภาษาไทย",  # Greek, Cyrillic, Thai
    16: "\U0001d54f\U0001d552\U0001d55d\U0001d556 \U00010348 \U0001f600",  # astral plane
    17: "Plain English: the State of the Union is strong.",
}


def make_table(
    conn: psycopg.Connection,
    rows: dict[Any, Optional[str]],
    table: str = "segments",
    id_column: str = "id",
    text_column: str = "text",
    old_column: Optional[str] = "embedding",
    old_dimensions: int = 8,
) -> None:
    """A table in the guide's shape, with any names; old vectors are seeded random stand-ins."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    old = (
        sql.SQL(", {c} vector({d})").format(c=sql.Identifier(old_column), d=sql.Literal(old_dimensions))
        if old_column
        else sql.SQL("")
    )
    conn.execute(
        sql.SQL("CREATE TABLE {t} ({i} bigint PRIMARY KEY, {x} text {old})").format(
            t=sql.Identifier(table), i=sql.Identifier(id_column), x=sql.Identifier(text_column), old=old
        )
    )
    rng = np.random.default_rng(7)
    for key, text in rows.items():
        if old_column:
            vector = "[" + ",".join(f"{v:.4f}" for v in rng.standard_normal(old_dimensions)) + "]"
            conn.execute(
                sql.SQL("INSERT INTO {t} VALUES (%s, %s, %s::vector)").format(t=sql.Identifier(table)),
                (key, text, vector),
            )
        else:
            conn.execute(sql.SQL("INSERT INTO {t} VALUES (%s, %s)").format(t=sql.Identifier(table)), (key, text))


def assert_one_line(error: BaseException, *fragments: str) -> str:
    message = str(error)
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def test_postgres_refuses_nul_bytes_and_invalid_utf8_before_the_pipeline_sees_them(
    connect: Callable[[], psycopg.Connection],
) -> None:
    with connect() as conn:
        conn.execute("CREATE TABLE segments (id bigint PRIMARY KEY, text text)")
        with pytest.raises(psycopg.DataError, match="NUL"):
            conn.execute("INSERT INTO segments VALUES (1, %s)", ("a\x00b",))  # psycopg refuses it client-side
        with pytest.raises(UnicodeEncodeError, match="surrogates not allowed"):
            conn.execute("INSERT INTO segments VALUES (2, %s)", ("lone \ud800 surrogate",))
        # The same bytes sent past the client: the server refuses them too.
        for payload in ("\\x610062", "\\xff", "\\xeda080", "\\xc3"):  # NUL, invalid byte, UTF-16 surrogate, truncated
            with pytest.raises(psycopg.errors.CharacterNotInRepertoire):
                conn.execute("INSERT INTO segments SELECT 3, convert_from(%s::bytea, 'UTF8')", (payload,))
        with pytest.raises(psycopg.errors.ProgramLimitExceeded):
            conn.execute("INSERT INTO segments VALUES (4, chr(0))")
        with pytest.raises(psycopg.errors.SyntaxError, match="surrogate"):
            conn.execute("INSERT INTO segments VALUES (5, U&'\\D800')")
        assert conn.execute("SELECT count(*) FROM segments").fetchone()[0] == 0


def test_every_text_postgres_accepts_is_embedded(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    """NULL is skipped; empty, blank, 100,000-character, control-character and every-script texts get the vector
    of exactly their text."""
    with connect() as conn:
        make_table(conn, HOSTILE_TEXTS)
        stored = dict(conn.execute("SELECT id, text FROM segments").fetchall())
    assert stored == HOSTILE_TEXTS, "the texts did not survive the round trip unchanged"
    result = migrate(settings_for(plain(database_url), minilm_path, BACKFILL_BATCH_ROWS=5))
    assert result.success
    metadata = result.asset_materializations_for_node("embeddings")[0].metadata
    assert metadata["rows_skipped_null_text"].value == 1
    with connect() as conn:
        rows = read_rows(conn)
        assert column_types(conn, "segments")["embedding"] == f"vector({DIMENSIONS})"
    assert {key: text for key, (text, _) in rows.items()} == HOSTILE_TEXTS
    assert assert_vectors_match_texts(minilm_path, rows) == len(HOSTILE_TEXTS) - 1
    for key, (_, vector) in rows.items():
        if vector is not None:
            assert np.isfinite(vector).all() and abs(float(np.linalg.norm(vector)) - 1.0) < 1e-4, key


def test_empty_table_migrates(database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str) -> None:
    with connect() as conn:
        make_table(conn, {})
    result = migrate(settings_for(plain(database_url), minilm_path))
    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    with connect() as conn:
        assert column_types(conn, "segments") == {"id": "bigint", "text": "text", "embedding": f"vector({DIMENSIONS})"}
        assert ("segments_embedding_ivfflat_idx", "ivfflat", "vector_cosine_ops", True) in indexes(conn, "segments")


def test_table_without_old_column_migrates(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    texts = {i: f"segment number {i}" for i in range(1, 21)}
    with connect() as conn:
        make_table(conn, texts, old_column=None)
    result = migrate(settings_for(plain(database_url), minilm_path))
    assert result.success
    with connect() as conn:
        assert column_types(conn, "segments") == {"id": "bigint", "text": "text", "embedding": f"vector({DIMENSIONS})"}
        assert assert_vectors_match_texts(minilm_path, read_rows(conn)) == 20


def test_rerun_on_a_migrated_table_changes_nothing(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    with connect() as conn:
        make_table(conn, {i: f"text {i}" for i in range(1, 21)})
    settings = settings_for(plain(database_url), minilm_path)
    assert migrate(settings).success
    with connect() as conn:
        before = snapshot(conn)
    result = migrate(settings)
    assert result.success
    assert not result.asset_materializations_for_node("live_embedding_column")  # nothing to swap
    assert result.asset_materializations_for_node("embeddings")[0].metadata["rows_embedded"].value == 0
    with connect() as conn:
        assert snapshot(conn) == before


def test_refusals_leave_the_database_unchanged(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    """Each bad setting or model: one clear line naming the setting, and not a byte of the database changed."""
    with connect() as conn:
        make_table(conn, {i: f"text {i}" for i in range(1, 11)})
        before = snapshot(conn)
    url = plain(database_url)

    def refused(error_type: type[BaseException], *fragments: str, **overrides: Any) -> str:
        with pytest.raises(error_type) as refusal:
            migrate(settings_for(url, minilm_path, **overrides))
        with connect() as conn:
            assert snapshot(conn) == before, f"the database changed after refusing {overrides}"
        return assert_one_line(refusal.value, *fragments)

    messages = [
        refused(DimensionMismatchError, "EMBEDDING_DIMENSIONS=768", "produces 384-dim", EMBEDDING_DIMENSIONS=768),
        refused(ModelLoadError, "EMBEDDING_DEVICE='cuda'", "no CUDA GPU", EMBEDDING_DEVICE="cuda"),
        refused(ModelLoadError, "EMBEDDING_DEVICE='cuda:3'", EMBEDDING_DEVICE="cuda:3"),
        refused(ModelLoadError, "EMBEDDING_MODEL=", EMBEDDING_MODEL="/nonexistent/model/dir"),
        refused(
            MigrationError,
            "EMBEDDING_TABLE='segments\"; DROP TABLE segments; --'",
            EMBEDDING_TABLE='segments"; DROP TABLE segments; --',
        ),
        refused(MigrationError, "EMBEDDING_TABLE=", EMBEDDING_TABLE="segments; DROP TABLE segments"),
        refused(MigrationError, "EMBEDDING_TABLE=", EMBEDDING_TABLE="'; DELETE FROM segments; --"),
        refused(MigrationError, "EMBEDDING_TABLE=", EMBEDDING_TABLE="public.segments"),
        refused(MigrationError, "EMBEDDING_TABLE=", EMBEDDING_TABLE="Segments"),
        refused(MigrationError, "EMBEDDING_SCHEMA", EMBEDDING_SCHEMA='public"; DROP SCHEMA public CASCADE; --'),
        refused(MigrationError, "EMBEDDING_TEXT_COLUMN=", EMBEDDING_TEXT_COLUMN="text); DROP TABLE segments; --"),
        refused(MigrationError, "EMBEDDING_ID_COLUMN=", EMBEDDING_ID_COLUMN='id" OR 1=1 --'),
    ]
    for overrides, fragment in (
        ({"EMBEDDING_DEVICE": "tpu"}, "EMBEDDING_DEVICE='tpu'"),
        ({"EMBEDDING_DEVICE": "cuda:x"}, "EMBEDDING_DEVICE"),
        ({"EMBEDDING_TABLE": "s" * 64}, "EMBEDDING_TABLE"),
        ({"EMBEDDING_COLUMN": "e" * 60}, "EMBEDDING_COLUMN"),  # its staging name would pass 63 bytes
        ({"EMBEDDING_TEXT_COLUMN": "te\x00xt"}, "NUL"),
        ({"EMBEDDING_DIMENSIONS": "384; DROP TABLE segments"}, "EMBEDDING_DIMENSIONS"),
        ({"BACKFILL_BATCH_ROWS": "0"}, "BACKFILL_BATCH_ROWS"),
    ):
        with pytest.raises(SettingsError) as refusal:
            settings_for(url, minilm_path, **overrides)
        messages.append(assert_one_line(refusal.value, fragment))
    with connect() as conn:
        assert snapshot(conn) == before
    print("\n".join(messages))


def test_an_id_without_a_unique_index_is_refused_until_it_has_one(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    """Without a unique id the backfill could neither page through rows nor write them by id lookups: refused
    in one line, database unchanged, whatever non-unique or partial index the id has; a primary key fixes it."""
    with connect() as conn:
        make_table(conn, {i: f"text {i}" for i in range(1, 11)})
        conn.execute("ALTER TABLE segments DROP CONSTRAINT segments_pkey")
        conn.execute("CREATE INDEX segments_id_plain ON segments (id)")
        conn.execute("CREATE UNIQUE INDEX segments_id_partial ON segments (id) WHERE id > 5")
        conn.execute("CREATE UNIQUE INDEX segments_id_text ON segments (id, text)")
        before = snapshot(conn)
    settings = settings_for(plain(database_url), minilm_path)
    with pytest.raises(MigrationError) as refusal:
        migrate(settings)
    assert_one_line(
        refusal.value, "EMBEDDING_ID_COLUMN='id'", "no unique index", "CREATE UNIQUE INDEX ON public.segments (id)"
    )
    with connect() as conn:
        assert snapshot(conn) == before
        conn.execute("ALTER TABLE segments ADD PRIMARY KEY (id)")
    migrate(settings)
    with connect() as conn:
        assert column_types(conn, "segments")["embedding"] == f"vector({DIMENSIONS})"
        assert conn.execute("SELECT count(*) FROM segments WHERE embedding IS NULL").fetchone()[0] == 0


WEIRD_TABLE = 'weird "name"; --'
WEIRD_ID = 'i"d; --'
WEIRD_TEXT = "te'xt; DROP TABLE segments; --"
WEIRD_EMBEDDING = 'emb"; DROP TABLE segments; --'


def test_table_with_hostile_names_migrates_through_quoting(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    """A table that really is named `weird "name"; --`, with columns named like injections, migrates; the canary
    `segments` table next to it is untouched."""
    texts = {i: f"row {i} of a table with a hostile name" for i in range(1, 31)}
    with connect() as conn:
        make_table(conn, {1: "canary"})
        make_table(conn, texts, WEIRD_TABLE, WEIRD_ID, WEIRD_TEXT, WEIRD_EMBEDDING, old_dimensions=3)
        canary = snapshot(conn)["checksums"]["public.segments"]
    result = migrate(
        settings_for(
            plain(database_url),
            minilm_path,
            EMBEDDING_TABLE=WEIRD_TABLE,
            EMBEDDING_ID_COLUMN=WEIRD_ID,
            EMBEDDING_TEXT_COLUMN=WEIRD_TEXT,
            EMBEDDING_COLUMN=WEIRD_EMBEDDING,
            BACKFILL_BATCH_ROWS=7,
        )
    )
    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    with connect() as conn:
        assert column_types(conn, WEIRD_TABLE) == {
            WEIRD_ID: "bigint",
            WEIRD_TEXT: "text",
            WEIRD_EMBEDDING: f"vector({DIMENSIONS})",
        }
        assert (f"{WEIRD_TABLE}_{WEIRD_EMBEDDING}_ivfflat_idx", "ivfflat", "vector_cosine_ops", True) in indexes(
            conn, WEIRD_TABLE
        )
        rows = read_rows(conn, WEIRD_TABLE, WEIRD_EMBEDDING, WEIRD_ID, WEIRD_TEXT)
        assert snapshot(conn)["checksums"]["public.segments"] == canary
        backup = conn.execute(
            sql.SQL("SELECT count(*) FROM {b}").format(b=sql.Identifier(f"{WEIRD_TABLE}_{WEIRD_EMBEDDING}_backup_3"))
        ).fetchone()[0]
    assert backup == 30
    assert assert_vectors_match_texts(minilm_path, rows) == 30


LONG_TABLE = "段落" * 5 + "s" * 30  # 60 bytes: a legal name, whose index names pass PostgreSQL's 63 bytes


def test_table_with_a_long_multibyte_name_migrates(
    database_url: str, connect: Callable[[], psycopg.Connection], minilm_path: str
) -> None:
    """Cut to 63 characters, the staging and live index names of such a table were equal (and longer than 63
    bytes), so the swap's index rename failed on every run."""
    with connect() as conn:
        make_table(conn, {i: f"row {i} of a table with a long name" for i in range(1, 16)}, LONG_TABLE)
    result = migrate(settings_for(plain(database_url), minilm_path, EMBEDDING_TABLE=LONG_TABLE))
    assert result.success
    assert all(check.passed for check in result.get_asset_check_evaluations())
    with connect() as conn:
        assert column_types(conn, LONG_TABLE)["embedding"] == f"vector({DIMENSIONS})"
        vector_indexes = [index for index in indexes(conn, LONG_TABLE) if index[1] == "ivfflat"]
        assert [index[1:] for index in vector_indexes] == [("ivfflat", "vector_cosine_ops", True)]
        assert len(vector_indexes[0][0].encode()) <= 63
        assert assert_vectors_match_texts(minilm_path, read_rows(conn, LONG_TABLE)) == 15
