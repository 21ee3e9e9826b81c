"""The named stages of the training pipeline (see ``groupseg.training.data`` for the whole):
shard order, rank/worker split, shuffle, position, decode, caption, prompts, tokenize, augment,
batch. Every random choice draws from an RNG the ``PipelineState`` seeds."""
from __future__ import annotations

import io
import json
import logging
import math
import random
import warnings
from typing import Callable, Iterator, Sequence

import torch
import webdataset as wds

from groupseg.transforms import normalize_pixels

from .skips import SampleError, SkipCounter

log = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


class PipelineState:
    """What the stages of one pipeline copy share: seed, epoch, resume point, position."""

    def __init__(self, seed: int, rank: int | None, world_size: int | None) -> None:
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = 0
        self.resume_from: dict | None = None  # LoaderPosition.state_dict()
        self.samples = 0  # samples this worker took from the shuffle buffer this epoch
        self.batches = 0
        self.read_events = 0  # shard losses the reader met this epoch (see reader.ReadShards)

    def worker_info(self) -> tuple[int, int, int, int]:
        rank, world, worker, nworkers = wds.utils.pytorch_worker_info()
        if self.rank is not None:
            rank, world = self.rank, self.world_size
        return rank, world, worker, nworkers

    def rng(self, *parts) -> random.Random:
        """A Random seeded by (seed, epoch, *parts): str seeds hash with SHA-512, no PYTHONHASHSEED."""
        return random.Random(":".join(map(str, (self.seed, self.epoch) + parts)))

    def resume_point(self, worker: int, nworkers: int) -> dict:
        """Where ``worker`` resumes: ``{"samples", "batches"[, "read_events"]}`` (zeros: the epoch's start)."""
        pos = self.resume_from
        if pos is None:
            return {"samples": 0, "batches": 0}
        if pos.get("num_workers") not in (None, nworkers):
            raise RuntimeError(f"the resume position was saved with {pos['num_workers']} workers, this loader has {nworkers}; use the same number or restart the epoch")
        workers = pos.get("workers", {})
        return workers.get(str(worker), workers.get(worker, {"samples": 0, "batches": 0}))


# --------------------------------------------------------------------------- stages


class ShardSource(wds.pytorch.IterableDataset):
    """First stage: ``{"url": ...}`` per shard; seeded shuffle of the list, or resampling."""

    def __init__(self, urls: list[str], weights: list[float], state: PipelineState, resampled: bool, shuffle: bool = True) -> None:
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

    def __init__(self, state: PipelineState) -> None:
        self.state = state

    def __call__(self, src):
        rank, world = self.state.rank, self.state.world_size
        yield from (s for i, s in enumerate(src) if i % world == rank)


class ShuffleSamples:
    """Shuffle buffer with a per-(epoch, rank, worker) seeded RNG."""

    def __init__(self, state: PipelineState, bufsize: int) -> None:
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

    def __init__(self, state: PipelineState) -> None:
        self.state = state

    def __call__(self, src):
        state = self.state
        rank, _, worker, nworkers = state.worker_info()
        start = state.resume_point(worker, nworkers)
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
            from . import nouns

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


class BatchSamples:
    """Batch as soon as ``batch_size`` samples are in (so ``position`` is exact), attach skip
    counts and position, and stop after this worker's share of ``epoch_samples``.

    A full batch goes out when the next one is full or the stream ends: by then the reader has
    finished the shards its samples came from, so the samples those shards lost
    (``SkipCounter.lost``) travel with it even when they are found in the worker's last shard
    and its last, partial batch is dropped (``drop_last``). Costs one batch of memory.
    """

    def __init__(self, state: PipelineState, skips: SkipCounter, batch_size: int, collate: Callable, drop_last: bool, epoch_samples: int | None) -> None:
        self.state, self.skips, self.batch_size, self.collate = state, skips, batch_size, collate
        self.drop_last, self.epoch_samples = drop_last, epoch_samples

    def __call__(self, src):
        _, world, worker, nworkers = self.state.worker_info()
        self.state.batches = self.state.resume_point(worker, nworkers)["batches"]
        quota = None if self.epoch_samples is None else math.ceil(self.epoch_samples / (self.batch_size * world * nworkers))
        if quota is not None and self.state.batches >= quota:
            return
        buf, held = [], None
        for sample in src:
            buf.append(sample)
            self.skips.good()
            if len(buf) == self.batch_size:
                if held is not None:
                    yield self.release(held)
                held, buf = self.finish(buf), []
                if quota is not None and self.state.batches >= quota:
                    break
        if held is not None:
            yield self.release(held)
        if buf and not self.drop_last and (quota is None or self.state.batches < quota):
            yield self.release(self.finish(buf))

    def finish(self, samples: list[dict]) -> dict:
        """Collate; attach the position and the sample skips as they stand now."""
        state = self.state
        batch = self.collate(samples)
        rank, _, worker, nworkers = state.worker_info()
        state.batches += 1
        batch["skip_reasons"] = self.skips.pop_pending()
        batch["position"] = {"epoch": state.epoch, "rank": rank, "worker": worker, "num_workers": nworkers,
                             "samples": state.samples, "batches": state.batches}
        return batch

    def release(self, batch: dict) -> dict:
        """Add the shard losses found so far (and how many loss events that makes, for resume)."""
        reasons = batch["skip_reasons"]
        for reason, n in self.skips.pop_lost().items():
            reasons[reason] = reasons.get(reason, 0) + n
        batch["skipped"] = torch.tensor(sum(reasons.values()), dtype=torch.long)
        batch["position"]["read_events"] = self.state.read_events
        return batch
