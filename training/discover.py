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

from groupseg.dataclass_cli import add_dataclass_args, dataclass_from_args

from .config import DiscoverConfig
from .engine import keep_freed_memory

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

EXAMPLES = """examples:
  groupseg discover --dataset camvid --data-root ../shared/data/camvid --split train --out runs/discover
  groupseg discover --images-dir photos/ --clusters 8 --out runs/discover-photos --self-train-rounds 0
  groupseg eval --dataset camvid --data-root ../shared/data/camvid --protocol unsupervised --weights runs/discover
  groupseg segment street.jpg --clusters 11 --weights runs/discover
"""


def add_discover_args(p: argparse.ArgumentParser) -> None:
    """One option per ``DiscoverConfig`` field (``groupseg discover --help`` lists them)."""
    add_dataclass_args(p, DiscoverConfig)
    p.epilog = EXAMPLES


def image_paths(cfg: DiscoverConfig) -> tuple[list[Path], int]:
    """The training images and the dataset's number of classes (0 for a folder). Labels are not read."""
    if cfg.images_dir:
        d = Path(cfg.images_dir)
        if not d.is_dir():
            raise ValueError(f"--images-dir {d}: not a directory")
        paths = sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_EXTS)
        if not paths:
            raise ValueError(f"--images-dir {d}: no images (.jpg, .png, ...) in it")
        classes = 0
    else:
        from groupseg.eval.datasets import load_dataset

        ds = load_dataset(cfg.dataset, cfg.data_root, cfg.split)
        paths, classes = [s.image for s in ds.samples], ds.num_classes
        if not paths:
            raise ValueError(f"{cfg.dataset} {cfg.split}: no images")
    return (paths[: cfg.limit] if cfg.limit else paths), classes


def check_args(cfg: DiscoverConfig, model, paths: list[Path], classes: int) -> int:
    """Validate option combinations against the model and data before any work; returns K."""
    from groupseg.stego import check_feature

    from .selftrain import check_resume

    check_feature(model, cfg.feature)
    check_resume(cfg)
    k = cfg.clusters or classes
    if not k:
        raise ValueError("--clusters K is needed with --images-dir (no dataset to count classes)")
    patch = model.cfg.vision.patch_size
    if cfg.res % patch:
        raise ValueError(f"--res {cfg.res} is not a multiple of the patch size {patch}")
    pixels = len(paths) * 5 * (cfg.res // patch) ** 2
    if k > pixels:
        raise ValueError(f"K={k} clusters but the training crops have only {pixels} feature pixels")
    if len(paths) < 2:
        raise ValueError("discover needs at least 2 images (neighbours come from other images)")
    if cfg.knn >= len(paths):
        raise ValueError(f"--knn {cfg.knn} needs more than {cfg.knn} images (got {len(paths)})")
    return k


def run_discover(args: argparse.Namespace) -> int:
    """Run ``groupseg discover``; returns the exit code."""
    import groupseg
    from groupseg.argtypes import resolve_device
    from groupseg.pretrained import resolve_weights
    from groupseg.stego import attach_head, knn_pairs

    from .stego_train import FeatureCache, fit_probe, plot_code_space, train_head
    from .selftrain import self_train

    cfg = dataclass_from_args(DiscoverConfig, args)  # range checks, before any work
    keep_freed_memory()
    t0 = time.time()
    torch.manual_seed(cfg.seed)
    paths, classes = image_paths(cfg)
    device = resolve_device(cfg.device)
    weights = resolve_weights(cfg.weights)
    model = groupseg.load_model(weights, device=device)
    for p in model.parameters():
        p.requires_grad_(False)
    k = check_args(cfg, model, paths, classes)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    cache = FeatureCache.build(model, paths, Path(cfg.cache or out / "cache"), cfg.res, cfg.crop_ratio, device)
    neighbours = knn_pairs(torch.from_numpy(np.asarray(cache.glob)), cfg.knn, torch.from_numpy(np.asarray(cache.groups)))
    head = attach_head(model, cfg.feature, cfg.dim, k)
    timings = {"features": time.time() - t0}
    if cfg.dim:
        train_head(model, head, cache, neighbours, cfg, out / "checkpoints")
    timings["head"] = time.time() - t0 - timings["features"]
    centres, embeds = fit_probe(model, head, cache, k, cfg.probe_epochs, cfg.seed)
    head.set_centres(centres, embeds)
    for r in range(cfg.self_train_rounds if cfg.dim else 0):
        head = self_train(model, head, cache, cfg, round_=r)
        if cfg.self_train_backbone > 0:  # the backbone moved: its features afresh
            cache = FeatureCache.build(model, paths, out / f"cache-self-train-{r + 1}", cfg.res, cfg.crop_ratio, device)
        head.set_centres(*fit_probe(model, head, cache, k, cfg.probe_epochs, cfg.seed, init=head.centres))
    timings["total"] = time.time() - t0
    model.cfg.stego["refine"] = "" if cfg.refine == "none" else cfg.refine
    model.cfg.stego["flip"] = cfg.flip
    export(model, weights, out, cfg, timings)
    plot_code_space(model, head, cache, out / "code_space.png", seed=cfg.seed)
    print(f"discover: wrote {out}/config.json and model.safetensors (K={k}, {len(paths)} images, "
          f"{timings['total'] / 60:.1f} min)")
    return 0


def export(model, weights: Path, out: Path, cfg: DiscoverConfig, timings: dict) -> None:
    """Ordinary groupseg weights (+ the source's tokenizer files) and a record of the run."""
    model.stego.eval()
    model.save_pretrained(out)
    src = Path(weights)
    tok = (src if src.is_dir() else src.parent) / "tokenizer"
    if tok.is_dir() and not (out / "tokenizer").exists():
        shutil.copytree(tok, out / "tokenizer")
    record = {"config": cfg.to_dict(), "seconds": timings, "command": "groupseg discover " + " ".join(sys.argv[2:])}
    (out / "discover.json").write_text(json.dumps(record, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupseg discover", formatter_class=argparse.RawDescriptionHelpFormatter)
    add_discover_args(p)
    return run_discover(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
