"""`python -m bge_pipeline.cli`: the `bge-pipeline` command."""

import sys

from bge_pipeline.cli.main import main

sys.exit(main())
