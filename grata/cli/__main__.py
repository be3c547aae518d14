"""`python -m grata.cli ...` runs the `grata` command."""

import sys

from . import main

sys.exit(main())
