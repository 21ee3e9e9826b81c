"""Atomic, resumable training checkpoints.

A checkpoint is a directory ``ckpt-00000123`` written as ``ckpt-00000123.tmp`` and renamed
only once complete (every file fsynced, ``trainer_state.json`` written last), so a kill at
any moment leaves either the previous checkpoints or a ``.tmp`` that resume ignores.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

_NAME = re.compile(r"^ckpt-(\d{8})$")
STATE_FILE = "trainer_state.json"


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    d = Path(output_dir)
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(output_dir: str | Path, step: int, write_fn, state: dict[str, Any], keep_last: int = 3) -> Path:
    """Write a checkpoint atomically.

    Args:
        output_dir: run directory.
        step: optimizer step (names the checkpoint).
        write_fn: ``write_fn(tmp_dir)`` writes the weights/optimizer/RNG files.
        state: trainer state (JSON), written last.
        keep_last: keep this many complete checkpoints (0 = all).
    """
    out = Path(output_dir)
    final = out / f"ckpt-{step:08d}"
    tmp = out / f"ckpt-{step:08d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write_fn(tmp)
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep_last > 0:
        for old in list_checkpoints(out)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    for stale in out.glob("ckpt-*.tmp"):  # half-written leftovers of killed runs
        if stale != tmp:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def read_state(ckpt: str | Path) -> dict[str, Any]:
    p = Path(ckpt) / STATE_FILE
    if not p.is_file():
        raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no {STATE_FILE})")
    return json.loads(p.read_text())
