"""Validation of settings dataclasses: an error names the class, the field,
what was expected and what was received."""

from __future__ import annotations

import math
from typing import Callable


def check_fields(obj, **rules: tuple[Callable[[object], bool], str]) -> None:
    """Raise ``ValueError`` for the first field of ``obj`` whose rule fails.

    Each rule is ``field=(predicate, "what was expected")``.
    """
    for field, (ok, expected) in rules.items():
        value = getattr(obj, field)
        if not ok(value):
            raise ValueError(f"{type(obj).__name__}: `{field}` must be {expected}; got {value!r}.")


def positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def positive_int_or_none(v) -> bool:
    return v is None or positive_int(v)


def tol_ok(v) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < 1)


def nonneg_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0
