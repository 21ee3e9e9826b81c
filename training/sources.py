"""Shard lists: expand a data spec (brace patterns, folders, globs, ``::``-joined sources) into
shard URLs with per-source sampling weights."""
from __future__ import annotations

import glob
import os
from typing import Sequence



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
