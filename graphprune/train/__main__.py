"""``python -m graphprune.train``: see :mod:`graphprune.train.run`."""

import sys

from graphprune.train.run import main

sys.exit(main())
