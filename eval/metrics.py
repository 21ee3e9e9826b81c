"""Segmentation metrics from one confusion matrix."""
from __future__ import annotations

import torch


def labelled(target, num_classes: int, ignore_index: int):
    """Mask of the pixels of a label map (numpy or torch) that carry a class: not ``ignore_index``, in 0..num_classes-1."""
    return (target != ignore_index) & (target >= 0) & (target < num_classes)


class ConfusionMatrix:
    """Accumulates a (C, C) confusion matrix (rows = truth, columns = prediction) on any device.

    Pixels whose truth is ``ignore_index`` (or outside 0..C-1) are skipped; predictions
    outside 0..C-1 (e.g. 255 = background) count as wrong for their true class.

    Args:
        num_classes: C.
        ignore_index: label value to skip.
        device: where to accumulate.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: str | torch.device = "cpu") -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.mat = torch.zeros(num_classes, num_classes + 1, dtype=torch.long, device=device)  # last column: no class

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one prediction/target pair of the same shape."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} differs from label shape {tuple(target.shape)}")
        C = self.num_classes
        t = target.reshape(-1).to(self.mat.device).long()
        p = pred.reshape(-1).to(self.mat.device).long()
        keep = labelled(t, C, self.ignore_index)
        t, p = t[keep], p[keep]
        p = torch.where((p >= 0) & (p < C), p, torch.full_like(p, C))
        self.mat += torch.bincount(t * (C + 1) + p, minlength=C * (C + 1)).view(C, C + 1)

    @property
    def matrix(self) -> torch.Tensor:
        """(C, C) counts, predictions outside the classes dropped."""
        return self.mat[:, : self.num_classes]

    def compute(self) -> dict[str, object]:
        """mIoU, per-class IoU, pixel accuracy, mean accuracy and frequency-weighted IoU (fractions).

        Classes absent from both truth and prediction have IoU NaN and are left out of the means.
        """
        m = self.mat.double().cpu()
        tp = torch.tensor([m[i, i] for i in range(self.num_classes)], dtype=torch.float64)
        gt = m.sum(1)  # every labelled pixel of the class
        pred = m[:, : self.num_classes].sum(0)
        union = gt + pred - tp
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
        acc = torch.where(gt > 0, tp / gt.clamp_min(1), torch.full_like(tp, float("nan")))
        total = gt.sum()
        valid = ~torch.isnan(iou)
        freq = gt / total.clamp_min(1)
        return {
            "miou": float(iou[valid].mean()) if valid.any() else float("nan"),
            "per_class_iou": iou.tolist(),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "mean_acc": float(acc[~torch.isnan(acc)].mean()) if (~torch.isnan(acc)).any() else float("nan"),
            "fwiou": float((freq[valid] * iou[valid]).sum()),
            "num_pixels": int(total),
        }
