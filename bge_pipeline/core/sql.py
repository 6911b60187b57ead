"""Every SQL statement the pipeline runs, named and parameterised.

Table and column names come from settings, so they are only ever composed with `sql.Identifier` (quoted) and
checked against the catalog before use; values are always bound parameters.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from psycopg import sql

STATE_TABLE = "bge_pipeline_models"
VECTOR_TYPES = ("vector", "halfvec")
INDEX_METHODS = ("ivfflat", "hnsw")
INTEGER_TYPES = ("smallint", "integer", "bigint")


def cosine_opclass(vector_type: str) -> str:
    """The operator class of `<=>`, the operator every query here uses, for the column's type."""
    return f"{vector_type}_cosine_ops"


COSINE_OPCLASSES = tuple(cosine_opclass(vector_type) for vector_type in VECTOR_TYPES)


@dataclass(frozen=True)
class Table:
    """The quoted names of one embeddings table: the live column, the staging column and their indexes."""

    schema: str
    name: str
    id_column: str
    text_column: str
    live_column: str
    staging_column: str
    id_type: str = "bigint"

    @property
    def ident(self) -> sql.Composable:
        return sql.Identifier(self.schema, self.name)

    @property
    def id(self) -> sql.Identifier:
        return sql.Identifier(self.id_column)

    @property
    def text(self) -> sql.Identifier:
        return sql.Identifier(self.text_column)

    def index_name(self, column: str, method: str = "ivfflat") -> str:
        return _identifier(f"{self.name}_{column}_{method}_idx")

    def pending_index_name(self, column: str) -> str:
        return _identifier(f"{self.name}_{column}_pending_idx")

    def backup_table(self, dimensions: int) -> str:
        """Where a swap keeps the old `dimensions`-dim vectors: hashed like the index names, so that two
        backups of a long table's name never truncate to one."""
        return _identifier(f"{self.name}_{self.live_column}_backup_{dimensions}")

    @property
    def lock_key(self) -> str:
        return f"bge_pipeline:{self.schema}.{self.name}"

    def bucket_expr(self, buckets: int) -> sql.Composable:
        """Which backfill partition a row belongs to: a hash of the id, so ids in steps (1, 41, 81, ...) still
        spread evenly; computable from the row alone and stable across runs."""
        if self.id_type in INTEGER_TYPES:
            hashed = sql.SQL("hashint8extended({id}::bigint, 0)").format(id=self.id)
        else:
            hashed = sql.SQL("hashtextextended({id}::text, 0)").format(id=self.id)
        return sql.SQL("mod(mod({h}, {n}) + {n}, {n})").format(h=hashed, n=sql.Literal(buckets))


def _identifier(name: str) -> str:
    """`name` if PostgreSQL keeps it whole (63 bytes), else a byte-safe prefix plus a hash of the whole: plain
    truncation made a long table's staging and live index names equal, and the swap's rename then failed."""
    encoded = name.encode()
    if len(encoded) <= 63:
        return name
    digest = hashlib.md5(encoded).hexdigest()[:8]
    return f"{encoded[:54].decode(errors='ignore')}_{digest}"


# --- extension and bookkeeping -----------------------------------------------------------------------------

VECTOR_AVAILABLE = sql.SQL(
    "SELECT default_version, installed_version FROM pg_available_extensions WHERE name = 'vector'"
)
CREATE_VECTOR_EXTENSION = sql.SQL("CREATE EXTENSION IF NOT EXISTS vector")

CREATE_STATE_TABLE = sql.SQL(
    """
    CREATE TABLE IF NOT EXISTS {state} (
        schema_name text NOT NULL,
        table_name text NOT NULL,
        column_name text NOT NULL,
        model text NOT NULL,
        dimensions integer NOT NULL,
        recorded_at timestamptz NOT NULL DEFAULT now(),
        kind text NOT NULL DEFAULT 'column' CHECK (kind IN ('column', 'backup')),
        vector_type text NOT NULL DEFAULT 'vector',
        index_type text,
        runtime text,
        PRIMARY KEY (schema_name, table_name, column_name)
    )
    """
).format(state=sql.Identifier(STATE_TABLE))

# Records made before backups had a kind of their own: a backup's record names a table, where a column's does not.
UPGRADE_STATE_TABLE = [
    sql.SQL(
        "ALTER TABLE {state} ADD COLUMN IF NOT EXISTS kind text NOT NULL DEFAULT 'column' "
        "CHECK (kind IN ('column', 'backup'))"
    ).format(state=sql.Identifier(STATE_TABLE)),
    sql.SQL("ALTER TABLE {state} ADD COLUMN IF NOT EXISTS vector_type text NOT NULL DEFAULT 'vector'").format(
        state=sql.Identifier(STATE_TABLE)
    ),
    sql.SQL("ALTER TABLE {state} ADD COLUMN IF NOT EXISTS index_type text").format(state=sql.Identifier(STATE_TABLE)),
    sql.SQL("ALTER TABLE {state} ADD COLUMN IF NOT EXISTS runtime text").format(state=sql.Identifier(STATE_TABLE)),
    sql.SQL(
        "UPDATE {state} SET kind = 'backup' "
        "WHERE kind = 'column' AND to_regclass(format('%I.%I', schema_name, column_name)) IS NOT NULL"
    ).format(state=sql.Identifier(STATE_TABLE)),
]

STATE_TABLE_EXISTS = sql.SQL("SELECT to_regclass({state}) IS NOT NULL").format(state=sql.Literal(STATE_TABLE))

SELECT_MODELS = sql.SQL(
    "SELECT column_name, model, dimensions, kind, vector_type, index_type, runtime FROM {state} "
    "WHERE schema_name = %s AND table_name = %s"
).format(state=sql.Identifier(STATE_TABLE))

_UPSERT_RECORD = """
    INSERT INTO {state} (schema_name, table_name, column_name, model, dimensions, vector_type, index_type, runtime,
                         kind)
    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, {kind})
    ON CONFLICT (schema_name, table_name, column_name)
    DO UPDATE SET model = EXCLUDED.model, dimensions = EXCLUDED.dimensions, vector_type = EXCLUDED.vector_type,
                  index_type = EXCLUDED.index_type, runtime = EXCLUDED.runtime, kind = EXCLUDED.kind,
                  recorded_at = now()
    """
# (schema, table, column, model, dimensions, vector type, index type, runtime): which model's vectors a column of
# the table holds, stored how, indexed how (NULL: not yet), and which runtime made them (int8 or float).
UPSERT_MODEL = sql.SQL(_UPSERT_RECORD).format(state=sql.Identifier(STATE_TABLE), kind=sql.Literal("column"))
# (schema, table, backup table, model, dimensions, vector type, NULL, runtime): old vectors kept by a swap.
UPSERT_BACKUP = sql.SQL(_UPSERT_RECORD).format(state=sql.Identifier(STATE_TABLE), kind=sql.Literal("backup"))

# (index type, schema, table, column): the index the column has now.
SET_INDEX_TYPE = sql.SQL(
    "UPDATE {state} SET index_type = %s WHERE schema_name = %s AND table_name = %s AND column_name = %s"
).format(state=sql.Identifier(STATE_TABLE))

DELETE_MODEL = sql.SQL("DELETE FROM {state} WHERE schema_name = %s AND table_name = %s AND column_name = %s").format(
    state=sql.Identifier(STATE_TABLE)
)

# --- catalog ----------------------------------------------------------------------------------------------

TABLE_COLUMNS = sql.SQL(
    """
    SELECT a.attname, format_type(a.atttypid, a.atttypmod), t.typname, a.atttypmod
    FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
    WHERE a.attrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
      AND a.attnum > 0 AND NOT a.attisdropped
    ORDER BY a.attnum
    """
)

TABLE_INDEXES = sql.SQL(
    """
    SELECT ic.relname, a.attname, am.amname, opc.opcname, ix.indisvalid, coalesce(ic.reloptions, '{}'),
           ix.indisunique AND ix.indnkeyatts = 1 AND ix.indpred IS NULL
    FROM pg_index ix
    JOIN pg_class ic ON ic.oid = ix.indexrelid
    JOIN pg_am am ON am.oid = ic.relam
    JOIN pg_attribute a ON a.attrelid = ix.indrelid AND a.attnum = ix.indkey[0]
    JOIN pg_opclass opc ON opc.oid = ix.indclass[0]
    WHERE ix.indrelid = to_regclass(format('%%I.%%I', %s::text, %s::text))
    """
)

# The table's main fork and all its indexes: what every row's UPDATE copies a share of (until VACUUM).
TABLE_SIZES = sql.SQL(
    """
    SELECT pg_relation_size(c.oid), pg_indexes_size(c.oid)
    FROM pg_class c WHERE c.oid = to_regclass(format('%%I.%%I', %s::text, %s::text))
    """
)

DATABASE_SIZE = sql.SQL("SELECT pg_database_size(current_database())")

INDEX_BUILD_PROGRESS = sql.SQL(
    """
    SELECT phase, blocks_done, blocks_total, tuples_done, tuples_total
    FROM pg_stat_progress_create_index
    WHERE relid = to_regclass(format('%%I.%%I', %s::text, %s::text))
    """
)


# --- phase 1: the staging column ------------------------------------------------------------------------


def add_vector_column(table: Table, column: str, dimensions: int, vector_type: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {t} ADD COLUMN IF NOT EXISTS {c} {type}({d})").format(
        t=table.ident, c=sql.Identifier(column), type=_vector_type(vector_type), d=sql.Literal(dimensions)
    )


def _known_type(vector_type: str) -> str:
    if vector_type not in VECTOR_TYPES:  # a type name cannot be a parameter: only the known ones are composed
        raise ValueError(f"VECTOR_TYPE={vector_type!r} is not one of {', '.join(VECTOR_TYPES)}")
    return vector_type


def _vector_type(vector_type: str) -> sql.SQL:
    return sql.SQL(_known_type(vector_type))


def comment_column(table: Table, column: str, comment: str | None) -> sql.Composed:
    # COMMENT takes no bind parameters, so the text goes in as a quoted literal.
    return sql.SQL("COMMENT ON COLUMN {t}.{c} IS {v}").format(
        t=table.ident, c=sql.Identifier(column), v=sql.Literal(comment)
    )


def drop_column(table: Table, column: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {t} DROP COLUMN IF EXISTS {c}").format(t=table.ident, c=sql.Identifier(column))


def clear_column(table: Table, column: str) -> sql.Composed:
    return sql.SQL("UPDATE {t} SET {c} = NULL WHERE {c} IS NOT NULL").format(t=table.ident, c=sql.Identifier(column))


def _stale_vector_names(table: Table) -> tuple[sql.Identifier, sql.Identifier]:
    name = _identifier(f"{table.name}_bge_stale_vectors")
    return sql.Identifier(table.schema, name), sql.Identifier(name)


def drop_stale_vector_trigger(table: Table) -> list[sql.Composed]:
    function, trigger = _stale_vector_names(table)
    return [
        sql.SQL("DROP TRIGGER IF EXISTS {trg} ON {t}").format(trg=trigger, t=table.ident),
        sql.SQL("DROP FUNCTION IF EXISTS {f}()").format(f=function),
    ]


def create_stale_vector_trigger(table: Table, columns: list[str]) -> list[sql.Composed]:
    """A changed text makes its vectors stale: NULL them in the same statement so the backfill finds the row."""
    function, trigger = _stale_vector_names(table)
    assignments = sql.SQL(" ").join(sql.SQL("NEW.{c} := NULL;").format(c=sql.Identifier(column)) for column in columns)
    return [
        sql.SQL(
            """
            CREATE OR REPLACE FUNCTION {f}() RETURNS trigger LANGUAGE plpgsql AS $body$
            BEGIN
                IF NEW.{text} IS DISTINCT FROM OLD.{text} THEN {assignments} END IF;
                RETURN NEW;
            END
            $body$
            """
        ).format(f=function, text=table.text, assignments=assignments),
        sql.SQL("DROP TRIGGER IF EXISTS {trg} ON {t}").format(trg=trigger, t=table.ident),
        sql.SQL("CREATE TRIGGER {trg} BEFORE UPDATE OF {text} ON {t} FOR EACH ROW EXECUTE FUNCTION {f}()").format(
            trg=trigger, text=table.text, t=table.ident, f=function
        ),
    ]


# --- phase 2: the backfill ------------------------------------------------------------------------------


def count_rows(table: Table, column: str, buckets: int = 1, scope: list[int] | None = None) -> sql.Composed:
    """total, with text, with text but no vector (pending), without text (skipped); `scope` limits the buckets."""
    where = (
        sql.SQL("WHERE {bucket} = ANY({scope})").format(bucket=table.bucket_expr(buckets), scope=sql.Literal(scope))
        if scope is not None
        else sql.SQL("")
    )
    return sql.SQL(
        """
        SELECT count(*),
               count({text}),
               count(*) FILTER (WHERE {text} IS NOT NULL AND {c} IS NULL),
               count(*) FILTER (WHERE {text} IS NULL)
        FROM {t} {where}
        """
    ).format(text=table.text, c=sql.Identifier(column), t=table.ident, where=where)


def count_pending(table: Table, column: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {t} WHERE {text} IS NOT NULL AND {c} IS NULL").format(
        t=table.ident, text=table.text, c=sql.Identifier(column)
    )


def select_pending_batch(table: Table, column: str, buckets: int, scope: list[int], after: bool) -> sql.Composed:
    """Keyset pagination by id: each batch reads only rows still NULL, so a rerun resumes where it stopped."""
    return sql.SQL(
        """
        SELECT {id}, {text} FROM {t}
        WHERE {text} IS NOT NULL AND {c} IS NULL AND {bucket} = ANY(%(scope)s) {after}
        ORDER BY {id} LIMIT %(limit)s
        """
    ).format(
        id=table.id,
        text=table.text,
        t=table.ident,
        c=sql.Identifier(column),
        bucket=table.bucket_expr(buckets),
        after=sql.SQL("AND {id} > %(after)s").format(id=table.id) if after else sql.SQL(""),
    )


def write_batch(table: Table, column: str) -> sql.Composed:
    """One round trip per batch, parameters in binary (as text, formatting 384,000 floats per batch in Python
    cost 10x the server's time). A row whose text changed since it was read, or that another writer already
    filled, is left alone: the stale vector would belong to text that no longer exists."""
    return sql.SQL(
        """
        UPDATE {t} AS t SET {c} = u.v
        FROM unnest(%(ids)b::{id_type}[], %(vectors)b::vector[], %(hashes)b::text[]) AS u(id, v, h)
        WHERE t.{id} = u.id AND t.{c} IS NULL AND md5(convert_to(t.{text}, 'UTF8')) = u.h
        """
    ).format(
        t=table.ident,
        c=sql.Identifier(column),
        id=table.id,
        text=table.text,
        id_type=sql.SQL(table.id_type),
    )


def copy_by_cast(table: Table, source: str, column: str, vector_type: str, buckets: int) -> sql.Composed:
    """A batch of `source`'s vectors into `column` as `vector_type`: the same model's vectors stored another way
    (VECTOR_TYPE changed) need no encoder. Keyset-paged like the backfill, one commit a batch."""
    return sql.SQL(
        """
        WITH batch AS (
            SELECT {id} FROM {t}
            WHERE {c} IS NULL AND {s} IS NOT NULL AND {bucket} = ANY(%(scope)s)
            ORDER BY {id} LIMIT %(limit)s
        )
        UPDATE {t} AS t SET {c} = t.{s}::{type} FROM batch WHERE t.{id} = batch.{id}
        """
    ).format(
        id=table.id,
        t=table.ident,
        c=sql.Identifier(column),
        s=sql.Identifier(source),
        type=_vector_type(vector_type),
        bucket=table.bucket_expr(buckets),
    )


# For the rest of the write's transaction: look each row up by its id. Left to itself the planner hash-joins the
# batch against a sequential scan of the whole table, computing md5 of every row's text for every batch (measured:
# 17k rows/s against 32k on 10,000 rows, and quadratic in the table's size). catalog.require_table ensures the id
# has a unique index to look rows up by.
WRITE_BY_ID = sql.SQL("SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)")

ADVISORY_LOCK = sql.SQL("SELECT pg_advisory_lock(hashtext(%s), %s)")
ADVISORY_TRY_LOCK = sql.SQL("SELECT pg_try_advisory_lock(hashtext(%s), %s)")
ADVISORY_UNLOCK = sql.SQL("SELECT pg_advisory_unlock(hashtext(%s), %s)")

# --- checks ---------------------------------------------------------------------------------------------


def count_wrong_dimensions(table: Table, column: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {t} WHERE {c} IS NOT NULL AND vector_dims({c}) <> %s").format(
        t=table.ident, c=sql.Identifier(column)
    )


# --- the index ------------------------------------------------------------------------------------------


def count_vectors(table: Table, column: str) -> sql.Composed:
    return sql.SQL("SELECT count({c}) FROM {t}").format(t=table.ident, c=sql.Identifier(column))


def create_index(
    table: Table, column: str, index: str, method: str, vector_type: str, options: dict[str, int]
) -> sql.Composed:
    """IVFFLAT or HNSW under the cosine operator class of the column's type, with its build parameters
    (`lists`; `m`, `ef_construction`), each left to pgvector's default when not given."""
    # CONCURRENTLY: writers keep writing while a large index builds; a killed build leaves an INVALID index,
    # which the index asset drops and rebuilds.
    if method not in INDEX_METHODS:
        raise ValueError(f"INDEX_TYPE={method!r} is not one of {', '.join(INDEX_METHODS)}")
    with_options = (
        sql.SQL(" WITH ({})").format(
            sql.SQL(", ").join(
                sql.SQL("{} = {}").format(sql.Identifier(name), sql.Literal(int(value)))
                for name, value in options.items()
            )
        )
        if options
        else sql.SQL("")
    )
    return sql.SQL("CREATE INDEX CONCURRENTLY IF NOT EXISTS {i} ON {t} USING {method} ({c} {opclass}){options}").format(
        i=sql.Identifier(index),
        t=table.ident,
        method=sql.SQL(method),
        c=sql.Identifier(column),
        opclass=sql.SQL(cosine_opclass(_known_type(vector_type))),
        options=with_options,
    )


def drop_index(table: Table, index: str) -> sql.Composed:
    return sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {i}").format(i=sql.Identifier(table.schema, index))


def create_pending_index(table: Table, column: str) -> sql.Composed:
    """The rows still waiting for a vector, indexed: under the swap's exclusive lock, counting them reads this
    (a few entries) instead of scanning the table while every reader waits."""
    return sql.SQL(
        "CREATE INDEX CONCURRENTLY IF NOT EXISTS {i} ON {t} ({id}) WHERE {text} IS NOT NULL AND {c} IS NULL"
    ).format(
        i=sql.Identifier(table.pending_index_name(column)),
        t=table.ident,
        id=table.id,
        text=table.text,
        c=sql.Identifier(column),
    )


def drop_index_in_transaction(table: Table, index: str) -> sql.Composed:
    return sql.SQL("DROP INDEX IF EXISTS {i}").format(i=sql.Identifier(table.schema, index))


INDEX_BUILD_SETTINGS = [
    sql.SQL("SET maintenance_work_mem = '1GB'"),
    sql.SQL("SET max_parallel_maintenance_workers = 4"),
]
# The build's connection goes back to the pool: its session settings must not go with it.
INDEX_BUILD_RESET = [sql.SQL("RESET maintenance_work_mem"), sql.SQL("RESET max_parallel_maintenance_workers")]

# --- phase 3: the swap ----------------------------------------------------------------------------------


SWAP_LOCK_TIMEOUT = sql.SQL("SET LOCAL lock_timeout = '60s'")


def lock_table(table: Table) -> sql.Composed:
    return sql.SQL("LOCK TABLE {t} IN ACCESS EXCLUSIVE MODE").format(t=table.ident)


def rename_column(table: Table, old: str, new: str) -> sql.Composed:
    return sql.SQL("ALTER TABLE {t} RENAME COLUMN {o} TO {n}").format(
        t=table.ident, o=sql.Identifier(old), n=sql.Identifier(new)
    )


def rename_index(table: Table, old: str, new: str) -> sql.Composed:
    return sql.SQL("ALTER INDEX IF EXISTS {o} RENAME TO {n}").format(
        o=sql.Identifier(table.schema, old), n=sql.Identifier(new)
    )


def create_backup_table(table: Table, backup: str, column: str) -> sql.Composed:
    return sql.SQL("CREATE TABLE {b} AS SELECT {id}, {c} FROM {t} WHERE {c} IS NOT NULL").format(
        b=sql.Identifier(table.schema, backup), id=table.id, c=sql.Identifier(column), t=table.ident
    )


def drop_table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("DROP TABLE IF EXISTS {b}").format(b=sql.Identifier(schema, name))


def restore_from_backup(table: Table, backup: str, column: str, backup_column: str) -> sql.Composed:
    return sql.SQL("UPDATE {t} AS t SET {c} = b.{bc} FROM {b} AS b WHERE t.{id} = b.{id}").format(
        t=table.ident,
        c=sql.Identifier(column),
        bc=sql.Identifier(backup_column),
        b=sql.Identifier(table.schema, backup),
        id=table.id,
    )


def count_table(schema: str, name: str) -> sql.Composed:
    return sql.SQL("SELECT count(*) FROM {t}").format(t=sql.Identifier(schema, name))


def analyze(table: Table) -> sql.Composed:
    return sql.SQL("ANALYZE {t}").format(t=table.ident)


# --- search ---------------------------------------------------------------------------------------------


def nearest_neighbours(table: Table, column: str, vector_type: str) -> sql.Composed:
    """The query vector is cast to the column's type: the index serves `<=>` only between two of that type."""
    return sql.SQL(
        """
        SELECT {id}, {text}, {c} <=> %(query)s::{type} AS distance
        FROM {t} WHERE {c} IS NOT NULL
        ORDER BY {c} <=> %(query)s::{type} LIMIT %(limit)s
        """
    ).format(id=table.id, text=table.text, c=sql.Identifier(column), t=table.ident, type=_vector_type(vector_type))


SET_PROBES = sql.SQL("SELECT set_config('ivfflat.probes', %s, true)")
SET_ITERATIVE_SCAN = sql.SQL("SELECT set_config('ivfflat.iterative_scan', 'relaxed_order', true)")
SET_EF_SEARCH = sql.SQL("SELECT set_config('hnsw.ef_search', %s, true)")
SET_HNSW_ITERATIVE_SCAN = sql.SQL("SELECT set_config('hnsw.iterative_scan', 'relaxed_order', true)")
DISABLE_INDEX_SCANS = [
    sql.SQL("SELECT set_config('enable_indexscan', 'off', true)"),
    sql.SQL("SELECT set_config('enable_bitmapscan', 'off', true)"),
]


def text_by_id(table: Table) -> sql.Composed:
    """One row's text by its id: what an application reads while the migration runs (`bench --scale`)."""
    return sql.SQL("SELECT {text} FROM {t} WHERE {id} = %s").format(text=table.text, t=table.ident, id=table.id)


def sample_texts(table: Table) -> sql.Composed:
    """A few of the table's texts (the same ones each time) to measure the encoder on."""
    return sql.SQL("SELECT {text} FROM {t} WHERE {text} IS NOT NULL ORDER BY md5({id}::text) LIMIT %s").format(
        text=table.text, t=table.ident, id=table.id
    )


def sample_rows(table: Table, column: str) -> sql.Composed:
    return sql.SQL(
        "SELECT {id}, {text}, {c}::text FROM {t} WHERE {c} IS NOT NULL ORDER BY md5({id}::text) LIMIT %s"
    ).format(id=table.id, text=table.text, c=sql.Identifier(column), t=table.ident)


VECTOR_VERSION = sql.SQL("SELECT extversion FROM pg_extension WHERE extname = 'vector'")

# The planner's estimate, not count(*): a search must not scan the table to decide how to scan it.
ESTIMATED_ROWS = sql.SQL(
    "SELECT reltuples::bigint FROM pg_class WHERE oid = to_regclass(format('%%I.%%I', %s::text, %s::text))"
)


def ann_candidates(table: Table, column: str, vector_type: str) -> sql.Composed:
    """The index's nearest rows, re-sorted: iterative scans in relaxed_order may return them slightly out of order."""
    return sql.SQL("WITH candidates AS MATERIALIZED ({inner}) SELECT * FROM candidates ORDER BY distance").format(
        inner=nearest_neighbours(table, column, vector_type)
    )


def rows_present(table: Table, column: str) -> sql.Composed:
    """Which of the given ids have a vector in `column`."""
    return sql.SQL("SELECT {id} FROM {t} WHERE {id} = ANY(%s) AND {c} IS NOT NULL").format(
        id=table.id, t=table.ident, c=sql.Identifier(column)
    )


def sample_ids(table: Table, column: str) -> sql.Composed:
    """A deterministic sample of the ids that have a vector in `column`."""
    return sql.SQL("SELECT {id} FROM {t} WHERE {c} IS NOT NULL ORDER BY md5({id}::text) LIMIT %s").format(
        id=table.id, c=sql.Identifier(column), t=table.ident
    )


def sample_vectors(table: Table, column: str) -> sql.Composed:
    """A deterministic sample (the same rows on every run) of ids with their vectors."""
    return sql.SQL("SELECT {id}, {c} FROM {t} WHERE {c} IS NOT NULL ORDER BY md5({id}::text) LIMIT %s").format(
        id=table.id, c=sql.Identifier(column), t=table.ident
    )


def vectors_by_id(schema: str, relation: str, id_column: str, column: str) -> sql.Composed:
    """`column` for the given ids, from the table itself or from a backup table of old vectors."""
    return sql.SQL("SELECT {id}, {c} FROM {r} WHERE {id} = ANY(%s) AND {c} IS NOT NULL").format(
        id=sql.Identifier(id_column), c=sql.Identifier(column), r=sql.Identifier(schema, relation)
    )


# --- the guide's verification queries -------------------------------------------------------------------


def verify_counts(table: Table, column: str) -> sql.Composed:
    return sql.SQL(
        """
        SELECT COUNT(*) AS total, COUNT({c}) AS populated, COUNT(*) - COUNT({c}) AS missing
        FROM {t} WHERE {text} IS NOT NULL
        """
    ).format(c=sql.Identifier(column), t=table.ident, text=table.text)
