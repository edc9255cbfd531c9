"""`python -m sae_jax.cli` runs the command line (as `python -m sae_jax` does)."""

import sys

from sae_jax.cli import main

sys.exit(main())
