"""``python -m train.generate`` (see :mod:`train.generate`)."""

import sys

from train.generate import cli

if __name__ == "__main__":
    sys.exit(cli())
