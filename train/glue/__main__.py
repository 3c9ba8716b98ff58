"""``python -m train.glue`` (see :mod:`train.glue`)."""

import sys

from train.glue.task import cli

if __name__ == "__main__":
    sys.exit(cli())
