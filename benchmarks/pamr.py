"""PAMR refinement speed: the library's banded propagation against the whole batch at once, in one run.

    python benchmarks/pamr.py                 # 11 classes, both shapes below
    python benchmarks/pamr.py --rounds 5

Two shapes that groupseg refines: the five 224-px crops of one photo whose pseudo labels
`groupseg discover` refines in self-training, and a 448 x 597 CamVid image as `groupseg eval` /
`groupseg segment` refine it. ``whole`` is the propagation as it was before 2026-12-02 (every
neighbour view of the whole batch at once), kept here only to measure against; the two give the
same scores to the bit (checked here and in tests/test_refine.py). Medians of alternating rounds.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from _machine import print_header


def whole(image: torch.Tensor, scores: torch.Tensor, iterations: int = 10) -> torch.Tensor:
    """PAMR before 2026-12-02: each step over the whole batch at once."""
    from groupseg.refine import DILATIONS, _neighbours, pamr_affinity

    aff = pamr_affinity(image.float(), DILATIONS)
    x = scores.float()
    for _ in range(iterations):
        out = torch.zeros_like(x)
        for k, nb in enumerate(_neighbours(x, DILATIONS)):
            out.addcmul_(nb, aff[:, k : k + 1])
        x = out
    return x


def main() -> None:
    from groupseg.refine import pamr

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--classes", type=int, default=11)
    args = p.parse_args()
    print_header(("fp32",))
    g = torch.Generator().manual_seed(0)
    for what, (b, h, w) in (("five 224-px crops (discover's pseudo labels)", (5, 224, 224)),
                            ("one 448 x 597 image (eval, segment)", (1, 448, 597))):
        image = torch.rand(b, 3, h, w, generator=g)
        scores = torch.rand(b, args.classes, h, w, generator=g).softmax(1)
        assert torch.equal(pamr(image, scores), whole(image, scores))
        ours, theirs = [], []
        for _ in range(args.rounds):
            for times, fn in ((ours, pamr), (theirs, whole)):
                t0 = time.perf_counter()
                fn(image, scores)
                times.append(time.perf_counter() - t0)
        a, c = statistics.median(ours), statistics.median(theirs)
        print(f"pamr, {what}, {args.classes} classes: {a:.2f} s banded against {c:.2f} s whole: {c / a:.2f}x "
              f"(medians of {args.rounds} alternating; equal to the bit)")


if __name__ == "__main__":
    main()
