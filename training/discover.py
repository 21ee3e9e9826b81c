"""``groupseg discover``: learn to segment with no labels and no words (STEGO, then PASS-style self-training).

    groupseg discover --dataset camvid --data-root ../shared/data/camvid --split train --out runs/discover
    groupseg discover --images-dir photos/ --clusters 8 --out runs/discover-photos

1. Features, once: every image is resized so its short side is ``res / crop_ratio`` and cut into
   five square crops of side ``res`` (four corners and the centre, STEGO's five-crop); the frozen
   backbone's first-stage patch tokens of each crop go to a float16 file on disk (memory does not
   grow with the number of images), with one global feature per crop (mean token).
2. Neighbours, once: the ``knn`` nearest crops of each crop by global feature, never a crop of
   the same photo.
3. STEGO head: correspondence distillation (``groupseg.loss.correspondence_loss``) on batches of
   crops, each paired with itself, a random one of its neighbours and random other crops.
4. Cluster probe: mini-batch cosine k-means of the codes of all crops (streamed).
5. Self-training (PASS-style, ``groupseg.training.selftrain``; ``--self-train-rounds 0`` = off).
6. Export: ordinary groupseg weights (backbone + head + centres + the centres' naming directions);
   ``groupseg segment --clusters K --weights OUT`` and ``groupseg eval --protocol unsupervised
   --weights OUT`` use the head.

Labels are never read. Checkpoints in ``OUT/checkpoints``; ``--resume auto`` continues.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from groupseg.argtypes import float_range, int_range

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

EXAMPLES = """examples:
  groupseg discover --dataset camvid --data-root ../shared/data/camvid --split train --out runs/discover
  groupseg discover --images-dir photos/ --clusters 8 --out runs/discover-photos --self-train-rounds 0
  groupseg eval --dataset camvid --data-root ../shared/data/camvid --protocol unsupervised --weights runs/discover
  groupseg segment street.jpg --clusters 11 --weights runs/discover
"""


def add_discover_args(p: argparse.ArgumentParser) -> None:
    """The ``groupseg discover`` options."""
    p.epilog = EXAMPLES
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--dataset", help="a dataset groupseg eval reads (camvid, voc, ...); its labels are never read")
    src.add_argument("--images-dir", help="a plain folder of photos instead of a dataset")
    p.add_argument("--data-root", help="folder the dataset was unpacked into (with --dataset)")
    p.add_argument("--split", default="train", help="split whose images are used (default: train)")
    p.add_argument("--out", required=True, help="output directory: groupseg weights + cache/ + checkpoints/")
    p.add_argument("--weights", help="backbone weights (default: the shipped model)")
    p.add_argument("--cache", help="feature cache folder (default: OUT/cache; runs with the same images and crops share it)")
    p.add_argument("--clusters", type=int, default=0, metavar="K",
                   help="clusters kept with the weights (default: the dataset's number of classes)")
    p.add_argument("--feature", choices=["tokens", "joint", "both"], default="tokens",
                   help="dense backbone feature: first-stage patch tokens, their joint-space projection, or both")
    p.add_argument("--dim", type=int_range(0), default=70, help="code channels (0 = no head: k-means on the features)")
    p.add_argument("--res", type=int_range(32), default=224, help="crop side in pixels (a multiple of the patch size)")
    p.add_argument("--crop-ratio", type=float_range(0, 1, lo_open=True), default=0.5,
                   help="crop side / image short side (five-crop)")
    p.add_argument("--knn", type=int_range(1), default=7, help="neighbours per crop")
    p.add_argument("--steps", type=int_range(0), default=1500, help="head training steps")
    p.add_argument("--batch-size", type=int_range(2), default=16)
    p.add_argument("--lr", type=float_range(0, lo_open=True), default=5e-4)
    p.add_argument("--shifts", default="0.18,0.12,0.46", help="b_self,b_knn,b_rand (STEGO's shifts)")
    p.add_argument("--loss-weights", default="0.67,0.25,0.63", help="l_self,l_knn,l_rand (STEGO's weights)")
    p.add_argument("--samples", type=int_range(2), default=11, help="sampled positions per side per crop")
    p.add_argument("--rand-pairs", type=int_range(0), default=5, help="random pairings per batch")
    p.add_argument("--probe-epochs", type=int_range(1), default=2, help="passes of the mini-batch k-means")
    p.add_argument("--self-train-rounds", type=int_range(0), default=1,
                   help="PASS-style rounds: pseudo labels -> fine-tune the head -> re-cluster (0 = off)")
    p.add_argument("--self-train-steps", type=int_range(1), default=1000, help="head steps per self-training round")
    p.add_argument("--keep", type=float_range(0, 1, lo_open=True), default=0.5,
                   help="self-training: fraction of each cluster's pixels kept as pseudo labels (the surest)")
    p.add_argument("--self-train-backbone", type=float_range(0), default=0.0, metavar="MULT",
                   help="self-training: also fine-tune the backbone's first stage at MULT x --lr (0 = only the new head, on cached features)")
    p.add_argument("--pseudo-refine", choices=["pamr", "none"], default="pamr",
                   help="self-training: refine the teacher's pseudo labels onto image edges with PAMR before training on them")
    p.add_argument("--refine", choices=["pamr", "none"], default="pamr",
                   help="refinement the output weights apply to their cluster maps by default (segment --clusters, "
                   "eval --protocol unsupervised; --pamr / --no-pamr there override it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", choices=["auto", "none"], default="auto", help="auto: continue from OUT/checkpoints")
    p.add_argument("--checkpoint-every", type=int_range(1), default=500, help="steps between checkpoints")
    p.add_argument("--device", default="auto", help="torch device (auto = cuda when visible, else cpu)")
    p.add_argument("--limit", type=int_range(0), default=0, help="use only the first N images (0 = all)")


def _floats(text: str, n: int, what: str) -> list[float]:
    try:
        out = [float(t) for t in text.split(",")]
    except ValueError:
        out = []
    if len(out) != n:
        raise ValueError(f"{what} must be {n} comma-separated numbers (got {text!r})")
    return out


def image_paths(args: argparse.Namespace) -> tuple[list[Path], int]:
    """The training images and the dataset's number of classes (0 for a folder). Labels are not read."""
    if args.images_dir:
        d = Path(args.images_dir)
        if not d.is_dir():
            raise ValueError(f"--images-dir {d}: not a directory")
        paths = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not paths:
            raise ValueError(f"--images-dir {d}: no images (.jpg, .png, ...) in it")
        classes = 0
    else:
        if not args.data_root:
            raise ValueError("--dataset needs --data-root")
        from groupseg.eval.datasets import load_dataset

        ds = load_dataset(args.dataset, args.data_root, args.split)
        paths, classes = [s.image for s in ds.samples], ds.num_classes
        if not paths:
            raise ValueError(f"{args.dataset} {args.split}: no images")
    return (paths[: args.limit] if args.limit else paths), classes


def check_args(args: argparse.Namespace, model, paths: list[Path], classes: int) -> int:
    """Validate option combinations against the model and data before any work; returns K."""
    from groupseg.stego import check_feature

    check_feature(model, args.feature)
    if args.clusters == 1 or args.clusters < 0:
        raise ValueError(f"--clusters must be at least 2 (got {args.clusters})")
    k = args.clusters or classes
    if not k:
        raise ValueError("--clusters K is needed with --images-dir (no dataset to count classes)")
    patch = model.cfg.vision.patch_size
    if args.res % patch:
        raise ValueError(f"--res {args.res} is not a multiple of the patch size {patch}")
    pixels = len(paths) * 5 * (args.res // patch) ** 2
    if k > pixels:
        raise ValueError(f"K={k} clusters but the training crops have only {pixels} feature pixels")
    if len(paths) < 2:
        raise ValueError("discover needs at least 2 images (neighbours come from other images)")
    if args.knn >= len(paths):
        raise ValueError(f"--knn {args.knn} needs more than {args.knn} images (got {len(paths)})")
    _floats(args.shifts, 3, "--shifts"), _floats(args.loss_weights, 3, "--loss-weights")
    return k


def run_discover(args: argparse.Namespace) -> int:
    """Run ``groupseg discover``; returns the exit code."""
    import groupseg
    from groupseg.argtypes import resolve_device
    from groupseg.pretrained import resolve_weights
    from groupseg.stego import attach_head, knn_pairs

    from .stego_train import FeatureCache, fit_probe, plot_code_space, train_head
    from .selftrain import self_train

    t0 = time.time()
    torch.manual_seed(args.seed)
    paths, classes = image_paths(args)
    device = resolve_device(args.device)
    weights = resolve_weights(args.weights)
    model = groupseg.load_model(weights, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    k = check_args(args, model, paths, classes)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache.build(model, paths, Path(args.cache or out / "cache"), args.res, args.crop_ratio, device)
    neighbours = knn_pairs(torch.from_numpy(np.asarray(cache.glob)), args.knn, torch.from_numpy(np.asarray(cache.groups)))
    head = attach_head(model, args.feature, args.dim, k)
    timings = {"features": time.time() - t0}
    if args.dim:
        train_head(model, head, cache, neighbours, args, out / "checkpoints")
    timings["head"] = time.time() - t0 - timings["features"]
    centres, embeds = fit_probe(model, head, cache, k, args.probe_epochs, args.seed)
    head.set_centres(centres, embeds)
    for r in range(args.self_train_rounds if args.dim else 0):
        head = self_train(model, head, cache, args, round_=r)
        if args.self_train_backbone > 0:  # the backbone moved: its features afresh
            cache = FeatureCache.build(model, paths, out / f"cache-self-train-{r + 1}", args.res, args.crop_ratio, device)
        head.set_centres(*fit_probe(model, head, cache, k, args.probe_epochs, args.seed, init=head.centres))
    timings["total"] = time.time() - t0
    model.cfg.stego["refine"] = "" if args.refine == "none" else args.refine
    export(model, weights, out, args, timings)
    plot_code_space(model, head, cache, out / "code_space.png", seed=args.seed)
    print(f"discover: wrote {out}/config.json and model.safetensors (K={k}, {len(paths)} images, "
          f"{timings['total'] / 60:.1f} min)")
    return 0


def export(model, weights: Path, out: Path, args: argparse.Namespace, timings: dict) -> None:
    """Ordinary groupseg weights (+ the source's tokenizer files) and a record of the run."""
    model.stego.eval()
    model.save_pretrained(out)
    src = Path(weights)
    tok = (src if src.is_dir() else src.parent) / "tokenizer"
    if tok.is_dir() and not (out / "tokenizer").exists():
        shutil.copytree(tok, out / "tokenizer")
    run = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if not k.startswith("_") and k != "func"}
    record = {"args": run, "seconds": timings, "command": "groupseg discover " + " ".join(sys.argv[2:])}
    (out / "discover.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupseg discover", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_discover_args(p)
    return run_discover(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
