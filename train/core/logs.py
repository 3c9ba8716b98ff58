"""Logging for the trainers: ``logging.getLogger("train")`` prints INFO on process 0 only."""

from __future__ import annotations

import logging
import sys


class _Stdout(logging.StreamHandler):
    """Writes to whatever ``sys.stdout`` is at the time (pytest's capture included)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


def setup(primary: bool = True, level: int = logging.INFO) -> logging.Logger:
    """Configures the ``train`` logger once: messages as plain lines on stdout, INFO and up
    on the primary process, warnings and up elsewhere.

    Example:
        >>> setup().name
        'train'
    """
    logger = logging.getLogger("train")
    if not any(isinstance(h, _Stdout) for h in logger.handlers):
        handler = _Stdout()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level if primary else logging.WARNING)
    return logger
