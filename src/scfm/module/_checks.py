"""Predicates shared by the config and call-option checks of the modules.

``bool`` is an ``int`` subclass, but ``True`` where a count or a rate belongs is a mistake, not
1: every predicate here refuses it. numpy scalars (what a value read from an array or computed
with numpy often is) count as numbers.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["is_int", "is_real"]


def is_int(value: Any) -> bool:
    """An ``int`` or numpy integer, not a ``bool``."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A finite ``int`` / ``float`` or numpy integer / floating scalar, not a ``bool``."""
    return (
        isinstance(value, int | float | np.integer | np.floating)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )
