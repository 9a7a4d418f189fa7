"""Numbers as the reports print them."""

from __future__ import annotations

from collections.abc import Sequence


def interval(bounds: Sequence[float] | None, digits: int = 3, signed: bool = False) -> str:
    """A confidence interval as ``[low, high]``, e.g. ``[-0.0798, -0.0176]`` ("n/a" for None).

    Never ``low - high``: with negative bounds that reads as ``-0.0798 - -0.0176``.
    """
    if bounds is None:
        return "n/a"
    sign = "+" if signed else ""
    low, high = bounds
    return f"[{low:{sign}.{digits}f}, {high:{sign}.{digits}f}]"
