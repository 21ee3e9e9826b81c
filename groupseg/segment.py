"""Zero-shot segmentation with any word list: the ``Segmenter`` API.

Two protocols turn an image into a label map (``Segmenter(protocol=...)``):

* ``"groupseg"`` (default): the short side resized to ``short_side`` (rounded to the patch size),
  the whole image or windows of ``window`` pixels, each pixel the best class of its segment
  (window scores averaged per region), a plain ``threshold`` on that class's probability.
* ``"paper"``: GroupViT's zero-shot protocol exactly as NVlabs' code runs it: mmcv's keep-ratio
  resize to (2048, 448), 448 x 448 crops with stride 224 placed as mmseg does, the image's top-5
  classes, NVlabs' background rule, the crops' class and background scores averaged per pixel,
  resized bilinearly to the image, then the argmax. Its pieces are the small functions of
  ``groupseg.classify`` and ``groupseg.transforms``.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .argtypes import resolve_device
from .classify import BACKGROUND, background_channel_label_map, background_floor, class_logits, to_label_map, top_k_filter, with_background
from .factory import load_model
from .models.groupvit import GroupViT
from .prompting import DEFAULT_TEMPLATES, load_templates, normalize_vocab, parse_class
from .tokenizer import get_tokenizer
from .transforms import (ImageLike, keep_ratio_size, load_image, resize_bilinear, resize_bilinear_argmax, resize_nearest,
                         sliding_windows, target_size, to_tensor)
from .viz import draw_legend, palette, save_label_map

PROTOCOLS = ("groupseg", "paper")
# GroupViT's zero-shot settings (NVlabs segmentation/configs/_base_/datasets/*.py, group_vit_seg.py)
PAPER = {"templates": "simple", "scale": (2048, 448), "window": 448, "stride": 224, "top_k": 5}


@dataclass
class SegmentationResult:
    """The segmentation of one image.

    Attributes:
        label_map: (H, W) numpy class indices 0..C-1 at the original size; 255 (or -1 when
            C >= 255) marks background / below threshold. A numpy array, like the image it
            labels: ready for PIL, saving and counting.
        classes: the class labels, in vocabulary order.
        image: the RGB input.
        timing: seconds spent per step.
        note: one line a caller should show (e.g. fewer clusters than asked), else empty.

    ``scores`` is a torch tensor instead: (C, H, W) floats for further computation (averaging,
    refinement, losses) on the segmenter's side; it is made on first access.
    """

    label_map: np.ndarray
    classes: list[str]
    image: Image.Image
    timing: dict[str, float] = field(default_factory=dict)
    _scores_fn: Callable[[], torch.Tensor] | None = field(default=None, repr=False)
    _scores: torch.Tensor | None = field(default=None, repr=False)
    note: str = ""

    @property
    def background(self) -> int:
        """The label map's background value: 255, or -1 for >= 255 classes."""
        return BACKGROUND if self.label_map.dtype == np.uint8 else -1

    @property
    def scores(self) -> torch.Tensor:
        """(C, H, W) float class probabilities at the original size (computed on first access)."""
        if self._scores is None and self._scores_fn is not None:
            self._scores = self._scores_fn()
        return self._scores

    def fractions(self) -> dict[str, float]:
        """Fraction of pixels given to each class (and ``background``)."""
        n = self.label_map.size
        counts = np.bincount(self.label_map[self.label_map != self.background].ravel().astype(np.int64), minlength=len(self.classes))
        out = {c: float(counts[i]) / n for i, c in enumerate(self.classes)}
        out["background"] = float((self.label_map == self.background).sum()) / n
        return out

    def colorize(self) -> np.ndarray:
        """(H, W, 3) uint8 colour image of the label map (background black)."""
        pal = np.concatenate([palette(len(self.classes)), np.zeros((1, 3), np.uint8)])
        idx = np.where(self.label_map == self.background, len(self.classes), self.label_map).astype(np.int64)
        return pal[idx]

    def overlay(self, alpha: float = 0.55, legend: bool = True) -> Image.Image:
        """The image blended with class colours, the same size as the input, with a legend."""
        base = np.asarray(self.image, dtype=np.float32)
        col = self.colorize().astype(np.float32)
        fg = (self.label_map != self.background)[..., None]
        out = np.where(fg, base * (1 - alpha) + col * alpha, base * 0.6)
        img = Image.fromarray(out.clip(0, 255).astype(np.uint8))
        if legend:
            self._draw_legend(img)
        return img

    def _draw_legend(self, img: Image.Image) -> None:
        fr = self.fractions()
        present = sorted((i for i, c in enumerate(self.classes) if fr[c] > 0), key=lambda i: -fr[self.classes[i]])
        pal = palette(len(self.classes))
        lines = [(pal[i], f"{self.classes[i]} {100 * fr[self.classes[i]]:.0f}%") for i in present]
        if not lines and self.label_map.size:  # say so rather than show a bare photo
            lines = [(None, "all background: no class above the threshold")]
        draw_legend(img, lines)

    def save(self, prefix: str | Path) -> dict[str, Path]:
        """Write ``PREFIX_labels.png`` (class indices, 255 background), ``PREFIX_overlay.png`` and ``PREFIX.json``."""
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        paths = {
            "labels": prefix.with_name(prefix.name + "_labels.png"),
            "overlay": prefix.with_name(prefix.name + "_overlay.png"),
            "json": prefix.with_name(prefix.name + ".json"),
        }
        save_label_map(self.label_map, self.background, paths["labels"])  # >= 255 classes: 16-bit, 65535 = background
        self.overlay().save(paths["overlay"])
        meta = {
            "classes": self.classes,
            "background_value": BACKGROUND if self.label_map.dtype == np.uint8 else 65535,
            "size": [self.label_map.shape[0], self.label_map.shape[1]],
            "fractions": self.fractions(),
            "timing": self.timing,
        }
        if self.note:
            meta["note"] = self.note
        paths["json"].write_text(json.dumps(meta, indent=2) + "\n")
        return paths


class Segmenter:
    """Segment images with any word list.

    Holds a model, its tokenizer and prompt templates, and a cache of text
    embeddings keyed by (template set, word), so a large vocabulary is encoded once.

    Args:
        model: a ``GroupViT`` (put in eval mode).
        templates: a template set name from ``prompts/templates`` or a file, or a list
            (default: the protocol's, ``simple`` for both).
        short_side: ``groupseg`` protocol: images are resized so their short side is this (then
            rounded to the patch size).
        window: sliding-window side in pixels, a multiple of the patch size (0 = never slide;
            ``None`` = the protocol's: 448 for ``paper``, else the model config's ``window``, set by
            fine-tuning to its crop size, else 0).
        top_k: keep only the image's k most likely classes per segment (NVlabs' filter); 0 = off;
            ``None`` = the protocol's (``paper``: 5, at most the vocabulary; ``groupseg``: 0).
        threshold: background threshold in [0, 1]; 0 = no background. ``groupseg``: a pixel whose
            best class probability is below it is background (255). ``paper``: NVlabs' rule, below
            ``min(threshold, best segment score of the crop)`` (``groupseg.classify.background_floor``).
        device: torch device, or ``"auto"`` (CUDA when visible, else the CPU; ``groupseg.argtypes.resolve_device``).
        weights_dir: where the weights came from (for a Hugging Face tokenizer stored beside them).
        tokenizer: use this tokenizer instead of the one found from the config / ``weights_dir``.
        groupings: grouping stages that merge segments (``None`` = the model config's
            ``groupings``, by default all, as GroupViT; ``1`` = the first stage's finer segments,
            the later stages' blocks still run over them).
        text_precision: precision of prompt encoding: ``auto`` (bf16 where the machine runs it faster:
            1,000 new words encode about twice as fast, cosine to fp32 > 0.999) or ``fp32``
            (``None`` = the protocol's: ``fp32`` for ``paper``, whose background rule hangs on the
            best segment of a crop and so on small score differences; ``auto`` for ``groupseg``).
        refine: ``"pamr"`` moves segment boundaries onto image edges (``groupseg.refine.pamr``,
            as TCL does at test time; ``groupseg`` protocol); ``""`` = off; ``None`` = the weights'
            own: off for words, and for clusters of a STEGO head what ``groupseg discover`` recorded
            (``groupseg.stego.cluster_refinement``).
        protocol: ``"groupseg"`` or ``"paper"`` (see the module docstring).
        stride: window step in pixels (``None``: ``paper`` 224, ``groupseg`` two thirds of the window).
        scale: ``paper`` protocol: the keep-ratio resize bounds (long side, short side).

    >>> seg = Segmenter.from_pretrained()  # doctest: +SKIP
    >>> out = seg.segment("street.jpg", ["road", "car", "cyclist", "puddle"])  # doctest: +SKIP
    >>> paper = Segmenter.from_pretrained("gvit/", protocol="paper", threshold=0.95)  # doctest: +SKIP
    """

    def __init__(
        self,
        model: GroupViT,
        templates: str | Sequence[str] | None = None,
        short_side: int = 448,
        window: int | None = None,
        top_k: int | None = None,
        threshold: float = 0.0,
        device: str | torch.device | None = "auto",
        weights_dir: str | Path | None = None,
        tokenizer=None,
        refine: str | None = None,
        text_precision: str | None = None,
        groupings: int | None = None,
        protocol: str = "groupseg",
        stride: int | None = None,
        scale: tuple[int, int] = PAPER["scale"],
    ) -> None:
        if protocol not in PROTOCOLS:
            raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
        paper = protocol == "paper"
        self.protocol = protocol
        self.groupings = groupings if groupings is not None else model.cfg.groupings
        from .precision import resolve_precision

        device = resolve_device(device)
        self.text_precision = resolve_precision(text_precision or ("fp32" if paper else "auto"), device)
        if refine not in (None, "", "pamr"):
            raise ValueError(f"unknown refinement {refine!r}; expected 'pamr' or ''")
        if refine and paper:
            raise ValueError("refinement (PAMR) applies to the groupseg protocol, not the paper's")
        self.refine = refine
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.cfg = model.cfg
        self.tokenizer = tokenizer if tokenizer is not None else get_tokenizer(self.cfg, weights_dir)
        templates = templates if templates is not None else (PAPER["templates"] if paper else DEFAULT_TEMPLATES)
        self.templates = load_templates(templates) if isinstance(templates, str) else list(templates)
        if not self.templates:
            raise ValueError("no prompt templates given")
        self._templates_key = hashlib.sha1("\n".join(self.templates).encode()).hexdigest()[:12]
        self.short_side, self.scale = short_side, tuple(scale)
        patch = self.cfg.vision.patch_size
        self.window = window if window is not None else (PAPER["window"] if paper else (model.cfg.window or 0))
        if self.window < 0 or self.window % patch:
            raise ValueError(f"window {self.window} is not a multiple of the model's patch size {patch} (e.g. {max(patch, self.window // patch * patch)})")
        self.stride = stride if stride is not None else (PAPER["stride"] if paper else max(patch, (self.window * 2 // 3) // patch * patch))
        if self.stride < 1 or short_side < 1 or min(self.scale) < 1:
            raise ValueError(f"stride, short side and scale must be positive (got {self.stride}, {short_side}, {self.scale})")
        self._top_k_given = top_k is not None
        self.top_k = top_k if top_k is not None else (PAPER["top_k"] if paper else 0)
        self.threshold = threshold
        _check_settings(self.top_k, self.threshold)
        self._cache: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, weights: str | Path | None = None, device: str | torch.device | None = "auto", **kwargs) -> "Segmenter":
        """Load weights (a directory, file, ``hf-hub:`` id, or ``None`` for the default) and wrap them."""
        from .factory import hub_snapshot
        from .pretrained import resolve_weights

        path = hub_snapshot(resolve_weights(weights))  # hf-hub:OWNER/NAME -> its downloaded folder
        device = resolve_device(device)  # auto: cuda when visible, else cpu (the rule of every command)
        model = load_model(path, device=device)
        wdir = Path(path) if Path(str(path)).is_dir() else None
        return cls(model, device=device, weights_dir=wdir, **kwargs)

    # ------------------------------------------------------------------ text
    @torch.no_grad()
    def encode_texts(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Texts -> (N, D) L2-normalised embeddings, batched."""
        from .precision import autocast

        outs = []
        for i in range(0, len(texts), batch_size):
            ids = self.tokenizer(list(texts[i : i + batch_size])).to(self.device)
            with autocast(self.text_precision, self.device):
                outs.append(F.normalize(self.model.encode_text(ids).float(), dim=-1))
        if not outs:
            return torch.zeros(0, self.cfg.embed_dim)
        return torch.cat(outs)

    @torch.no_grad()
    def word_embeddings(self, words: Sequence[str]) -> torch.Tensor:
        """(N, D) prompt-ensembled embeddings of single names, through the cache."""
        missing = [w for w in dict.fromkeys(words) if (self._templates_key, w) not in self._cache]
        if missing:
            prompts = [t.format(w) for w in missing for t in self.templates]
            emb = self.encode_texts(prompts).view(len(missing), len(self.templates), -1)
            emb = F.normalize(F.normalize(emb, dim=-1).mean(dim=1), dim=-1)
            for w, e in zip(missing, emb):
                self._cache[(self._templates_key, w)] = e
        return torch.stack([self._cache[(self._templates_key, w)] for w in words])

    def class_embeddings(self, vocab: str | Sequence[str]) -> tuple[list[str], torch.Tensor, torch.Tensor]:
        """Vocabulary -> (labels, synonym embeddings (S, D), synonym -> class index (S,))."""
        entries = normalize_vocab(vocab)
        names, owner, tuned = [], [], {}
        for c, e in enumerate(entries):
            syn = parse_class(e)
            rows = self.model.tuned_class_rows(syn[0])
            if rows is not None:  # a fine-tuned class: its tuned rows (one per tuned synonym) replace the prompts
                for r in rows:
                    tuned[len(names)] = r.to(self.device)
                    names.append(syn[0])
                    owner.append(c)
                continue
            for n in syn:
                names.append(n)
                owner.append(c)
        labels = [parse_class(e)[0] for e in entries]
        words = [n for i, n in enumerate(names) if i not in tuned]
        emb = self.word_embeddings(words) if words else torch.zeros(0, self.cfg.embed_dim, device=self.device)
        if tuned:
            rows, it = [], iter(emb)
            for i in range(len(names)):
                rows.append(tuned[i] if i in tuned else next(it))
            emb = torch.stack(rows)
        return labels, emb, torch.tensor(owner)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, images: Sequence[ImageLike], batch_size: int = 32) -> torch.Tensor:
        """Images -> (N, D) L2-normalised embeddings at the model's training resolution."""
        s = self.cfg.vision.image_size
        outs = []
        for i in range(0, len(images), batch_size):
            px = torch.stack([
                to_tensor(load_image(im), (s, s), self.cfg.image_mean, self.cfg.image_std) for im in images[i : i + batch_size]
            ]).to(self.device)
            outs.append(self.model.encode_image(px).float())
        if not outs:
            return torch.zeros(0, self.cfg.embed_dim)
        return torch.cat(outs)

    def _class_probs(self, g: dict, text: torch.Tensor, owner: torch.Tensor, num_classes: int, top_k: int) -> torch.Tensor:
        """Per-segment class probabilities (B, G, C) from group/image embeddings."""
        scale = self.model.logit_scale.exp().clamp(max=100).float()
        logits = class_logits(g["group_embeds"].float(), text, owner, num_classes, scale)  # (B, G, C)
        image = class_logits(g["image_embeds"].float(), text, owner, num_classes, scale)  # (B, C)
        return top_k_filter(logits, image, top_k)

    @torch.no_grad()
    def _window(self, px: torch.Tensor, text, owner, C, top_k) -> tuple[torch.Tensor, torch.Tensor]:
        """One (3, h, w) crop -> class probabilities per segment (G, C) and segment index per pixel (h, w)."""
        g = self.model.encode_groups(px[None].to(self.device), self.groupings)
        probs = self._class_probs(g, text, owner, C, top_k)[0]  # (G, C)
        grouping = F.interpolate(g["grouping"].float(), size=px.shape[-2:], mode="bilinear", align_corners=False)
        return probs, grouping[0].argmax(0)  # (h, w)

    def _windows(self, px: torch.Tensor, text, owner, C, top_k, threshold: float = 0.0) -> list[tuple[int, int, torch.Tensor, torch.Tensor]]:
        """(y, x, segment scores (G, C), segment index per pixel) of each window of ``px``; with a
        ``threshold`` (paper protocol) the scores gain NVlabs' background column first (G, 1 + C)."""
        h, w = px.shape[-2:]
        win = self.window
        parts = []
        for y, x in (sliding_windows(h, w, win, self.stride) if win else [(0, 0)]):
            crop = px[:, y : y + win, x : x + win] if win else px
            probs, gidx = self._window(crop, text, owner, C, top_k)
            if threshold > 0:
                probs = with_background(probs, background_floor(probs, threshold))
            parts.append((y, x, probs.cpu(), gidx.cpu()))
        return parts

    def segment(
        self,
        image: ImageLike,
        vocab: str | Sequence[str],
        threshold: float | None = None,
        top_k: int | None = None,
        refine: str | None = None,
    ) -> SegmentationResult:
        """Label every pixel of ``image`` with one of the classes of ``vocab``.

        Args:
            image: path, PIL image, array or tensor.
            vocab: a comma-separated string or a list of classes (synonyms with ``;``).
            threshold: background threshold (default: the Segmenter's).
            top_k: image-level class filter (default: the Segmenter's); at most the vocabulary size.
            refine: ``"pamr"`` or ``""`` (default: the Segmenter's).
        """
        t0 = time.perf_counter()
        labels, text, owner = self.class_embeddings(vocab)
        t1 = time.perf_counter()
        img = load_image(image)
        C = len(labels)
        threshold = self.threshold if threshold is None else threshold
        given = top_k is not None or self._top_k_given
        top_k = self.top_k if top_k is None else top_k
        _check_settings(top_k, threshold)
        if top_k > C:
            if given:
                raise ValueError(f"top-k {top_k} is larger than the vocabulary ({C} classes)")
            top_k = C  # the paper's top-5 rule on a smaller vocabulary: min(5, C), as NVlabs
        refine = self.refine if refine is None else refine
        if refine and self.protocol == "paper":
            raise ValueError("refinement (PAMR) applies to the groupseg protocol, not the paper's")
        run = self._segment_paper if self.protocol == "paper" else self._segment_groupseg
        lm, scores_fn = run(img, text, owner, C, top_k, threshold, refine)
        t3 = time.perf_counter()
        timing = {"text": t1 - t0, "model": t3 - t1, "total": t3 - t0}
        return SegmentationResult(lm, labels, img, timing, _scores_fn=scores_fn)

    def _segment_paper(self, img: Image.Image, text, owner, C: int, top_k: int, threshold: float, refine: str):
        """GroupViT's protocol: keep-ratio resize, slide, average class (+ background) scores,
        bilinear resize to the image, argmax."""
        W0, H0 = img.size
        h, w = keep_ratio_size(H0, W0, self.scale)
        px = to_tensor(resize_bilinear(img, (h, w)), (h, w), self.cfg.image_mean, self.cfg.image_std)
        parts = self._windows(px, text, owner, C, top_k, threshold)
        if len(parts) > 1:
            merged = _WindowMerge(parts, h, w)
            scores = merged.scores().T[:, merged.region]  # (C', h, w) mean over the crops covering each pixel
        else:
            scores = parts[0][2].T[:, parts[0][3]]
        ch = resize_bilinear_argmax(scores, (H0, W0))
        lm = background_channel_label_map(ch, C) if threshold > 0 else to_label_map(ch, C)
        cls = scores[1:] if threshold > 0 else scores
        return lm, lambda: F.interpolate(cls[None].float(), size=(H0, W0), mode="bilinear", align_corners=False)[0]

    def _segment_groupseg(self, img: Image.Image, text, owner, C: int, top_k: int, threshold: float, refine: str):
        """groupseg's protocol: short side resize, windows, best class per region, plain threshold."""
        W0, H0 = img.size
        h, w = target_size(H0, W0, self.short_side, self.cfg.vision.patch_size)
        px = to_tensor(img, (h, w), self.cfg.image_mean, self.cfg.image_std)
        parts = self._windows(px, text, owner, C, top_k)
        merged = _WindowMerge(parts, h, w) if len(parts) > 1 else None

        def scores_at(size: tuple[int, int], classes: slice | torch.Tensor = slice(None)) -> torch.Tensor:
            """Average window scores (c, h, w) at the resized resolution, then resize to ``size``."""
            if merged is None:
                probs, gidx = parts[0][2], resize_nearest(parts[0][3], size)
                return probs[:, classes].T[:, gidx]  # (c, H, W)
            acc = merged.scores(classes).T[:, merged.region]  # (c, h, w)
            return F.interpolate(acc[None], size=size, mode="nearest")[0] if tuple(size) != (h, w) else acc

        if refine == "pamr":  # refine the scores of the classes that win somewhere, at the model's input size
            from .refine import pamr

            winners = torch.cat([p[2].argmax(1)[p[3]].unique() for p in parts]).unique()
            v, i = pamr(px, scores_at((h, w), winners)).max(0)
            label = resize_nearest(winners[i], (H0, W0))
            conf = F.interpolate(v[None, None], size=(H0, W0), mode="nearest")[0, 0]
        elif merged is None:
            probs, gidx = parts[0][2], resize_nearest(parts[0][3], (H0, W0))
            best, seg_label = probs.max(dim=1)  # per segment
            label, conf = seg_label[gidx], best[gidx]
        else:  # best class per region of the window overlay, then per pixel
            best, seg_label = merged.best()
            label = resize_nearest(seg_label[merged.region], (H0, W0))
            conf = F.interpolate(best[merged.region][None, None], size=(H0, W0), mode="nearest")[0, 0]
        lm = to_label_map(label, C, conf < threshold if threshold > 0 else None)
        return lm, lambda: scores_at((H0, W0))


def _check_settings(top_k: int, threshold: float) -> None:
    if not 0 <= threshold <= 1:
        raise ValueError(f"threshold {threshold:g} is outside [0, 1]")
    if top_k < 0:
        raise ValueError(f"top-k must be 0 (off) or a positive number of classes, got {top_k}")


class _WindowMerge:
    """Overlapping windows' segment scores averaged per pixel, computed once per region.

    Pixels that lie in the same segment of every window covering them get the same average, so
    the overlay splits the image into a few thousand regions (``region``, (h, w) indices) and the
    scores are averaged per region: (R, C) instead of (h * w, C) per window, exact (same sums).
    """

    def __init__(self, parts: list[tuple[int, int, torch.Tensor, torch.Tensor]], h: int, w: int) -> None:
        region = torch.zeros(h, w, dtype=torch.long)
        for y, x, probs, gidx in parts:  # refine the regions by each window's segments
            hh, ww = gidx.shape
            if region.max() >= 2**62 // (probs.shape[0] + 1):  # compact before the key could overflow
                region = torch.unique(region, return_inverse=True)[1].view(h, w)
            region = region * (probs.shape[0] + 1)  # 0 = outside this window, g + 1 = its segment g
            region[y : y + hh, x : x + ww] += gidx + 1
        region = torch.unique(region, return_inverse=True)[1].view(h, w)
        flat = region.reshape(-1)
        rep = torch.empty(int(flat.max()) + 1, dtype=torch.long).scatter_(0, flat, torch.arange(flat.numel()))
        ys, xs = rep // w, rep % w  # one pixel of each region stands for all of it
        self.region, self.parts = region, parts
        self.members = []  # per window: which regions it covers, and their segment there
        count = torch.zeros(len(rep))
        for y, x, _, gidx in parts:
            hh, ww = gidx.shape
            inside = ((ys >= y) & (ys < y + hh) & (xs >= x) & (xs < x + ww)).nonzero().squeeze(1)
            self.members.append((inside, gidx[ys[inside] - y, xs[inside] - x]))
            count[inside] += 1
        self.count = count

    def scores(self, classes: slice | torch.Tensor = slice(None)) -> torch.Tensor:
        """(R, c) mean score of each region over the windows covering it."""
        acc = None
        for (_, _, probs, _), (inside, seg) in zip(self.parts, self.members):
            p = probs[:, classes]
            if acc is None:
                acc = p.new_zeros(len(self.count), p.shape[1])
            acc.index_add_(0, inside, p[seg])
        return acc / self.count[:, None]

    def best(self, chunk: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
        """Per region: the best mean score and its class; class chunks keep memory bounded."""
        C = self.parts[0][2].shape[1]
        conf = torch.full((len(self.count),), -1.0)
        label = torch.zeros(len(self.count), dtype=torch.long)
        for c0 in range(0, C, chunk):
            v, i = self.scores(slice(c0, c0 + chunk)).max(1)
            better = v > conf
            conf, label = torch.where(better, v, conf), torch.where(better, i + c0, label)
        return conf, label
