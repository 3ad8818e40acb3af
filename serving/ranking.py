"""Ranking a batch's class probabilities: the top k of each row, most likely first."""

from __future__ import annotations

import numpy as np


def top_k(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and probabilities of the k most likely classes per row, most likely first."""
    k = min(k, probabilities.shape[1])
    if k == 1:  # the common case: no partition, no fancy take_along_axis
        best = probabilities.argmax(axis=1)
        rows = np.arange(len(best))
        return best[:, None], probabilities[rows, best][:, None]
    else:
        part = np.argpartition(-probabilities, k - 1, axis=1)[:, :k]
        order = np.take_along_axis(probabilities, part, axis=1).argsort(axis=1)[:, ::-1]
        idx = np.take_along_axis(part, order, axis=1)
    return idx, np.take_along_axis(probabilities, idx, axis=1)
