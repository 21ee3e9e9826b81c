"""STEGO: a segmentation head distilled from a frozen backbone's feature correspondences.

Hamilton et al., "Unsupervised Semantic Segmentation by Distilling Feature Correspondences"
(ICLR 2022). A small head maps the frozen backbone's dense features F (C, h, w) to codes S
(dim, h, w). For two images with features f, g and codes s, t the head is trained with

    F_hwij = cos(f_hw, g_ij)                      feature correspondence
    F^SC_hwij = F_hwij - mean_i'j' F_hwi'j'         spatially centred (over the second image)
    S_hwij = cos(s_hw, t_ij)                      code correspondence
    L(f, g, s, t, b) = - sum_hwij (F^SC_hwij - b) max(S_hwij, 0)

averaged over the sampled positions (``groupseg.loss.correspondence``), for three kinds of pairs: the image with itself (shift
b_self, weight l_self), with one of its k nearest neighbours by global feature (b_knn, l_knn) and
with a random other image (b_rand, l_rand). Pixels whose backbone features correlate more than b
are pulled together in code space, the others pushed apart (down to orthogonal: the zero clamp).

Codes cluster into classes with a cosine k-means ("cluster probe", here mini-batch and streamed,
so memory does not grow with the number of images); a linear probe reports how much of the
labels a code space holds where labels exist.

The head lives in ``GroupViT.stego`` when ``ModelConfig.stego`` is set (feature, in_dim, dim,
clusters), with its cluster centres and, per centre, a direction in the joint image-text space
that names the cluster (``centre_embeds``).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .optim import build_optimizer

FEATURES = ("tokens", "joint", "both")  # stage-1 patch tokens, their joint-space projection, both


# ----------------------------------------------------------------------------- backbone features
def check_feature(model: nn.Module, feature: str) -> None:
    """Raise ``ValueError`` (one line) when ``model`` cannot give the dense ``feature``."""
    if feature not in FEATURES:
        raise ValueError(f"unknown dense feature {feature!r}: choose one of {', '.join(FEATURES)}")
    stages = getattr(getattr(model, "visual", None), "stages", None)
    if not stages or stages[0].group_token is None:
        raise ValueError(f"this backbone has no grouping stage, so no first-stage patch tokens for feature {feature!r}")


def feature_dim(model: nn.Module, feature: str) -> int:
    """Channels of the dense ``feature`` of ``model``."""
    check_feature(model, feature)
    width, joint = model.visual.width, model.cfg.embed_dim
    return {"tokens": width, "joint": joint, "both": width + joint}[feature]


def first_stage_tokens(model: nn.Module, pixels: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, 3, H, W) -> (B, N, width) image tokens after the first stage's blocks, before its grouping,
    and the patch grid: from the vision tower's own API (only the first stage runs)."""
    out = model.visual(pixels, groupings=1, return_patch_tokens=True)
    return out.patch_tokens, out.grid


def features_from_tokens(model: nn.Module, tokens: torch.Tensor, feature: str = "tokens") -> torch.Tensor:
    """First-stage patch tokens (B, N, width) -> the dense ``feature`` (B, N, C).

    ``tokens`` as they are, ``joint`` their projection into the joint image-text space (after the
    final norm, unit length), ``both`` the two concatenated, each unit length.
    """
    if feature == "tokens":
        return tokens
    joint = F.normalize(model.visual_proj(model.visual.norm(tokens)), dim=-1)
    return joint if feature == "joint" else torch.cat([F.normalize(tokens, dim=-1), joint], dim=-1)


def to_grid(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h * w, C) token features -> (B, C, h, w) maps."""
    return x.transpose(1, 2).reshape(x.shape[0], -1, h, w)


def dense_features(model: nn.Module, pixels: torch.Tensor, feature: str = "tokens") -> torch.Tensor:
    """The backbone's dense features (B, C, h, w) on the patch grid (differentiable: callers that
    do not train the backbone run it under ``torch.no_grad``).

    Args:
        model: a GroupViT.
        pixels: (B, 3, H, W) normalised images.
        feature: ``tokens`` (first-stage patch tokens), ``joint`` (their projection into the
            joint image-text space) or ``both`` (see ``features_from_tokens``).
    """
    check_feature(model, feature)
    tokens, (h, w) = first_stage_tokens(model, pixels)
    return to_grid(features_from_tokens(model, tokens, feature), h, w)


# ----------------------------------------------------------------------------- head
class StegoHead(nn.Module):
    """Linear + nonlinear 1x1-convolution branches, summed (STEGO's projection), and a cluster probe.

    Args:
        in_dim: backbone feature channels.
        dim: code channels; 0 = no head (codes are the backbone features: the k-means baseline).
        clusters: cluster centres kept (``centres`` (K, code dim), ``centre_embeds`` (K, embed_dim)).
        embed_dim: joint-space size, for the centres' names.
        dropout: channel dropout on the features in training (STEGO: 0.1).
        kernel: the nonlinear branch's first convolution (1 = STEGO's per-pixel head; the
            self-trained head sees each patch's neighbours: 5 by default, 3 before 2026-12-02).
    """

    def __init__(self, in_dim: int, dim: int = 70, clusters: int = 0, embed_dim: int = 256, dropout: float = 0.1,
                 kernel: int = 1) -> None:
        super().__init__()
        self.in_dim, self.dim = in_dim, dim
        if dim:
            self.linear = nn.Conv2d(in_dim, dim, 1)
            self.nonlinear = nn.Sequential(nn.Conv2d(in_dim, in_dim, kernel, padding=kernel // 2), nn.ReLU(), nn.Conv2d(in_dim, dim, 1))
        self.dropout = nn.Dropout2d(dropout)
        self.register_buffer("centres", torch.zeros(clusters, dim or in_dim))
        self.register_buffer("centre_embeds", torch.zeros(clusters, embed_dim))

    @property
    def code_dim(self) -> int:
        return self.dim or self.in_dim

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, in_dim, h, w) features -> (B, code_dim, h, w) codes (not normalised)."""
        if not self.dim:
            return feats
        x = self.dropout(feats)
        return self.linear(x) + self.nonlinear(x)

    def set_centres(self, centres: torch.Tensor, embeds: torch.Tensor) -> None:
        """Store (K, code_dim) cluster centres and their (K, embed_dim) naming directions."""
        self.centres = F.normalize(centres.detach().float(), dim=-1).to(self.centres.device)
        self.centre_embeds = F.normalize(embeds.detach().float(), dim=-1).to(self.centres.device)


def build_head(cfg: dict, embed_dim: int) -> StegoHead:
    """The head described by ``ModelConfig.stego`` (keys ``in_dim``, ``dim``, ``clusters``, ``feature``, ``kernel``)."""
    return StegoHead(int(cfg["in_dim"]), int(cfg.get("dim", 70)), int(cfg.get("clusters", 0)), embed_dim,
                     kernel=int(cfg.get("kernel", 1)))


def stego_config(model: nn.Module, feature: str, dim: int, clusters: int) -> dict:
    """The ``ModelConfig.stego`` record of a head over ``model``'s ``feature``."""
    return {"feature": feature, "in_dim": feature_dim(model, feature), "dim": dim, "clusters": clusters}


def attach_head(model: nn.Module, feature: str, dim: int, clusters: int) -> StegoHead:
    """Give ``model`` a fresh STEGO head (recorded in its config, so saved weights rebuild it)."""
    model.cfg.stego = stego_config(model, feature, dim, clusters)
    model.stego = build_head(model.cfg.stego, model.cfg.embed_dim).to(model.logit_scale.device)
    return model.stego


@torch.no_grad()
def code_map(model: nn.Module, pixels: torch.Tensor, *, joint: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """(B, 3, H, W) -> (B, code_dim, h, w) unit codes of ``model``'s STEGO head on the patch grid;
    with ``joint``, the pair (codes, unit joint-space features (B, D, h, w)) from one backbone pass."""
    if getattr(model, "stego", None) is None:
        raise ValueError("these weights have no STEGO head: train one with groupseg discover")
    tokens, (h, w) = first_stage_tokens(model, pixels)
    codes = F.normalize(model.stego(to_grid(features_from_tokens(model, tokens, model.cfg.stego["feature"]), h, w)), dim=1)
    return (codes, to_grid(features_from_tokens(model, tokens, "joint"), h, w)) if joint else codes


# ----------------------------------------------------------------------------- neighbours
@torch.no_grad()
def knn_pairs(glob: torch.Tensor, k: int, groups: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
    """The ``k`` nearest neighbours (N, k) of each row of ``glob`` (N, D) by cosine, never itself.

    Args:
        glob: global features, one row per training item.
        k: neighbours per item (fewer items than ``k + 1`` is an error).
        groups: (N,) source image of each item; items of the same image are never neighbours
            (five crops of one photo overlap).
        chunk: rows compared at a time (memory N x chunk).
    """
    N = glob.shape[0]
    g = F.normalize(glob.float(), dim=-1)
    groups = torch.arange(N) if groups is None else groups
    if int(torch.bincount(groups).max()) + k > N:
        raise ValueError(f"{N} training items cannot give {k} neighbours from other images each")
    out = torch.empty(N, k, dtype=torch.long)
    for s in range(0, N, chunk):
        sim = g[s : s + chunk] @ g.T  # (chunk, N)
        same = groups[s : s + chunk, None] == groups[None]
        out[s : s + chunk] = sim.masked_fill(same, -math.inf).topk(k, dim=1).indices
    return out


# ----------------------------------------------------------------------------- cluster probe
class MiniBatchKMeans:
    """Spherical (cosine) k-means over a stream of mini-batches (Sculley 2010, on the unit sphere).

    Memory is K x D whatever the stream's length. ``init`` seeds the centres by k-means++ on one
    batch; ``update`` moves each centre towards the mean of its batch members with a per-centre
    learning rate 1 / (points seen); a centre that stays empty is re-seeded from the batch point
    farthest from its centre.

    Args:
        k: clusters (>= 2).
        seed: seed of the k-means++ draws.
    """

    def __init__(self, k: int, seed: int = 0) -> None:
        if k < 2:
            raise ValueError(f"the number of clusters must be at least 2 (got {k})")
        self.k, self.seed = k, seed
        self.centres: torch.Tensor | None = None
        self.counts: torch.Tensor | None = None

    def init(self, x: torch.Tensor) -> None:
        from .clusters import kmeans

        if x.shape[0] < self.k:
            raise ValueError(f"K={self.k} clusters need at least {self.k} points, got {x.shape[0]}")
        self.centres, _ = kmeans(x, self.k, iters=20, seed=self.seed)
        self.counts = torch.zeros(self.k, device=self.centres.device)

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """One mini-batch (N, D) of points (normalised here)."""
        x = F.normalize(x.float(), dim=-1)
        if self.centres is None:
            self.init(x)
        sim = x @ self.centres.T  # (N, K)
        assign = sim.argmax(1)
        sums = torch.zeros_like(self.centres).index_add_(0, assign, x)
        n = torch.bincount(assign, minlength=self.k).float()
        self.counts += n
        lr = (n / self.counts.clamp_min(1))[:, None]
        moved = F.normalize((1 - lr) * self.centres + lr * sums / n.clamp_min(1)[:, None], dim=-1)
        self.centres = torch.where((n > 0)[:, None], moved, self.centres)
        empty = (self.counts == 0).nonzero()[:, 0]
        if len(empty):  # re-seed never-used centres on the worst-fitted points
            far = sim.max(1).values.argsort()[: len(empty)]
            self.centres[empty[: len(far)]] = x[far]

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        return (F.normalize(x.float(), dim=-1) @ self.centres.T).argmax(-1)


def fit_cluster_probe(batches: Iterable[torch.Tensor], k: int, epochs: int = 2, seed: int = 0) -> torch.Tensor:
    """Cosine k-means centres (K, D) over code batches; ``batches`` is re-iterated ``epochs`` times.

    Args:
        batches: a re-iterable of (N, D) code batches (e.g. a function's generator wrapped in a list-like).
        k: clusters.
        epochs: passes over the stream.
        seed: k-means++ seed.
    """
    km = MiniBatchKMeans(k, seed)
    for _ in range(epochs):
        for x in batches:
            km.update(x)
    if km.centres is None:
        raise ValueError("no codes to cluster")
    return km.centres


# ----------------------------------------------------------------------------- linear probe
def fit_linear_probe(codes: torch.Tensor, labels: torch.Tensor, num_classes: int, steps: int = 300, lr: float = 0.05,
                     seed: int = 0) -> nn.Linear:
    """A linear classifier over codes (N, D) -> classes, for reporting how much a code space holds
    (STEGO's linear probe; ``probe_label_map`` applies it to an image).

    Args:
        codes: (N, D) codes of labelled pixels (``pixel_codes``), used as they are.
        labels: (N,) their classes, each in 0..num_classes-1.
        num_classes: classes.
        steps: full-batch Adam steps on the cross-entropy.
        lr: Adam's learning rate.
        seed: seeds the classifier's initialisation.

    Raises a one-line ``ValueError`` when there is no pixel or a label is out of range.
    """
    if len(labels) == 0:
        raise ValueError("no labelled pixels to fit the linear probe on")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"linear probe labels must lie in 0..{num_classes - 1} (got {int(labels.min())}..{int(labels.max())})")
    torch.manual_seed(seed)
    x, y = codes.float(), labels.long()
    probe = nn.Linear(x.shape[1], num_classes)
    opt = build_optimizer([{"params": list(probe.parameters()), "weight_decay": 0.0}], lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(probe(x), y).backward()
        opt.step()
    return probe.requires_grad_(False)


# ----------------------------------------------------------------------------- inference
@torch.no_grad()
def cluster_scores(codes: torch.Tensor, centres: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, dim, h, w) unit codes -> (B, K, H, W) cosine to (K, dim) centres, bilinearly upsampled to ``size``.

    Scoring on the patch grid and upsampling the K scores equals scoring the upsampled codes up to
    a positive factor per pixel (the codes' renormalisation), so the nearest centre is the same,
    at K / dim of the cost.
    """
    scores = torch.einsum("bdhw,kd->bkhw", codes, F.normalize(centres.to(codes), dim=-1))
    return F.interpolate(scores, size=size, mode="bilinear", align_corners=False)


def cluster_refinement(segmenter) -> str:
    """The refinement of cluster maps: the segmenter's when set, else the one the STEGO head's weights
    record (``groupseg discover --refine``, PAMR by default; weights from before 2026-11-30: none)."""
    if segmenter.refine is not None:
        return segmenter.refine
    return (segmenter.model.cfg.stego or {}).get("refine", "")


def cluster_flip(segmenter, flip: bool | None = None) -> bool:
    """Whether cluster maps average the image's scores with its mirror image's: ``flip`` when given,
    else what the STEGO head's weights record (``groupseg discover --flip``, the default; weights
    from before 2026-12-02: no)."""
    if flip is not None:
        return flip
    return bool((segmenter.model.cfg.stego or {}).get("flip", False))


def _mirror_averaged(segmenter, px: torch.Tensor, codes: torch.Tensor, centres: torch.Tensor, flip: bool | None) -> torch.Tensor:
    """(1, K, H, W) cluster scores of ``px`` at its size; where ``cluster_flip`` says so, averaged with
    those of the mirror image, mirrored back."""
    size = tuple(px.shape[-2:])
    scores = cluster_scores(codes, centres, size)
    if cluster_flip(segmenter, flip):
        scores = (scores + cluster_scores(code_map(segmenter.model, px.flip(-1)), centres, size).flip(-1)) / 2
    return scores


def _image_codes(segmenter, image, joint: bool = False):
    """A path, PIL image or uint8 array -> (the PIL image, its (1, 3, h, w) pixels at the segmenter's
    short side, ``code_map`` of them: their (1, dim, h', w') codes, or with ``joint`` (codes, joint))."""
    from .transforms import load_image, target_size, to_tensor

    img = load_image(image)
    cfg = segmenter.cfg
    h, w = target_size(img.height, img.width, segmenter.short_side, cfg.vision.patch_size)
    px = to_tensor(img, (h, w), cfg.image_mean, cfg.image_std)[None].to(segmenter.device)
    return img, px, code_map(segmenter.model, px, joint=joint)


@torch.no_grad()
def stego_label_map(segmenter, image, centres: torch.Tensor, temperature: float = 0.1, flip: bool | None = None) -> torch.Tensor:
    """(H, W) cluster id per pixel at the image's own size: nearest centre of the upsampled codes
    (averaged with the mirror image's scores as ``cluster_flip`` says), refined by PAMR as
    ``cluster_refinement`` says."""
    from .transforms import resize_nearest

    img, px, codes = _image_codes(segmenter, image)
    scores = _mirror_averaged(segmenter, px, codes, centres, flip)
    if cluster_refinement(segmenter) == "pamr":
        from .refine import pamr

        scores = pamr(px, (scores / temperature).softmax(1))
    return resize_nearest(scores[0].argmax(0).cpu(), (img.height, img.width))


@torch.no_grad()
def pixel_codes(segmenter, image, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """(n, dim) codes at pixels (``ys``, ``xs``) of the image at its own size: the head's patch-grid
    codes interpolated there exactly as a bilinear upsampling of the whole map to the image would
    give them (no refinement), without building that map.

    Args:
        segmenter: a ``Segmenter`` whose weights have a STEGO head (its short side and device are used).
        image: a path, PIL image or (H, W, 3) uint8 array.
        ys, xs: (n,) pixel rows and columns at the image's own size.
    """
    img, px, codes = _image_codes(segmenter, image)
    gx = (xs.float() + 0.5) / img.width * 2 - 1  # pixel centres in grid_sample's [-1, 1] (align_corners=False)
    gy = (ys.float() + 0.5) / img.height * 2 - 1
    grid = torch.stack([gx, gy], -1).view(1, 1, -1, 2).to(codes)
    return F.grid_sample(codes, grid, mode="bilinear", padding_mode="border", align_corners=False)[0, :, 0].T.cpu()


@torch.no_grad()
def probe_label_map(segmenter, image, probe: nn.Linear) -> torch.Tensor:
    """(H, W) class per pixel at the image's own size: ``probe`` on the bilinearly upsampled codes
    (computed on the patch grid and upsampled, which is the same: the probe is linear).

    Args:
        segmenter: a ``Segmenter`` whose weights have a STEGO head.
        image: a path, PIL image or (H, W, 3) uint8 array.
        probe: from ``fit_linear_probe``.
    """
    from .transforms import resize_bilinear_argmax

    img, px, codes = _image_codes(segmenter, image)
    w, b = probe.weight.to(codes), probe.bias.to(codes)
    logits = torch.einsum("dhw,cd->chw", codes[0], w) + b[:, None, None]
    return resize_bilinear_argmax(logits.cpu(), (img.height, img.width))


def _keeps_centres(head: StegoHead, k: int) -> bool:
    """Whether the head stores ``k`` fitted centres (the zero init means none were fitted)."""
    return head.centres.shape[0] == k and bool(head.centres.abs().sum() > 0)


@torch.no_grad()
def stego_centres(segmenter, images, k: int, seed: int = 0) -> torch.Tensor:
    """The head's stored centres when it keeps ``k``; else mini-batch k-means over the codes of ``images``."""
    head = segmenter.model.stego
    if _keeps_centres(head, k):
        return head.centres
    km = MiniBatchKMeans(k, seed)
    for image in images:
        codes = _image_codes(segmenter, image)[2]
        km.update(codes[0].flatten(1).T)
    if km.centres is None:
        raise ValueError("no images to cluster")
    return km.centres


@torch.no_grad()
def stego_segment(segmenter, image, k: int, vocab=None, *, seed: int = 0):
    """``cluster_segment`` for weights with a STEGO head: the stored centres when the head keeps
    ``k`` of them (named by their stored joint-space directions), else k-means of this image's
    codes (named by the mean joint-space feature of each cluster); mirror averaging as
    ``cluster_flip`` says and PAMR as ``cluster_refinement`` says.
    Returns a ``SegmentationResult``, largest cluster first."""
    import time

    import numpy as np

    from .clusters import default_naming_vocab, kmeans, name_directions
    from .prompting import normalize_vocab
    from .segment import BACKGROUND, SegmentationResult
    from .transforms import resize_nearest

    t0 = time.perf_counter()
    vocab = default_naming_vocab() if vocab is None else normalize_vocab(vocab)
    img, px, (codes, joint) = _image_codes(segmenter, image, joint=True)
    head, n = segmenter.model.stego, codes.shape[-2] * codes.shape[-1]
    if k < 2 or (k > n and head.centres.shape[0] != k):
        raise ValueError(f"the number of clusters must be between 2 and the image's {n} feature pixels (got {k})")
    if _keeps_centres(head, k):
        centres, embeds = head.centres, head.centre_embeds
    else:
        flat = codes[0].flatten(1).T  # (n, dim)
        centres, assign = kmeans(flat, k, seed=seed)
        embeds = torch.zeros(k, joint.shape[1], device=flat.device).index_add_(0, assign, joint[0].flatten(1).T)
    scores = _mirror_averaged(segmenter, px, codes, centres, None)[0]
    if cluster_refinement(segmenter) == "pamr":
        from .refine import pamr

        scores = pamr(px[0], (scores / 0.1).softmax(0))
    lab = scores.argmax(0)
    counts = torch.bincount(lab.flatten(), minlength=k)
    order = [i for i in counts.argsort(descending=True).tolist() if counts[i] > 0]
    remap = torch.full((k,), -1, dtype=torch.long, device=lab.device)
    remap[order] = torch.arange(len(order), device=lab.device)
    label = resize_nearest(remap[lab].cpu(), (img.height, img.width))
    names = name_directions(segmenter, embeds[order], vocab)
    lm = label.numpy().astype(np.uint8 if len(names) < BACKGROUND else np.int32)
    keep = scores[order]

    def share() -> torch.Tensor:  # (C, H, W) softmax share of each cluster at the original size
        s = (keep / 0.1).softmax(0)
        return F.interpolate(s[None], size=(img.height, img.width), mode="nearest")[0].cpu()

    return SegmentationResult(lm, names, img, {"total": time.perf_counter() - t0}, _scores_fn=share)
