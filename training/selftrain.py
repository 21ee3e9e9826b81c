"""PASS-style self-training for ``groupseg discover``: clusters -> pseudo labels -> a new head -> re-cluster.

Each crop's pseudo labels come from the STEGO head (the teacher): its cluster probabilities
(softmax of the cosine to the centres), upsampled to the crop's pixels, by default averaged with
those of the mirrored crop (mirrored back) and refined
onto image edges by PAMR, then pooled to a grid ``UPSAMPLE`` times finer than the patch grid. A
pixel's label is its most probable cluster and its confidence the margin over the second. Per
cluster, only the surest ``keep`` share of its pixels keep their label (thresholds from a streamed
histogram of margins; labels and margins live in memory-mapped files, so memory does not grow
with the number of images); the others are marked unsure (``UNSURE``) and never reach the loss.
As PASS trains a segmentation network on its pseudo labels, a new head whose nonlinear branch sees
each patch's 5 x 5 neighbourhood (``--self-train-kernel``) is trained from scratch on them
(cross-entropy of its cosine logits to the fixed centres, upsampled to the labels' grid); it
replaces the STEGO head, and the caller re-clusters its codes. Training on refined labels distils
the refinement into the head. The teacher's labels are fixed for the round, so the student cannot
drift towards its own mistakes.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

import torch
import torch.nn.functional as F

from groupseg.optim import build_optimizer
from groupseg.stego import StegoHead, cluster_scores

if TYPE_CHECKING:
    from .config import DiscoverConfig

UNSURE = -1  # pseudo label of a pixel self-training is unsure of (not the loss's IGNORE = 255: cluster ids reach 918 on ImageNet-S)
BINS = 400  # margin histogram over [0, 2]
UPSAMPLE = 4  # pseudo labels on a grid this many times finer than the patch grid


@torch.no_grad()
def margins(codes: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) unit codes -> nearest cluster (...) and margin cos(nearest) - cos(second) (...)."""
    top = (codes @ centres.T).topk(2, dim=-1)
    return top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


@torch.no_grad()
def keep_thresholds(pairs, k: int, keep: float) -> torch.Tensor:
    """Per cluster, the margin above which its surest ``keep`` share of pixels lies (K,), streamed
    over ``(labels, margins)`` pairs (margins in [0, 2])."""
    hist = torch.zeros(k, BINS)
    for lab, m in pairs:
        lab, m = torch.as_tensor(lab).long().flatten().cpu(), torch.as_tensor(m).float().flatten().cpu()
        b = (m / 2 * BINS).long().clamp(0, BINS - 1)
        hist.index_put_((lab, b), torch.ones(len(b)), accumulate=True)
    above = hist.flip(1).cumsum(1).flip(1)  # pixels with margin >= bin start
    need = keep * hist.sum(1, keepdim=True)
    last = (above >= need).sum(1) - 1  # the highest bin with at least ``keep`` of the cluster at or above it
    return last.clamp_min(0).float() / BINS * 2


def pseudo_labels(lab: torch.Tensor, m: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Cluster labels (...) with their margins (...) -> labels, ``UNSURE`` where the margin is below the cluster's threshold."""
    lab = torch.as_tensor(lab).long()
    return torch.where(torch.as_tensor(m).float() >= thresholds.to(lab.device)[lab], lab, torch.full_like(lab, UNSURE))


@torch.no_grad()
def teacher_targets(model, teacher: StegoHead, cache, directory: Path, refine: str, tau: float = 0.1,
                    flip: bool = False):
    """Every crop's (L, L) labels and margins (L = ``UPSAMPLE`` x the patch grid), memory-mapped in
    ``directory``: the teacher's cluster probabilities at the crop's pixels (with ``flip``, averaged
    with those of the mirrored crop, mirrored back), PAMR-refined when ``refine == "pamr"``,
    average-pooled to L."""
    from tqdm import tqdm

    from groupseg.refine import pamr
    from groupseg.stego import dense_features

    from .stego_train import crop_pixels

    n, side = len(cache), UPSAMPLE * cache.grid
    res, ratio, feature = cache.meta["res"], cache.meta["crop_ratio"], model.cfg.stego["feature"]
    directory.mkdir(parents=True, exist_ok=True)
    labels = np.lib.format.open_memmap(directory / "labels.npy", mode="w+", dtype=np.int16, shape=(n, side, side))
    marg = np.lib.format.open_memmap(directory / "margins.npy", mode="w+", dtype=np.float16, shape=(n, side, side))
    centres = teacher.centres
    for i, path in enumerate(tqdm(cache.meta["images"], desc="pseudo labels", unit="img", dynamic_ncols=True)):
        idx = np.arange(5 * i, 5 * i + 5)
        codes = F.normalize(teacher(cache.features(model, idx, feature)), dim=1)
        probs = (cluster_scores(codes, centres, (res, res)) / tau).softmax(1)
        pixels = crop_pixels(model, path, res, ratio).to(probs.device) if refine == "pamr" or flip else None
        if flip:
            mirrored = F.normalize(teacher(dense_features(model, pixels.flip(-1), feature)), dim=1).flip(-1)
            probs = (probs + (cluster_scores(mirrored, centres, (res, res)) / tau).softmax(1)) / 2
        if refine == "pamr":
            probs = pamr(pixels, probs)
        top = F.adaptive_avg_pool2d(probs, side).topk(2, dim=1)
        labels[idx] = top.indices[:, 0].cpu().numpy()
        marg[idx] = (top.values[:, 0] - top.values[:, 1]).cpu().numpy()
    labels.flush(), marg.flush()
    return labels, marg


def round_checkpoint(cfg: DiscoverConfig, round_: int) -> Path:
    """Where self-training round ``round_`` (0-based) is checkpointed."""
    return Path(cfg.out) / "checkpoints" / f"self-train-{round_ + 1}.pt"


def check_resume(cfg: DiscoverConfig) -> None:
    """Before any work: the self-training checkpoints ``--resume auto`` would restore were trained
    with this ``--self-train-kernel`` (else a one-line ``ValueError``, not a state-dict traceback later)."""
    if cfg.resume != "auto":
        return
    for r in range(cfg.self_train_rounds):
        ckpt = round_checkpoint(cfg, r)
        if ckpt.is_file():
            saved = torch.load(ckpt, map_location="cpu", weights_only=False)["student"]["nonlinear.0.weight"].shape[-1]
            if saved != cfg.self_train_kernel:
                raise ValueError(f"{ckpt}: self-training round {r + 1} was trained with --self-train-kernel {saved}, "
                                 f"not {cfg.self_train_kernel} (pass that, or --resume none to start afresh)")


def self_train(model, head: StegoHead, cache, cfg: DiscoverConfig, round_: int = 0, tau: float = 0.1) -> StegoHead:
    """One round: pseudo labels of ``head`` (the teacher), a new head (its nonlinear branch a
    ``cfg.self_train_kernel`` square convolution) trained on them (with the backbone's first stage
    when ``cfg.self_train_backbone > 0``, as PASS fine-tunes its network), returned and recorded
    in ``model.cfg.stego``; the caller re-clusters its codes (on features computed afresh when the
    backbone moved). A finished round is checkpointed and not redone on resume."""
    teacher, centres = head.eval(), head.centres.clone()
    student = StegoHead(head.in_dim, head.dim, centres.shape[0], model.cfg.embed_dim, kernel=cfg.self_train_kernel).to(centres.device)
    ckpt = round_checkpoint(cfg, round_)
    if cfg.resume == "auto" and ckpt.is_file():
        state = torch.load(ckpt, map_location=centres.device, weights_only=False)
        student.load_state_dict(state["student"])
        model.visual.load_state_dict(state["visual"])
        print(f"discover: self-training round {round_ + 1} restored from {ckpt}")
    else:
        labels, marg = teacher_targets(model, teacher, cache, Path(cfg.out) / "pseudo", cfg.pseudo_refine, tau,
                                       flip=cfg.pseudo_flip)
        chunks = (slice(s, s + 256) for s in range(0, len(cache), 256))
        thresholds = keep_thresholds(((labels[c], marg[c]) for c in chunks), centres.shape[0], cfg.keep)
        gen = torch.Generator().manual_seed(cfg.seed + 1000 + round_)
        torch.manual_seed(cfg.seed + 1000 + round_)
        fit_student(model, student, cache, (labels, marg, thresholds), centres, cfg, gen, round_, tau)
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"student": student.state_dict(), "visual": model.visual.state_dict()}, ckpt.with_suffix(".tmp"))
        ckpt.with_suffix(".tmp").replace(ckpt)
    student.eval()
    student.set_centres(centres, head.centre_embeds)
    model.stego = student
    model.cfg.stego["kernel"] = cfg.self_train_kernel
    return student


def _crop_batch(model, cache, items: np.ndarray) -> torch.Tensor:
    """(len(items), 3, res, res) pixels of cache items (five crops per image, in the cache's order)."""
    from .stego_train import crop_pixels

    res, ratio = cache.meta["res"], cache.meta["crop_ratio"]
    images = {}
    for it in items:
        i = int(it) // 5
        if i not in images:
            images[i] = crop_pixels(model, cache.meta["images"][i], res, ratio)
    return torch.stack([images[int(it) // 5][int(it) % 5] for it in items])


def fit_student(model, student: StegoHead, cache, targets, centres: torch.Tensor, cfg, gen: torch.Generator,
                round_: int, tau: float) -> None:
    """Cross-entropy of the student's cosine logits to the fixed centres against the kept pseudo
    labels. With ``cfg.self_train_backbone > 0`` the backbone's first stage learns too, at that
    multiple of ``cfg.lr``, on crops decoded afresh (a few photos, all five crops, per batch);
    otherwise the student reads the feature cache."""
    from tqdm import tqdm

    from groupseg.stego import dense_features

    labels, marg, thresholds = targets
    side, feature, device = labels.shape[-1], model.cfg.stego["feature"], centres.device
    backbone = cfg.self_train_backbone > 0
    groups = [{"params": list(student.parameters()), "lr": cfg.lr, "weight_decay": 0.0}]
    if backbone:
        model.visual.requires_grad_(True)
        groups.append({"params": list(model.visual.parameters()), "lr": cfg.lr * cfg.self_train_backbone, "weight_decay": 0.0})
    opt = build_optimizer(groups, cfg.lr)  # Adam: no weight decay anywhere
    n_img = max(1, cfg.batch_size // 5)
    bar = tqdm(range(cfg.self_train_steps), desc=f"self-train {round_ + 1}", unit="step", dynamic_ncols=True)
    try:
        for step in bar:
            if backbone:  # a few photos, all their crops
                imgs = torch.randperm(len(cache) // 5, generator=gen)[:n_img].numpy()
                idx = (imgs[:, None] * 5 + np.arange(5)).reshape(-1)
                f = dense_features(model, _crop_batch(model, cache, idx).to(device), feature)
            else:
                idx = np.sort(torch.randint(len(cache), (cfg.batch_size,), generator=gen).numpy())
                f = cache.features(model, idx, feature)  # (B, C, g, g)
            target = pseudo_labels(torch.from_numpy(labels[idx]), torch.from_numpy(marg[idx]), thresholds).to(device)
            if torch.rand((), generator=gen) < 0.5:  # mirrored crops: the same labels, mirrored
                f, target = f.flip(-1), target.flip(-1)
            student.train()
            logits = torch.einsum("bdhw,kd->bkhw", F.normalize(student(f), dim=1), centres) / tau
            logits = F.interpolate(logits, size=(side, side), mode="bilinear", align_corners=False)
            loss = F.cross_entropy(logits, target, ignore_index=UNSURE) if (target != UNSURE).any() else logits.sum() * 0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 20 == 0:
                bar.set_postfix(ce=f"{loss.item():.3f}", kept=f"{(target != UNSURE).float().mean().item():.2f}")
    finally:
        model.visual.requires_grad_(False)
