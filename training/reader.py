"""Tar shards -> samples, tolerant of damage, with every sample a shard lost accounted for.

``iter_shard`` groups a shard's files into samples as webdataset does (``KEY.EXT`` files with
the same key, meta files ``__*__`` ignored, extensions lower-cased) but never raises: a shard
that cannot be opened, or is cut short, ends quietly and says why in its ``ShardRead``. A
sample cut by the damage is dropped. Python's ``tarfile`` (and webdataset) end a shard cut at a
member boundary without an error; the missing end-of-archive marker tells it apart here.

``ReadShards`` (the pipeline stage) compares what it read from each shard with the count
``make-shards`` recorded in ``stats.json`` and counts the difference as skipped under
``"truncated shard NAME"``. Shards without a recorded count that are damaged count one
``read`` skip (how many samples they lost is unknown).
"""
from __future__ import annotations

import logging
import os
import re
import tarfile
from dataclasses import dataclass
from typing import Iterator

from .skips import TRUNCATED, SkipCounter
from .sources import ShardManifest, is_local

log = logging.getLogger(__name__)

_NAME = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")  # KEY.EXT, the key keeps its folder (webdataset's rule)
_META = re.compile(r"(^|/)__[^/]*__$")


@dataclass
class ShardRead:
    """What reading one shard gave: complete samples, and why it stopped early (if it did)."""

    url: str
    samples: int = 0
    error: str | None = None  # an exception that stopped the reading
    ended: bool = False  # the end-of-archive marker was reached
    bad_members: int = 0  # files dropped for a name used twice in one sample

    @property
    def damaged(self) -> bool:
        return self.error is not None or not self.ended

    def why(self) -> str:
        return self.error or "no end-of-archive marker: the file is cut short"


class _EndMarkInfo(tarfile.TarInfo):
    """Notes on the archive when the end-of-archive marker (a zero block) is read."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except tarfile.EOFHeaderError:
            tf.saw_end_marker = True
            raise


def iter_shard(url: str, result: ShardRead) -> Iterator[dict]:
    """The samples (``{"__key__", "__url__", EXT: bytes, ...}``) of one tar shard, in file order.

    Never raises for a damaged or unreadable shard: ``result`` records the complete samples
    yielded and why reading stopped.
    """
    import webdataset as wds

    try:
        stream = open(url, "rb") if is_local(url) else wds.gopen(url)
    except OSError as exn:
        result.error = f"{type(exn).__name__}: {exn}"
        return
    current, shape = None, None  # the sample being read; the file extensions of the last complete one
    try:
        with stream, tarfile.open(fileobj=stream, mode="r|*", tarinfo=_EndMarkInfo) as tf:
            for info in tf:
                key, ext = _sample_file(info)
                if key is None:
                    continue
                if current is not None and key != current["__key__"]:  # the previous sample is whole
                    shape = _complete(current, result)
                    yield current
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                data = tf.extractfile(info).read()  # raises when the file is cut inside this member
                tf.members = []  # stream mode keeps every header otherwise
                if ext in current:
                    result.bad_members += 1
                    continue
                current[ext] = data
            result.ended = getattr(tf, "saw_end_marker", False)
    except (tarfile.TarError, OSError, EOFError, ValueError) as exn:  # ValueError: zlib/bz2 streams cut short
        result.error = f"{type(exn).__name__}: {str(exn)[:200]}"
        current = None  # the file being read was cut: its sample is incomplete
    if current is not None and (result.ended or (shape is not None and set(current) == shape)):
        _complete(current, result)
        yield current


def _sample_file(info: tarfile.TarInfo) -> tuple[str | None, str | None]:
    if not info.isreg() or _META.search(info.name):
        return None, None
    m = _NAME.match(info.name)
    return (m.group(1), m.group(2).lower()) if m else (None, None)


def _complete(sample: dict, result: ShardRead) -> set:
    result.samples += 1
    return set(sample)


class ReadShards:
    """Pipeline stage: ``{"url": ...}`` items -> samples, counting what each shard lost.

    A shard's losses are counted before its last sample is passed on, so they travel with the
    batches that follow. After ``pipeline.resume`` the losses already counted before the resume
    point (``position["read_events"]``) are not counted again: the worker re-reads its shards
    from the start of the epoch and meets them a second time.

    Args:
        skips: where the counts go.
        state: the pipeline's ``PipelineState`` (resume point, event count); None for a reader
            that never resumes.
        manifest: the recorded shard sizes (default: read ``stats.json`` beside the shards).
    """

    def __init__(self, skips: SkipCounter, state=None, manifest: ShardManifest | None = None) -> None:
        self.skips, self.state, self.manifest = skips, state, manifest or ShardManifest()

    def __call__(self, src) -> Iterator[dict]:
        suppress = 0
        if self.state is not None:
            _, _, worker, nworkers = self.state.worker_info()
            suppress = self.state.resume_point(worker, nworkers).get("read_events", 0)
            self.state.read_events = 0
        for item in src:
            result = ShardRead(item["url"])
            samples = iter_shard(item["url"], result)
            held = next(samples, None)
            for sample in samples:
                yield held
                held = sample
            suppress = self._account(result, suppress)
            if held is not None:
                yield held

    def _account(self, result: ShardRead, suppress: int) -> int:
        """Count one shard's losses unless a resumed run counted them already; returns the
        number of events still to suppress."""
        losses = self._losses(result)
        for reason, n, message in losses:
            if self.state is not None:
                self.state.read_events += 1
            if suppress > 0:
                suppress -= 1
                log.info("already counted before the resume: %s", message)
                continue
            self.skips.lost(reason, n, message)
            if reason == "read":
                self.skips.consecutive += n
        return suppress

    def _losses(self, result: ShardRead) -> list[tuple[str, int, str]]:
        name = os.path.basename(result.url)
        recorded, _ = self.manifest.lookup(result.url)
        out = []
        if recorded is not None and result.samples < recorded:
            lost = recorded - result.samples
            out.append((f"{TRUNCATED} {name}", lost, f"{TRUNCATED} {result.url}: {lost} of its {recorded} samples lost, "
                        f"{result.samples} read ({result.why()})"))
        elif recorded is None and result.damaged:
            out.append(("read", 1, f"shard {result.url}: {result.why()}; {result.samples} samples read, the rest lost "
                        "(no count recorded by make-shards to tell how many)"))
        if recorded is not None and result.samples > recorded:
            log.warning("shard %s holds %d samples, its stats.json records %d: the record is stale", result.url, result.samples, recorded)
        if result.bad_members:
            out.append(("read", result.bad_members, f"shard {result.url}: {result.bad_members} files with a name used twice in a sample"))
        return out
