"""`python -m sae_jax` runs the command line."""

import sys

from sae_jax.cli import main

sys.exit(main())
