"""``python -m jointkl``: the command line (what ``torchrun -m jointkl`` runs on each rank)."""

import sys

from jointkl.cli import main

sys.exit(main())
