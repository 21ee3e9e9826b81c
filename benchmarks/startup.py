"""Start-up time of the ``groupseg`` command, side by side with ``python -c "import torch"``.

    python benchmarks/startup.py [--repeats 5] [--before /usr/bin/python3]

Each round runs every command once, in turn (so slow phases of a shared machine hit them all
alike); the table shows the median wall time over the rounds and each one's ratio to importing
torch. ``--before PYTHON`` adds the same commands run by another interpreter whose ``groupseg``
is an older checkout (e.g. the system python pointing at main), as the "before" column. Commands
run from a temporary folder so that the current directory cannot shadow the installed package.
"""
from __future__ import annotations

import argparse
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"
PHOTO = DOCS / "astronaut.jpg"
VOCAB = "person,sky,flag,rocket"
TORCH = 'python -c "import torch"'


def cpu_line() -> str:
    """The CPU model and the instruction-set flags that decide CPU speed here."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
    flags = re.search(r"^flags\s*:\s*(.+)$", text, re.M)
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if flags and f in flags.group(1).split()]
    return f"{model.group(1) if model else platform.processor()}; flags: {' '.join(wanted) or 'none of avx2/avx512'}"


# `groupseg info` as it will cost once groupseg's layers stop importing timm for one DropPath:
# the same command with timm replaced by a stub (torch is imported first, as info needs it anyway)
INFO_NO_TIMM = """import sys, types, torch
stub = types.ModuleType("timm.layers"); stub.DropPath = torch.nn.Identity
sys.modules["timm"] = types.ModuleType("timm"); sys.modules["timm.layers"] = stub
from groupseg.cli import main; sys.exit(main(["info"]))"""


def commands(python: str, out: Path, segment: bool = True, stub: bool = False) -> dict[str, list[str]]:
    cli = [python, "-m", "groupseg.cli"]
    stubbed = {"groupseg info, timm stubbed": [python, "-c", INFO_NO_TIMM]} if stub else {}
    return {
        TORCH: [python, "-c", "import torch"],
        "groupseg --help": [*cli, "--help"],
        "groupseg segment --help": [*cli, "segment", "--help"],
        "groupseg info": [*cli, "info"],
        **stubbed,
        **({"groupseg segment (1 photo)": [*cli, "segment", str(PHOTO), "--vocab", VOCAB, "--groupings", "1",
                                            "--templates", "short", "--out", str(out), "--quiet"]} if segment else {}),
    }


def where(python: str, cwd: str) -> str:
    r = subprocess.run([python, "-c", "import groupseg, os; print(os.path.dirname(os.path.dirname(groupseg.__file__)))"],
                       capture_output=True, text=True, cwd=cwd)
    return r.stdout.strip() or r.stderr.strip().splitlines()[-1]


def timed(argv: list[str], cwd: str) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + system) of one run of ``argv``.

    CPU time is what a busy shared machine distorts least: wall time also counts the time other
    jobs held the cores."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd)
    dt = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(argv)}\n{r.stderr[-2000:]}")
    return dt, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="rounds (default: 5)")
    ap.add_argument("--before", metavar="PYTHON", help="interpreter whose groupseg is the 'before' checkout")
    ap.add_argument("--no-segment", action="store_true", help="start-up only: leave out segmenting a photo")
    ap.add_argument("--stub-timm", action="store_true",
                    help="add `groupseg info` with timm stubbed out (what info costs once the layers drop timm)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        sides = {"after": sys.executable, **({"before": args.before} if args.before else {})}
        for side, python in sides.items():
            print(f"{side}: {python} -> groupseg from {where(python, tmp)}")
        runs = {(side, name): argv for side, python in sides.items()
                for name, argv in commands(python, Path(tmp) / f"out-{side}", not args.no_segment,
                                           args.stub_timm and side == "after").items()}
        times: dict[tuple[str, str], list[tuple[float, float]]] = {k: [] for k in runs}
        for _ in range(args.repeats):
            for key, argv in runs.items():
                times[key].append(timed(argv, tmp))

    wall = {k: statistics.median(t[0] for t in v) for k, v in times.items()}
    cpu = {k: statistics.median(t[1] for t in v) for k, v in times.items()}
    print(f"\nCPU: {cpu_line()}; python {platform.python_version()}; median of {args.repeats} alternating rounds; "
          f"load average (1 min) at the end {os.getloadavg()[0]:.1f}\n")
    sides_shown = [s for s in ("after", "before") if s in sides]
    head = "| command |" + "".join(f" {s} wall (s) | {s} CPU (s) | {s} CPU / import torch |" for s in sides_shown)
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for name in commands(sys.executable, Path("."), not args.no_segment, args.stub_timm):
        row = f"| `{name}` |"
        for side in sides_shown:
            if (side, name) not in wall:
                row += " – | – | – |"
                continue
            row += f" {wall[(side, name)]:.2f} | {cpu[(side, name)]:.2f} | {cpu[(side, name)] / cpu[(side, TORCH)]:.2f}x |"
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
