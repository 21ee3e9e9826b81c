"""``groupseg eval``: zero-shot mIoU on segmentation benchmarks, the unsupervised (Hungarian)
protocol, and image-text retrieval on Flickr8k; a results JSON, a console table and pictures."""
from __future__ import annotations

import argparse
import heapq
import os
import json
import math
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from groupseg.prompting import DEFAULT_TEMPLATES

from .datasets import DATASETS, Sample, SegDataset, load_dataset, read_rgb
from .metrics import ConfusionMatrix

EXAMPLES = """examples:
  groupseg eval --dataset voc --data-root data/ --weights gvit-yfcc/ --out voc.json --gallery voc.png
  groupseg eval --dataset camvid --data-root data/camvid --device cuda --confusion camvid_cm.png
  groupseg eval --dataset folder --data-root mydata/ --vocab-file mydata/classes.txt
  groupseg eval --dataset cityscapes --data-root data/ --protocol unsupervised
  groupseg eval --dataset flickr8k --data-root data/flickr8k --split dev
"""

THUMB_WIDTH = 320


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The ``groupseg eval`` options."""
    p.epilog = EXAMPLES
    p.add_argument("--dataset", required=True, choices=[*DATASETS, "flickr8k"], metavar="NAME",
                   help=f"benchmark: {', '.join(DATASETS)}, flickr8k (retrieval)")
    p.add_argument("--data-root", required=True, help="folder the dataset was unpacked into")
    p.add_argument("--split", default="val", help="split (default: val; flickr8k: dev or test)")
    p.add_argument("--weights", help="weights directory, file or hub id (default: see README, 'Default weights')")
    p.add_argument("--vocab-file", help="class names, one per line in label order (required for 'folder'; replaces the shipped list otherwise)")
    p.add_argument("--out", help="write the results JSON here")
    p.add_argument("--save-predictions", metavar="DIR", help="write STEM.png label maps (vocabulary indices, 255 = background)")
    p.add_argument("--threshold", type=float, help="background threshold (default: the benchmark's, e.g. 0.95 for voc, 0 without background)")
    p.add_argument("--templates", default=DEFAULT_TEMPLATES, help=f"prompt template set or file (default: {DEFAULT_TEMPLATES})")
    p.add_argument("--short-side", type=int, default=448, help="resize so the short side is this many pixels (default: 448)")
    p.add_argument("--window", type=int, default=None,
                   help="sliding-window size in pixels (0 = whole image; default: the weights' own, else 0)")
    p.add_argument("--top-k", type=int, default=0, help="keep only each image's k most likely classes (0 = all)")
    p.add_argument("--flip", action="store_true", help="average class scores with the mirrored image")
    p.add_argument("--groupings", type=int, default=None, metavar="N",
                   help="use only the first N grouping stages' segments (default: all; 1 = finer segments)")
    p.add_argument("--pamr", action="store_true", help="refine boundaries onto image edges with PAMR (as TCL)")
    p.add_argument("--scales", default="1", help="comma-separated short-side factors whose class scores are averaged, e.g. 0.75,1,1.25")
    p.add_argument("--limit", type=int, default=0, help="evaluate only the first N images (0 = all)")
    p.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--protocol", choices=["zero-shot", "unsupervised"], default="zero-shot",
                   help="zero-shot: name classes with text; unsupervised: k-means over the dataset + Hungarian matching")
    p.add_argument("--clusters", type=int, default=0, help="unsupervised protocol: K (default: the number of classes)")
    p.add_argument("--gallery", metavar="PNG", help="picture of the 3 best and 3 worst images: image / truth / prediction")
    p.add_argument("--confusion", metavar="PNG", help="picture of the row-normalised confusion matrix")


def run_eval(args: argparse.Namespace) -> int:
    """Run ``groupseg eval``; returns the exit code."""
    if args.dataset == "flickr8k":
        return run_retrieval(args)
    ds = load_dataset(args.dataset, args.data_root, args.split, args.vocab_file)
    samples = ds.samples[: args.limit] if args.limit > 0 else ds.samples
    threshold = ds.default_threshold if args.threshold is None else args.threshold
    if args.clusters and args.protocol != "unsupervised":
        raise ValueError("--clusters applies to --protocol unsupervised (for one image: groupseg segment --clusters K)")
    if args.protocol == "unsupervised" and (args.flip or _scales(args.scales) != [1.0]):
        raise ValueError("--flip and --scales apply to the zero-shot protocol only")
    from accelerate import PartialState

    # under `accelerate launch` (or torchrun), every process takes its share of the images
    state = PartialState(cpu=os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available())
    world, rank = state.num_processes, state.process_index
    if world > 1:
        if args.protocol == "unsupervised":
            raise ValueError("--protocol unsupervised clusters the whole dataset at once: run it in one process")
        args.device = args.device or str(state.device)
        print(f"process {rank} of {world}: {len(samples[rank::world])} of {len(samples)} images", file=sys.stderr)
    seg, weights = _segmenter(args, threshold)
    if args.protocol == "unsupervised":
        cm, per_image = evaluate_unsupervised(seg, ds, samples, args)
    else:
        cm, per_image = evaluate_zero_shot(seg, ds, samples[rank::world], args, threshold)
    if world > 1:
        from accelerate.utils import reduce

        cm.mat = reduce(cm.mat.to(state.device), reduction="sum").cpu()
        if not state.is_main_process:
            return 0  # the main process reports (its gallery shows its own share of the images)
    res = cm.compute()
    print_table(ds, res, len(samples), f"{ds.name} ({args.split}), {args.protocol}, threshold {threshold:g}")
    if args.confusion:
        plot_confusion(cm.mat, ds.classes, args.confusion, f"{ds.name} {args.split}: mIoU {100 * res['miou']:.1f}")
        print(f"wrote {args.confusion}")
    if args.gallery:
        per_image.save(args.gallery)
        print(f"wrote {args.gallery}")
    results = {
        "dataset": ds.name,
        "split": args.split,
        "protocol": args.protocol,
        "miou": res["miou"],
        "per_class_iou": dict(zip(ds.classes, res["per_class_iou"])),
        "pixel_acc": res["pixel_acc"],
        "mean_acc": res["mean_acc"],
        "fwiou": res["fwiou"],
        "num_images": len(samples),
        "num_pixels": res["num_pixels"],
        "threshold": threshold,
        "command": command_line(args),
        "weights": weights,
    }
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return 0


# ----------------------------------------------------------------------------- zero-shot
def evaluate_zero_shot(seg, ds: SegDataset, samples: Sequence[Sample], args, threshold: float) -> tuple[ConfusionMatrix, "Gallery"]:
    """Segment every image with the benchmark's class names; one confusion matrix at each image's size."""
    from tqdm import tqdm

    scales = _scales(args.scales)
    cm = ConfusionMatrix(ds.num_classes, ignore_index=ds.ignore_index)
    gallery = Gallery(ds)
    seg.class_embeddings(ds.vocab)  # text embeddings once, before the progress bar starts
    for s in tqdm(samples, desc=f"eval {ds.name}", unit="img", dynamic_ncols=True):
        target = ds.load_target(s)
        rgb = read_rgb(s.image)
        label_map, bg = predict(seg, rgb, ds.vocab, threshold, args.flip, scales)
        pred = ds.to_metric(label_map, bg)
        _check_size(s, pred, target)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target))
        if args.save_predictions:
            save_label_map(label_map, bg, Path(args.save_predictions) / f"{s.stem}.png")
        if args.gallery:
            gallery.add(image_miou(pred, target, ds.num_classes, ds.ignore_index), s.stem, rgb, target, pred)
    return cm, gallery


def predict(seg, image: np.ndarray, vocab: Sequence[str], threshold: float, flip: bool = False,
            scales: Sequence[float] = (1.0,)) -> tuple[np.ndarray, int]:
    """(label map, its background value). Flip / scales average the class scores; the plain path
    takes the label map as is (no per-pixel scores are made)."""
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
    conf, label = acc.max(0)
    small = acc.shape[0] < 255
    bg = 255 if small else -1
    lm = label.numpy().astype(np.uint8 if small else np.int32)
    if threshold > 0:
        lm[(conf < threshold).numpy()] = bg
    return lm, bg


def _check_size(s: Sample, pred: np.ndarray, target: np.ndarray) -> None:
    if pred.shape != target.shape:
        raise ValueError(f"{s.stem}: image {s.image.name} is {pred.shape[1]}x{pred.shape[0]} but its label map is "
                         f"{target.shape[1]}x{target.shape[0]}")


# ----------------------------------------------------------------------------- unsupervised
def evaluate_unsupervised(seg, ds: SegDataset, samples: Sequence[Sample], args) -> tuple[ConfusionMatrix, "Gallery"]:
    """STEGO / PASS protocol: k-means (K = classes) over the segments of all images, every pixel
    takes its cluster, clusters are matched one-to-one to classes by the Hungarian algorithm on
    the cluster-vs-class confusion, then the usual metrics. Two passes over the images (features,
    then assignment); a third over the few images pictured or saved."""
    from tqdm import tqdm

    from groupseg.clusters import cluster_label_map, group_features, kmeans

    from .clusters import Reservoir, hungarian_match, matched_confusion

    C = ds.num_classes
    K = args.clusters or C
    if getattr(seg.model, "stego", None) is not None:  # a STEGO head (groupseg discover): its codes and centres
        from groupseg.stego import stego_centres, stego_label_map

        centres = stego_centres(seg, (read_rgb(s.image) for s in tqdm(samples, desc="features", unit="img")), K)
        pool = Reservoir()

        def clusters_of(rgb: np.ndarray) -> np.ndarray:  # (H, W) nearest centre per pixel
            return stego_label_map(seg, rgb, centres).numpy().astype(np.int64)
    else:
        pool = Reservoir()
        for s in tqdm(samples, desc="features", unit="img", dynamic_ncols=True):
            f = group_features(seg, read_rgb(s.image))
            pool.add(f.embeds.cpu(), f.areas.cpu())
        centres, _ = kmeans(pool.x.to(seg.device), K, weights=pool.w.to(seg.device), seed=0)

        def clusters_of(rgb: np.ndarray) -> np.ndarray:  # (H, W) nearest centre per pixel
            f = group_features(seg, rgb)
            return cluster_label_map(f, (f.embeds @ centres.T).argmax(1))

    conf = np.zeros(K * C, dtype=np.int64)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []  # per image: (stem, cluster * C + class, count), small
    for s in tqdm(samples, desc="assign", unit="img", dynamic_ncols=True):
        target = ds.load_target(s)
        lab = clusters_of(read_rgb(s.image))
        _check_size(s, lab, target)
        valid = (target != ds.ignore_index) & (target >= 0) & (target < C)
        codes, counts = np.unique(lab[valid] * C + target[valid], return_counts=True)
        np.add.at(conf, codes, counts)
        if args.gallery:
            pairs.append((s.stem, codes.astype(np.int64), counts.astype(np.int64)))
    conf = conf.reshape(K, C)
    mapping = hungarian_match(conf)
    cm = ConfusionMatrix(C, ignore_index=ds.ignore_index)
    cm.mat = matched_confusion(conf, mapping)

    gallery = Gallery(ds)
    chosen: set[str] = set()
    if args.gallery:
        scored = [(_miou_of_pairs(mapping[c // C], c % C, n, C), stem) for stem, c, n in pairs]
        chosen = {stem for _, stem in Gallery.pick(scored)}
    if chosen or args.save_predictions:
        todo = [s for s in samples if args.save_predictions or s.stem in chosen]
        lut = np.append(mapping, -1)  # cluster -> metric class, -1 unmatched
        for s in tqdm(todo, desc="render", unit="img", dynamic_ncols=True):
            rgb = read_rgb(s.image)
            pred = lut[clusters_of(rgb)]
            if args.save_predictions:
                vocab_idx = pred - 1 if ds.background else pred
                save_label_map(np.where(vocab_idx < 0, -1, vocab_idx), -1, Path(args.save_predictions) / f"{s.stem}.png", C)
            if s.stem in chosen:
                target = ds.load_target(s)
                gallery.add(image_miou(pred, target, C, ds.ignore_index), s.stem, rgb, target, pred)
    print(f"unsupervised: K={K} clusters over {len(pool.x) if pool.x is not None else 'the head codes of all'} segments, "
          f"{int((mapping >= 0).sum())} matched to classes")
    return cm, gallery


# ----------------------------------------------------------------------------- per image
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


# ----------------------------------------------------------------------------- outputs
def save_label_map(label_map: np.ndarray, background: int, path: Path, num_classes: int | None = None) -> None:
    """Class indices as PNG: 8-bit with 255 = background, or 16-bit with 65535 for >= 255 classes."""
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    wide = label_map.dtype != np.uint8 and (num_classes is None or num_classes >= 255 or label_map.max(initial=0) >= 255)
    bg = label_map == background
    if wide:
        out = np.where(bg, 65535, label_map).astype(np.uint16)
    else:
        out = np.where(bg, 255, label_map).astype(np.uint8)
    Image.fromarray(out).save(path)


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_nan_to_none(v) for v in x]
    return x


def write_json(results: dict, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(_nan_to_none(results), indent=2, allow_nan=False) + "\n")


def print_table(ds: SegDataset, res: dict, n_images: int, title: str) -> None:
    """Per-class IoU and the summary, in percent."""
    pct = lambda v: "    -" if v is None or math.isnan(v) else f"{100 * v:5.1f}"  # noqa: E731
    width = max(12, *(len(c) for c in ds.classes)) if ds.classes else 12
    print(f"\n{title}, {n_images} images")
    print(f"{'class':<{width}}  IoU %")
    for c, v in zip(ds.classes, res["per_class_iou"]):
        print(f"{c:<{width}}  {pct(v)}")
    print(f"mIoU {pct(res['miou']).strip()} | pixel acc {pct(res['pixel_acc']).strip()} | "
          f"mean acc {pct(res['mean_acc']).strip()} | fwIoU {pct(res['fwiou']).strip()}")


def command_line(args: argparse.Namespace) -> list[str]:
    """The command that reproduces this run: ``groupseg eval`` with every option that differs from its default."""
    parser = argparse.ArgumentParser(add_help=False)
    add_eval_args(parser)
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


def _scales(text: str) -> list[float]:
    try:
        out = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--scales must be comma-separated numbers, e.g. 0.75,1,1.25 (got {text!r})") from None
    if not out or any(s <= 0 for s in out):
        raise ValueError(f"--scales must be positive numbers (got {text!r})")
    return out


def _segmenter(args, threshold: float):
    from groupseg.pretrained import resolve_weights
    from groupseg.segment import Segmenter

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    weights = resolve_weights(args.weights)
    seg = Segmenter.from_pretrained(weights, device=device, templates=args.templates, short_side=args.short_side,
                                    window=args.window, top_k=args.top_k, threshold=threshold,
                                    refine="pamr" if args.pamr else "", groupings=args.groupings)
    return seg, str(weights)


# ----------------------------------------------------------------------------- pictures
class Gallery:
    """Keeps thumbnails of the 3 best and 3 worst images by per-image mIoU (bounded memory).

    Args:
        ds: the dataset (class names, background, ignore index).
        n: images kept at each end.
    """

    def __init__(self, ds: SegDataset, n: int = 3) -> None:
        self.ds, self.n = ds, n
        self._best: list = []  # min-heap of (miou, order, stem, thumbs)
        self._worst: list = []  # min-heap of (-miou, ...)
        self._count = 0
        from groupseg.segment import palette

        pal = palette(ds.num_classes).astype(np.uint8)
        if ds.background:
            pal[0] = (0, 0, 0)
        self.pal = np.concatenate([pal, [[0, 0, 0], [90, 90, 90]]]).astype(np.uint8)  # + no class, ignore

    @staticmethod
    def pick(scored: list[tuple[float, str]], n: int = 3) -> list[tuple[float, str]]:
        """The n best, then the n worst (not already among the best) of (score, stem) pairs; NaN skipped."""
        ok = sorted((x for x in scored if not math.isnan(x[0])), key=lambda x: -x[0])
        best = ok[:n]
        worst = [x for x in ok[::-1][:n] if x not in best]
        return best + worst

    def _colour(self, lab: np.ndarray, is_target: bool) -> np.ndarray:
        C = self.ds.num_classes
        idx = np.where((lab >= 0) & (lab < C), lab, C + 1 if is_target else C)
        return self.pal[idx]

    def _thumbs(self, rgb: np.ndarray, target: np.ndarray, pred: np.ndarray):
        from PIL import Image

        h, w = target.shape
        tw = min(THUMB_WIDTH, w)
        th = max(1, round(h * tw / w))
        img = Image.fromarray(rgb).resize((tw, th), Image.BILINEAR)
        gt = Image.fromarray(self._colour(target, True)).resize((tw, th), Image.NEAREST)
        pr = Image.fromarray(self._colour(pred, False)).resize((tw, th), Image.NEAREST)
        present = set(np.unique(target).tolist()) | set(np.unique(pred).tolist())
        return img, gt, pr, {c for c in present if 0 <= c < self.ds.num_classes}

    def add(self, miou: float, stem: str, rgb: np.ndarray, target: np.ndarray, pred: np.ndarray) -> None:
        if math.isnan(miou):
            return
        self._count += 1
        thumbs = None
        for heap, key in ((self._best, miou), (self._worst, -miou)):
            if len(heap) < self.n or (key, self._count) > heap[0][:2]:
                thumbs = thumbs or self._thumbs(rgb, target, pred)
                entry = (key, self._count, stem, thumbs)
                (heapq.heappush if len(heap) < self.n else heapq.heapreplace)(heap, entry)

    def rows(self) -> list[tuple[float, str, tuple]]:
        best = sorted(((k, s, t) for k, _, s, t in self._best), key=lambda r: -r[0])
        names = {s for _, s, _ in best}
        worst = sorted(((-k, s, t) for k, _, s, t in self._worst if s not in names), key=lambda r: r[0])
        return best + worst

    def save(self, path: str | Path) -> None:
        """Write the picture: a header per row (stem, mIoU), image / truth / prediction, and a legend."""
        from PIL import Image, ImageDraw

        from groupseg.segment import _font

        rows = self.rows()
        font = _font(13)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not rows:
            img = Image.new("RGB", (3 * THUMB_WIDTH, 40), "white")
            ImageDraw.Draw(img).text((8, 12), "no image with labelled pixels", fill="black", font=font)
            img.save(p)
            return
        pad, head = 4, 20
        col_w = max(t[0].width for _, _, t in rows)
        present = sorted(set().union(*(t[3] for _, _, t in rows)))
        names = [self.ds.classes[c] for c in present]
        per_line = max(1, (3 * (col_w + pad)) // 150)
        legend_h = 18 * math.ceil(len(names) / per_line) + 8 if names else 0
        H = head + sum(head + t[0].height + pad for _, _, t in rows) + legend_h
        canvas = Image.new("RGB", (3 * (col_w + pad) + pad, H), "white")
        draw = ImageDraw.Draw(canvas)
        for i, title in enumerate(("image", "ground truth", "prediction")):
            draw.text((pad + i * (col_w + pad), 3), title, fill="black", font=font)
        y = head
        for k, (score, stem, (img, gt, pr, _)) in enumerate(rows):
            tag = "best" if k < min(self.n, len(self._best)) else "worst"
            draw.text((pad, y + 3), f"{tag}: {stem}  mIoU {100 * score:.1f}%", fill="black", font=font)
            y += head
            for i, t in enumerate((img, gt, pr)):
                canvas.paste(t, (pad + i * (col_w + pad), y))
            y += img.height + pad
        for j, (c, name) in enumerate(zip(present, names)):
            x0 = pad + (j % per_line) * 150
            y0 = y + 4 + 18 * (j // per_line)
            draw.rectangle([x0, y0, x0 + 12, y0 + 12], fill=tuple(int(v) for v in self.pal[c]), outline="black")
            draw.text((x0 + 16, y0 - 1), name[:18], fill="black", font=font)
        canvas.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(p, optimize=True)  # ~3x smaller


def plot_confusion(mat: torch.Tensor, classes: Sequence[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows = truth, columns = prediction) with class names on the axes.

    Args:
        mat: (C, C + 1) counts as in ``ConfusionMatrix.mat`` (last column: predictions of no class).
        classes: the C class names.
        path: PNG to write.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = mat.double().cpu().numpy()
    C = len(classes)
    labels_x = list(classes)
    if m.shape[1] > C and m[:, C].sum() == 0:
        m = m[:, :C]
    elif m.shape[1] > C:
        labels_x.append("(none)")
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    size = float(np.clip(3 + 0.2 * C, 5, 24))
    fig = Figure(figsize=(size * m.shape[1] / C, size), dpi=100 if C <= 60 else 72)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if C <= 200:
        fs = 9 if C <= 25 else (6 if C <= 80 else 4)
        ax.set_xticks(range(len(labels_x)), labels_x, rotation=90, fontsize=fs)
        ax.set_yticks(range(C), classes, fontsize=fs)
    if C <= 25:
        for i in range(C):
            for j in range(norm.shape[1]):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if norm[i, j] > 0.6 else "white")
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion matrix (rows sum to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


# ----------------------------------------------------------------------------- retrieval
def run_retrieval(args: argparse.Namespace) -> int:
    """Flickr8k image-text retrieval: recall@1/5/10 both ways (``groupseg.eval.retrieval.recall_at_k``)."""
    from tqdm import tqdm

    from .retrieval import recall_at_k

    root = Path(args.data_root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root} (--data-root)")
    split = {"val": "dev"}.get(args.split, args.split)
    names_file = root / f"Flickr_8k.{split}Images.txt"
    tokens_file = root / "Flickr8k.token.txt"
    for f in (names_file, tokens_file):
        if not f.is_file():
            raise FileNotFoundError(f"Flickr8k file not found: expected {f} (--split dev or test)")
    img_dir = next((root / d for d in ("images", "Flicker8k_Dataset", "Flickr8k_Dataset") if (root / d).is_dir()), root)
    names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    if args.limit > 0:
        names = names[: args.limit]
    caps: dict[str, list[str]] = {}
    for ln in tokens_file.read_text(encoding="utf-8").splitlines():
        if "\t" in ln:
            key, text = ln.split("\t", 1)
            caps.setdefault(key.split("#", 1)[0], []).append(text.strip())
    missing = [n for n in names if n not in caps]
    if missing:
        raise ValueError(f"{tokens_file.name} has no captions for {missing[0]} ({len(missing)} images without captions)")
    texts, owner = [], []
    for i, n in enumerate(names):
        texts += caps[n]
        owner += [i] * len(caps[n])
    seg, weights = _segmenter(args, 0.0)
    img_emb = []
    for i in tqdm(range(0, len(names), 32), desc="images", unit="batch", dynamic_ncols=True):
        img_emb.append(seg.encode_images([img_dir / n for n in names[i : i + 32]]).cpu())
    txt_emb = []
    for i in tqdm(range(0, len(texts), 256), desc="captions", unit="batch", dynamic_ncols=True):
        txt_emb.append(seg.encode_texts(texts[i : i + 256]).cpu())
    sim = torch.cat(img_emb) @ torch.cat(txt_emb).T  # (I, T)
    r = recall_at_k(sim, torch.tensor(owner))
    print(f"\nflickr8k ({split}), {len(names)} images, {len(texts)} captions")
    print("            R@1    R@5   R@10")
    for d, name in (("i2t", "image->text"), ("t2i", "text->image")):
        print(f"{name:<11} {r[f'{d}_r1']:5.1f}  {r[f'{d}_r5']:5.1f}  {r[f'{d}_r10']:5.1f}")
    print(f"rsum {r['rsum']:.1f}")
    results = {"dataset": "flickr8k", "split": split, **r, "num_images": len(names), "num_captions": len(texts),
               "command": command_line(args), "weights": weights}
    if args.out:
        write_json(results, args.out)
        print(f"wrote {args.out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m groupseg.eval.main ...``: the same as ``groupseg eval ...``."""
    from groupseg.cli import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
