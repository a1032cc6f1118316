"""How the benchmark judges a row's float32 error: against the autograd-based implementations measured on the
same problem and against the problem's own sensitivity (how far the float64 meta-gradient moves under a
relative weight noise), instead of a fixed threshold."""

from __future__ import annotations

from typing import Optional

OUTLIER_FACTOR = 3.0  # a row above this many times the worst autograd-based row's error ...
SENSITIVITY_FACTOR = 3.0  # ... and above this many times the sensitivity is WRONG
MORE_ACCURATE_FACTOR = 2.0  # a row this many times better than the float32 autograd loop says so


def tolerance(worst_autograd: float, sensitivity: Optional[float] = None) -> float:
    """The largest error a row may have: the larger of OUTLIER_FACTOR × the worst autograd-based row's
    error and SENSITIVITY_FACTOR × the problem's sensitivity (None: not measured, the autograd-based
    rows alone decide)."""
    return max(OUTLIER_FACTOR * worst_autograd, 0.0 if sensitivity is None else SENSITIVITY_FACTOR * sensitivity)


def verdict(err: float, ref: float, worst_autograd: Optional[float] = None, sensitivity: Optional[float] = None) -> str:
    """ "WRONG" for an error above `tolerance(worst_autograd, sensitivity)` (worst_autograd None: the
    float32 autograd loop's error `ref` is the only autograd-based one); "more accurate" when ≥2× below
    the loop's."""
    if err > tolerance(ref if worst_autograd is None else worst_autograd, sensitivity):
        return "WRONG"
    if err * MORE_ACCURATE_FACTOR <= ref:
        return "more accurate"
    return ""
