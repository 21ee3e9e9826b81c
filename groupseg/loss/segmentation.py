"""Segmentation losses for fine-tuning GroupViT on pixel labels and image tags.

Pure functions of tensors: group-to-class logits ``(B, G, C)``, soft patch-to-group maps
``(B, G, h, w)`` (softmax over G), label maps ``(B, H, W)`` with ``IGNORE`` for unlabelled pixels.

* ``pixel_log_probs``: each pixel's class distribution through its group (soft, or the argmax
  group with a straight-through gradient), for a per-pixel NLL;
* ``triplet_loss`` over sampled patch features (``patch_labels``, ``sample_patches``): the
  "match" of mix-and-match (Zhan et al., AAAI 2018);
* ``tag_scores`` (multiple-instance image-level scores), ``complementary_loss`` and
  ``pixel_pair_similarity_losses``: the weak-shot terms after SimFormer (NeurIPS 2022).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = 255  # label of pixels no loss reads (void, hidden weak classes)


def patch_groups(grouping: torch.Tensor, hard: bool) -> torch.Tensor:
    """p(group | patch) (B, G, h, w): soft, or the one-hot argmax group with the soft gradient.

    Args:
        grouping: (B, G, h, w) soft assignment, softmax over G.
        hard: one-hot argmax in the forward pass, the soft assignment's gradient (straight-through).
    """
    grouping = grouping.float()
    if not hard:
        return grouping
    one_hot = torch.zeros_like(grouping).scatter_(1, grouping.argmax(1, keepdim=True), 1.0)
    return one_hot - grouping.detach() + grouping


def pixel_log_probs(group_logits: torch.Tensor, grouping: torch.Tensor, size: tuple[int, int], hard: bool = False) -> torch.Tensor:
    """log p(class | pixel) = log sum_g p(g | pixel) p(class | g), at ``size``: (B, C, H, W).

    Args:
        group_logits: (B, G, C) class logits of each group.
        grouping: (B, G, h, w) soft patch-to-group maps.
        size: output (H, W); the maps are upsampled bilinearly.
        hard: p(g | patch) is the one-hot argmax group (the segment inference gives the patch)
            in the forward pass, with the soft assignment's gradient (straight-through).

    Both the upsampling and the sum over groups are linear, so the class probabilities are formed
    on the patch grid and only the C class maps are upsampled, not the G group maps (the same
    values, G / C times less upsampling work, which dominated the fine-tuning step).
    """
    probs = torch.einsum("bgc,bghw->bchw", group_logits.float().softmax(-1), patch_groups(grouping, hard).float())
    probs = F.interpolate(probs, size=size, mode="bilinear", align_corners=False)
    return probs.clamp_min(1e-8).log()


def tag_scores(group_logits: torch.Tensor, grouping: torch.Tensor, classes: torch.Tensor, topk: float, hard: bool = True) -> torch.Tensor:
    """Image-level presence score of ``classes`` from the groups (B, len(classes)), in (0, 1).

    Multiple-instance pooling over groups weighted by their area: each patch carries the class
    probabilities of its (argmax) group, and the score is the mean of the ``topk`` fraction of
    patches with the highest probability. A group that owns no patch cannot explain a tag, and
    an absent tag pushes down every patch that scores high.

    Args:
        group_logits: (B, G, C) class logits of each group.
        grouping: (B, G, h, w) soft patch-to-group maps.
        classes: (K,) indices of the classes to score.
        topk: fraction of patches pooled per class, in (0, 1].
        hard: patches carry their argmax group's probabilities (straight-through).
    """
    probs = torch.einsum("bgc,bgn->bcn", group_logits.float().softmax(-1)[..., classes], patch_groups(grouping, hard).flatten(2))
    k = max(1, round(topk * probs.shape[-1]))
    return probs.topk(k, dim=-1).values.mean(-1).clamp(1e-6, 1 - 1e-6)


def complementary_loss(log_probs: torch.Tensor, target: torch.Tensor, weak: torch.Tensor, weak_tags: torch.Tensor,
                       balance: float = 0.0) -> torch.Tensor:
    """SimFormer's complementary loss: what no base class claims belongs to the image's weak classes.

    Every pixel no base label covers (hidden weak pixels and void alike: the target says only
    ``IGNORE``) in an image tagged with some weak class gets -log sum_{tagged weak c} p(c | pixel);
    which weak class it is stays to the tag and similarity losses.

    Its gradient is that of a cross-entropy against the model's own posterior over the tagged
    classes, q(c | pixel) = p(c | pixel) / sum_tagged p, so the class already claiming most of the
    unclaimed pixels (car, in CamVid) keeps claiming them. ``balance`` > 0 divides q by each
    class's mean q over the image's unclaimed pixels to the power ``balance`` (class-balanced
    self-training, after Zou et al. 2018) and renormalises, then uses the KL divergence from that
    fixed target: a tagged class with little mass wins the pixels where it is relatively likely.
    ``balance`` -> 0 is the plain loss (same gradient, same value).

    Args:
        log_probs: (B, C, H, W) per-pixel class log-probabilities.
        target: (B, H, W) labels with the weak classes hidden (``IGNORE``).
        weak: (W,) class indices of the weak classes.
        weak_tags: (B, W) presence of each weak class in each image.
        balance: class-balancing exponent (0 = off).
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
    """Majority class of each patch cell (B, h, w); ``IGNORE`` where no class covers ``purity``.

    Args:
        target: (B, H, W) label map.
        grid: the patch grid (h, w).
        purity: least fraction of a cell's pixels its class must cover.
    """
    B, H, W = target.shape
    h, w = grid
    C = int(target[target != IGNORE].max().item()) + 1 if (target != IGNORE).any() else 1
    t = target.clamp(max=C).long()  # IGNORE -> C, dropped below
    if H % h == 0 and W % w == 0:  # equal cells: count each cell's classes (no (B, C, H, W) one-hot)
        ph, pw = H // h, W // w
        cell = (torch.arange(H, device=t.device) // ph)[:, None] * w + (torch.arange(W, device=t.device) // pw)[None, :]
        idx = ((torch.arange(B, device=t.device)[:, None, None] * (h * w) + cell) * (C + 1) + t).reshape(-1)
        counts = torch.bincount(idx, minlength=B * h * w * (C + 1)).view(B, h, w, C + 1)[..., :C]
        frac = counts.permute(0, 3, 1, 2).float() / (ph * pw)  # (B, C, h, w)
    else:
        onehot = F.one_hot(t, C + 1).permute(0, 3, 1, 2).float()[:, :C]
        frac = F.adaptive_avg_pool2d(onehot, grid)  # (B, C, h, w)
    best, lab = frac.max(1)
    lab[best < purity] = IGNORE
    return lab.view(B, *grid)


def sample_patches(labels: torch.Tensor, per_class: int, gen: torch.Generator) -> torch.Tensor:
    """Flat indices into (B*h*w) of up to ``per_class`` labelled patches of each class ("mix").

    Args:
        labels: (B, h, w) patch labels (``patch_labels``).
        per_class: most patches drawn per class.
        gen: the generator that draws them.
    """
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

    Args:
        feats: (N, D) features of the sampled patches.
        labels: (N,) their classes.
        margin: the triplet margin (in the unit-sphere distance).
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
    with torch.no_grad():  # (a, p): which negative is the nearest beyond p, a few anchors at a time
        # (the whole (a, p, n) cube of 352 patches is 174 MB a tensor; autograd would keep it too)
        d_an = d.masked_fill(same, float("nan"))  # (a, n), NaN where n is not a negative
        beyond = [torch.where(d_an[i : i + 32, None, :] > d[i : i + 32, :, None], d_an[i : i + 32, None, :],
                              float("inf")).min(-1) for i in range(0, len(d), 32)]
        nearest, found = torch.cat([b.indices for b in beyond]), torch.isfinite(torch.cat([b.values for b in beyond]))
    semi = torch.where(found, d.gather(1, nearest), float("inf"))  # its distance, with its gradient
    easiest = d.masked_fill(same, float("-inf")).amax(1, keepdim=True).expand_as(semi)
    d_neg = torch.where(torch.isfinite(semi), semi, easiest)
    return F.relu(d - d_neg + margin)[pairs].mean()


def random_pairs(n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` random index pairs (a, b) in ``range(n)``, drawn from ``gen`` (a first, then b)."""
    a = torch.randint(0, n, (k,), generator=gen)
    b = torch.randint(0, n, (k,), generator=gen)
    return a, b


def pixel_pair_similarity_losses(pair_embeds: torch.Tensor, labels: torch.Tensor, group_logits: torch.Tensor,
                                 grouping: torch.Tensor, num_pairs: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Pixel-pixel similarity: learnt on base-class patch pairs, transferred to hidden pixels.

    ``num_pairs`` random patch pairs within an image each get a "same class?" logit from their
    embeddings. ``sim``: binary cross-entropy of that logit on pairs whose both labels are
    known; ``transfer``: on pairs touching a hidden (``IGNORE``) patch, the probability that the
    two patches' group-derived class distributions agree is pulled towards the (detached)
    similarity. A term is absent when no pair of its kind was drawn.

    Args:
        pair_embeds: (B, N, E) L2-normalised patch embeddings of the similarity head.
        labels: (B, N) patch labels, ``IGNORE`` where hidden or unlabelled.
        group_logits: (B, G, C) class logits of each group.
        grouping: (B, G, h, w) soft patch-to-group maps, h * w = N.
        num_pairs: pairs drawn.
        gen: the generator that draws them (image indices first, then the pairs).
    """
    B, N = labels.shape
    bi = torch.randint(0, B, (num_pairs,), generator=gen)
    a, b = random_pairs(N, num_pairs, gen)
    la, lb = labels[bi, a], labels[bi, b]
    sim_logit = 10.0 * (pair_embeds[bi, a] * pair_embeds[bi, b]).sum(-1)
    known = (la != IGNORE) & (lb != IGNORE)
    terms = {}
    if known.any():  # learn "same class?" on base-class pairs
        terms["sim"] = F.binary_cross_entropy_with_logits(sim_logit[known], (la == lb)[known].float())
    unknown = ~known
    if unknown.any():  # transfer: pairs touching hidden pixels should agree as the similarity says
        probs = torch.einsum("bgc,bgn->bnc", group_logits.softmax(-1), grouping.flatten(2))  # (B, N, C)
        same = (probs[bi, a] * probs[bi, b]).sum(-1).clamp(1e-6, 1 - 1e-6)
        goal = torch.sigmoid(sim_logit.detach())
        terms["transfer"] = F.binary_cross_entropy(same[unknown], goal[unknown])
    return terms
