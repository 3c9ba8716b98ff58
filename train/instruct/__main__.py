"""``python -m train.instruct`` (see :mod:`train.instruct`)."""

import sys

from train.instruct.task import cli

if __name__ == "__main__":
    sys.exit(cli())
