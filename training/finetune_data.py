"""Fine-tuning data: a seeded subset of a segmentation split, weak-class hiding, image tags,
class weights and the random-scale / crop / flip samples the fine-tuning loop reads."""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from groupseg.loss.segmentation import IGNORE
from groupseg.transforms import load_image, normalize_pixels

DECODED_CACHE_BYTES = 2 << 30  # decoded training photos kept in memory (``LabelledImages.decoded``)


def select_subset(num: int, images: int = -1, fraction: float = 0.0, seed: int = 0) -> list[int]:
    """Sorted indices of a seeded random subset of ``num`` labelled images."""
    if fraction:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {fraction}")
        k = max(1, int(round(fraction * num)))
    elif images >= 0:
        k = min(images, num)
    else:
        k = num
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(num, generator=g)[:k].tolist())


def resolve_weak_classes(spec: str, labels: Sequence[str]) -> list[int]:
    """``"car, fence"`` -> class indices; a name not in the dataset is a one-line error."""
    names = [s.strip() for s in spec.split(",") if s.strip()]
    lower = [lab.lower() for lab in labels]
    out = []
    for n in names:
        if n.lower() not in lower:
            raise ValueError(f"--weak-classes: {n!r} is not a class of this dataset ({', '.join(labels)})")
        out.append(lower.index(n.lower()))
    return sorted(set(out))


def vocab_targets(ds, sample) -> np.ndarray:
    """A sample's label map in vocabulary indices (0..C-1), everything else ``IGNORE``.

    Datasets scored with a background class keep background out of fine-tuning: GroupViT
    predicts it by threshold, so it has no classifier of its own.
    """
    t = ds.load_target(sample)
    out = np.full(t.shape, IGNORE, dtype=np.int64)
    C = len(ds.vocab)
    if ds.background:
        keep = (t >= 1) & (t <= C)
        out[keep] = t[keep] - 1
    else:
        keep = (t >= 0) & (t < C)
        out[keep] = t[keep]
    return out


def image_tags(target: np.ndarray, num_classes: int) -> np.ndarray:
    """(C,) float presence of each class in a vocabulary-index label map (ignore excluded)."""
    v = target[target != IGNORE]
    return (np.bincount(v.ravel(), minlength=num_classes)[:num_classes] > 0).astype(np.float32)


def hide_classes(target: np.ndarray, hidden: Sequence[int]) -> np.ndarray:
    """Copy of ``target`` with the pixels of ``hidden`` classes set to ``IGNORE``."""
    out = target.copy()
    if len(hidden):
        out[np.isin(out, np.asarray(hidden))] = IGNORE
    return out


def median_frequency_weights(targets: Sequence[np.ndarray], num_classes: int, max_weight: float = 10.0,
                             power: float = 1.0) -> torch.Tensor:
    """SegNet's median frequency balancing: ``w_c = min(median(f) / f_c, max_weight) ** power``.

    ``f_c`` is class c's pixels over the pixels of the images in which c appears (``IGNORE``
    excluded). Classes never seen get weight 1 (no pixel of theirs reaches the loss); weights
    are capped at ``max_weight`` so that a class seen in a few pixels of one image cannot take
    over a small subset. ``power`` 0.5 softens the balance (rare classes still gain, but less):
    it gives the square roots of the ``power`` 1 weights, cap included.
    """
    pix = np.zeros(num_classes)
    denom = np.zeros(num_classes)
    for t in targets:
        v = t[t != IGNORE]
        counts = np.bincount(v, minlength=num_classes)[:num_classes]
        pix += counts
        denom[counts > 0] += v.size
    seen = pix > 0
    w = np.ones(num_classes)
    if seen.any():
        f = pix[seen] / denom[seen]
        w[seen] = np.minimum(np.median(f) / f, max_weight) ** power
    return torch.tensor(w, dtype=torch.float32)


class LabelledImages(torch.utils.data.Dataset):
    """Random-scale, random-crop, flip samples of a segmentation split.

    Each item is ``pixels`` (3, S, S) normalised, ``target`` (S, S) int64 with weak classes
    hidden, and ``tags`` (C,) presence of each class in the crop, from its label map before hiding
    (tags of the whole photo would name cars and people the crop does not show). Augmentation draws
    from an RNG seeded by (seed, epoch, index): runs and resumed runs see the same crops.

    Args:
        ds: a ``groupseg.eval.datasets`` segmentation dataset.
        indices: the samples used (``select_subset``).
        cfg: a ``FinetuneConfig`` (seed, short_side, scale_range, crop_size).
        hidden: class indices whose pixels are hidden (``IGNORE``).
        mean: per-channel pixel mean of the model.
        std: per-channel pixel standard deviation of the model.
    """

    def __init__(self, ds, indices: Sequence[int], cfg, hidden: Sequence[int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.ds, self.indices, self.cfg, self.hidden = ds, list(indices), cfg, list(hidden)
        self.mean, self.std = tuple(mean), tuple(std)
        self.epoch = 0
        self._decoded: dict[int, tuple] = {}  # subset position -> (image, uint8 label map), see ``decoded``
        self._decoded_bytes = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        cfg = self.cfg
        img, lab = self.decoded(i)
        rng = np.random.default_rng([cfg.seed, self.epoch, self.indices[i]])
        s = cfg.short_side * rng.uniform(*cfg.scale_range) / min(img.size)
        w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
        S = cfg.crop_size
        small = w < S or h < S
        if small:
            img, lab = img.resize((w, h), Image.BILINEAR), lab.resize((w, h), Image.NEAREST)
        else:  # the crop of the image resized to (w, h), resampling only the crop
            y, x = int(rng.integers(0, h - S + 1)), int(rng.integers(0, w - S + 1))
            sx, sy = img.width / w, img.height / h
            box = (x * sx, y * sy, (x + S) * sx, (y + S) * sy)
            img, lab = img.resize((S, S), Image.BILINEAR, box=box), lab.resize((S, S), Image.NEAREST, box=box)
        px = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        t = torch.from_numpy(np.asarray(lab, dtype=np.uint8).astype(np.int64))
        if small:  # padded: zeros (mean after normalising) / ignore, then cropped
            pad = (0, max(0, S - w), 0, max(0, S - h))
            px, t = F.pad(px, pad), F.pad(t, pad, value=IGNORE)
            y = int(rng.integers(0, px.shape[1] - S + 1))
            x = int(rng.integers(0, px.shape[2] - S + 1))
            px, t = px[:, y : y + S, x : x + S], t[y : y + S, x : x + S]
        if rng.random() < 0.5:
            px, t = px.flip(-1), t.flip(-1)
        if cfg.color_jitter > 0:
            px = photometric(px, cfg.color_jitter, rng)
        px = normalize_pixels(px, self.mean, self.std)
        # the crop is the image the model sees: its tags come from its own (full) label map, then
        # the weak classes' pixels are hidden
        full = t.numpy()
        tags = image_tags(full, len(self.ds.vocab))
        target = torch.from_numpy(hide_classes(full, self.hidden))
        return {"pixels": px, "target": target, "tags": torch.from_numpy(tags)}

    def decoded(self, i: int):
        """Subset item ``i``'s RGB image and label map (vocabulary indices, ``IGNORE`` elsewhere) as PIL
        images. Every epoch crops the same photos again, so the training process keeps them decoded
        while they fit in ``DECODED_CACHE_BYTES`` (CamVid train: about 1.3 GB); decoding a 960 x 720
        photo and its labels is a third of preparing a crop. Loader worker processes decode afresh
        (their memory would be lost at the end of each epoch)."""
        from PIL import Image

        hit = self._decoded.get(i)
        if hit is not None:
            return hit
        sample = self.ds.samples[self.indices[i]]
        img = load_image(sample.image)
        full = vocab_targets(self.ds, sample)
        if full.shape != (img.height, img.width):
            raise ValueError(f"{sample.label}: label map {full.shape[::-1]} does not match image {img.size}")
        out = img, Image.fromarray(full.astype(np.uint8))
        size = 5 * img.width * img.height  # PIL keeps RGB in 4 bytes a pixel, labels in 1
        if torch.utils.data.get_worker_info() is None and self._decoded_bytes + size <= DECODED_CACHE_BYTES:
            self._decoded[i], self._decoded_bytes = out, self._decoded_bytes + size
        return out


def photometric(px: torch.Tensor, strength: float, rng: np.random.Generator) -> torch.Tensor:
    """Seeded photometric augmentation of a uint8 (3, H, W) crop: brightness, contrast and saturation
    factors in ``[1 - s, 1 + s]``, hue shifted by up to ``s / 8`` (in random order), then a Gaussian
    blur half the time. Day and dusk frames differ mostly in these.

    Args:
        px: uint8 RGB crop, channels first.
        strength: ``s`` in (0, 1].
        rng: the crop's generator (the same image, epoch and seed give the same result).
    """
    import torchvision.transforms.v2.functional as TF

    ops = [
        lambda x, f: TF.adjust_brightness(x, f),
        lambda x, f: TF.adjust_contrast(x, f),
        lambda x, f: TF.adjust_saturation(x, f),
    ]
    factors = rng.uniform(1 - strength, 1 + strength, size=3)
    for k in rng.permutation(3):
        px = ops[k](px, float(factors[k]))
    px = TF.adjust_hue(px, float(rng.uniform(-strength / 8, strength / 8)))
    if rng.random() < 0.5:
        px = TF.gaussian_blur(px, kernel_size=5, sigma=float(rng.uniform(0.1, 1.5)))
    return px
