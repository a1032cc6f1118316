"""MAML++'s multi-step loss weights (Antoniou et al., 2019, "How to train your MAML"), for
`meta_step(..., step_weights=...)`.

At the start of training every inner step's query loss counts equally (1/K each); over `anneal`
(epochs, iterations: any unit of `progress`) the weight moves to the last step, the others keeping a
floor of 0.03/K. The weights always sum to 1.
"""

from __future__ import annotations

import numbers
from typing import List


def msl_weights(steps: int, progress: float, anneal: float) -> List[float]:
    """MAML++'s multi-step loss weights after `progress` units of training.

    w_j = max((1 − p)/K, 0.03/K) for j < K and w_K = min((1 + p (K − 1))/K, 1 − 0.03 (K − 1)/K), with
    p = progress / anneal (the schedule of the MAML++ reference code, per epoch).

    Args:
        steps: K, the number of inner steps.
        progress: how far training is (epochs, iterations: any unit).
        anneal: after how many units of `progress` all weight is on the last step.

    Returns:
        [w_1, ..., w_K], summing to 1, for `meta_step(..., step_weights=...)`.

    Raises:
        ValueError: a bad argument (the message names it).
    """
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ValueError(f"steps: expected a positive int, got {steps!r}")
    if not isinstance(progress, numbers.Real) or progress < 0:
        raise ValueError(f"progress: expected a non-negative number, got {progress!r}")
    if not isinstance(anneal, numbers.Real) or not anneal > 0:
        raise ValueError(f"anneal: expected a positive number (the length of the annealing), got {anneal!r}")
    K, p = int(steps), float(progress) / float(anneal)
    floor = 0.03 / K
    early = max((1.0 - p) / K, floor)
    last = min((1.0 + p * (K - 1)) / K, 1.0 - floor * (K - 1))
    return [early] * (K - 1) + [last]
