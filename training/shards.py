"""Write image-text webdataset shards from a folder of images and a captions file.

One sample per image, all of its captions kept together:

- ``{key}.jpg``  the image (valid RGB JPEGs that need no resize or rotation are copied
  byte for byte; everything else is decoded, converted to RGB and re-encoded),
- ``{key}.txt``  its first caption,
- ``{key}.json`` ``{"captions": [...], "image": original name, "width": w, "height": h}``.

Captions files (read by ``caption_files``): CSV/TSV with a header naming ``image`` and
``caption`` columns (delimiter detected), JSON lines (``{"image": ..., "caption": ...}`` or
``"captions": [...]``), COCO ``captions_*.json`` and the Flickr ``*.token.txt`` format
(``IMAGE.jpg#K<TAB>caption``).

The split into train/val is by image (all captions of an image land in one split). Sample
order is a shuffle of the images seeded by ``seed``, so the output is the same on every run.
Unreadable or truncated images are skipped and listed in ``stats.json``; they never abort a run.

Example:
    groupseg make-shards --images data/flickr8k/images \\
        --captions data/flickr8k/Flickr8k.token.txt --out shards/flickr8k \\
        --resize 256 --shard-size 1000 --val-fraction 0.05 --workers 4
"""
from __future__ import annotations

import argparse
import glob
import io
import json
import os
import random
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Sequence

from .caption_files import FORMATS, CaptionFormat, detect_format, read_captions, read_split_file

__all__ = ["FORMATS", "CaptionFormat", "detect_format", "read_captions", "read_split_file", "make_shards",
           "add_make_shards_args", "run_make_shards", "main"]

SPLITS = ("train", "val")
DEFAULT_PATTERN = "{split}-%06d.tar"
FIXED_MTIME = 946684800.0  # 2000-01-01: tar member times fixed so shards are byte-reproducible
MAX_LISTED = 1000  # at most this many skipped names are listed in stats.json (counts are exact)


# --------------------------------------------------------------------------- images


def _encode_image(job: tuple[str, int, int]) -> tuple:
    """Read, check and (if needed) re-encode one image. Runs in worker processes.

    Returns ``("ok", jpeg_bytes, width, height, reencoded)`` or ``("unreadable", message)``.
    """
    path, resize, quality = job
    from PIL import Image, ImageOps

    try:
        with open(path, "rb") as f:
            raw = f.read()
        im = Image.open(io.BytesIO(raw))
        fmt = im.format
        w0, h0 = im.size
        if resize and min(w0, h0) > resize and fmt == "JPEG":
            s = resize / min(w0, h0)  # let libjpeg decode at a reduced scale (never below target)
            im.draft("RGB", (int(w0 * s) + 1, int(h0 * s) + 1))
        im.load()  # raises on truncated or corrupt data
        orientation = im.getexif().get(0x0112, 1)
        if orientation not in (1, None):
            im = ImageOps.exif_transpose(im)
        w, h = im.size
        if resize and min(w, h) > resize:
            s = resize / min(w, h)
            im = im.resize((max(1, round(w * s)), max(1, round(h * s))), Image.BICUBIC)
        elif fmt == "JPEG" and im.mode == "RGB" and orientation in (1, None) and (w, h) == (w0, h0):
            return "ok", raw, w, h, False  # already a fine JPEG: copy it
        im = _to_rgb(im)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=quality)
        return "ok", buf.getvalue(), im.size[0], im.size[1], True
    except Exception as exn:  # noqa: BLE001 - every unreadable image is skipped and recorded
        return "unreadable", f"{type(exn).__name__}: {exn}"[:300]


def _to_rgb(im):
    from PIL import Image

    if im.mode == "RGB":
        return im
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(im, mask=im.getchannel("A"))
        return bg
    return im.convert("RGB")


def _make_key(name: str, used: set[str]) -> str:
    """A webdataset key (no dots, no slashes) derived from an image name, unique in ``used``."""
    stem = os.path.splitext(name.replace("\\", "/").lstrip("/"))[0]
    key = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "image"
    base, n = key, 1
    while key in used:
        key = f"{base}_{n}"
        n += 1
    used.add(key)
    return key


# --------------------------------------------------------------------------- shards


def _split_patterns(pattern: str, splits: Sequence[str]) -> dict[str, str]:
    """Resolve ``--pattern`` into one %-pattern per split."""
    if "%" not in pattern:  # a prefix
        pattern = f"{pattern}-{{split}}-%06d.tar"
    out = {}
    for split in splits:
        if "{split}" in pattern:
            p = pattern.replace("{split}", split)
        elif len(splits) == 1 or split == "train":
            p = pattern
        elif "train" in os.path.basename(pattern):
            head, tail = os.path.split(pattern)
            p = os.path.join(head, tail.replace("train", split))
        else:
            raise ValueError(f"--pattern {pattern!r} needs '{{split}}' (or 'train') in it to name the val shards")
        try:
            p % 0
        except (TypeError, ValueError):
            raise ValueError(f"--pattern {pattern!r} must hold one integer field such as %06d") from None
        out[split] = p
    if len(set(out.values())) < len(out):
        raise ValueError(f"--pattern {pattern!r} gives the same file names to train and val")
    return out


def _pattern_glob(pattern: str) -> str:
    return re.sub(r"%0?\d*d", "*", pattern)


def _brace_url(out: Path, pattern: str, n: int) -> str:
    """``/abs/out/train-{000000..000009}.tar`` for n shards written with ``pattern``."""
    if n == 1:
        return str(out.resolve() / (pattern % 0))
    m = re.search(r"%0?\d*d", pattern)
    field = m.group(0)
    span = f"{{{field % 0}..{field % (n - 1)}}}"
    return str(out.resolve() / (pattern[: m.start()].replace("%%", "%") + span + pattern[m.end():].replace("%%", "%")))


class _LazyShardWriter:
    """A ``wds.ShardWriter`` opened on the first sample, so an empty split writes no file; records
    how many samples and bytes each finished shard holds (``stats.json`` keeps them, so readers
    can tell a truncated shard and count samples without opening every tar)."""

    def __init__(self, pattern: str, shard_size: int) -> None:
        self.pattern, self.shard_size, self.writer, self.files = pattern, shard_size, None, []
        self.samples: dict[str, int] = {}  # shard file name -> samples written
        self.bytes: dict[str, int] = {}  # shard file name -> file size

    def write(self, sample: dict) -> None:
        if self.writer is None:
            import webdataset as wds

            self.writer = wds.ShardWriter(
                self.pattern, maxcount=self.shard_size, maxsize=float("inf"), verbose=0,
                post=self._finished, mtime=FIXED_MTIME,
            )
        self.writer.write(sample)

    def _finished(self, fname: str) -> None:
        name = os.path.basename(fname)
        self.files.append(fname)
        self.samples[name], self.bytes[name] = self.writer.count, os.path.getsize(fname)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def make_shards(
    images: str | Path, captions: str | Path, out: str | Path, *, format: CaptionFormat = "auto",
    pattern: str = DEFAULT_PATTERN, shard_size: int = 1000, resize: int = 0, jpeg_quality: int = 90, workers: int = 1,
    val_fraction: float = 0.0, split_file: str | Path | None = None, seed: int = 0, overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Write webdataset shards (one sample per image, all its captions) and ``stats.json``.

    Args:
        images: folder the image names in the captions file are relative to.
        captions: captions file (CSV/TSV, JSON lines, COCO captions JSON or Flickr token file).
        out: output folder (created).
        format: captions file format, ``auto`` to detect it.
        pattern: shard file names inside ``out``: a %-pattern, optionally with ``{split}``
            (``"{split}-%06d.tar"``, ``"train-%06d.tar"``: val replaces ``train`` by ``val``),
            or a prefix (``"flickr8k"`` -> ``flickr8k-train-000000.tar``).
        shard_size: samples per shard.
        resize: resize so the short side is this many pixels (0 keeps the size; never upscales).
        jpeg_quality: JPEG quality for re-encoded images.
        workers: processes that decode and re-encode images (1 = in this process).
        val_fraction: fraction of the images that go to the val split (by image, seeded).
        split_file: file listing the image names of the val split (instead of val_fraction).
        seed: seed of the image order and of the val_fraction split.
        overwrite: replace shards a previous run left in ``out`` (else it is an error).
        progress: show a tqdm progress bar.

    Returns:
        The statistics also written to ``out/stats.json``: counts of images, captions,
        samples and shards per split, shard ``urls`` per split (brace patterns), samples and
        bytes per shard file (``shard_samples``, ``shard_bytes``: training reads them to count
        samples and to report what a truncated shard lost), and the skipped images and caption
        rows with reasons.

    Raises:
        FileNotFoundError: images folder, captions file or split file missing.
        ValueError: bad options, unknown format, or no listed image exists.
        FileExistsError: shards already in ``out`` and ``overwrite`` is False.

    >>> stats = make_shards("flickr8k/images", "flickr8k/Flickr8k.token.txt", "shards", resize=256)  # doctest: +SKIP
    >>> stats["urls"]["train"]  # doctest: +SKIP
    'shards/train-{000000..000007}.tar'
    """
    images, out = Path(images), Path(out)
    _check_options(images, shard_size, resize, jpeg_quality, val_fraction, split_file)
    val_names = read_split_file(split_file) if split_file is not None else None
    groups, bad_rows, fmt = read_captions(captions, format)
    order, keys, missing = _order_images(images, captions, groups, seed)
    split_of = _assign_splits(order, val_fraction, val_names)
    splits = [s for s in SPLITS if s in split_of.values()]
    patterns = _split_patterns(pattern, splits)
    out.mkdir(parents=True, exist_ok=True)
    _check_out(out, patterns, overwrite)

    writers = {s: _LazyShardWriter(str(out / patterns[s]), shard_size) for s in splits}
    jobs = ((str(images / name), resize, jpeg_quality) for name in order)
    try:
        written = _write_samples(order, _map_jobs(jobs, workers, len(order), progress), groups, keys, split_of, writers)
    finally:
        for wr in writers.values():
            wr.close()

    options = {
        "images": str(images), "captions": str(captions), "pattern": pattern, "shard_size": shard_size,
        "resize": resize, "jpeg_quality": jpeg_quality, "val_fraction": val_fraction,
        "split_file": None if split_file is None else str(split_file), "seed": seed,
    }
    return _write_stats(out, patterns, writers, written, groups, bad_rows, missing, fmt, val_names, options)


def _write_stats(out: Path, patterns: dict, writers: dict, written: dict, groups: dict, bad_rows: list, missing: list,
                 fmt: str, val_names: set[str] | None, options: dict) -> dict:
    """Write ``out/stats.json`` and return what it holds."""
    splits = list(writers)
    n_samples = written["samples"]
    shard_files = {s: [os.path.basename(f) for f in writers[s].files] for s in splits}
    stats = {
        "images": sum(n_samples.values()),
        "captions": written["captions"],
        "samples": {s: n_samples[s] for s in splits},
        "shards": {s: len(shard_files[s]) for s in splits},
        "urls": {s: _brace_url(out, patterns[s], len(shard_files[s])) for s in splits if shard_files[s]},
        "shard_files": shard_files,
        # per shard file: samples written and file size (truncation checks, sample counts)
        "shard_samples": {name: n for s in splits for name, n in writers[s].samples.items()},
        "shard_bytes": {name: n for s in splits for name, n in writers[s].bytes.items()},
        "reencoded": written["reencoded"],
        "copied": sum(n_samples.values()) - written["reencoded"],
        "listed": {"images": len(groups), "captions": sum(map(len, groups.values()))},
        "skipped_counts": {"missing": len(missing), "unreadable": len(written["unreadable"]), "bad_rows": len(bad_rows)},
        "skipped": {"missing": missing[:MAX_LISTED], "unreadable": written["unreadable"][:MAX_LISTED], "bad_rows": bad_rows[:MAX_LISTED]},
        "format": fmt,
    }
    if val_names is not None:
        stats["skipped_counts"]["split_file_unmatched"] = len(val_names - set(groups) - {os.path.basename(n) for n in groups})
    stats["options"] = options
    with open(out / "stats.json", "w", encoding="utf-8") as f:
        json.dump(stats, f, indent=2)
    return stats


def _check_options(images: Path, shard_size: int, resize: int, jpeg_quality: int, val_fraction: float, split_file) -> None:
    if not images.is_dir():
        raise FileNotFoundError(f"images folder not found: {images}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be >= 1, got {shard_size}")
    if resize < 0:
        raise ValueError(f"--resize must be >= 0, got {resize}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"--jpeg-quality must be in 1..100, got {jpeg_quality}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0 and split_file is not None:
        raise ValueError("give either --val-fraction or --split-file, not both")


def _order_images(images: Path, captions, groups: dict[str, list[str]], seed: int) -> tuple[list[str], dict[str, str], list[str]]:
    """The listed images that exist, in a seeded shuffle; their keys (from the file order, so
    stable); and the names of the missing ones."""
    present, missing = [], []
    for name in groups:
        (present if (images / name).is_file() else missing).append(name)
    if not present:
        raise ValueError(
            f"none of the {len(groups)} images named in {captions} exist under {images} "
            f"(first: {missing[0]!r}); check --images"
        )
    used: set[str] = set()
    keys = {name: _make_key(name, used) for name in present}
    order = list(present)
    random.Random(seed).shuffle(order)
    return order, keys, missing


def _write_samples(order, results, groups, keys, split_of, writers) -> dict:
    """Write one sample per readable image; returns counts and the unreadable images."""
    n_samples: Counter = Counter()
    n_captions, reencoded, unreadable = 0, 0, []
    for name, result in zip(order, results):
        if result[0] != "ok":
            unreadable.append({"image": name, "error": result[1]})
            continue
        _, data, w, h, was_reencoded = result
        split = split_of[name]
        writers[split].write({
            "__key__": keys[name],
            "jpg": data,
            "txt": groups[name][0],
            "json": {"captions": groups[name], "image": name, "width": w, "height": h},
        })
        n_samples[split] += 1
        n_captions += len(groups[name])
        reencoded += was_reencoded
    return {"samples": n_samples, "captions": n_captions, "reencoded": reencoded, "unreadable": unreadable}


def _assign_splits(order: list[str], val_fraction: float, val_names: set[str] | None) -> dict[str, str]:
    if val_names is not None:
        return {n: "val" if (n in val_names or os.path.basename(n) in val_names) else "train" for n in order}
    n_val = round(len(order) * val_fraction)
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    return {n: "val" if i < n_val else "train" for i, n in enumerate(order)}


def _check_out(out: Path, patterns: dict[str, str], overwrite: bool) -> None:
    old = sorted(f for p in patterns.values() for f in glob.glob(str(out / _pattern_glob(p))))
    if old and not overwrite:
        raise FileExistsError(f"{out} already holds shards ({os.path.basename(old[0])}, ...); pass --overwrite or pick another --out")
    for f in old:
        os.remove(f)


def _map_jobs(jobs, workers: int, total: int, progress: bool):
    """``_encode_image`` over jobs, in order, in ``workers`` processes, with a progress bar."""
    from tqdm import tqdm

    bar = tqdm(total=total, unit="img", desc="make-shards", disable=not progress, smoothing=0.1)
    if workers <= 1:
        for job in jobs:
            yield _encode_image(job)
            bar.update()
    else:
        import multiprocessing as mp

        with mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(workers) as pool:
            for result in pool.imap(_encode_image, jobs, chunksize=8):
                yield result
                bar.update()
    bar.close()


# --------------------------------------------------------------------------- command line

EXAMPLE = """example:
  groupseg make-shards --images data/flickr8k/images \\
      --captions data/flickr8k/Flickr8k.token.txt --out shards/flickr8k \\
      --resize 256 --shard-size 1000 --split-file data/flickr8k/Flickr_8k.devImages.txt

  writes shards/flickr8k/train-000000.tar ..., val-000000.tar ... and stats.json
"""


def add_make_shards_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``make-shards`` options to an (sub)parser and return it."""
    parser.description = parser.description or "Write webdataset shards from a folder of images and a captions file."
    if parser.epilog is None:
        parser.epilog = EXAMPLE
        parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--images", required=True, metavar="DIR", help="folder the image names in the captions file are relative to")
    parser.add_argument("--captions", required=True, metavar="FILE", help="CSV/TSV (image,caption), JSON lines, COCO captions_*.json or Flickr *.token.txt")
    parser.add_argument("--format", default="auto", choices=FORMATS, help="captions file format (default: detect)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder for the shards and stats.json")
    parser.add_argument("--pattern", default=DEFAULT_PATTERN, help="shard names: a %%-pattern with optional {split} ('{split}-%%06d.tar', 'train-%%06d.tar') or a prefix (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=1000, metavar="N", help="samples per shard (default: %(default)s)")
    parser.add_argument("--resize", type=int, default=0, metavar="SHORT_SIDE", help="resize the short side to this many pixels; 0 keeps the size, never upscales (default: %(default)s)")
    parser.add_argument("--jpeg-quality", type=int, default=90, metavar="Q", help="quality of re-encoded JPEGs (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N", help="processes decoding images (default: %(default)s)")
    parser.add_argument("--val-fraction", type=float, default=0.0, metavar="F", help="fraction of images (not captions) in the val split (default: %(default)s)")
    parser.add_argument("--split-file", default=None, metavar="FILE", help="image names of the val split, one a line")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sample order and the val split (default: %(default)s)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards a previous run left in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_make_shards(args: argparse.Namespace) -> int:
    """Run ``make-shards`` from parsed arguments; user errors print one line and return 2."""
    try:
        stats = make_shards(
            args.images, args.captions, args.out, format=args.format, pattern=args.pattern,
            shard_size=args.shard_size, resize=args.resize, jpeg_quality=args.jpeg_quality,
            workers=args.workers, val_fraction=args.val_fraction, split_file=args.split_file,
            seed=args.seed, overwrite=args.overwrite, progress=not args.no_progress,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as exn:
        print(f"groupseg make-shards: error: {exn}", file=sys.stderr)
        return 2
    skipped = ", ".join(f"{n} {why}" for why, n in stats["skipped_counts"].items() if n) or "none"
    for split, url in stats["urls"].items():
        print(f"{split}: {stats['samples'][split]} samples in {stats['shards'][split]} shards: {url}")
    print(f"{stats['images']} images, {stats['captions']} captions; skipped: {skipped}; see {Path(args.out) / 'stats.json'}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_make_shards(add_make_shards_args(argparse.ArgumentParser(prog="make-shards")).parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
