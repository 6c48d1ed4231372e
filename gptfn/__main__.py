"""``python -m gptfn`` (also what ``torchrun -m gptfn`` runs)."""

import sys

from gptfn.cli import main

sys.exit(main())
