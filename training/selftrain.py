"""PASS-style self-training for ``groupseg discover``: clusters -> pseudo labels -> a new head -> re-cluster.

Each pixel's pseudo label is the STEGO head's nearest cluster centre; its confidence is the
margin between the nearest and the second-nearest centre (cosine). Per cluster, only the surest
``keep`` share of its pixels keep their label (thresholds from a streamed histogram of margins,
so memory does not grow with the number of images); the others are marked unsure (``IGNORE``)
and never reach the loss. As PASS trains a segmentation network on its pseudo labels, a new head
whose nonlinear branch sees each patch's 3 x 3 neighbourhood is trained from scratch on them
(cross-entropy on its cosine logits to the fixed centres); it replaces the STEGO head, and the
caller re-clusters its codes. The teacher's labels are fixed for the round, so the student cannot
drift towards its own mistakes.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from groupseg.stego import StegoHead

IGNORE = 255
BINS = 400  # margin histogram over [0, 2]


@torch.no_grad()
def margins(codes: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., D) unit codes -> nearest cluster (...) and margin cos(nearest) - cos(second) (...)."""
    top = (codes @ centres.T).topk(2, dim=-1)
    return top.indices[..., 0], top.values[..., 0] - top.values[..., 1]


@torch.no_grad()
def keep_thresholds(batches, centres: torch.Tensor, keep: float) -> torch.Tensor:
    """Per cluster, the margin above which its surest ``keep`` share of pixels lies (K,), streamed."""
    k = centres.shape[0]
    hist = torch.zeros(k, BINS)
    for codes in batches:
        lab, m = margins(codes, centres)
        b = (m / 2 * BINS).long().clamp(0, BINS - 1)
        hist.index_put_((lab.cpu(), b.cpu()), torch.ones(len(b)), accumulate=True)
    above = hist.flip(1).cumsum(1).flip(1)  # pixels with margin >= bin start
    need = keep * hist.sum(1, keepdim=True)
    last = (above >= need).sum(1) - 1  # the highest bin with at least ``keep`` of the cluster at or above it
    return last.clamp_min(0).float() / BINS * 2


@torch.no_grad()
def pseudo_labels(codes: torch.Tensor, centres: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """(..., D) unit codes -> (...) cluster labels, ``IGNORE`` where the margin is below the cluster's threshold."""
    lab, m = margins(codes, centres)
    return torch.where(m >= thresholds.to(m.device)[lab], lab, torch.full_like(lab, IGNORE))


def self_train(model, head: StegoHead, cache, args: argparse.Namespace, round_: int = 0, tau: float = 0.1) -> StegoHead:
    """One round: pseudo labels of ``head`` (the teacher), a new 3 x 3 head trained on them, returned
    (and recorded in ``model.cfg.stego``); the caller re-clusters its codes."""
    from tqdm import tqdm

    from .stego_train import code_batches

    teacher, centres = head.eval(), head.centres.clone()
    thresholds = keep_thresholds((c for c, _, _ in code_batches(model, teacher, cache, None)), centres, args.keep)
    gen = torch.Generator().manual_seed(args.seed + 1000 + round_)
    torch.manual_seed(args.seed + 1000 + round_)
    student = StegoHead(head.in_dim, head.dim, centres.shape[0], model.cfg.embed_dim, kernel=3).to(centres.device)
    opt = torch.optim.Adam(student.parameters(), lr=args.lr)
    bar = tqdm(range(args.self_train_steps), desc=f"self-train {round_ + 1}", unit="step", dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(cache), (args.batch_size,), generator=gen)
        f = cache.features(model, idx, args.feature)  # (B, C, g, g)
        if torch.rand((), generator=gen) < 0.5:  # mirrored crops: the same labels, mirrored
            f = f.flip(-1)
        with torch.no_grad():
            target = pseudo_labels(F.normalize(teacher(f), dim=1).movedim(1, -1), centres, thresholds)  # (B, g, g)
        student.train()
        logits = torch.einsum("bdhw,kd->bkhw", F.normalize(student(f), dim=1), centres) / tau
        loss = F.cross_entropy(logits, target, ignore_index=IGNORE) if (target != IGNORE).any() else logits.sum() * 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(ce=f"{loss.item():.3f}", kept=f"{(target != IGNORE).float().mean().item():.2f}")
    student.eval()
    student.set_centres(centres, head.centre_embeds)
    model.stego = student
    model.cfg.stego["kernel"] = 3
    return student
