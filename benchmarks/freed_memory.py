"""Fine-tuning step speed with glibc keeping freed memory (``keep_freed_memory``, what the training
commands do since 2026-12-02) against glibc's defaults, in one run.

    python benchmarks/freed_memory.py                 # CamVid from ../shared/data/camvid
    python benchmarks/freed_memory.py --rounds 3 --steps 6

The allocator's settings hold for a whole process, so each round starts one fresh process per
setting, alternately; each builds the real fine-tuner (default settings, the shipped model), warms
up two steps and times ``--steps`` more of the mix-and-match and the per-pixel stage on one batch,
counting the process's minor page faults. Medians over rounds.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(data_root: str, steps: int, keep: bool) -> None:
    import torch  # noqa: F401

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from finetune_step import build, one_step

    from groupseg.training.engine import keep_freed_memory

    if keep:
        assert keep_freed_memory(), "not glibc: nothing to compare"
    ft, opt = build(data_root, "fp32")
    ft.data.epoch = 0
    batch = next(iter(ft._loader(0)))
    out = {}
    for epoch, stage in ((0, "mix-and-match"), (1, "per-pixel")):
        for _ in range(2):
            one_step(ft, opt, batch, epoch)
        f0, times = int(open("/proc/self/stat").read().split()[9]), []
        for _ in range(steps):
            t0 = time.perf_counter()
            one_step(ft, opt, batch, epoch)
            times.append(time.perf_counter() - t0)
        out[stage] = (statistics.median(times), (int(open("/proc/self/stat").read().split()[9]) - f0) / steps)
    print(json.dumps(out))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--child", choices=("keep", "default"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.data_root, args.steps, args.child == "keep")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _machine import print_header

    if not Path(args.data_root).is_dir():
        raise SystemExit(f"no CamVid at {args.data_root}: give --data-root")
    print_header(("fp32",))
    res = {"keep": [], "default": []}
    for _ in range(args.rounds):
        for mode in ("default", "keep"):
            cmd = [sys.executable, __file__, "--child", mode, "--data-root", args.data_root, "--steps", str(args.steps)]
            res[mode].append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]))
    for stage in ("mix-and-match", "per-pixel"):
        (k, kf), (d, df) = [(statistics.median(r[stage][0] for r in res[m]), statistics.median(r[stage][1] for r in res[m]))
                            for m in ("keep", "default")]
        print(f"fp32: {stage} step {k * 1000:,.0f} ms keeping freed memory ({kf:,.0f} page faults a step) against "
              f"{d * 1000:,.0f} ms with glibc's defaults ({df:,.0f}): {d / k:.2f}x (medians of {args.rounds} alternating processes)")


if __name__ == "__main__":
    main()
