"""Test-selection helpers shared by test files."""
import pytest


def fast_subset(cases, keep: int):
    """A parametrize list whose first `keep` cases run in the fast target (make test-fast) and
    the rest are marked slow: a grid's spread of shapes is checked by `make test`, a
    representative few on every fast run."""
    return [c if i < keep else pytest.param(*(c if isinstance(c, tuple) else (c,)),
                                            marks=pytest.mark.slow)
            for i, c in enumerate(cases)]
