"""`python -m raylm` is the `raylm` command."""

import sys

from raylm.cli import main

sys.exit(main())
