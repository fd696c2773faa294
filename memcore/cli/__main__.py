"""`python -m memcore.cli`: the same entry point as the `memcore` command."""

import sys

from memcore.cli import main

sys.exit(main())
