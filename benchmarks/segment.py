"""End-to-end ``Segmenter.segment`` latency with a 1,000-word vocabulary.

    python benchmarks/segment.py --weights runs/flickr8k-default/model [--image docs/rocket.jpg] [--threads 2]

Prints the first call (1,000 new words: prompt encoding included) and later calls (cached text
embeddings) on a photo resized to a 448 px short side. (The comparison row for transformers'
GroupViT at 224 px is not written yet.)
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", help="weights to time (default: groupseg's default weights)")
    p.add_argument("--image", default="docs/rocket.jpg")
    p.add_argument("--words", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--templates", default="short")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from groupseg.prompting import shipped_vocab
    from groupseg.segment import Segmenter

    vocab = shipped_vocab("nouns_large")[: args.words]
    seg = Segmenter.from_pretrained(args.weights, templates=args.templates)
    t0 = time.perf_counter()
    first = seg.segment(args.image, vocab)
    t_first = time.perf_counter() - t0
    later = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = seg.segment(args.image, vocab)
        later.append(time.perf_counter() - t0)
    h, w = out.label_map.shape
    print(f"{len(vocab)} words x {len(seg.templates)} templates, image {w}x{h} -> short side {seg.short_side}, {args.threads} threads")
    print(f"first call (new words): {t_first:.2f} s  (text {first.timing['text']:.2f} s, model {first.timing['model']:.2f} s)")
    print(f"cached calls: median {statistics.median(later):.3f} s, min {min(later):.3f} s over {args.repeats}")


if __name__ == "__main__":
    main()
