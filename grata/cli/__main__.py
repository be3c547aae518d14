"""`python -m grata.cli ...` runs the `grata` command."""

import sys

from grata.cli import main

sys.exit(main())
