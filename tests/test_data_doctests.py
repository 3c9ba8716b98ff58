"""Runs the docstring examples of train.data (outside pytest's default doctest paths)."""

import doctest

import pytest

from train.data import batching, glue, mr


@pytest.mark.parametrize("module", [glue, batching, mr], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0
