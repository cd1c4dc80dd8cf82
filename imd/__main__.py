"""``python -m imd``: the same as the ``imd`` console script (imd/cli.py)."""

import sys

from imd.cli import main

sys.exit(main())
