#!/usr/bin/env bash
# The main job on the embedded default model and the bundled data: see README.md.
source "$(dirname "$0")/venv.sh"
exec .venv/bin/slimtune demo "$@"
