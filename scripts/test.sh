#!/usr/bin/env bash
# The README's test command: install the project with its test extras, then run the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --upgrade pip
# torch first, pinned: any other spec pulls a multi-GB CUDA build onto a CPU machine (see README).
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
export HF_HUB_OFFLINE=1
python -m pytest "$@"
