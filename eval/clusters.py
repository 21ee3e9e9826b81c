"""The STEGO / PASS unsupervised protocol: dataset-level k-means over GroupViT's segment
embeddings (``groupseg.clusters``), clusters matched to classes by the Hungarian algorithm."""
from __future__ import annotations

import numpy as np
import torch


# ----------------------------------------------------------------------------- dataset protocol
def hungarian_match(confusion: np.ndarray | torch.Tensor) -> np.ndarray:
    """The one-to-one cluster -> class assignment that maximises the matched pixels.

    Args:
        confusion: (K, C) pixel counts, row = cluster, column = true class.

    Returns:
        (K,) int64: the class of each cluster, -1 for clusters left over when K > C.

    >>> hungarian_match(np.array([[0, 5], [7, 1]])).tolist()
    [1, 0]
    """
    from scipy.optimize import linear_sum_assignment

    conf = np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion, dtype=np.float64)
    rows, cols = linear_sum_assignment(conf, maximize=True)
    mapping = np.full(conf.shape[0], -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping


def matched_confusion(confusion: np.ndarray | torch.Tensor, mapping: np.ndarray) -> torch.Tensor:
    """(K, C) cluster-vs-class counts + a cluster -> class mapping -> (C, C + 1) truth-vs-prediction
    counts in ``ConfusionMatrix.mat``'s layout (last column: pixels of unmatched clusters)."""
    conf = torch.as_tensor(np.asarray(confusion.cpu() if isinstance(confusion, torch.Tensor) else confusion), dtype=torch.long)
    K, C = conf.shape
    cols = torch.as_tensor(np.where(np.asarray(mapping) < 0, C, mapping), dtype=torch.long)  # (K,)
    out = torch.zeros(C, C + 1, dtype=torch.long)
    out.index_add_(1, cols, conf.T)  # column mapping[k] += cluster k's counts per true class
    return out


class Reservoir:
    """A uniform sample of at most ``cap`` weighted vectors from a stream (reservoir sampling).

    Args:
        cap: rows kept.
        seed: sampling seed.
    """

    def __init__(self, cap: int = 200_000, seed: int = 0) -> None:
        self.cap = cap
        self.seen = 0
        self.x: torch.Tensor | None = None
        self.w: torch.Tensor | None = None
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor, w: torch.Tensor) -> None:
        x, w = x.detach(), w.detach()
        if self.x is None:
            self.x, self.w = x[: self.cap].clone(), w[: self.cap].clone()
            start = min(len(x), self.cap)
        else:
            room = self.cap - len(self.x)
            self.x, self.w = torch.cat([self.x, x[:room]]), torch.cat([self.w, w[:room]])
            start = max(0, min(room, len(x)))
        for i in range(start, len(x)):  # the stream past the cap: replace with probability cap / seen
            j = int(torch.randint(0, self.seen + i + 1, (1,), generator=self.gen))
            if j < self.cap:
                self.x[j], self.w[j] = x[i], w[i]
        self.seen += len(x)
