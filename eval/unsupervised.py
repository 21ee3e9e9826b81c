"""The STEGO / PASS unsupervised protocol over a benchmark: k-means (K = classes) over the segments
of all images, every pixel takes its cluster, clusters matched one-to-one to classes by the
Hungarian algorithm on the cluster-vs-class confusion, then the usual metrics. For weights with a
STEGO head, STEGO's linear probe too: a linear classifier fitted on another split's labelled codes."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from groupseg.viz import Gallery, save_label_map

from .clusters import Reservoir, hungarian_match, matched_confusion
from .datasets import Sample, SegDataset, read_rgb
from .metrics import ConfusionMatrix, labelled
from .report import _miou_of_pairs, image_miou
from .zero_shot import check_size


def _cluster_assigner(seg, samples: Sequence[Sample], K: int, flip: bool | None = None):
    """Cluster centres over the dataset -> (``rgb -> (H, W) cluster index``, what was clustered).

    A model with a STEGO head (``groupseg discover``) clusters its codes (streamed mini-batch
    k-means; mirror averaging as ``groupseg.stego.cluster_flip(seg, flip)`` says); any other
    clusters the segment embeddings of its last grouping stage.
    """
    from tqdm import tqdm

    from groupseg.clusters import cluster_label_map, group_features, kmeans

    if getattr(seg.model, "stego", None) is not None:
        from groupseg.stego import stego_centres, stego_label_map

        centres = stego_centres(seg, (read_rgb(s.image) for s in tqdm(samples, desc="features", unit="img")), K)
        return (lambda rgb: stego_label_map(seg, rgb, centres, flip=flip).numpy().astype(np.int64)), "the STEGO head's pixel codes"
    pool = Reservoir()
    for s in tqdm(samples, desc="features", unit="img", dynamic_ncols=True):
        f = group_features(seg, read_rgb(s.image))
        pool.add(f.embeds.cpu(), f.areas.cpu())
    centres, _ = kmeans(pool.x.to(seg.device), K, weights=pool.w.to(seg.device), seed=0)

    def clusters_of(rgb: np.ndarray) -> np.ndarray:  # (H, W) nearest centre per pixel
        f = group_features(seg, rgb)
        return cluster_label_map(f, (f.embeds @ centres.T).argmax(1))

    return clusters_of, f"{len(pool.x)} segments"


def evaluate_unsupervised(seg, ds: SegDataset, samples: Sequence[Sample], args) -> tuple[ConfusionMatrix, Gallery]:
    """Two passes over the images (features, then assignment); a third over the few pictured or saved."""
    from tqdm import tqdm

    C = ds.num_classes
    K = args.clusters or C
    clusters_of, what = _cluster_assigner(seg, samples, K, args.flip)

    conf = np.zeros(K * C, dtype=np.int64)
    pairs: list[tuple[str, np.ndarray, np.ndarray]] = []  # per image: (stem, cluster * C + class, count), small
    for s in tqdm(samples, desc="assign", unit="img", dynamic_ncols=True):
        target = ds.load_target(s)
        lab = clusters_of(read_rgb(s.image))
        check_size(s, lab, target)
        valid = labelled(target, C, ds.ignore_index)
        codes, counts = np.unique(lab[valid] * C + target[valid], return_counts=True)
        np.add.at(conf, codes, counts)
        if args.gallery:
            pairs.append((s.stem, codes.astype(np.int64), counts.astype(np.int64)))
    conf = conf.reshape(K, C)
    mapping = hungarian_match(conf)
    cm = ConfusionMatrix(C, ignore_index=ds.ignore_index)
    cm.mat = matched_confusion(conf, mapping)

    gallery = Gallery(ds.classes, ds.background)
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
                gallery.add(image_miou(pred, ds.load_target(s), C, ds.ignore_index), s.stem, rgb, ds.load_target(s), pred)
    print(f"unsupervised: K={K} clusters over {what}, {int((mapping >= 0).sum())} matched to classes")
    return cm, gallery


def linear_probe(seg, fit: SegDataset, ds: SegDataset, samples: Sequence[Sample], per_image: int = 1000, seed: int = 0) -> ConfusionMatrix:
    """STEGO's linear probe: a linear classifier fitted on the head's codes of random labelled pixels
    of every image of ``fit`` (their labels are read: a report of how much of the classes the code
    space holds, not an unsupervised result), then scored on ``samples``.

    Args:
        seg: a ``Segmenter`` whose weights have a STEGO head.
        fit: the dataset the probe is fitted on (never the evaluated images).
        ds: the evaluated dataset (its classes, ignore label and targets).
        samples: the evaluated images of ``ds``.
        per_image: labelled pixels drawn from each image of ``fit`` (all when it has fewer).
        seed: seeds the pixel draw and the probe.

    Returns the probe's confusion matrix over ``samples``.
    """
    import torch
    from tqdm import tqdm

    from groupseg.stego import fit_linear_probe, pixel_codes, probe_label_map

    C, gen = ds.num_classes, torch.Generator().manual_seed(seed)
    codes, labels = [], []
    for s in tqdm(fit.samples, desc="probe codes", unit="img", dynamic_ncols=True):
        target, rgb = fit.load_target(s), read_rgb(s.image)
        check_size(s, rgb[..., 0], target)
        target = torch.from_numpy(target.astype(np.int64))
        ys, xs = torch.nonzero(labelled(target, C, fit.ignore_index), as_tuple=True)
        pick = torch.randperm(len(ys), generator=gen)[:per_image]
        codes.append(pixel_codes(seg, rgb, ys[pick], xs[pick]))
        labels.append(target[ys[pick], xs[pick]])
    probe = fit_linear_probe(torch.cat(codes), torch.cat(labels), C, seed=seed)
    cm = ConfusionMatrix(C, ignore_index=ds.ignore_index)
    for s in tqdm(samples, desc="probe", unit="img", dynamic_ncols=True):
        target = ds.load_target(s)
        pred = probe_label_map(seg, read_rgb(s.image), probe).numpy()
        check_size(s, pred, target)
        cm.update(torch.from_numpy(pred), torch.from_numpy(target.astype(np.int64)))
    return cm
