"""The Dagster layer: assets, checks, jobs, automation and resources over bge_pipeline.core (and nothing else)."""
