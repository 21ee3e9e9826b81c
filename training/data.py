"""Training data: webdataset shards -> batches of augmented pixels and tokenized texts.

The pipeline is a list of small named stages handed to ``wds.DataPipeline`` (see
``train_stages``; the stages are in ``stages.py``, the tar reader in ``reader.py``, shard lists
and recorded counts in ``sources.py``, skip counting in ``skips.py``; their public names are
importable from here)::

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
- ``position`` ``{"epoch", "rank", "worker", "num_workers", "samples", "batches", "read_events"}``:
  where this worker's stream stands after this batch.

Skip counts. Bad samples (unreadable image, no caption, ...) and unreadable shards are logged,
counted and dropped; the pipeline goes on. DataLoader workers are separate processes, so their
counters are not visible to the trainer: every batch carries the counts since the previous
batch of its worker. Sum them in the main process with ``SkipCounter.update(batch)``.
Reasons: ``read`` (unreadable shard or tar member), ``truncated shard NAME`` (samples that
``make-shards`` recorded in shard file NAME but that could not be read: the shard is cut short
or damaged; the samples before the damage are used), ``no_image``, ``decode``, ``caption``,
``prompts``, ``tokenize``, ``augment``. Shard losses reach the trainer even from a worker's last
shard (``BatchSamples`` holds each full batch until the next one is full); sample skips after a
worker's last batch of an epoch are only reported when that last (partial) batch is kept, i.e.
not with ``drop_last=True``. ``count_samples`` gives the epoch length from the counts
``make-shards`` recorded in ``stats.json`` (shards from other tools are read, tolerantly); a
zero-byte shard is a ``ValueError`` naming it.

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
read), so the rest of the epoch comes out exactly as in the uninterrupted run; the shard losses
it meets again are not counted twice (``read_events``). With 0 workers
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

import io
from typing import Callable, Sequence

import webdataset as wds

from .reader import ReadShards, ShardRead, iter_shard
from .skips import SampleError, SkipCounter, SkipHandler, describe_skips
from .sources import ShardManifest, count_samples, expand_urls, expand_weighted_urls
from .stages import (
    IMAGE_EXTS, Augment, BatchSamples, ChooseCaption, Collate, DecodeImage, MakePrompts, PipelineState, ShardSource,
    ShuffleSamples, SplitByRank, Tokenize, TrackPosition, crop_params, decode_rgb, normalize_pixels, sample_captions,
)

__all__ = [  # also the stages' and helpers' names, importable from here as before the split
    "DEFAULT_TEMPLATES", "IMAGE_EXTS", "Augment", "BatchSamples", "ChooseCaption", "Collate", "DecodeImage",
    "LoaderPosition", "MakePrompts", "PipelineState", "ReadShards", "SampleError", "ShardManifest", "ShardRead",
    "ShardSource", "ShuffleSamples", "SkipCounter", "SkipHandler", "SplitByRank", "Tokenize", "TrackPosition",
    "TrainPipeline", "build_eval_pairs", "build_loader", "build_train_pipeline", "count_samples", "crop_params",
    "decode_rgb", "describe_skips", "expand_urls", "expand_weighted_urls", "iter_shard", "normalize_pixels",
    "sample_captions", "train_stages",
]

DEFAULT_TEMPLATES = ("a photo of a {}.",)


class TrainPipeline(wds.DataPipeline):
    """A ``wds.DataPipeline`` with an epoch, a resume point and the pipeline's ``SkipCounter``."""

    def __init__(self, *stages, state: PipelineState, skips: SkipCounter) -> None:
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
        self.workers[p["worker"]] = {"samples": p["samples"], "batches": p["batches"], "read_events": p.get("read_events", 0)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "num_workers": self.num_workers, "workers": {str(w): p for w, p in self.workers.items()}}


# --------------------------------------------------------------------------- builders


def train_stages(
    urls: str | Sequence[str], *, image_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int,
    state: PipelineState, skips: SkipCounter, num_prompts: int = 3, templates: Sequence[str] = DEFAULT_TEMPLATES,
    shuffle: int = 1000, resampled: bool = False, weights: str | Sequence[float] | None = None,
    epoch_samples: int | None = None, scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5,
    noun_fn: Callable | None = None, prompt_fn: Callable | None = None, tokenizer: Callable | None = None,
    context_length: int = 77, drop_last: bool = False, normalize: bool = True,
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
        ReadShards(skips, state),
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
    urls: str | Sequence[str], *, image_size: int, mean: Sequence[float], std: Sequence[float], batch_size: int,
    num_prompts: int = 3, templates: Sequence[str] = DEFAULT_TEMPLATES, shuffle: int = 1000, seed: int = 0,
    resampled: bool = False, weights: str | Sequence[float] | None = None, epoch_samples: int | None = None,
    scale: tuple[float, float] = (0.08, 1.0), hflip: float = 0.5, noun_fn: Callable | None = None,
    prompt_fn: Callable | None = None, tokenizer: Callable | None = None, context_length: int = 77,
    drop_last: bool = False, normalize: bool = True, rank: int | None = None, world_size: int | None = None,
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
    state, skips = PipelineState(seed, rank, world_size), SkipCounter(max_consecutive_skips)
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
        ReadShards(skips),
        wds.map(_eval_pair, handler=skips.handler("decode")),
    )
    pipe.skips = skips
    return pipe
