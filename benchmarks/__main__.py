"""`python -m benchmarks [--quick] [--only NAME[,NAME]] [--out FILE] [--no-write] [--dryrun]`: see suite.py."""

import sys

from benchmarks.suite import main

sys.exit(main())
