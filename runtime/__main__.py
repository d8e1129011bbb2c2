"""`python -m runtime ...` (see runtime/cli.py)."""

import sys

from .cli import main

sys.exit(main())
