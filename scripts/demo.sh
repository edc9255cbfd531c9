#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then synthesize activations with known
# features, train a ReLU SAE on CPU and print its evaluation against the ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
echo "demo.sh: sae-jax is installed in .venv/; to run it yourself: source .venv/bin/activate" >&2
exec .venv/bin/sae-jax demo "$@"
