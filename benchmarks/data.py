"""Throughput of the training data pipeline (decode, caption, nouns + prompts, tokens, augment,
batch) from shards on disk, in samples/s: with 0 workers (the per-worker figure, one CPU thread)
and with N DataLoader workers. Also times the decode + crop paths (torchvision vs PIL).

Without --shards it first writes shards of the first --images Flickr8k images into a temp dir.

The output starts with the machine (CPU model and flags) and an fp32 matmul peak of the same run;
every figure line names the CPU kind.

Example:
    python benchmarks/data.py --workers 2
    python benchmarks/data.py --shards "shards/train-{000000..000009}.tar" --image-size 224
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import cpu_tag, print_header  # noqa: E402  (also puts the checkout on sys.path)
from groupseg.training import data as D  # noqa: E402
from groupseg.training import shards as S  # noqa: E402

FLICKR = Path(__file__).resolve().parents[2] / "shared" / "data" / "flickr8k"
CLIP_MEAN, CLIP_STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)


def flickr_shards(flickr: Path, n: int, out: Path) -> str:
    names = set(sorted(p.name for p in (flickr / "images").glob("*.jpg"))[:n])
    lines = [ln for ln in (flickr / "Flickr8k.token.txt").read_text().splitlines() if ln.split("#", 1)[0] in names]
    (out / "captions.token.txt").write_text("\n".join(lines) + "\n")
    stats = S.make_shards(flickr / "images", out / "captions.token.txt", out / "shards", shard_size=100, workers=2, progress=False)
    return stats["urls"]["train"]


def noun_fns():
    """The pipeline's own noun extraction (groupseg.training.nouns: NLTK's tagger if its data is present)."""
    return None, None, "groupseg.training.nouns (default)"


def run(urls: str, args, workers: int, normalize: bool = True) -> tuple[float, int]:
    """Steady state: one long resampled epoch (workers start once), clock from the 2nd batch."""
    noun_fn, prompt_fn, _ = noun_fns()
    pipe = D.build_train_pipeline(
        urls, image_size=args.image_size, mean=CLIP_MEAN, std=CLIP_STD, batch_size=args.batch_size,
        num_prompts=args.num_prompts, noun_fn=noun_fn, prompt_fn=prompt_fn,
        resampled=True, epoch_samples=args.samples, normalize=normalize,
    )
    loader = D.build_loader(pipe, workers) if workers > 0 else pipe
    n, t0 = 0, None
    for batch in loader:
        if t0 is None:  # the clock starts after the first batch (worker start, lexicon load)
            t0 = time.perf_counter()
            continue
        n += batch["pixels"].shape[0]
    return n / (time.perf_counter() - t0), n


def decode_paths(urls: str, image_size: int, count: int = 200) -> dict[str, float]:
    """ms per image: decode + random resized crop + flip to uint8, torchvision vs PIL."""
    import numpy as np
    import webdataset as wds
    from PIL import Image

    raws = [s["jpg"] for s, _ in zip(wds.DataPipeline(wds.SimpleShardList(D.expand_urls(urls)), wds.tarfile_to_samples()), range(count))]
    aug = D.Augment(image_size)

    def tv(raw, rng):
        return aug({"image": D.decode_rgb(raw), "__rng__": rng})["image"]

    def pil(raw, rng):
        im = Image.open(io.BytesIO(raw)).convert("RGB")
        top, left, h, w = D.crop_params(im.height, im.width, aug.scale, aug.ratio, rng)
        im = im.resize((image_size, image_size), Image.BILINEAR, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            im = im.transpose(Image.FLIP_LEFT_RIGHT)
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)

    out = {}
    for name, f in (("torchvision", tv), ("PIL", pil)):
        times = []
        for _ in range(3):
            rng = random.Random(0)
            t0 = time.perf_counter()
            for raw in raws:
                f(raw, rng)
            times.append((time.perf_counter() - t0) / len(raws) * 1e3)
        out[name] = statistics.median(times)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default=None, help="shard spec to read (default: build from Flickr8k)")
    p.add_argument("--flickr", default=str(FLICKR), help="Flickr8k folder (images/, Flickr8k.token.txt)")
    p.add_argument("--images", type=int, default=500, help="Flickr8k images to shard")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--num-prompts", type=int, default=3)
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers for the second figure")
    p.add_argument("--samples", type=int, default=2000, help="samples per measurement (shards are resampled)")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        urls = args.shards
        if urls is None:
            if not (Path(args.flickr) / "Flickr8k.token.txt").is_file():
                print(f"error: Flickr8k not found at {args.flickr}; pass --shards or --flickr", file=sys.stderr)
                return 2
            t0 = time.perf_counter()
            urls = flickr_shards(Path(args.flickr), args.images, Path(tmp))
            print(f"make-shards: {args.images} Flickr8k images in {time.perf_counter() - t0:.1f}s -> {urls}")
        print(f"nouns: {noun_fns()[2]}; image_size {args.image_size}, batch {args.batch_size}, k={args.num_prompts}")

        torch.set_num_threads(1)
        print_header(("fp32",))  # the pipeline does no matmuls; the peak places the machine
        tag = cpu_tag()
        dec = decode_paths(urls, args.image_size)
        print("decode+crop+flip per image: " + ", ".join(f"{k} {v:.2f} ms" for k, v in dec.items()) + f" {tag}")
        rate, n = run(urls, args, 0)
        print(f"0 workers (1 thread, per-worker figure): {rate:7.1f} samples/s  ({n} samples) {tag}")
        print(f"CPU cores here: {os.cpu_count()} (workers share them with the main process)")
        if args.workers > 0:
            for normalize in (True, False):
                rate_w, n = run(urls, args, args.workers, normalize)
                what = "float pixels" if normalize else "uint8 pixels (normalize=False)"
                print(f"{args.workers} workers, {what:31s} {rate_w:7.1f} samples/s  ({n} samples) {tag}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
