"""Shard lists: expand a data spec (brace patterns, folders, globs, ``::``-joined sources) into
shard URLs with per-source sampling weights; what ``make-shards`` recorded about each shard
(``ShardManifest``), and the number of samples in a shard list (``count_samples``)."""
from __future__ import annotations

import glob
import json
import logging
import os
import tarfile
from typing import Sequence

log = logging.getLogger(__name__)

MANIFEST = "stats.json"  # written by make-shards beside its shards



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
            check_not_empty(name)
            out.append(name)
        else:
            missing.append(name)
    if missing:
        raise FileNotFoundError(f"shard pattern {pattern!r}: {len(missing)} of {len(names)} files not found (first: {missing[0]})")
    if not out:
        raise FileNotFoundError(f"shard pattern {pattern!r} matches no file")
    return out


def is_local(url: str) -> bool:
    return not (url.startswith("pipe:") or "://" in url)


def check_not_empty(path: str) -> None:
    """A zero-byte shard is a user error (an interrupted copy): one line naming the file."""
    if os.path.getsize(path) == 0:
        raise ValueError(f"shard {path} is empty (0 bytes): copy it again, re-run make-shards or leave it out of the pattern")


class ShardManifest:
    """What ``make-shards`` recorded about each shard file in the ``stats.json`` beside it.

    ``lookup(url)`` gives ``(samples, bytes)`` as written, ``(None, None)`` for shards it did not
    write (other tools, remote URLs). Old ``stats.json`` files without per-shard records give
    counts derived from ``shard_size`` and the split's sample count, and no size.
    """

    def __init__(self) -> None:
        self._dirs: dict[str, dict[str, tuple[int, int | None]]] = {}

    def lookup(self, url: str) -> tuple[int | None, int | None]:
        if not is_local(url):
            return None, None
        folder, name = os.path.split(os.path.abspath(url))
        if folder not in self._dirs:
            self._dirs[folder] = _read_manifest(os.path.join(folder, MANIFEST))
        samples, size = self._dirs[folder].get(name, (None, None))
        try:
            actual = os.path.getsize(url)
        except OSError:  # gone since the list was made: everything recorded is lost
            actual = 0
        if size is not None and actual > size:
            return None, None  # not the file make-shards wrote (replaced since): don't trust the record
        return samples, size


def _read_manifest(path: str) -> dict[str, tuple[int, int | None]]:
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
        if "shard_samples" in stats:
            sizes = stats.get("shard_bytes", {})
            return {name: (int(n), None if sizes.get(name) is None else int(sizes[name])) for name, n in stats["shard_samples"].items()}
        out: dict[str, tuple[int, int | None]] = {}
        size = int(stats["options"]["shard_size"])
        for split, files in stats["shard_files"].items():
            for i, name in enumerate(files):
                out[name] = (size if i < len(files) - 1 else int(stats["samples"][split]) - size * (len(files) - 1), None)
        return out
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exn:
        log.warning("%s: unreadable (%s: %s); counting samples by reading the shards", path, type(exn).__name__, exn)
        return {}


def count_samples(urls: Sequence[str], manifest: ShardManifest | None = None) -> int:
    """Samples in a list of shards: the counts ``make-shards`` recorded (no tar is opened), else
    the distinct keys read from the tar (tolerant: a damaged shard counts what precedes the damage).

    Raises:
        ValueError: a zero-byte shard.
    """
    manifest = manifest or ShardManifest()
    total = 0
    for url in urls:
        if is_local(url):
            check_not_empty(url)
        samples, size = manifest.lookup(url)
        if samples is None:
            total += _count_by_reading(url)
            continue
        if size is not None and os.path.getsize(url) < size:
            log.warning("shard %s is %d bytes, make-shards wrote %d: truncated; the samples past the cut will be counted "
                        "as skipped", url, os.path.getsize(url), size)
        total += samples
    return total


def _count_by_reading(url: str) -> int:
    """Distinct sample keys of one shard's regular files, up to the first damage."""
    import webdataset as wds

    keys: set[str] = set()
    damaged = None
    try:  # local files: headers only (seeks over the data); other URLs: streamed
        with (tarfile.open(url, "r:*") if is_local(url) else tarfile.open(fileobj=wds.gopen(url), mode="r|*")) as tf:
            for info in tf:
                if info.isreg():
                    keys.add(info.name.rsplit("/", 1)[-1].split(".", 1)[0])
    except (tarfile.TarError, OSError, EOFError) as exn:
        damaged = f"{type(exn).__name__}: {exn}"
    if damaged:
        log.warning("shard %s is damaged (%s): %d samples counted before the damage", url, damaged, len(keys))
    return len(keys)
