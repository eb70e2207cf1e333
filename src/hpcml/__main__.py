"""`python -m hpcml ...` is the `hpcml` command (torchrun and SLURM scripts launch modules this way)."""

import sys

from hpcml.cli import main

sys.exit(main())
