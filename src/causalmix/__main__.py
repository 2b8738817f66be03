"""``python -m causalmix``: the command line (:mod:`causalmix.cli`)."""

import sys

from causalmix.cli import main

sys.exit(main())
