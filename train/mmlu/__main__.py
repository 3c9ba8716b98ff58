"""``python -m train.mmlu`` (see :mod:`train.mmlu`)."""

import sys

from train.mmlu import cli

if __name__ == "__main__":
    sys.exit(cli())
