"""The `bge-pipeline` command: argument parsing and printing over bge_pipeline.core and bge_pipeline.defs."""
