"""Training data: webdataset shards -> batches of augmented pixels and tokenized texts.

The pipeline is a list of small named stages handed to ``wds.DataPipeline`` (see
``train_stages``)::

    shards -> [split by node, split by worker] -> tar samples -> shuffle -> position
           -> decode -> caption -> prompts -> tokenize -> augment -> batch

Batches are dicts:

- ``pixels``  (B, 3, H, W) float32, normalised with ``mean``/``std`` (uint8 with
  ``normalize=False``: then call ``normalize_pixels`` on the device),
- ``text``    (B, 1 + k, context_length) int64: the chosen caption, then k noun prompts,
- ``keys``    list of sample keys, ``captions`` the chosen captions, ``texts`` the (1 + k)
  strings per sample that ``text`` tokenizes (for text-feature caches),
- ``skipped`` int64 scalar tensor: samples (and unreadable shards) dropped since the previous
  batch of the same worker; ``skip_reasons`` the same as ``{reason: count}``,
- ``position`` ``{"epoch", "rank", "worker", "num_workers", "samples", "batches"}``: where this
  worker's stream stands after this batch.

Skip counts. Bad samples (unreadable image, no caption, ...) and unreadable shards are logged,
counted and dropped; the pipeline goes on. DataLoader workers are separate processes, so their
counters are not visible to the trainer: every batch carries the counts since the previous
batch of its worker. Sum them in the main process with ``SkipCounter.update(batch)``.
Reasons: ``read`` (unreadable shard or tar member), ``no_image``, ``decode``, ``caption``,
``prompts``, ``tokenize``, ``augment``. Skips after a worker's last batch of an epoch are only
reported when that last (partial) batch is kept, i.e. not with ``drop_last=True``.

Shards and ranks. ``resampled=False``: each epoch the shard list is shuffled with
``(seed, epoch)`` (same order on every rank), then split with ``wds.split_by_node`` and
``wds.split_by_worker``, so ranks and workers read disjoint shards (use at least
``world_size * num_workers`` shards, ideally a multiple). ``resampled=True``: every rank and
worker draws shards with replacement from its own seeded stream; ``epoch_samples`` (global, all
ranks) sets the epoch length, ``ceil(epoch_samples / (batch_size * world_size * num_workers))``
batches per worker (what ``with_epoch`` does in open_clip, computed inside each worker).

Determinism and resume. All randomness (shard order, shuffle buffer, caption choice, prompts,
crop, flip) comes from RNGs seeded by ``(seed, epoch, rank, worker, position)``; nothing
depends on time, pids or the global RNGs. With the same shards, seed and ``num_workers`` the
batches are the same on every run. Call ``pipeline.set_epoch(epoch)`` before iterating each
epoch (``build_loader`` keeps ``persistent_workers=False`` so workers see it). To resume inside
an epoch, keep a ``LoaderPosition`` updated with every batch the trainer consumed, save its
``state_dict()`` (one per rank), and call ``pipeline.resume(state)`` instead of ``set_epoch``:
each worker skips the samples it already produced *before* decoding them (only tar bytes are
read), so the rest of the epoch comes out exactly as in the uninterrupted run. With 0 workers
the batch sequence is identical; with N workers each worker's sequence is identical, but the
DataLoader restarts its round-robin at worker 0.

Example:
    >>> pipe = build_train_pipeline("shards/train-{000000..000007}.tar", image_size=224,
    ...     mean=(0.481, 0.458, 0.408), std=(0.269, 0.261, 0.276), batch_size=256)  # doctest: +SKIP
    >>> loader = build_loader(pipe, num_workers=8)  # doctest: +SKIP
    >>> skips, pos = SkipCounter(), LoaderPosition()  # doctest: +SKIP
    >>> for epoch in range(10):  # doctest: +SKIP
    ...     pipe.set_epoch(epoch)
    ...     for batch in loader:
    ...         skips.update(batch); pos.update(batch)
"""
from __future__ import annotations

import glob
import io
import json
import logging
import math
import os
import random
import warnings
from typing import Callable, Iterator, Sequence

import torch
import webdataset as wds

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
DEFAULT_TEMPLATES = ("a photo of a {}.",)


# --------------------------------------------------------------------------- shard lists


def expand_urls(spec: str | Sequence[str]) -> list[str]:
    """Expand a shard spec into a list of shard URLs.

    Args:
        spec: brace patterns (``/data/train-{000000..000009}.tar``), local files, folders
            (their ``*.tar``), globs (``/data/*.tar``), ``pipe:`` or remote URLs; several
            sources joined by ``::`` or given as a list.

    Returns:
        The URLs, sources in the given order, globs sorted.

    Raises:
        ValueError: empty spec or unbalanced braces.
        FileNotFoundError: a local pattern names a file that does not exist or matches nothing.
    """
    return expand_weighted_urls(spec)[0]


def expand_weighted_urls(spec: str | Sequence[str], weights: str | Sequence[float] | None = None) -> tuple[list[str], list[float]]:
    """``expand_urls`` with one sampling weight per source (``"1,2"`` or ``[1, 2]``).

    Each shard gets its source's weight (an upsampling factor, as in open_clip): with
    ``resampled=True`` a shard is drawn with probability proportional to its weight.

    Returns:
        ``(urls, weights)``, one weight per URL.
    """
    sources = str(spec).split("::") if isinstance(spec, (str, os.PathLike)) else [str(s) for s in spec]
    sources = [s.strip() for s in sources if s.strip()]
    if not sources:
        raise ValueError(f"no shards: the data spec {spec!r} is empty")
    if weights is None:
        ws = [1.0] * len(sources)
    else:
        try:
            ws = [float(w) for w in (weights.split(",") if isinstance(weights, str) else weights)]
        except ValueError:
            raise ValueError(f"data weights {weights!r} must be numbers separated by commas") from None
        if len(ws) != len(sources):
            raise ValueError(f"{len(ws)} data weights for {len(sources)} sources in {spec!r}; give one weight per '::' source")
        if any(w < 0 for w in ws) or not any(w > 0 for w in ws):
            raise ValueError(f"data weights {weights!r} must be >= 0 with at least one > 0")
    urls, out_w = [], []
    for source, w in zip(sources, ws):
        expanded = _expand_source(source)
        urls.extend(expanded)
        out_w.extend([w] * len(expanded))
    return urls, out_w


def _expand_source(pattern: str) -> list[str]:
    from braceexpand import braceexpand

    try:
        names = list(braceexpand(pattern))
    except Exception as exn:  # braceexpand.UnbalancedBracesError
        raise ValueError(f"bad shard pattern {pattern!r}: {exn}") from None
    if pattern.startswith("pipe:") or "://" in pattern:
        return names
    out, missing = [], []
    for name in names:
        name = os.path.expanduser(name)
        if os.path.isdir(name):
            out.extend(sorted(glob.glob(os.path.join(glob.escape(name), "*.tar"))))
        elif glob.has_magic(name):
            out.extend(sorted(glob.glob(name)))
        elif os.path.isfile(name):
            out.append(name)
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(names)} files not found (first: {missing[0]})")
    if not out:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
    return out


# --------------------------------------------------------------------------- skips


class SampleError(Exception):
    """A sample that cannot be used; ``reason`` is the key it is counted under."""

    def __init__(self, reason: str, key: str | None, message: str) -> None:
        super().__init__(f"{reason}: sample {key}: {message}")
        self.reason, self.key = reason, key


class SkipCounter:
    """Counts skipped samples by reason.

    In the pipeline (one copy per DataLoader worker) it is fed by ``SkipHandler``s and drained
    into every batch. In the trainer, ``update(batch)`` sums the per-batch counts of all
    workers, so ``counts`` there is the total for the run.

    Args:
        max_consecutive: raise when this many samples in a row are skipped (the data or the
            pipeline is broken; without this a bug would silently skip everything).
    """

    def __init__(self, max_consecutive: int = 1000) -> None:
        self.counts: dict[str, int] = {}
        self.pending: dict[str, int] = {}
        self.consecutive = 0
        self.max_consecutive = max_consecutive

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def add(self, reason: str, n: int = 1) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + n
        self.pending[reason] = self.pending.get(reason, 0) + n

    def good(self, n: int = 1) -> None:
        """Samples that made it into a batch."""
        self.consecutive = 0

    def pop_pending(self) -> dict[str, int]:
        """Counts since the last call (what the next batch carries)."""
        out, self.pending = self.pending, {}
        return out

    def update(self, batch: dict) -> dict[str, int]:
        """Main process: add a batch's ``skip_reasons``; returns them."""
        reasons = batch.get("skip_reasons") or {}
        for reason, n in reasons.items():
            self.counts[reason] = self.counts.get(reason, 0) + int(n)
        return reasons

    def handler(self, default_reason: str) -> "SkipHandler":
        return SkipHandler(self, default_reason)


class SkipHandler:
    """A webdataset exception handler that logs, counts and continues.

    Args:
        counter: where counts go.
        default_reason: the reason for exceptions that are not ``SampleError``s
            (``"read"`` for the tar reader).
    """

    log_first = 10  # log every skip up to this many per reason, then every 1000th

    def __init__(self, counter: SkipCounter, default_reason: str) -> None:
        self.counter, self.default_reason = counter, default_reason

    def __call__(self, exn: Exception) -> bool:
        reason = exn.reason if isinstance(exn, SampleError) else self.default_reason
        c = self.counter
        c.add(reason)
        c.consecutive += 1
        n = c.counts[reason]
        if n <= self.log_first or n % 1000 == 0:
            log.warning("skipped (%s, %d so far): %s", reason, n, str(exn)[:300])
        if c.consecutive >= c.max_consecutive:
            raise RuntimeError(f"{c.consecutive} samples in a row were skipped (last: {str(exn)[:200]}); the data or the pipeline is broken")
        return True


# --------------------------------------------------------------------------- state


class _State:
    """What the stages of one pipeline copy share: seed, epoch, resume point, position."""

    def __init__(self, seed: int, rank: int | None, world_size: int | None) -> None:
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.resume_from: dict | None = None  # LoaderPosition.state_dict()
        self.samples = 0  # samples this worker took from the shuffle buffer this epoch
        self.batches = 0

    def worker_info(self) -> tuple[int, int, int, int]:
        rank, world, worker, nworkers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world = self.rank, self.world_size
        return rank, world, worker, nworkers

    def rng(self, *parts) -> random.Random:
        """A Random seeded by (seed, epoch, *parts): str seeds hash with SHA-512, no PYTHONHASHSEED."""
        return random.Random(":".join(map(str, (self.seed, self.epoch) + parts)))


class TrainPipeline(wds.DataPipeline):
    """A ``wds.DataPipeline`` with an epoch, a resume point and the pipeline's ``SkipCounter``."""

    def __init__(self, *stages, state: _State, skips: SkipCounter) -> None:
        super().__init__(*stages)
        self.state, self.skips = state, skips

    def set_epoch(self, epoch: int) -> None:
        """Seed the next iteration for ``epoch`` (from its start)."""
        self.state.epoch, self.state.resume_from = int(epoch), None

    def resume(self, position: dict) -> None:
        """Continue an epoch where a saved ``LoaderPosition.state_dict()`` left it."""
        self.state.epoch, self.state.resume_from = int(position["epoch"]), position


class LoaderPosition:
    """Main process: the latest position of each worker; save ``state_dict()`` to resume.

    Args:
        state: a previous ``state_dict()`` to continue from (after ``pipeline.resume``).
    """

    def __init__(self, state: dict | None = None) -> None:
        self.epoch = None if state is None else state["epoch"]
        self.num_workers = None if state is None else state["num_workers"]
        self.workers: dict[int, dict] = {} if state is None else {int(w): dict(p) for w, p in state["workers"].items()}

    def update(self, batch: dict) -> None:
        p = batch["position"]
        if self.epoch != p["epoch"]:
            self.epoch, self.workers = p["epoch"], {}
        self.num_workers = p["num_workers"]
        self.workers[p["worker"]] = {"samples": p["samples"], "batches": p["batches"]}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "num_workers": self.num_workers, "workers": {str(w): p for w, p in self.workers.items()}}


# --------------------------------------------------------------------------- stages


class ShardSource(wds.pytorch.IterableDataset):
    """First stage: ``{"url": ...}`` per shard; seeded shuffle of the list, or resampling."""

    def __init__(self, urls: list[str], weights: list[float], state: _State, resampled: bool, shuffle: bool = True) -> None:
        super().__init__()
        self.urls, self.weights, self.state, self.resampled, self.shuffle = urls, weights, state, resampled, shuffle

    def __iter__(self) -> Iterator[dict]:
        if self.resampled:
            rank, _, worker, _ = self.state.worker_info()
            rng = self.state.rng("resample", rank, worker)
            while True:
                yield {"url": rng.choices(self.urls, weights=self.weights)[0]}
        urls = list(self.urls)
        if self.shuffle:
            self.state.rng("shards").shuffle(urls)  # same on every rank, before splitting
        for url in urls:
            yield {"url": url}


class SplitByRank:
    """``wds.split_by_node`` with an explicit rank/world_size (tests, custom launchers)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def __call__(self, src):
        rank, world = self.state.rank, self.state.world_size
        yield from (s for i, s in enumerate(src) if i % world == rank)


class ShuffleSamples:
    """Shuffle buffer with a per-(epoch, rank, worker) seeded RNG."""

    def __init__(self, state: _State, bufsize: int) -> None:
        self.state, self.bufsize = state, bufsize

    def __call__(self, src):
        if self.bufsize <= 1:
            return src
        rank, _, worker, _ = self.state.worker_info()
        rng = self.state.rng("shuffle", rank, worker)
        return wds.shuffle(self.bufsize, initial=min(self.bufsize, 100), rng=rng)(src)


class TrackPosition:
    """Number the samples, skip those a resumed run already used (before decoding them) and
    give each sample its RNG, seeded by (seed, epoch, rank, worker, position)."""

    def __init__(self, state: _State) -> None:
        self.state = state

    def __call__(self, src):
        state = self.state
        rank, _, worker, nworkers = state.worker_info()
        start = _resume_point(state, worker, nworkers)
        state.samples = start["samples"]
        seen = 0
        for i, sample in enumerate(src):
            seen += 1
            if i < start["samples"]:
                continue
            state.samples = i + 1
            sample["__rng__"] = state.rng(rank, worker, i)
            yield sample
        if seen == 0:
            log.warning("rank %d worker %d got no samples this epoch: fewer shards than ranks x workers, or all unreadable", rank, worker)


def _resume_point(state: _State, worker: int, nworkers: int) -> dict:
    pos = state.resume_from
    if pos is None:
        return {"samples": 0, "batches": 0}
    if pos.get("num_workers") not in (None, nworkers):
        raise RuntimeError(f"the resume position was saved with {pos['num_workers']} workers, this loader has {nworkers}; use the same number or restart the epoch")
    workers = pos.get("workers", {})
    return workers.get(str(worker), workers.get(worker, {"samples": 0, "batches": 0}))


class DecodeImage:
    """Decode the image bytes to a (3, H, W) uint8 RGB tensor: ``torchvision.io`` (libjpeg-turbo),
    falling back to PIL for other formats."""

    def __call__(self, sample: dict) -> dict:
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            raise SampleError("no_image", sample.get("__key__"), f"no {'/'.join(IMAGE_EXTS)} file (has {sorted(k for k in sample if not k.startswith('__'))})")
        raw = sample.pop(ext)
        try:
            img = decode_rgb(raw)
        except Exception as exn:  # noqa: BLE001
            raise SampleError("decode", sample.get("__key__"), f"{type(exn).__name__}: {str(exn)[:200]}") from None
        sample["image"] = img
        return sample


def decode_rgb(raw: bytes) -> torch.Tensor:
    """Image bytes -> (3, H, W) uint8 RGB tensor."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # image I/O is deprecated in torchvision 0.29; PIL is the slower fallback
        decode_image = None
    try:
        if decode_image is None:
            raise RuntimeError("Unsupported image file")
        with warnings.catch_warnings():  # torchvision >= 0.29 warns on every call
            warnings.simplefilter("ignore", DeprecationWarning)
            img = decode_image(torch.frombuffer(bytearray(raw), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError as exn:
        if "Unsupported image file" not in str(exn):
            raise
        import numpy as np
        from PIL import Image

        arr = np.asarray(Image.open(io.BytesIO(raw)).convert("RGB"))
        img = torch.from_numpy(arr.copy()).permute(2, 0, 1)
    if img.shape[0] != 3 or min(img.shape[1:]) < 1:
        raise ValueError(f"decoded to shape {tuple(img.shape)}")
    return img


def sample_captions(sample: dict) -> list[str]:
    """All non-empty captions of a sample: ``json["captions"]`` (or ``"caption"``), else ``txt``."""
    key = sample.get("__key__")
    caps: list = []
    try:
        if "json" in sample:
            meta = json.loads(sample["json"])
            caps = meta.get("captions") or ([meta["caption"]] if "caption" in meta else [])
        if not caps and "txt" in sample:
            caps = [sample["txt"].decode("utf-8")]
    except (ValueError, AttributeError, TypeError, UnicodeDecodeError) as exn:
        raise SampleError("caption", key, f"unreadable caption metadata: {type(exn).__name__}") from None
    caps = [c.strip() for c in caps if isinstance(c, str) and c.strip()]
    if not caps:
        raise SampleError("caption", key, "no caption")
    return caps


class ChooseCaption:
    """Pick one of the sample's captions at random (the sample's RNG)."""

    def __call__(self, sample: dict) -> dict:
        sample["caption"] = sample["__rng__"].choice(sample_captions(sample))
        return sample


class MakePrompts:
    """Noun prompts for the caption: ``prompt_fn(caption, noun_fn(caption), templates=, k=, rng=)``.

    Args:
        k: prompts per sample.
        templates: prompt templates with ``{}``.
        noun_fn: ``caption -> list[str]``; default ``groupseg.training.nouns.extract_nouns`` (imported
            on first use, in the worker).
        prompt_fn: default ``groupseg.training.nouns.build_prompts``; must return exactly ``k`` prompts.
    """

    def __init__(self, k: int, templates: Sequence[str], noun_fn: Callable | None, prompt_fn: Callable | None) -> None:
        self.k, self.templates, self.noun_fn, self.prompt_fn = k, tuple(templates), noun_fn, prompt_fn

    def _load(self) -> None:
        if self.noun_fn is None or self.prompt_fn is None:
            from training import nouns

            self.noun_fn = self.noun_fn or nouns.extract_nouns
            self.prompt_fn = self.prompt_fn or nouns.build_prompts

    def __call__(self, sample: dict) -> dict:
        self._load()
        key, caption = sample.get("__key__"), sample["caption"]
        try:
            found = self.noun_fn(caption)
            prompts = self.prompt_fn(caption, found, templates=self.templates, k=self.k, rng=sample["__rng__"])
        except Exception as exn:  # noqa: BLE001
            raise SampleError("prompts", key, f"{type(exn).__name__}: {str(exn)[:200]}") from None
        if len(prompts) != self.k:
            raise SampleError("prompts", key, f"prompt_fn gave {len(prompts)} prompts, expected {self.k}")
        sample["prompts"] = list(prompts)
        return sample


class Tokenize:
    """Caption + prompts -> ``text`` (1 + k, context_length) int64."""

    def __init__(self, context_length: int = 77, tokenizer: Callable | None = None) -> None:
        self.context_length, self.tokenizer = context_length, tokenizer

    def __call__(self, sample: dict) -> dict:
        texts = [sample["caption"], *sample.get("prompts", ())]
        if self.tokenizer is None:
            from groupseg.tokenizer import tokenize

            sample["text"] = tokenize(texts, self.context_length)
        else:
            sample["text"] = self.tokenizer(texts)
        return sample


class Augment:
    """Random resized crop to ``image_size`` and horizontal flip, on uint8 (3, H, W).

    Args:
        image_size: output side.
        scale: crop area range as a fraction of the image.
        ratio: crop aspect ratio range.
        hflip: flip probability.
    """

    def __init__(self, image_size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), hflip: float = 0.5) -> None:
        self.size, self.scale, self.ratio, self.hflip = int(image_size), tuple(scale), tuple(ratio), hflip

    def __call__(self, sample: dict) -> dict:
        from torchvision.transforms.v2 import functional as TF

        img, rng = sample.pop("image"), sample["__rng__"]
        top, left, h, w = crop_params(img.shape[1], img.shape[2], self.scale, self.ratio, rng)
        img = TF.resized_crop(img, top, left, h, w, [self.size, self.size], antialias=True)
        if rng.random() < self.hflip:
            img = img.flip(-1)
        sample["image"] = img.contiguous()  # (3, S, S) uint8
        return sample


def crop_params(height: int, width: int, scale, ratio, rng: random.Random) -> tuple[int, int, int, int]:
    """``RandomResizedCrop.get_params`` drawing from ``rng``: (top, left, h, w)."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height  # fallback: central crop
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class Collate:
    """Samples -> batch dict; normalises uint8 pixels once per batch (unless ``normalize=False``)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], normalize: bool = True) -> None:
        self.mean, self.std, self.normalize = tuple(mean), tuple(std), normalize

    def __call__(self, samples: list[dict]) -> dict:
        pixels = torch.stack([s["image"] for s in samples])  # (B, 3, H, W) uint8
        return {
            "pixels": normalize_pixels(pixels, self.mean, self.std) if self.normalize else pixels,
            "text": torch.stack([s["text"] for s in samples]),  # (B, 1 + k, L)
            "keys": [s["__key__"] for s in samples],
            "captions": [s["caption"] for s in samples],
            "texts": [[s["caption"], *s.get("prompts", ())] for s in samples],  # what ``text`` encodes
        }


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 (B, 3, H, W) in 0..255 -> ``(x / 255 - mean) / std`` as ``dtype``, on ``pixels.device``
    (use it on the accelerator for batches built with ``normalize=False``)."""
    std_t = torch.tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    out = pixels.to(torch.float32).mul_(1.0 / (255.0 * std_t)).sub_(mean_t / std_t)
    return out if dtype == torch.float32 else out.to(dtype)


class BatchSamples:
    """Batch as soon as ``batch_size`` samples are in (so ``position`` is exact), attach skip
    counts and position, and stop after this worker's share of ``epoch_samples``."""

    def __init__(self, state: _State, skips: SkipCounter, batch_size: int, collate: Callable, drop_last: bool, epoch_samples: int | None) -> None:
        self.state, self.skips, self.batch_size, self.collate = state, skips, batch_size, collate
        self.drop_last, self.epoch_samples = drop_last, epoch_samples

    def __call__(self, src):
        _, world, worker, nworkers = self.state.worker_info()
        self.state.batches = _resume_point(self.state, worker, nworkers)["batches"]
        quota = None if self.epoch_samples is None else math.ceil(self.epoch_samples / (self.batch_size * world * nworkers))
        if quota is not None and self.state.batches >= quota:
            return
        buf = []
        for sample in src:
            buf.append(sample)
            self.skips.good()
            if len(buf) == self.batch_size:
                yield self.finish(buf)
                buf = []
                if quota is not None and self.state.batches >= quota:
                    return
        if buf and not self.drop_last:
            yield self.finish(buf)

    def finish(self, samples: list[dict]) -> dict:
        state = self.state
        batch = self.collate(samples)
        rank, _, worker, nworkers = state.worker_info()
        state.batches += 1
        reasons = self.skips.pop_pending()
        batch["skipped"] = torch.tensor(sum(reasons.values()), dtype=torch.long)
        batch["skip_reasons"] = reasons
        batch["position"] = {"epoch": state.epoch, "rank": rank, "worker": worker, "num_workers": nworkers,
                             "samples": state.samples, "batches": state.batches}
        return batch


# --------------------------------------------------------------------------- builders


def train_stages(
    urls: str | Sequence[str],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    state: _State,
    skips: SkipCounter,
    num_prompts: int = 3,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    shuffle: int = 1000,
    resampled: bool = False,
    weights: str | Sequence[float] | None = None,
    epoch_samples: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    noun_fn: Callable | None = None,
    prompt_fn: Callable | None = None,
    tokenizer: Callable | None = None,
    context_length: int = 77,
    drop_last: bool = False,
    normalize: bool = True,
) -> list:
    """The named stages of the training pipeline (see ``build_train_pipeline``)."""
    url_list, url_weights = expand_weighted_urls(urls, weights)
    if weights is not None and not resampled and len(set(url_weights)) > 1:
        raise ValueError("data weights need resampled=True (plain mode reads every shard once per epoch)")
    if resampled and epoch_samples is None:
        raise ValueError("resampled=True needs epoch_samples (the stream is endless)")
    split_node = wds.split_by_node if state.rank is None else SplitByRank(state)
    prompts = [wds.map(MakePrompts(num_prompts, templates, noun_fn, prompt_fn), handler=skips.handler("prompts"))] if num_prompts > 0 else []
    return [
        ShardSource(url_list, url_weights, state, resampled),
        *([] if resampled else [split_node, wds.split_by_worker]),
        wds.tarfile_to_samples(handler=skips.handler("read")),
        ShuffleSamples(state, shuffle),
        TrackPosition(state),
        wds.map(DecodeImage(), handler=skips.handler("decode")),
        wds.map(ChooseCaption(), handler=skips.handler("caption")),
        *prompts,
        wds.map(Tokenize(context_length, tokenizer), handler=skips.handler("tokenize")),
        wds.map(Augment(image_size, scale=scale, hflip=hflip), handler=skips.handler("augment")),
        BatchSamples(state, skips, batch_size, Collate(mean, std, normalize), drop_last, epoch_samples),
    ]


def build_train_pipeline(
    urls: str | Sequence[str],
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    batch_size: int,
    num_prompts: int = 3,
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    shuffle: int = 1000,
    seed: int = 0,
    resampled: bool = False,
    weights: str | Sequence[float] | None = None,
    epoch_samples: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    noun_fn: Callable | None = None,
    prompt_fn: Callable | None = None,
    tokenizer: Callable | None = None,
    context_length: int = 77,
    drop_last: bool = False,
    normalize: bool = True,
    rank: int | None = None,
    world_size: int | None = None,
    max_consecutive_skips: int = 1000,
) -> TrainPipeline:
    """Build the training pipeline: shards -> augmented, tokenized batches.

    Args:
        urls: shard spec for ``expand_urls`` (brace patterns, globs, ``::``-joined sources).
        image_size: side of the square crops.
        mean: per-channel normalisation mean (0..1 scale).
        std: per-channel normalisation std.
        batch_size: samples per batch (per rank).
        num_prompts: noun prompts per sample (k); ``text`` is (B, 1 + k, context_length).
        templates: prompt templates with ``{}``.
        shuffle: sample shuffle buffer size (0 or 1: no shuffle).
        seed: seed of every random choice (see module docstring).
        resampled: draw shards with replacement (multi-node); needs ``epoch_samples``.
        weights: per-source weights for ``::``-joined sources (resampled only).
        epoch_samples: samples per epoch over all ranks; each worker stops after its share.
        scale: random-resized-crop area range.
        hflip: horizontal flip probability.
        noun_fn: ``caption -> nouns``; default ``groupseg.training.nouns.extract_nouns``.
        prompt_fn: ``(caption, nouns, templates=, k=, rng=) -> k prompts``; default
            ``groupseg.training.nouns.build_prompts``.
        tokenizer: ``list[str] -> (N, L)`` ids; default ``groupseg.tokenizer.tokenize``.
        context_length: token sequence length for the default tokenizer.
        drop_last: drop each worker's last partial batch.
        normalize: ``pixels`` as normalised float32 (default). False keeps them uint8, 4x less
            to move from DataLoader workers (measurably faster with workers); normalise on
            the device with ``normalize_pixels(batch["pixels"].to(device), mean, std)``.
        rank: this process's rank (default: env ``RANK``/``WORLD_SIZE`` or torch.distributed).
        world_size: number of ranks, with ``rank``.
        max_consecutive_skips: raise after this many skipped samples in a row.

    Returns:
        A ``TrainPipeline`` (a ``wds.DataPipeline``) yielding batch dicts; ``set_epoch``/``resume``.

    >>> pipe = build_train_pipeline("shards/train-{000000..000003}.tar", image_size=224,
    ...     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), batch_size=64)  # doctest: +SKIP
    >>> next(iter(pipe))["pixels"].shape  # doctest: +SKIP
    torch.Size([64, 3, 224, 224])
    """
    if (rank is None) != (world_size is None):
        raise ValueError("pass both rank and world_size, or neither")
    if rank is not None and not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if batch_size < 1 or image_size < 1:
        raise ValueError(f"batch_size and image_size must be >= 1, got {batch_size}, {image_size}")
    state, skips = _State(seed, rank, world_size), SkipCounter(max_consecutive_skips)
    stages = train_stages(
        urls, image_size=image_size, mean=mean, std=std, batch_size=batch_size, state=state, skips=skips,
        num_prompts=num_prompts, templates=templates, shuffle=shuffle, resampled=resampled, weights=weights,
        epoch_samples=epoch_samples, scale=scale, hflip=hflip, noun_fn=noun_fn, prompt_fn=prompt_fn,
        tokenizer=tokenizer, context_length=context_length, drop_last=drop_last, normalize=normalize,
    )
    return TrainPipeline(*stages, state=state, skips=skips)


def build_loader(pipeline: wds.DataPipeline, num_workers: int, *, pin_memory: bool = False, prefetch_factor: int | None = 2) -> wds.WebLoader:
    """A ``wds.WebLoader`` over a batching pipeline (``batch_size=None``; never pass it to
    ``accelerator.prepare``: move batches to the device yourself).

    Workers are not persistent, so ``pipeline.set_epoch``/``resume`` reach them each epoch.
    """
    kw = {"prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return wds.WebLoader(pipeline, batch_size=None, shuffle=False, num_workers=num_workers,
                         persistent_workers=False, pin_memory=pin_memory, **kw)


# --------------------------------------------------------------------------- evaluation


def _eval_pair(sample: dict) -> tuple:
    from PIL import Image

    key = sample.get("__key__")
    caps = sample_captions(sample)
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        raise SampleError("no_image", key, "no image file")
    try:
        img = Image.open(io.BytesIO(sample[ext])).convert("RGB")
    except Exception as exn:  # noqa: BLE001
        raise SampleError("decode", key, f"{type(exn).__name__}: {str(exn)[:200]}") from None
    return img, caps, key


def build_eval_pairs(urls: str | Sequence[str]) -> wds.DataPipeline:
    """``(PIL RGB image, [captions], key)`` for every sample, in shard order, no augmentation
    (image-text retrieval evaluation). Bad samples are logged, counted in ``.skips`` and dropped.

    >>> pairs = list(build_eval_pairs("shards/val-{000000..000001}.tar"))  # doctest: +SKIP
    """
    skips = SkipCounter()
    pipe = wds.DataPipeline(
        wds.SimpleShardList(expand_urls(urls)),
        wds.tarfile_to_samples(handler=skips.handler("read")),
        wds.map(_eval_pair, handler=skips.handler("decode")),
    )
    pipe.skips = skips
    return pipe
