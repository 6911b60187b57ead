"""The migration as a library: settings, SQL, the catalog, the phases, the encoder and the query path.

Nothing here imports Dagster or prints; importing a module reads no setting and loads no model.
"""
