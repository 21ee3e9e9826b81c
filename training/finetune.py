"""Fine-tune a text-pretrained GroupViT on a few pixel-labelled images, keeping the open vocabulary.

    groupseg finetune --dataset camvid --data-root ../shared/data/camvid --out runs/ft-camvid \\
        [--fraction 0.1 | --images 12] [--objective ce|mix-match] [--weak-classes "car,fence"]
    accelerate launch -m groupseg.training.finetune --dataset camvid ...

The classifier is a (C, D) matrix in the joint image-text space, initialised with the class
names' prompt-ensembled text embeddings, so zero labelled images is exactly the zero-shot model.
Group-to-class logits give each pixel the class distribution of its group (the argmax group, as at
inference, with the soft assignment's gradient: straight-through), trained with a per-pixel loss
(ignore index honoured, median-frequency class weights); the backbone learns at a lower rate.
Models pretrained on a few thousand photos assign patches to groups with nearly flat logits, so
the first-stage assignments get a learnable sharpening scale (``--assign-scale``, 50 at the start)
and no Gumbel noise while tuning; the exported model segments in windows of the crop size.

Modes:
- ``ce``: per-pixel negative log-likelihood only.
- ``mix-match`` (Zhan et al., AAAI 2018; the default: ahead of ``ce`` at 1, 10 and 100 % of the
  CamVid labels at the default settings, 18.9 / 43.4 / 43.0 against 15.1 / 38.5 / 40.0 % mIoU):
  first, patches sampled from all labelled images of a batch ("mix") form a class-wise graph; a
  triplet loss on their first-stage tokens over every same-class pair, with semi-hard negatives,
  pulls same-class patches together ("match"); then the per-pixel loss.
- ``--weak-classes`` (weak-shot, after SimFormer, NeurIPS 2022): those classes' pixel labels are
  hidden (set to ignore before anything reaches a loss) and only their image-level tags are
  kept (those of each training crop). Groups act as class-agnostic proposals learnt from
  base-class pixels; a multiple-instance tag loss on the proposals' class probabilities, pooled
  over the patches each group owns (``--tag-topk``: the best 2 %), names the weak classes;
  SimFormer's complementary loss gives the pixels no base label claims to the union of the
  crop's tagged weak classes (``--comp-weight``), with class-balanced targets (``--comp-balance``)
  so the easiest tagged class does not take them all; and a pixel-pixel similarity head trained on
  base-class patch pairs supervises whether two patches share a class where labels are hidden.
  ``--weak-loss none`` is the base-only baseline: weak classes get no signal at all.

The output directory holds ordinary groupseg weights (``config.json`` + ``model.safetensors``):
the fine-tuned classes keep their tuned classifier, any other word goes through the text tower.
Checkpoints are written to ``OUT/checkpoints`` every epoch; ``--resume auto`` continues from the
latest one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import groupseg
from groupseg.layers.grouping import AssignAttention
from groupseg.prompting import DEFAULT_TEMPLATES
from groupseg.transforms import load_image

from .checkpoint import latest_checkpoint, read_state, save_checkpoint
from .main import fused_adamw

log = logging.getLogger("groupseg.finetune")

IGNORE = 255


@dataclass
class FinetuneConfig:
    dataset: str = ""  # a name groupseg.eval.datasets.load_dataset reads (camvid, voc, ade20k, ..., folder)
    data_root: str = ""
    split: str = "train"
    vocab_file: str = ""  # class names, one per line in label order (required for ``folder``)
    weights: str = ""  # starting weights; "" = the shipped default model
    out: str = ""
    images: int = -1  # labelled images to use (-1 = all)
    fraction: float = 0.0  # or this fraction of them (0 = unset)
    weak_classes: str = ""  # comma-separated class labels with image-level tags only
    weak_loss: Literal["tags", "none"] = "tags"  # none = base-only fine-tuning
    objective: Literal["ce", "mix-match"] = "mix-match"  # ahead of ce at 1, 10 and 100 % of CamVid at the default settings
    groupings: int = 1  # segment with the first N grouping stages (1: the first stage's 64 groups; 0 = all)
    epochs: int = 30
    min_steps: int = 1000  # small subsets run more epochs, so that every budget gets at least this many steps
    mix_match_epochs: int = 0  # triplet-only epochs first (0 = a third of the epochs) for mix-match
    seed: int = 0
    batch_size: int = 8
    lr: float = 1e-3  # classifier and projection head
    backbone_lr_mult: float = 0.3  # vision tower learns at lr * this
    weight_decay: float = 0.01
    class_weights: Literal["median-freq", "none"] = "median-freq"  # per-pixel loss balancing (SegNet's median frequency)
    grouping_loss: Literal["soft", "hard"] = "hard"  # pixels see a soft mixture of groups, or (straight-through) their argmax group as at inference
    assign_scale: float = 50.0  # > 0: a learnable multiplier of the grouping logits starting here (sharpens flat assignments)
    assign_noise: bool = False  # Gumbel noise in the grouping assignment while training (False: the deterministic inference assignment)
    warmup_epochs: float = 1.0
    short_side: int = 448  # images are resized to this short side (times a random scale) ...
    scale_range: tuple[float, float] = (0.75, 1.5)
    crop_size: int = 256  # ... then randomly cropped to this square
    margin: float = 0.3  # triplet margin (Euclidean distance of centred, normalised features)
    patches_per_class: int = 32  # mix-match / similarity: patches sampled per class per batch
    tag_weight: float = 0.5
    comp_weight: float = 1.0  # weak-shot complementary loss (pixels no base class claims -> the tagged weak classes)
    tag_topk: float = 0.02  # weak-shot tag loss: pool the top 2 % of patches (area-weighted groups) per class
    comp_balance: float = 0.5  # complementary loss: divide each tagged class's share by its mean share of the unclaimed pixels ** this
    sim_weight: float = 0.5
    templates: str = DEFAULT_TEMPLATES  # prompt templates for the initial classifier
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    workers: int = 1
    keep_last: int = 2
    resume: str = ""  # "auto" or a checkpoint directory
    log_every: int = 10


# --------------------------------------------------------------------------- data
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
    tags = np.zeros(num_classes, dtype=np.float32)
    tags[np.unique(v)] = 1.0
    return tags


def hide_classes(target: np.ndarray, hidden: Sequence[int]) -> np.ndarray:
    """Copy of ``target`` with the pixels of ``hidden`` classes set to ``IGNORE``."""
    out = target.copy()
    if len(hidden):
        out[np.isin(out, np.asarray(hidden))] = IGNORE
    return out


def median_frequency_weights(targets: Sequence[np.ndarray], num_classes: int, max_weight: float = 10.0) -> torch.Tensor:
    """SegNet's median frequency balancing: ``w_c = median(f) / f_c``.

    ``f_c`` is class c's pixels over the pixels of the images in which c appears (``IGNORE``
    excluded). Classes never seen get weight 1 (no pixel of theirs reaches the loss); weights
    are capped at ``max_weight`` so that a class seen in a few pixels of one image cannot take
    over a small subset.
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
        w[seen] = np.minimum(np.median(f) / f, max_weight)
    return torch.tensor(w, dtype=torch.float32)


class LabelledImages(torch.utils.data.Dataset):
    """Random-scale, random-crop, flip samples of a segmentation split.

    Each item is ``pixels`` (3, S, S) normalised, ``target`` (S, S) int64 with weak classes
    hidden, and ``tags`` (C,) presence of each class in the crop, from its label map before hiding
    (tags of the whole photo would name cars and people the crop does not show). Augmentation draws
    from an RNG seeded by (seed, epoch, index): runs and resumed runs see the same crops.
    """

    def __init__(self, ds, indices: Sequence[int], cfg: FinetuneConfig, hidden: Sequence[int],
                 mean: Sequence[float], std: Sequence[float]) -> None:
        self.ds, self.indices, self.cfg, self.hidden = ds, list(indices), cfg, list(hidden)
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        from PIL import Image

        cfg = self.cfg
        sample = self.ds.samples[self.indices[i]]
        img = load_image(sample.image)
        full = vocab_targets(self.ds, sample)
        if full.shape != (img.height, img.width):
            raise ValueError(f"{sample.label}: label map {full.shape[::-1]} does not match image {img.size}")
        rng = np.random.default_rng([cfg.seed, self.epoch, self.indices[i]])
        s = cfg.short_side * rng.uniform(*cfg.scale_range) / min(img.size)
        w, h = max(1, round(img.width * s)), max(1, round(img.height * s))
        img = img.resize((w, h), Image.BILINEAR)
        lab = Image.fromarray(full.astype(np.uint8)).resize((w, h), Image.NEAREST)
        px = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        t = torch.from_numpy(np.asarray(lab, dtype=np.uint8).astype(np.int64))
        S = cfg.crop_size
        ph, pw = max(0, S - h), max(0, S - w)
        if ph or pw:  # pad small images: zeros (mean after normalising) / ignore
            px = F.pad(px, (0, pw, 0, ph))
            t = F.pad(t, (0, pw, 0, ph), value=IGNORE)
        y = int(rng.integers(0, px.shape[1] - S + 1))
        x = int(rng.integers(0, px.shape[2] - S + 1))
        px, t = px[:, y : y + S, x : x + S], t[y : y + S, x : x + S]
        if rng.random() < 0.5:
            px, t = px.flip(-1), t.flip(-1)
        px = (px.float() / 255.0 - self.mean) / self.std
        # the crop is the image the model sees: its tags come from its own (full) label map, then
        # the weak classes' pixels are hidden
        full = t.numpy()
        tags = image_tags(full, len(self.ds.vocab))
        target = torch.from_numpy(hide_classes(full, self.hidden))
        return {"pixels": px, "target": target, "tags": torch.from_numpy(tags)}


# --------------------------------------------------------------------------- model
def add_assign_scale(model: groupseg.GroupViT, init: float) -> None:
    """Give every grouping assignment that has none a learnable logit multiplier starting at ``init``.

    Recorded in the model config (``assign_scale_init``), so the exported weights load with it.
    Models trained on few photos assign patches with nearly flat logits (the shipped model's
    first stage: mean max probability 0.03 over 64 groups), so a per-pixel loss on the soft
    grouping barely localises; the multiplier lets fine-tuning sharpen them.
    """
    for m in model.modules():
        if isinstance(m, AssignAttention) and m.logit_scale is None:
            m.logit_scale = nn.Parameter(torch.tensor(math.log(init), device=m.qkv.weight.device))
    model.cfg.vision.assign_scale_init = init


class SegmentationHead(nn.Module):
    """A GroupViT with a trainable classifier over its groups.

    Args:
        model: the pretrained GroupViT.
        class_embeds: (C, D) initial classifier (L2-normalised class text embeddings).
    """

    def __init__(self, model: groupseg.GroupViT, class_embeds: torch.Tensor, groupings: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.classifier = nn.Parameter(class_embeds.detach().clone().float())
        self.groupings = groupings
        self.sim_head = nn.Sequential(nn.Linear(model.visual.width, 128), nn.GELU(), nn.Linear(128, 64))
        self._patch_tokens: torch.Tensor | None = None
        first = model.visual.stages[0]
        first.blocks[-1].register_forward_hook(self._grab)

    def _grab(self, module, inputs, output) -> None:
        self._patch_tokens = output

    def forward(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        g = self.model.encode_groups(pixels, self.groupings)
        h, w = g["grid"]
        scale = self.model.logit_scale.exp().clamp(max=100)
        cls = F.normalize(self.classifier, dim=-1)
        group_logits = scale * torch.einsum("bgd,cd->bgc", g["group_embeds"].float(), cls).float()  # (B, G, C)
        grouping = g["grouping"].float()  # (B, G, h, w), softmax over G
        tokens = self._patch_tokens[:, : h * w]  # (B, N, width): stage-1 patch features
        return {
            "group_logits": group_logits,
            "grouping": grouping,
            "group_embeds": g["group_embeds"].float(),
            "patch_tokens": tokens.float(),
        }


def pixel_log_probs(group_logits: torch.Tensor, grouping: torch.Tensor, size: tuple[int, int], hard: bool = False) -> torch.Tensor:
    """log p(class | pixel) = log sum_g p(g | pixel) p(class | g), at ``size``: (B, C, H, W).

    ``hard``: p(g | patch) is the one-hot argmax group (the segment inference gives the patch) in
    the forward pass, with the soft assignment's gradient (straight-through).
    """
    grouping = F.interpolate(patch_groups(grouping, hard), size=size, mode="bilinear", align_corners=False)
    probs = torch.einsum("bgc,bghw->bchw", group_logits.float().softmax(-1), grouping)
    return probs.clamp_min(1e-8).log()


def patch_groups(grouping: torch.Tensor, hard: bool) -> torch.Tensor:
    """p(group | patch) (B, G, h, w): soft, or the one-hot argmax group with the soft gradient (straight-through)."""
    grouping = grouping.float()
    if not hard:
        return grouping
    one_hot = torch.zeros_like(grouping).scatter_(1, grouping.argmax(1, keepdim=True), 1.0)
    return one_hot - grouping.detach() + grouping


def tag_scores(group_logits: torch.Tensor, grouping: torch.Tensor, classes: torch.Tensor, topk: float, hard: bool = True) -> torch.Tensor:
    """Image-level presence score of ``classes`` from the groups (B, len(classes)), in (0, 1).

    Multiple-instance pooling over groups weighted by their area: each patch carries the class
    probabilities of its (argmax) group, and the score is the mean of the ``topk`` fraction of
    patches with the highest probability. A group that owns no patch cannot explain a tag, and
    an absent tag pushes down every patch that scores high.
    """
    probs = torch.einsum("bgc,bgn->bcn", group_logits.float().softmax(-1)[..., classes], patch_groups(grouping, hard).flatten(2))
    k = max(1, round(topk * probs.shape[-1]))
    return probs.topk(k, dim=-1).values.mean(-1).clamp(1e-6, 1 - 1e-6)


def complementary_loss(log_probs: torch.Tensor, target: torch.Tensor, weak: torch.Tensor, weak_tags: torch.Tensor,
                       balance: float = 0.0) -> torch.Tensor:
    """SimFormer's complementary loss: what no base class claims belongs to the image's weak classes.

    ``log_probs`` (B, C, H, W), ``target`` (B, H, W) with weak classes hidden, ``weak_tags``
    (B, W) presence of the weak classes in each image. Every pixel no base label covers (hidden
    weak pixels and void alike: the target says only ``IGNORE``) in an image tagged with some weak
    class gets -log sum_{tagged weak c} p(c | pixel); which weak class it is stays to the tag and
    similarity losses.

    Its gradient is that of a cross-entropy against the model's own posterior over the tagged
    classes, q(c | pixel) = p(c | pixel) / sum_tagged p, so the class already claiming most of the
    unclaimed pixels (car, in CamVid) keeps claiming them. ``balance`` > 0 divides q by each
    class's mean q over the image's unclaimed pixels to the power ``balance`` (class-balanced
    self-training, after Zou et al. 2018) and renormalises, then uses the KL divergence from that
    fixed target: a tagged class with little mass wins the pixels where it is relatively likely.
    ``balance`` -> 0 is the plain loss (same gradient, same value).
    """
    tagged = weak_tags > 0
    pix = (target == IGNORE) & tagged.any(1)[:, None, None]
    if not pix.any():
        return log_probs.sum() * 0.0
    # untagged classes drop out (a large finite penalty, not -inf: images with no tag would give NaN gradients)
    lp = log_probs[:, weak].float() + torch.where(tagged, 0.0, -1e4)[:, :, None, None]
    if balance > 0:
        with torch.no_grad():
            q = lp.softmax(1)  # (B, W, H, W') posterior over the tagged weak classes
            mask = pix[:, None].float()
            mass = (q * mask).sum((2, 3)) / mask.sum((2, 3)).clamp(min=1)  # (B, W) share of the unclaimed pixels
            q = q / mass.clamp(min=1e-4)[:, :, None, None] ** balance
            q = q / q.sum(1, keepdim=True)
        # KL(q || p): the cross-entropy against q less q's entropy (same gradient), so the value is
        # the plain loss's as balance -> 0 and 0 when the model matches its targets
        per_pixel = (torch.special.xlogy(q, q) - q * lp.clamp(min=-1e4)).sum(1)
    else:
        per_pixel = -torch.logsumexp(lp, 1)
    # summed over those pixels, divided by all pixels: each pixel weighs as much as a labelled one
    # (a mean over the few unclaimed pixels alone would outweigh the per-pixel loss tenfold)
    return per_pixel[pix].sum() / pix.numel()


def patch_labels(target: torch.Tensor, grid: tuple[int, int], purity: float = 0.5) -> torch.Tensor:
    """Majority class of each patch cell (B, h, w); ``IGNORE`` where no class covers ``purity``."""
    B = target.shape[0]
    C = int(target[target != IGNORE].max().item()) + 1 if (target != IGNORE).any() else 1
    onehot = F.one_hot(target.clamp(max=C).long(), C + 1).permute(0, 3, 1, 2).float()[:, :C]
    frac = F.adaptive_avg_pool2d(onehot, grid)  # (B, C, h, w)
    best, lab = frac.max(1)
    lab[best < purity] = IGNORE
    return lab.view(B, *grid)


def sample_patches(labels: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Flat indices into (B*h*w) of up to ``per_class`` labelled patches of each class ("mix")."""
    flat = labels.reshape(-1)
    out = []
    for c in flat[flat != IGNORE].unique():
        idx = (flat == c).nonzero().squeeze(1)
        out.append(idx[torch.randperm(len(idx), generator=gen)[:per_class]])
    return torch.cat(out) if out else flat.new_zeros(0)


def triplet_loss(feats: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Triplet loss over every anchor-positive pair, with semi-hard negatives.

    Features are centred over the sampled patches and L2-normalised; the distance is Euclidean on
    the unit sphere (0-2, about the angle for small angles). For each pair (a, p) the negative is
    the nearest different-class sample farther from a than p (FaceNet's semi-hard choice), or the
    farthest negative when none is. The first version (cosine distance, hardest negative and
    positive per anchor) collapsed the shipped model's features to one point within 100 steps on
    CamVid (loss stuck at the margin, every pixel labelled alike): its patch features start nearly
    parallel, where cosine distance is flat (its gradient vanishes with the angle) and the
    hardest negatives push less than the positives pull.
    """
    if feats.shape[0] < 2 or labels.unique().numel() < 2:
        return feats.sum() * 0.0
    f = feats.float()
    f = F.normalize(f - f.mean(0, keepdim=True), dim=-1)
    d = (2.0 - 2.0 * f @ f.T).clamp_min(1e-8).sqrt()  # (N, N)
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    pairs = same & ~eye  # (a, p); every anchor has a negative (two classes at least, checked above)
    if not pairs.any():
        return feats.sum() * 0.0
    d_ap = d[:, :, None]  # (a, p, 1)
    d_an = d.masked_fill(same, float("nan"))[:, None, :]  # (a, 1, n), NaN where n is not a negative
    semi = torch.where(d_an > d_ap, d_an, float("inf")).amin(-1)  # (a, p): nearest negative beyond p
    easiest = d.masked_fill(same, float("-inf")).amax(1, keepdim=True).expand_as(semi)
    d_neg = torch.where(torch.isfinite(semi), semi, easiest)
    return F.relu(d - d_neg + margin)[pairs].mean()


def _pairs(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randint(0, n, (k,), generator=gen)
    b = torch.randint(0, n, (k,), generator=gen)
    return a, b


# --------------------------------------------------------------------------- training
class Finetuner:
    """State and loop of one fine-tuning run."""

    def __init__(self, cfg: FinetuneConfig) -> None:
        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, set_seed

        from groupseg.eval.datasets import load_dataset

        from groupseg.precision import resolve_precision

        if not cfg.out:
            raise ValueError("--out is required")
        if cfg.objective not in ("ce", "mix-match"):
            raise ValueError(f"--objective must be ce or mix-match, got {cfg.objective!r}")
        if cfg.assign_scale < 0:
            raise ValueError(f"--assign-scale must be >= 0, got {cfg.assign_scale}")
        if cfg.comp_weight < 0 or cfg.tag_weight < 0:
            raise ValueError(f"--comp-weight and --tag-weight must be >= 0, got {cfg.comp_weight} and {cfg.tag_weight}")
        if cfg.comp_balance < 0:
            raise ValueError(f"--comp-balance must be >= 0, got {cfg.comp_balance}")
        if not 0 < cfg.tag_topk <= 1:
            raise ValueError(f"--tag-topk must be in (0, 1], got {cfg.tag_topk}")
        if cfg.grouping_loss not in ("soft", "hard"):
            raise ValueError(f"--grouping-loss must be soft or hard, got {cfg.grouping_loss!r}")
        self.cfg = cfg
        self.out = Path(cfg.out)
        self.ds = load_dataset(cfg.dataset, cfg.data_root, cfg.split, cfg.vocab_file or None)
        if not self.ds.samples:
            raise FileNotFoundError(f"{cfg.dataset}: no labelled images in split {cfg.split!r}")
        self.labels = self.ds.labels
        self.hidden = resolve_weak_classes(cfg.weak_classes, self.labels) if cfg.weak_classes else []
        self.subset = select_subset(len(self.ds), cfg.images, cfg.fraction, cfg.seed)
        precision = resolve_precision(cfg.precision)
        # some heads sit idle in some stages (the classifier during mix-and-match, the similarity head without weak classes)
        ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
        self.acc = Accelerator(mixed_precision="no" if precision == "fp32" else precision, kwargs_handlers=[ddp])
        set_seed(cfg.seed)
        from groupseg.pretrained import resolve_weights

        src = resolve_weights(cfg.weights or None)
        self.weights_dir = Path(str(src)) if Path(str(src)).is_dir() else Path(str(src)).parent
        self.export_dtype = self._stored_dtype(self.weights_dir)
        seg = groupseg.Segmenter.from_pretrained(src, templates=cfg.templates)
        model = seg.model
        with torch.no_grad():
            _, emb, owner = seg.class_embeddings(self.ds.vocab)
            C = len(self.labels)
            init = torch.zeros(C, emb.shape[1]).index_add_(0, owner, emb.float().cpu())
            init = F.normalize(init, dim=-1)
        for p in model.text.parameters():
            p.requires_grad_(False)
        for p in model.text_proj.parameters():
            p.requires_grad_(False)
        if cfg.assign_scale > 0 and self.subset and cfg.epochs > 0:  # (no images: the zero-shot model, unchanged)
            add_assign_scale(model, cfg.assign_scale)
        self.head = SegmentationHead(model, init, cfg.groupings or None)
        self.step = 0
        self.epoch = 0
        mcfg = model.cfg
        self.data = LabelledImages(self.ds, self.subset, cfg, self.hidden, mcfg.image_mean, mcfg.image_std)
        if cfg.class_weights not in ("median-freq", "none"):
            raise ValueError(f"--class-weights must be median-freq or none, got {cfg.class_weights!r}")
        self.class_weights = None
        if cfg.class_weights == "median-freq":  # from the visible labels of the subset (hidden weak classes excluded)
            maps = (hide_classes(vocab_targets(self.ds, self.ds.samples[i]), self.hidden) for i in self.subset)
            self.class_weights = median_frequency_weights(maps, len(self.labels))
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.epochs, self.mix_epochs = cfg.epochs, 0

    # ------------------------------------------------------------------ pieces
    def _optimizer(self) -> torch.optim.Optimizer:
        cfg, head = self.cfg, self.head
        scales = [m.logit_scale for m in head.model.modules() if isinstance(m, AssignAttention) and m.logit_scale is not None]
        ids = {id(p) for p in scales}
        backbone = [p for p in head.model.visual.parameters() if p.requires_grad and id(p) not in ids]
        heads = list(head.model.visual_proj.parameters()) + [head.classifier, head.model.logit_scale] + scales
        heads += list(head.sim_head.parameters())
        return torch.optim.AdamW(
            [{"params": backbone, "lr": cfg.lr * cfg.backbone_lr_mult}, {"params": heads, "lr": cfg.lr}],
            lr=cfg.lr, weight_decay=cfg.weight_decay,
            fused=fused_adamw(backbone + heads) or None,
        )

    def _loader(self, epoch: int):
        """This process's share of a seeded shuffle of the subset (every process: a different share)."""
        self.data.epoch = epoch
        g = torch.Generator().manual_seed(self.cfg.seed * 1000003 + epoch)
        order = torch.randperm(len(self.data), generator=g)[self.acc.process_index :: self.acc.num_processes].tolist()
        return torch.utils.data.DataLoader(
            self.data, batch_size=self.cfg.batch_size, sampler=order, drop_last=len(order) > self.cfg.batch_size,
            # a few images: a worker process per epoch would cost more than it saves
            num_workers=self.cfg.workers if len(order) >= 8 * self.cfg.batch_size else 0, persistent_workers=False,
        )

    def _train_mode(self) -> None:
        self.head.train()
        self.head.model.text.eval()
        for m in self.head.modules():  # small batches: keep the pretrained BatchNorm statistics
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
            if isinstance(m, AssignAttention) and not self.cfg.assign_noise:
                m.eval()  # hard argmax assignment without Gumbel noise, as at inference

    def losses(self, batch: dict[str, torch.Tensor], epoch: int) -> dict[str, torch.Tensor]:
        """All loss terms of one batch (only what the mode uses is non-zero)."""
        cfg = self.cfg
        px, target, tags = batch["pixels"], batch["target"], batch["tags"]
        with self.acc.autocast():
            out = self.head(px)
        grid = out["grouping"].shape[-2:]
        terms: dict[str, torch.Tensor] = {}
        if epoch < self.mix_epochs:  # mix-and-match stage: triplets over patches of all images in the batch
            lab = patch_labels(target, tuple(grid))
            idx = sample_patches(lab, cfg.patches_per_class, self.gen).to(px.device)
            # the first stage's patch tokens, which the grouping reads: group-pooled features are equal
            # for all patches of a segment, so a different-class patch in the same segment is a negative
            # at distance 0 with no gradient, only the positives pull, and the features collapse
            feats = out["patch_tokens"].reshape(-1, out["patch_tokens"].shape[-1])
            terms["triplet"] = triplet_loss(feats[idx], lab.reshape(-1)[idx], cfg.margin)
            return terms
        logp = pixel_log_probs(out["group_logits"], out["grouping"], tuple(target.shape[-2:]), cfg.grouping_loss == "hard")
        terms["ce"] = self.pixel_loss(logp, target)
        if self.hidden and cfg.weak_loss == "tags":
            weak = torch.tensor(self.hidden, device=px.device)
            # proposals = groups: an image has a weak class iff some of its segments are that class
            p_img = tag_scores(out["group_logits"], out["grouping"], weak, cfg.tag_topk, cfg.grouping_loss == "hard")  # (B, W)
            terms["tag"] = cfg.tag_weight * F.binary_cross_entropy(p_img, tags[:, weak].float())
            if cfg.comp_weight > 0:
                terms["comp"] = cfg.comp_weight * complementary_loss(logp, target, weak, tags[:, weak], cfg.comp_balance)
            terms.update(self._similarity_terms(out, target, grid))
        return terms

    def pixel_loss(self, log_probs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Per-pixel NLL; ``IGNORE`` pixels (hidden weak classes included) contribute nothing."""
        w = None if self.class_weights is None else self.class_weights.to(log_probs.device, log_probs.dtype)
        return F.nll_loss(log_probs, target, weight=w, ignore_index=IGNORE)

    def _similarity_terms(self, out, target, grid) -> dict[str, torch.Tensor]:
        """Pixel-pixel similarity: learnt on base-class patch pairs, transferred to hidden pixels."""
        cfg = self.cfg
        lab = patch_labels(target, tuple(grid)).reshape(target.shape[0], -1)  # (B, N), hidden = IGNORE
        emb = F.normalize(self.head.sim_head(out["patch_tokens"]), dim=-1)  # (B, N, 64)
        B, N = lab.shape
        k = cfg.patches_per_class * 8
        bi = torch.randint(0, B, (k,), generator=self.gen)
        a, b = _pairs(N, k, self.gen)
        la, lb = lab[bi, a], lab[bi, b]
        sim_logit = 10.0 * (emb[bi, a] * emb[bi, b]).sum(-1)
        known = (la != IGNORE) & (lb != IGNORE)
        terms = {}
        if known.any():  # learn "same class?" on base-class pairs
            terms["sim"] = cfg.sim_weight * F.binary_cross_entropy_with_logits(sim_logit[known], (la == lb)[known].float())
        unknown = ~known
        if unknown.any():  # transfer: pairs touching hidden pixels should agree as the similarity says
            probs = torch.einsum("bgc,bgn->bnc", out["group_logits"].softmax(-1), out["grouping"].flatten(2))
            same = (probs[bi, a] * probs[bi, b]).sum(-1).clamp(1e-6, 1 - 1e-6)
            goal = torch.sigmoid(sim_logit.detach())
            terms["transfer"] = cfg.sim_weight * F.binary_cross_entropy(same[unknown], goal[unknown])
        return terms

    # ------------------------------------------------------------------ checkpoints and export
    def _state(self) -> dict[str, Any]:
        return {"step": self.step, "epoch": self.epoch, "config": json.loads(json.dumps(dataclasses.asdict(self.cfg))),
                "subset": [self.ds.samples[i].stem for i in self.subset], "gen": self.gen.get_state().tolist()}

    def save(self) -> None:
        if self.acc.is_main_process:
            save_checkpoint(self.out / "checkpoints", self.step, lambda d: self.acc.save_state(str(d)), self._state(), self.cfg.keep_last)
            self.export()
        self.acc.wait_for_everyone()

    def resume(self) -> None:
        if not self.cfg.resume:
            return
        ckpt = latest_checkpoint(self.out / "checkpoints") if self.cfg.resume == "auto" else Path(self.cfg.resume)
        if ckpt is None:
            log.info("no checkpoint in %s: starting fresh", self.out / "checkpoints")
            return
        st = read_state(ckpt)
        if st.get("subset") != [self.ds.samples[i].stem for i in self.subset]:
            raise ValueError(f"{ckpt}: checkpoint was trained on a different image subset (check --seed/--images/--fraction)")
        self.acc.load_state(str(ckpt))
        self.step, self.epoch = st["step"], st["epoch"]
        self.gen.set_state(torch.tensor(st["gen"], dtype=torch.uint8))
        metrics = self.out / "metrics.jsonl"
        if metrics.exists():
            keep = [ln for ln in metrics.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= self.step]
            metrics.write_text("".join(ln + "\n" for ln in keep))
        log.info("resumed from %s at epoch %d (step %d)", ckpt, self.epoch, self.step)

    def export(self) -> Path:
        """Ordinary groupseg weights in ``out``: the model plus the tuned class vectors."""
        head = self.acc.unwrap_model(self.head)
        model = head.model
        saved = (list(model.cfg.tuned_classes), model.tuned_class_embeds, model.cfg.groupings, model.cfg.window)
        model.cfg.groupings = self.cfg.groupings or None  # the exported model segments as it was tuned:
        model.cfg.window = self.cfg.crop_size  # with its grouping stages, in windows of its crop size
        try:  # the live model stays as it was: checkpoints keep one state layout
            model.set_tuned_classes(self.labels, F.normalize(head.classifier.detach().float(), dim=-1))
            return self._write_weights(model)
        finally:
            model.cfg.tuned_classes = saved[0]
            model.cfg.groupings, model.cfg.window = saved[2], saved[3]
            if saved[1] is None:
                del model.tuned_class_embeds
                model.register_parameter("tuned_class_embeds", None)
            else:
                model.tuned_class_embeds = saved[1]

    def _write_weights(self, model: groupseg.GroupViT) -> Path:
        """``model`` (in the starting weights' precision) and their tokenizer files into ``out``, via a temp dir."""
        tmp = self.out / "model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        model.save_pretrained(tmp, dtype=self.export_dtype)
        if (self.weights_dir / "tokenizer").is_dir():
            shutil.copytree(self.weights_dir / "tokenizer", tmp / "tokenizer")
        for f in tmp.iterdir():
            dest = self.out / f.name
            if dest.is_dir():
                shutil.rmtree(dest)
            f.replace(dest)
        tmp.rmdir()
        return self.out

    @staticmethod
    def _stored_dtype(weights_dir: Path) -> torch.dtype | None:
        """fp16 when the starting weights are stored in 16 bits (the export keeps their size), else fp32."""
        from safetensors import safe_open

        st = weights_dir / "model.safetensors"
        if not st.exists():
            return None
        with safe_open(str(st), "pt") as f:
            return torch.float16 if f.get_slice(next(iter(f.keys()))).get_dtype() in ("F16", "BF16") else None

    # ------------------------------------------------------------------ loop
    def fit(self) -> Path:
        from tqdm import tqdm

        from .main import plot_loss_curve

        cfg, acc = self.cfg, self.acc
        self.out.mkdir(parents=True, exist_ok=True)
        if not cfg.resume and latest_checkpoint(self.out / "checkpoints") is not None:
            raise ValueError(f"{self.out} already holds checkpoints: pass --resume auto to continue, or choose another --out")
        (self.out / "subset.txt").write_text("".join(self.ds.samples[i].stem + "\n" for i in self.subset))
        (self.out / "finetune_config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")
        if not self.subset or cfg.epochs == 0:
            # nothing to learn from: the zero-shot model itself (prompt ensembles, max over synonyms)
            log.info("no labelled images: writing the starting (zero-shot) model unchanged")
            return self._write_weights(self.acc.unwrap_model(self.head).model)
        opt = self._optimizer()
        steps_per_epoch = max(1, len(self._loader(0)))
        self.epochs = max(cfg.epochs, math.ceil(cfg.min_steps / steps_per_epoch))
        if cfg.objective == "mix-match":
            self.mix_epochs = cfg.mix_match_epochs or max(1, self.epochs // 3)
        total = steps_per_epoch * self.epochs
        log.info("%d labelled images, %d epochs of %d steps", len(self.subset), self.epochs, steps_per_epoch)
        if self.class_weights is not None:
            log.info("class weights (median frequency): %s",
                     ", ".join(f"{n} {w:.2f}" for n, w in zip(self.labels, self.class_weights.tolist())))
        warm = int(cfg.warmup_epochs * steps_per_epoch)

        def factor(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        self.head, opt = acc.prepare(self.head, opt)
        acc.register_for_checkpointing(sched)
        self.resume()
        metrics = (self.out / "metrics.jsonl").open("a")
        bar = tqdm(total=total, initial=self.step, desc="finetune", disable=not acc.is_main_process, dynamic_ncols=True)
        t0 = time.time()
        while self.epoch < self.epochs:
            self._train_mode()
            for batch in self._loader(self.epoch):
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                terms = self.losses(batch, self.epoch)
                loss = sum(terms.values())
                acc.backward(loss)
                acc.clip_grad_norm_(self.head.parameters(), 5.0)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                self.step += 1
                bar.update(1)
                if self.step % cfg.log_every == 0 and acc.is_main_process:
                    rec = {"step": self.step, "epoch": self.epoch, "loss": float(loss.detach())}
                    rec |= {f"{k}_loss": float(v.detach()) for k, v in terms.items()}
                    rec |= {"lr": sched.get_last_lr()[1], "elapsed_s": round(time.time() - t0, 1)}
                    metrics.write(json.dumps(rec) + "\n")
                    metrics.flush()
                    bar.set_postfix(loss=f"{rec['loss']:.3f}")
            self.epoch += 1
            # checkpoint every epoch, or every few epochs when epochs are only a step or two long
            if self.epoch % max(1, math.ceil(20 / steps_per_epoch)) == 0 or self.epoch == self.epochs:
                self.save()
        bar.close()
        metrics.close()
        if acc.is_main_process:
            plot_loss_curve(self.out / "metrics.jsonl", self.out / "loss_curve.png")
        return self.out


# --------------------------------------------------------------------------- command line
def add_finetune_args(p: argparse.ArgumentParser) -> None:
    d = FinetuneConfig()
    p.add_argument("--dataset", required=True, help="camvid, voc, ade20k, coco-stuff, imagenet-s, folder, ... (as groupseg eval)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default=d.split)
    p.add_argument("--vocab-file", default="", help="class names, one per line in label order (required for folder)")
    p.add_argument("--weights", default="", help="starting weights (default: the shipped model)")
    p.add_argument("--out", required=True, help="output directory: groupseg weights + checkpoints/")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--images", type=int, default=d.images, help="use N labelled images (seeded subset)")
    g.add_argument("--fraction", type=float, default=d.fraction, help="use this fraction of the labelled images, in (0, 1]")
    p.add_argument("--weak-classes", default="", help="comma-separated classes with image-level tags only")
    p.add_argument("--weak-loss", choices=["tags", "none"], default=d.weak_loss, help="none = base-only fine-tuning")
    p.add_argument("--tag-weight", type=float, default=d.tag_weight, help="weight of the weak-shot tag loss")
    p.add_argument("--comp-weight", type=float, default=d.comp_weight,
                   help="weak-shot complementary loss: pixels no base class claims go to the image's tagged weak classes (0 = off)")
    p.add_argument("--comp-balance", type=float, default=d.comp_balance,
                   help="complementary loss: share each tagged weak class gets, divided by its mean share of the image's unclaimed pixels ** this (0 = off)")
    p.add_argument("--tag-topk", type=float, default=d.tag_topk,
                   help="weak-shot tag loss: fraction of patches pooled per class (their mean scores the image)")
    p.add_argument("--objective", choices=["ce", "mix-match"], default=d.objective,
                   help="mix-match (default): triplets over patches of the labelled images for a third of the epochs, then per-pixel; ce: per-pixel only")
    p.add_argument("--groupings", type=int, default=d.groupings,
                   help="train on the first N grouping stages' segments (default 1: the first stage's; 0 = all)")
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--min-steps", type=int, default=d.min_steps, help="small subsets run more epochs to get this many steps")
    p.add_argument("--mix-match-epochs", type=int, default=d.mix_match_epochs)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--backbone-lr-mult", type=float, default=d.backbone_lr_mult)
    p.add_argument("--class-weights", choices=["median-freq", "none"], default=d.class_weights,
                   help="per-pixel loss balancing (default: median frequency, as SegNet on CamVid)")
    p.add_argument("--grouping-loss", choices=["soft", "hard"], default=d.grouping_loss,
                   help="per-pixel loss on the soft group mixture, or on each patch's argmax group (straight-through)")
    p.add_argument("--assign-scale", type=float, default=d.assign_scale,
                   help="> 0: learnable multiplier of the grouping logits, starting at this value")
    p.add_argument("--assign-noise", action=argparse.BooleanOptionalAction, default=d.assign_noise,
                   help="Gumbel noise in the grouping assignment while training")
    p.add_argument("--crop-size", type=int, default=d.crop_size)
    p.add_argument("--short-side", type=int, default=d.short_side)
    p.add_argument("--templates", default=d.templates)
    p.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default=d.precision)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--resume", default="", help="'auto' = continue from the latest checkpoint in OUT/checkpoints")


def config_from_args(args: argparse.Namespace) -> FinetuneConfig:
    names = {f.name for f in dataclasses.fields(FinetuneConfig)}
    return FinetuneConfig(**{k: v for k, v in vars(args).items() if k in names})


def run_finetune(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    out = Finetuner(config_from_args(args)).fit()
    print(f"done: weights in {out} (groupseg segment/eval/groups --weights {out})")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupseg.training.finetune", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_finetune_args(p)
    args = p.parse_args(argv)
    try:
        return run_finetune(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"groupseg finetune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
