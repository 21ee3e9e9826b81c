"""What an evaluation hands back: per-image scores, the console table, the results JSON and the
command line that reproduces a run."""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def _miou_of_pairs(pred: np.ndarray, true: np.ndarray, counts: np.ndarray | None, C: int) -> float:
    """Mean IoU over the classes present in truth or prediction; ``pred`` outside 0..C-1 = miss."""
    w = None if counts is None else counts.astype(np.float64)
    gt = np.bincount(true, weights=w, minlength=C)[:C]
    ok = (pred >= 0) & (pred < C)
    pr = np.bincount(pred[ok], weights=None if w is None else w[ok], minlength=C)[:C]
    hit = ok & (pred == true)
    tp = np.bincount(true[hit], weights=None if w is None else w[hit], minlength=C)[:C]
    union = gt + pr - tp
    present = union > 0
    return float((tp[present] / union[present]).mean()) if present.any() else float("nan")


def image_miou(pred: np.ndarray, target: np.ndarray, num_classes: int, ignore_index: int) -> float:
    """One image's mIoU (classes present in its truth or prediction); NaN when nothing is labelled."""
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    return _miou_of_pairs(pred[valid].astype(np.int64), target[valid].astype(np.int64), None, num_classes)


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def write_json(results: dict, path: str | Path) -> None:
    """Results as JSON; NaN (a class absent from truth and prediction) becomes null."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_nan_to_none(results), indent=2, allow_nan=False) + "\n")


def print_table(classes: list[str], res: dict, n_images: int, title: str) -> None:
    """Per-class IoU and the summary, in percent."""
    pct = lambda v: "    -" if v is None or math.isnan(v) else f"{100 * v:5.1f}"  # noqa: E731
    width = max(12, *(len(c) for c in classes)) if classes else 12
    print(f"\n{title}, {n_images} images")
    print(f"{'class':<{width}}  IoU %")
    for c, v in zip(classes, res["per_class_iou"]):
        print(f"{c:<{width}}  {pct(v)}")
    print(f"mIoU {pct(res['miou']).strip()} | pixel acc {pct(res['pixel_acc']).strip()} | "
          f"mean acc {pct(res['mean_acc']).strip()} | fwIoU {pct(res['fwiou']).strip()}")


def command_line(args: argparse.Namespace, add_args) -> list[str]:
    """The command that reproduces this run: ``groupseg eval`` with every option that differs from its default."""
    parser = argparse.ArgumentParser(add_help=False)
    add_args(parser)
    out = ["groupseg", "eval"]
    for a in parser._actions:
        if not a.option_strings or not hasattr(args, a.dest):
            continue
        v = getattr(args, a.dest)
        if v == a.default and not a.required:
            continue
        if isinstance(a, argparse._StoreTrueAction):
            out.append(a.option_strings[0])
        else:
            out += [a.option_strings[0], str(v)]
    return out
