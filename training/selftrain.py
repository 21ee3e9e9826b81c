"""PASS-style self-training for ``groupseg discover``: clusters -> pseudo labels -> fine-tune -> re-cluster.

Each pixel's pseudo label is its nearest cluster centre; its confidence is the margin between
the nearest and the second-nearest centre (cosine). Per cluster, only the surest ``keep`` share of
its pixels keep their label (thresholds from a streamed histogram of margins, so memory does
not grow with the number of images); the others are marked unsure (``IGNORE``) and never reach
the loss. The head is then fine-tuned with a cross-entropy on its cosine logits to the (fixed)
centres, plus the STEGO loss that keeps the code space's structure, and the caller re-clusters.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from groupseg.stego import StegoHead, correspondence_loss

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


def self_train(model, head: StegoHead, cache, args: argparse.Namespace, round_: int = 0, tau: float = 0.1) -> None:
    """One round: pseudo labels from the head's current clusters, then ``args.self_train_steps`` head steps."""
    from tqdm import tqdm

    from .discover import _floats
    from .stego_train import code_batches

    centres = head.centres.clone()
    thresholds = keep_thresholds((c for c, _, _ in code_batches(model, head, cache, None)), centres, args.keep)
    shifts, weights = _floats(args.shifts, 3, "--shifts"), _floats(args.loss_weights, 3, "--loss-weights")
    gen = torch.Generator().manual_seed(args.seed + 1000 + round_)
    opt = torch.optim.Adam(head.parameters(), lr=args.lr)
    for step in (bar := tqdm(range(args.self_train_steps), desc=f"self-train {round_ + 1}", unit="step", dynamic_ncols=True)):
        idx = torch.randint(len(cache), (args.batch_size,), generator=gen)
        f = cache.features(model, idx, args.feature)  # (B, C, g, g)
        head.eval()
        with torch.no_grad():
            target = pseudo_labels(F.normalize(head(f), dim=1).movedim(1, -1), centres, thresholds)  # (B, g, g)
        head.train()
        codes = head(f)
        logits = torch.einsum("bdhw,kd->bkhw", F.normalize(codes, dim=1), centres) / tau
        ce = F.cross_entropy(logits, target, ignore_index=IGNORE) if (target != IGNORE).any() else logits.sum() * 0
        stego, _ = correspondence_loss(f, f, codes, codes, shifts, weights, gen, args.samples, 0)
        loss = ce + stego
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 20 == 0:
            bar.set_postfix(ce=f"{ce.item():.3f}", kept=f"{(target != IGNORE).float().mean().item():.2f}")
    head.eval()
