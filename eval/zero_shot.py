"""Zero-shot segmentation benchmarks: the paper's protocol (GroupViT, exactly as NVlabs' code) or
groupseg's own settings (synonym vocabularies, windows, PAMR, flip / multi-scale, plain threshold).

The protocol's pieces live in the library (``groupseg.segment.Segmenter(protocol=...)``,
``groupseg.classify``, ``groupseg.transforms``); this module picks the settings for a benchmark,
runs every image and counts.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from groupseg.classify import background_value, threshold_label_map
from groupseg.viz import Gallery, save_label_map

from .datasets import Sample, SegDataset, read_rgb
from .metrics import ConfusionMatrix
from .report import image_miou

PAPER_DATASETS = ("voc", "context", "coco-object")  # the benchmarks of the GroupViT paper: --protocol paper by default
GROUPSEG_ONLY = {"short_side": "--short-side", "flip": "--flip", "pamr": "--pamr"}


def resolve_protocol(args, ds: SegDataset) -> str:
    """``paper`` / ``groupseg`` / ``unsupervised`` from ``--protocol`` and the benchmark."""
    p = args.protocol or "zero-shot"
    if p == "zero-shot":  # the benchmark's default zero-shot protocol
        p = "paper" if ds.name in PAPER_DATASETS else "groupseg"
    if p == "paper":
        used = [flag for key, flag in GROUPSEG_ONLY.items() if getattr(args, key, None) not in (None, False)]
        if args.scales not in (None, "1"):
            used.append("--scales")
        if used:
            raise ValueError(f"{', '.join(used)} apply to --protocol groupseg (the paper's protocol fixes them)")
    return p


def vocabulary(ds: SegDataset, protocol: str, vocab_file_given: bool) -> list[str]:
    """The paper's class names (NVlabs' configs) under the paper protocol, else the benchmark's vocabulary."""
    if protocol == "paper" and ds.paper_vocab is not None and not vocab_file_given:
        return ds.paper_vocab
    return ds.vocab


def settings(seg, protocol: str, threshold: float, vocab_source: str) -> dict:
    """The effective inference settings, for the results JSON and the table title."""
    out = {"protocol": protocol, "templates": seg.templates, "window": seg.window, "stride": seg.stride,
           "top_k": seg.top_k, "threshold": threshold, "vocabulary": vocab_source}
    if protocol == "paper":
        out.update(resize=f"keep ratio within {seg.scale[0]}x{seg.scale[1]} (mmcv)",
                   background="min(threshold, best segment of the crop) (NVlabs)")
    else:
        out.update(resize=f"short side {seg.short_side}, rounded to the patch size", background="plain threshold")
    return out


def evaluate_zero_shot(seg, ds: SegDataset, samples: Sequence[Sample], vocab: list[str], args, threshold: float) -> tuple[ConfusionMatrix, Gallery]:
    """Segment every image with ``vocab``; one confusion matrix at each image's size."""
    from tqdm import tqdm

    scales = parse_scales(args.scales or "1")
    cm = ConfusionMatrix(ds.num_classes, ignore_index=ds.ignore_index)
    gallery = Gallery(ds.classes, ds.background)
    seg.class_embeddings(vocab)  # text embeddings once, before the progress bar starts
    for s in tqdm(samples, desc=f"eval {ds.name}", unit="img", dynamic_ncols=True):
        target = ds.load_target(s)
        rgb = read_rgb(s.image)
        label_map, bg = predict(seg, rgb, vocab, threshold, args.flip, scales)
        pred = ds.to_metric(label_map, bg)
        check_size(s, pred, target)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        if args.save_predictions:
            save_label_map(label_map, bg, Path(args.save_predictions) / f"{s.stem}.png")
        if args.gallery:
            gallery.add(image_miou(pred, target, ds.num_classes, ds.ignore_index), s.stem, rgb, target, pred)
    return cm, gallery


def predict(seg, image: np.ndarray, vocab: Sequence[str], threshold: float, flip: bool = False,
            scales: Sequence[float] = (1.0,)) -> tuple[np.ndarray, int]:
    """(label map, its background value). Flip / scales (groupseg protocol) average the class
    scores; the plain path takes the Segmenter's label map as is."""
    if not flip and list(scales) == [1.0]:
        r = seg.segment(image, vocab, threshold=threshold)
        return r.label_map, r.background
    refine, seg.refine = seg.refine, ""  # refine the averaged scores once, below
    base = seg.short_side
    acc, n = None, 0
    try:
        for s in scales:
            seg.short_side = max(seg.cfg.vision.patch_size, int(round(base * s)))
            for mirrored in ([False, True] if flip else [False]):
                img = np.ascontiguousarray(image[:, ::-1]) if mirrored else image
                sc = seg.segment(img, vocab, threshold=0.0).scores  # (C, H, W)
                sc = sc.flip(-1) if mirrored else sc
                acc = sc.clone() if acc is None else acc.add_(sc)
                n += 1
    finally:
        seg.short_side = base
        seg.refine = refine
    acc /= n
    if refine == "pamr":
        from groupseg.refine import pamr

        acc = pamr(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(), acc)
    lm = threshold_label_map(acc, threshold)
    return lm, background_value(acc.shape[0])


def check_size(s: Sample, pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{s.stem}: image {s.image.name} is {pred.shape[1]}x{pred.shape[0]} but its label map is "
                         f"{target.shape[1]}x{target.shape[0]}")


def parse_scales(text: str) -> list[float]:
    try:
        out = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, e.g. 0.75,1,1.25 (got {text!r})") from None
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"--scales must be positive numbers (got {text!r})")
    return out
