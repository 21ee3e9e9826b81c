"""Vocabulary-free segmentation: cluster GroupViT's segments, then name the clusters.

Features. GroupViT already cuts an image into G segments (8 for the released models) and gives
each one an embedding in the joint image-text space (``encode_groups``: ``group_embeds`` (G, D)
and soft maps ``grouping`` (G, h, w) over the patch grid). We cluster those segment embeddings,
each weighted by its pixel area (the soft map's mass), rather than per-pixel mixtures of them:
a mixture at a segment border is not a feature of its own, and would form spurious clusters of
border pixels once K exceeds the number of real segments. A pixel then takes the cluster with the
most soft grouping mass at that pixel (bilinearly upsampled, as ``Segmenter`` does for classes).
A consequence: one image yields at most G segments (G per sliding window), whatever K is.

K-means runs on the segmenter's device: spherical (cosine) k-means with k-means++ seeding from a
fixed seed, batched over independent problems, on L2-normalised embeddings.

Naming. Each cluster centre is a direction in the joint space; its name is the nearest word of a
vocabulary (prompt-ensembled text embeddings, max over synonyms), by default
``prompts/vocab/nouns_large.txt``.

The dataset-level protocol of STEGO / PASS (``groupseg eval --protocol unsupervised``, in
``eval/clusters.py``) uses the same features pooled over all images.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .classify import class_logits, to_label_map
from .prompting import normalize_vocab, parse_class, prompts_dir, read_vocab_file
from .segment import SegmentationResult, Segmenter
from .transforms import ImageLike, load_image, resize_nearest, sliding_windows, target_size, to_tensor


# ----------------------------------------------------------------------------- k-means
@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    k: int,
    weights: torch.Tensor | None = None,
    iters: int = 50,
    seed: int = 0,
    tol: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means with k-means++ seeding, on ``x``'s device.

    Args:
        x: (N, D) or (B, N, D) points (normalised here); a batch holds B independent problems.
        k: number of clusters. With fewer distinct points than ``k`` the extra clusters stay empty.
        weights: (N,) or (B, N) non-negative point weights (e.g. pixel areas; 0 = padding).
        iters: maximum Lloyd iterations.
        seed: seed of the k-means++ draws.
        tol: stop when no centre moves by more than this.

    Returns:
        centres (K, D) / (B, K, D), unit norm, and the assignment (N,) / (B, N) of each point.

    >>> c, a = kmeans(torch.randn(100, 8), 3)
    >>> c.shape, a.shape
    (torch.Size([3, 8]), torch.Size([100]))
    """
    single = x.ndim == 2
    x = F.normalize((x[None] if single else x).float(), dim=-1)  # (B, N, D)
    B, N, D = x.shape
    w = torch.ones(B, N, device=x.device) if weights is None else (weights[None] if single else weights).float().to(x.device)
    if N == 0 or k < 1:
        raise ValueError(f"k-means needs points and k >= 1 (got {N} points, k={k})")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    rows = torch.arange(B, device=x.device)

    def draw(p: torch.Tensor) -> torch.Tensor:  # (B, N) -> (B,) indices, p >= 0
        bad = p.sum(-1, keepdim=True) <= 0
        p = torch.where(bad, w.clamp_min(0) + 1e-12, p)  # all points covered: draw again by weight
        return torch.multinomial(p, 1, generator=gen)[:, 0]

    # k-means++: each new centre drawn with probability ~ weight * squared distance to the nearest one
    centres = x[rows, draw(w.clamp_min(0) + 1e-12)][:, None]  # (B, 1, D)
    d2 = (2 - 2 * (x @ centres.transpose(1, 2))[..., 0]).clamp_min(0)  # (B, N)
    for _ in range(1, k):
        c = x[rows, draw(w * d2)]  # (B, D)
        centres = torch.cat([centres, c[:, None]], dim=1)
        d2 = torch.minimum(d2, (2 - 2 * (x @ c[..., None])[..., 0]).clamp_min(0))

    for _ in range(iters):
        assign = (x @ centres.transpose(1, 2)).argmax(-1)  # (B, N)
        sums = torch.zeros(B, k, D, device=x.device).scatter_add_(1, assign[..., None].expand(-1, -1, D), x * w[..., None])
        mass = torch.zeros(B, k, device=x.device).scatter_add_(1, assign, w)
        new = torch.where((mass > 0)[..., None], F.normalize(sums, dim=-1), centres)  # empty clusters keep their centre
        shift = (new - centres).norm(dim=-1).max()
        centres = new
        if shift <= tol:
            break
    assign = (x @ centres.transpose(1, 2)).argmax(-1)
    return (centres[0], assign[0]) if single else (centres, assign)


# ----------------------------------------------------------------------------- features
@dataclass
class GroupFeatures:
    """GroupViT's segments of one image.

    Attributes:
        embeds: (N, D) L2-normalised segment embeddings (all windows).
        areas: (N,) soft pixel mass of each segment, in patches.
        windows: per window ``(y, x, height, width, first, last, grouping (g, gh, gw))``: the crop
            at the resized resolution and its segments ``embeds[first:last]``.
        size: the resized (h, w); ``orig``: the input (H, W).
    """

    embeds: torch.Tensor
    areas: torch.Tensor
    windows: list[tuple[int, int, int, int, int, int, torch.Tensor]]
    size: tuple[int, int]
    orig: tuple[int, int]


@torch.no_grad()
def group_features(segmenter: Segmenter, image: ImageLike, groupings: int | None = None, hard: bool = False) -> GroupFeatures:
    """Run the vision tower on ``image`` (sliding windows as the segmenter is set up) -> segments.

    ``groupings`` limits the grouping stages (``None`` = the segmenter's; 1 = the first stage's
    finer segments). ``hard`` gives each patch wholly to its most likely segment (areas then count
    patches), so that segments owning no patch weigh nothing."""
    img = load_image(image)
    W0, H0 = img.size
    cfg = segmenter.cfg
    patch = cfg.vision.patch_size
    h, w = target_size(H0, W0, segmenter.short_side, patch)
    px = to_tensor(img, (h, w), cfg.image_mean, cfg.image_std)
    win = segmenter.window
    corners = sliding_windows(h, w, win, segmenter.stride) if win else [(0, 0)]
    embeds, areas, windows, n = [], [], [], 0
    for y, x in corners:
        crop = px[:, y : y + win, x : x + win] if win else px
        g = segmenter.model.encode_groups(crop[None].to(segmenter.device), groupings if groupings is not None else segmenter.groupings)
        grouping = g["grouping"][0].float()  # (g, gh, gw)
        if hard:
            grouping = F.one_hot(grouping.argmax(0), grouping.shape[0]).permute(2, 0, 1).float()
        embeds.append(g["group_embeds"][0].float())
        areas.append(grouping.sum((1, 2)))
        windows.append((y, x, crop.shape[1], crop.shape[2], n, n + grouping.shape[0], grouping))
        n += grouping.shape[0]
    return GroupFeatures(torch.cat(embeds), torch.cat(areas), windows, (h, w), (H0, W0))


@torch.no_grad()
def cluster_votes(feats: GroupFeatures, segment_cluster: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft grouping mass per cluster at the resized resolution.

    Args:
        feats: the image's segments.
        segment_cluster: (N,) cluster id of each segment.

    Returns:
        ``used`` (U,) the cluster ids that own a segment, and ``votes`` (U, h, w) their mass per pixel.
    """
    used, local = torch.unique(segment_cluster, return_inverse=True)
    U = used.numel()
    h, w = feats.size
    acc = count = None
    for y, x, ch, cw, a, b, grouping in feats.windows:
        onehot = F.one_hot(local[a:b].to(grouping.device), U).T.float()  # (U, g)
        v = (onehot @ grouping.flatten(1)).view(U, *grouping.shape[1:])  # (U, gh, gw)
        v = F.interpolate(v[None], size=(ch, cw), mode="bilinear", align_corners=False)[0]
        if len(feats.windows) == 1:
            return used, v
        if acc is None:
            acc = torch.zeros(U, h, w, device=v.device)
            count = torch.zeros(h, w, device=v.device)
        acc[:, y : y + ch, x : x + cw] += v
        count[y : y + ch, x : x + cw] += 1
    return used, acc / count


def cluster_label_map(feats: GroupFeatures, segment_cluster: torch.Tensor) -> np.ndarray:
    """(H, W) int64 cluster id per pixel at the input's original size."""
    used, votes = cluster_votes(feats, segment_cluster)
    lab = used.to(votes.device)[votes.argmax(0)].cpu()
    return resize_nearest(lab, feats.orig).numpy().astype(np.int64)


# ----------------------------------------------------------------------------- naming
def default_naming_vocab() -> list[str]:
    """``prompts/vocab/nouns_large.txt``, else every shipped vocabulary's classes (deduplicated)."""
    vdir = prompts_dir() / "vocab"
    large = vdir / "nouns_large.txt"
    files = [large] if large.is_file() else sorted(vdir.glob("*.txt"))
    seen, out = set(), []
    for f in files:
        for e in read_vocab_file(f):
            key = parse_class(e)[0].lower()
            if key not in seen:
                seen.add(key)
                out.append(e)
    if not out:
        raise FileNotFoundError(f"no naming vocabulary in {vdir}: pass one")
    return out


@torch.no_grad()
def name_directions(segmenter: Segmenter, directions: torch.Tensor, vocab: str | Sequence[str]) -> list[str]:
    """The nearest vocabulary label of each (K, D) direction; repeats get a suffix (``grass 2``)."""
    labels, text, owner = segmenter.class_embeddings(vocab)
    per_class = class_logits(F.normalize(directions.float(), dim=-1), text, owner, len(labels), 1.0)  # (K, C)
    names, seen = [], {}
    for i in per_class.argmax(1).tolist():
        seen[labels[i]] = seen.get(labels[i], 0) + 1
        names.append(labels[i] if seen[labels[i]] == 1 else f"{labels[i]} {seen[labels[i]]}")
    return names


# ----------------------------------------------------------------------------- one image
def _cluster(feats: GroupFeatures, k: int, seed: int, iters: int):
    """k-means over one image's segments -> (centres, used cluster ids, votes, non-empty clusters largest first)."""
    centres, assign = kmeans(feats.embeds, k, weights=feats.areas, iters=iters, seed=seed)
    used, votes = cluster_votes(feats, assign)
    counts = torch.bincount(votes.argmax(0).flatten(), minlength=used.numel())
    order = [i for i in counts.argsort(descending=True).tolist() if counts[i] > 0]  # largest first, empty dropped
    return centres, used, votes, order


@torch.no_grad()
def cluster_segment(
    segmenter: Segmenter,
    image: ImageLike,
    k: int,
    vocab: str | Sequence[str] | None = None,
    *,
    seed: int = 0,
    iters: int = 50,
) -> SegmentationResult:
    """Segment ``image`` into ``k`` clusters without a word list, then name each cluster.

    The final grouping stage's segments are clustered first; when they give fewer than ``k``
    clusters (a model whose last stage puts a whole photo in one or two segments), the first
    stage's finer segments are clustered instead, each patch given wholly to its most likely
    segment. If those still give fewer, the result has fewer and its ``note`` says so and why.

    Args:
        segmenter: a ``Segmenter`` (its model, device, ``short_side`` and ``window`` are used).
        image: path, PIL image, array or tensor.
        k: the number of clusters wanted.
        vocab: words to name clusters with (comma-separated string or list, synonyms with ``;``);
            default ``prompts/vocab/nouns_large.txt``.
        seed: k-means++ seed.
        iters: maximum k-means iterations.

    Returns:
        a ``SegmentationResult`` whose classes are the cluster names, largest cluster first
        (no background); ``.scores`` are the clusters' soft pixel shares; ``.note`` is empty, or
        one line on why fewer than ``k`` clusters came back.

    >>> res = cluster_segment(Segmenter.from_pretrained(), "street.jpg", 5)  # doctest: +SKIP
    >>> res.save("out/street")  # doctest: +SKIP
    """
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1 (got {k})")
    if getattr(segmenter.model, "stego", None) is not None:  # a STEGO head (groupseg discover): its codes and centres
        from .stego import stego_segment

        return stego_segment(segmenter, image, k, vocab, seed=seed)
    t0 = time.perf_counter()
    vocab = default_naming_vocab() if vocab is None else normalize_vocab(vocab)
    segmenter.class_embeddings(vocab)  # text embeddings, cached for the next image
    t1 = time.perf_counter()
    img = load_image(image)
    feats = group_features(segmenter, img)
    centres, used, votes, order = _cluster(feats, k, seed, iters)
    if len(order) < k and segmenter.groupings != 1 and len(segmenter.cfg.vision.stages) > 2:
        feats = group_features(segmenter, img, groupings=1, hard=True)  # finer: the first stage's segments
        centres, used, votes, order = _cluster(feats, k, seed, iters)
    t2 = time.perf_counter()
    lab = votes.argmax(0)  # (h, w) index into used
    remap = torch.full((used.numel(),), -1, dtype=torch.long, device=lab.device)
    remap[order] = torch.arange(len(order), device=lab.device)
    label = resize_nearest(remap[lab].cpu(), feats.orig)
    names = name_directions(segmenter, centres[used[order]], vocab)
    t3 = time.perf_counter()
    lm = to_label_map(label, len(names))
    keep = votes[order]

    def scores() -> torch.Tensor:  # (C, H, W) soft pixel share of each cluster, at the original size
        s = keep / keep.sum(0, keepdim=True).clamp_min(1e-12)
        return F.interpolate(s[None], size=feats.orig, mode="nearest")[0].cpu()

    note = "" if len(names) >= k else (
        f"{len(names)} of {k} clusters: the model's segments of this image form only {len(names)} distinct regions")
    timing = {"text": t1 - t0, "model": t2 - t1, "kmeans": t3 - t2, "total": t3 - t0}
    return SegmentationResult(lm, names, img, timing, _scores_fn=scores, note=note)
