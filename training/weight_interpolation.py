"""Weight-space interpolation of the fine-tuned model with its phase-1 model (WiSE-FT).

Fine-tuning the backbone on one source fits its features to that source: the model gains at
home and can lose on other clinics' images (Kumar et al., "Fine-Tuning can Distort Pretrained
Features and Underperform Out-of-Distribution", ICLR 2022, for exactly our linear-probe-then-
fine-tune phases). Wortsman et al., "Robust fine-tuning of zero-shot models" (WiSE-FT, CVPR
2022) keep much of the starting point's robustness and most of the fine-tuned accuracy without
retraining: the exported weights are ``(1 - a) * start + a * fine_tuned``.

Here the start is phase 1's final model (ImageNet backbone, trained head) and the end phase 2's;
phase 2 keeps BatchNorm frozen (:func:`training.model.unfreeze_last_blocks`), so both ends share
its statistics and only convolution and head weights move.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["interpolate_weights"]


def interpolate_weights(model, start: Sequence[np.ndarray], end: Sequence[np.ndarray], alpha: float) -> None:
    """Set ``model``'s weights to ``(1 - alpha) * start + alpha * end`` (lists as ``get_weights()`` gives).

    ``alpha`` 1 is ``end`` itself, 0 is ``start``; non-float state (counters) is taken from ``end``.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"the interpolation weight must be in [0, 1], got {alpha}")
    if len(start) != len(end):
        raise ValueError(f"the two ends have {len(start)} and {len(end)} weight arrays: not one architecture")
    mixed = []
    for index, (s, e) in enumerate(zip(start, end)):
        s, e = np.asarray(s), np.asarray(e)
        if s.shape != e.shape:
            raise ValueError(f"weight {index}: shapes {s.shape} and {e.shape} differ: not one architecture")
        floating = np.issubdtype(e.dtype, np.floating)
        mixed.append(((1.0 - alpha) * s + alpha * e).astype(e.dtype) if floating else e)
    model.set_weights(mixed)
