"""Checked option values for every command: ranges, devices. Imports nothing heavy.

Each factory returns an ``argparse`` ``type=`` callable whose error names the allowed range, so a
bad value is refused before any work starts.

>>> int_range(1)("3")
3
>>> float_range(0, 1)("0.5")
0.5
"""
from __future__ import annotations

import argparse
import math


def int_range(lo: int | None = None, hi: int | None = None):
    """``type=`` for an integer in ``[lo, hi]`` (either end open when ``None``)."""

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v} is out of range {_describe(lo, hi)}")
        return v

    parse.__name__ = "integer"
    return parse


def float_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False):
    """``type=`` for a finite number in ``[lo, hi]`` (``(lo, hi]`` with ``lo_open``)."""

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        bad_lo = lo is not None and (v <= lo if lo_open else v < lo)
        if not math.isfinite(v) or bad_lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"{v:g} is out of range {_describe(lo, hi, lo_open)}")
        return v

    parse.__name__ = "number"
    return parse


def _describe(lo, hi, lo_open: bool = False) -> str:
    left = "(" if lo_open or lo is None else "["
    return f"{left}{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}{']' if hi is not None else ')'}"


def resolve_device(spec: str | None = "auto"):
    """``auto``/``None`` -> ``cuda`` when a GPU is visible, else ``cpu``; a named device is checked.

    Raises ``ValueError`` with one line when the device does not exist here (``--device cuda`` on a
    machine without a GPU). The one rule for every command and for ``Segmenter``.
    """
    import torch

    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r} (use auto, cpu, cuda or cuda:N)") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if n == 0:
            raise ValueError(f"device {spec!r} asked for, but no CUDA GPU is visible here (use --device cpu or auto)")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"device {spec!r} asked for, but only {n} CUDA GPU(s) are visible")
    elif dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"device {spec!r} asked for, but MPS is not available here")
    return dev
