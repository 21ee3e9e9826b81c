"""Agreement of the offline noun extractor with NLTK's tagger on real Flickr8k captions.

NLTK (words tagged NN/NNS, lemmatised the same way) is the reference. Prints the number of
captions, mean nouns per caption per backend, micro precision/recall/F1 of the offline nouns
over (caption, noun) pairs, the fraction of captions whose first-3-noun sets are identical, and
the speed of both backends. Needs NLTK's ``averaged_perceptron_tagger_eng`` data.

The output starts with the machine (CPU model and flags) and an fp32 matmul peak of the same run
(the extractors do no matmuls: it places the machine); speed lines name the CPU kind.

Example:
    python benchmarks/nouns_agreement.py --data /work/shared/data/flickr8k --split dev
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from _machine import cpu_tag, print_header
from groupseg.training.nouns import extract_nouns, load_lexicon, nltk_tagger_resource

SPLIT_FILES = {"dev": "Flickr_8k.devImages.txt", "train": "Flickr_8k.trainImages.txt"}


def read_captions(root: Path, split: str) -> list[str]:
    """Captions of the images listed in the split file, in the token file's order."""
    images = set((root / SPLIT_FILES[split]).read_text().split())
    captions = []
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, _, caption = line.partition("\t")
        if key.split("#", 1)[0] in images and caption.strip():
            captions.append(caption.strip())
    return captions


def run_backend(captions: list[str], backend: str, max_nouns: int | None = None) -> tuple[list[list[str]], float]:
    """Nouns of every caption and the rate in captions per second."""
    t0 = time.perf_counter()
    out = [extract_nouns(c, max_nouns=max_nouns, backend=backend) for c in captions]  # type: ignore[arg-type]
    return out, len(captions) / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/flickr8k"), help="Flickr8k folder")
    parser.add_argument("--split", choices=sorted(SPLIT_FILES), default="dev")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N captions (0: all)")
    parser.add_argument("--show-errors", type=int, default=0, metavar="N", help="print the N most frequent disagreements")
    args = parser.parse_args(argv)

    if nltk_tagger_resource() is None:
        raise SystemExit("NLTK tagger data not found: install averaged_perceptron_tagger_eng (see training/nouns.py)")
    print_header(("fp32",))
    captions = read_captions(args.data, args.split)
    if args.limit:
        captions = captions[: args.limit]
    load_lexicon()
    extract_nouns("warm up the nltk tagger .", backend="nltk")

    ref, ref_rate = run_backend(captions, "nltk")
    off, off_rate = run_backend(captions, "offline")
    tp = fp = fn = 0
    false_pos: Counter[str] = Counter()
    false_neg: Counter[str] = Counter()
    for r, o in zip(ref, off):
        rs, os_ = set(r), set(o)
        tp += len(rs & os_)
        fp += len(os_ - rs)
        fn += len(rs - os_)
        false_pos.update(os_ - rs)
        false_neg.update(rs - os_)
    precision = tp / max(tp + fp, 1)
    recall = tp / max(tp + fn, 1)
    f1 = 2 * precision * recall / max(precision + recall, 1e-12)
    same3 = sum(set(r[:3]) == set(o[:3]) for r, o in zip(ref, off)) / len(captions)

    print(f"captions ({args.split}):             {len(captions)}")
    print(f"mean nouns/caption, nltk:    {sum(map(len, ref)) / len(ref):.3f}")
    print(f"mean nouns/caption, offline: {sum(map(len, off)) / len(off):.3f}")
    print(f"offline vs nltk: precision {precision:.4f}  recall {recall:.4f}  F1 {f1:.4f}")
    print(f"captions with identical first-3-noun sets: {same3:.4f}")
    print(f"speed, nltk:    {ref_rate:,.0f} captions/s {cpu_tag()}")
    print(f"speed, offline: {off_rate:,.0f} captions/s {cpu_tag()}")
    if args.show_errors:
        print("offline-only nouns:", false_pos.most_common(args.show_errors))
        print("nltk-only nouns:   ", false_neg.most_common(args.show_errors))


if __name__ == "__main__":
    main()
