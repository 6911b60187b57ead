"""One module per phase of the migration: the staging column, the backfill, the index and the swap."""
