"""Atomic, resumable, checked training checkpoints.

A checkpoint is a directory ``ckpt-00000123`` written as ``ckpt-00000123.tmp`` and renamed
only once complete (every file fsynced, ``trainer_state.json`` written last), so a kill at
any moment leaves either the previous checkpoints or a ``.tmp`` that resume ignores.
``trainer_state.json`` records the size of every other file (``files``); ``validate_checkpoint``
checks them and the safetensors headers before a resume trusts the folder (a disk that filled
up, a copy cut short). Damaged checkpoints are skipped and kept, never deleted.
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
FILES_KEY = "files"  # in the state: {relative path: size in bytes} of every file written beside it


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
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / STATE_FILE).write_text(json.dumps({**state, FILES_KEY: files}, indent=2))
    _fsync_tree(tmp)
    if final.exists():
        if validate_checkpoint(final):  # a damaged one (skipped at resume) is kept aside, never deleted
            final.rename(_free_name(out / f"{final.name}.damaged"))
        else:
            shutil.rmtree(final)
    os.replace(tmp, final)
    fd = os.open(out, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep_last > 0:  # damaged checkpoints are left where they are
        for old in [c for c in list_checkpoints(out) if not validate_checkpoint(c)][:-keep_last]:
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


def _free_name(path: Path) -> Path:
    n, cand = 1, path
    while cand.exists():
        n += 1
        cand = path.with_name(f"{path.name}-{n}")
    return cand


def safetensors_problem(path: Path) -> str:
    """Why a ``.safetensors`` file is unreadable ("" when its header parses and its data is all there)."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little") if size >= 8 else -1
            if n < 0 or 8 + n > size:
                return f"{path.name}: truncated header ({size} bytes)"
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        return f"{path.name}: unreadable header ({e.__class__.__name__})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end != size:
        return f"{path.name}: {size} bytes, its header describes {8 + n + end}"
    return ""


def validate_checkpoint(ckpt: str | Path) -> str:
    """What is wrong with a checkpoint folder, in one phrase ("" when it is complete and readable).

    Checks: ``trainer_state.json`` parses; every file it records is present with its recorded
    size (checkpoints written before sizes were recorded: only the next check); every
    ``.safetensors`` file's header is readable and describes exactly the bytes on disk.
    """
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError):
        return f"unreadable {STATE_FILE}"
    for rel, size in (state.get(FILES_KEY) or {}).items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {size} when saved"
    for p in sorted(ckpt.rglob("*.safetensors")):
        problem = safetensors_problem(p)
        if problem:
            return problem
    return ""


def latest_valid_checkpoint(output_dir: str | Path, on_skip=None) -> Path | None:
    """The newest checkpoint that passes ``validate_checkpoint``; ``on_skip(path, why)`` hears of each newer damaged one."""
    for ckpt in reversed(list_checkpoints(output_dir)):
        problem = validate_checkpoint(ckpt)
        if not problem:
            return ckpt
        if on_skip is not None:
            on_skip(ckpt, problem)
    return None
