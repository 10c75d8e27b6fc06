#!/usr/bin/env bash
# The test suite, offline. Extra arguments go to pytest (e.g. `-m slow` for the embedded-model tests).
source "$(dirname "$0")/venv.sh"
exec .venv/bin/python -m pytest -q "$@"
