#!/usr/bin/env bash
# The main job on a fresh machine: set up .venv, then synthesize activations with known
# features, train a ReLU SAE on CPU and print its evaluation against the ground truth.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/sae-jax demo "$@"
