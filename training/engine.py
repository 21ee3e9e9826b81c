"""The training core pretraining (``main.py``) and fine-tuning (``finetune.py``) share.

* (optimizers: ``groupseg.optim.build_optimizer``, which every optimizer in the project comes from);
* ``warmup_cosine``: linear warm-up, then cosine decay to a floor;
* ``MetricsWriter``: ``metrics.jsonl``, written and trimmed on resume by the main process only;
* ``plot_loss_curve``: the loss terms and learning rate against steps;
* ``export_weights``: ordinary groupseg weights written through a temporary folder;
* ``choose_checkpoint``: the checkpoint a ``resume`` setting names, damaged ones skipped;
* ``keep_freed_memory``: the C allocator keeps a step's freed activations for the next step.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import latest_valid_checkpoint, validate_checkpoint

log = logging.getLogger("groupseg.train")


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


def keep_freed_memory(block: int = 32 << 20, trim: int = 1 << 30) -> bool:
    """Ask glibc's malloc to keep freed memory for reuse instead of handing it back to the system.

    A training step allocates and frees the same activations every step. By default glibc maps
    blocks above a moving threshold afresh and trims the heap when its free top grows, so each
    step faults the same pages in again: on a 2-core AVX2 EPYC about 90,000 page faults per
    fine-tuning step and a fifth of the run's CPU time in the kernel. With blocks up to ``block``
    bytes (glibc's largest allowed threshold on 64-bit) served from the heap and the heap trimmed
    only beyond ``trim`` free bytes, the per-pixel step faults 900 pages instead of 34,000 and is
    1.08x faster there (``benchmarks/freed_memory.py``). Called by the training commands; returns
    False, changing nothing, where the C library is not glibc."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    done = [bool(mallopt(M_MMAP_THRESHOLD, block)), bool(mallopt(M_TRIM_THRESHOLD, trim))]
    return all(done)


# --------------------------------------------------------------------------- optimisation
def warmup_cosine(opt: torch.optim.Optimizer, total_steps: int, warmup: int, floor: float = 0.0):
    """LambdaLR: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` x the base rate.

    Args:
        opt: the optimizer.
        total_steps: steps of the whole run.
        warmup: warm-up steps (0 = none).
        floor: final learning rate as a fraction of each group's base rate.
    """

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, total_steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


# --------------------------------------------------------------------------- metrics
class MetricsWriter:
    """``metrics.jsonl``: one JSON record per logged step, written by the main process only.

    Args:
        path: the file.
        is_main: whether this process writes; on every other rank each method does nothing.
    """

    def __init__(self, path: Path, is_main: bool = True) -> None:
        self.path, self.is_main = Path(path), is_main

    def trim(self, step: int) -> None:
        """Drop the records logged after ``step`` (a resumed run logs them again)."""
        if not self.is_main or not self.path.exists():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        self.path.write_text("".join(ln + "\n" for ln in keep))

    def write(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self, png: Path) -> None:
        if self.is_main:
            plot_loss_curve(self.path, png)


def plot_loss_curve(metrics_file: Path, png: Path) -> None:
    """Loss terms and learning rate against steps, from ``metrics.jsonl``."""
    if not Path(metrics_file).exists():
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(ln) for ln in Path(metrics_file).read_text().splitlines() if ln.strip()]
    if not recs:
        return
    steps = [r["step"] for r in recs]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    keys = [k for k in dict.fromkeys(k for r in recs for k in r) if k == "loss" or k.endswith("_loss")]
    for k in keys:  # terms may start later (e.g. after a warm-up stage): plot where they exist
        pts = [(r["step"], r[k]) for r in recs if k in r]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=k)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax2 = ax.twinx()
    ax2.plot(steps, [r["lr"] for r in recs], color="grey", ls="--", lw=0.8, label="lr")
    ax2.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


# --------------------------------------------------------------------------- weights and checkpoints
def export_weights(model, directory: Path, dtype: torch.dtype | None = None,
                   extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``model`` as groupseg weights (``config.json`` + ``model.safetensors``) into ``directory``.

    The files are written into ``directory/model.tmp`` first and moved into place one by one, so
    a reader never sees a half-written file; other files in ``directory`` stay.

    Args:
        model: a ``GroupViT``.
        directory: the output folder (created).
        dtype: stored precision of floating-point tensors (``None`` = as they are).
        extra: ``extra(tmp_dir)`` adds files (e.g. a tokenizer) beside the weights.
    """
    directory = Path(directory)
    tmp = directory / "model.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, dtype=dtype)
    if extra is not None:
        extra(tmp)
    for f in tmp.iterdir():
        dest = directory / f.name
        if dest.is_dir():
            shutil.rmtree(dest)
        f.replace(dest)
    tmp.rmdir()
    return directory


def choose_checkpoint(resume: str, checkpoints_dir: Path) -> Path | None:
    """The checkpoint ``resume`` names: ``""`` none, ``"auto"`` the newest valid one, else that folder.

    ``auto`` skips damaged checkpoints (a missing or truncated file) with one line each on the
    log, never deleting them; a named checkpoint that fails the checks is an error.
    """
    if not resume:
        return None
    if resume == "auto":
        ckpt = latest_valid_checkpoint(checkpoints_dir, on_skip=lambda p, why: log.warning("skipping checkpoint %s: %s", p, why))
        if ckpt is None:
            log.info("no checkpoint in %s: starting fresh", checkpoints_dir)
        return ckpt
    problem = validate_checkpoint(resume)
    if problem:
        raise ValueError(f"{resume}: cannot resume from this checkpoint: {problem}")
    return Path(resume)
