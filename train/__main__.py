"""``python -m train``: the training CLI (see :mod:`train.cli`, or ``python -m train --help``)."""

import sys

from train.cli import main

if __name__ == "__main__":
    sys.exit(main())
