"""One picture comparing several models' predictions on the same images.

    python -m groupseg.eval.compare --dataset camvid --data-root ../shared/data/camvid --split val \\
        --pred zero-shot=preds/zs --pred "10 %"=preds/ft10 --pred "100 %"=preds/ft100 \\
        --images 4 --out docs/camvid-finetune-compare.png

Each ``--pred NAME=DIR`` is a folder written by ``groupseg eval --save-predictions DIR``
(``STEM.png``, vocabulary indices, 255 = no class). Rows are images (evenly spaced through the
split, or ``--stems``), columns: image, ground truth, then each model.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from groupseg.viz import read_label_map

from .datasets import DATASETS, load_dataset

THUMB = 240


def compare_picture(ds, preds: list[tuple[str, Path]], stems: Sequence[str], out: str | Path) -> Path:
    """Write the comparison grid; raises ``FileNotFoundError`` naming a missing prediction."""
    from PIL import Image, ImageDraw

    from groupseg.viz import colour_labels, draw_swatches, font, palette, save_quantized

    by_stem = {s.stem: s for s in ds.samples}
    C = ds.num_classes
    pal = np.concatenate([palette(C), [[0, 0, 0], [90, 90, 90]]]).astype(np.uint8)  # + no class, ignore
    off = 1 if ds.background else 0

    def colour(lab: np.ndarray, is_target: bool) -> Image.Image:
        return Image.fromarray(colour_labels(pal, lab, C, is_target))

    rows = []
    for stem in stems:
        if stem not in by_stem:
            raise FileNotFoundError(f"{stem}: not an image of {ds.name} {ds.root}")
        s = by_stem[stem]
        target = ds.load_target(s)
        h, w = target.shape
        tw, th = THUMB, max(1, round(h * THUMB / w))
        cells = [Image.open(s.image).convert("RGB").resize((tw, th), Image.BILINEAR),
                 colour(target, True).resize((tw, th), Image.NEAREST)]
        for name, d in preds:
            f = Path(d) / f"{stem}.png"
            if not f.exists():
                raise FileNotFoundError(f"prediction {f} not found (written by groupseg eval --save-predictions {d})")
            p = read_label_map(f).astype(np.int64)
            bg = p == 255
            p = p + off
            p[bg] = 0 if ds.background else -1  # background class, or "no class"
            cells.append(colour(p, False).resize((tw, th), Image.NEAREST))
        rows.append(cells)
    titles = ["image", "ground truth"] + [n for n, _ in preds]
    pad, head = 4, 20
    ncol = len(titles)
    th = rows[0][0].height if rows else 0
    per_line = max(1, (ncol * (THUMB + pad)) // 150)
    legend_h = 18 * -(-C // per_line) + 8
    canvas = Image.new("RGB", (ncol * (THUMB + pad) + pad, head + len(rows) * (th + pad) + legend_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, t in enumerate(titles):
        draw.text((pad + i * (THUMB + pad), 3), t[:30], fill="black", font=font(13))
    y = head
    for cells in rows:
        for i, c in enumerate(cells):
            canvas.paste(c, (pad + i * (THUMB + pad), y))
        y += th + pad
    draw_swatches(draw, [(pal[c], ds.classes[c]) for c in range(C)], y, ncol * (THUMB + pad))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_quantized(canvas, out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="groupseg.eval.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=list(DATASETS))
    p.add_argument("--data-root", required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--vocab-file")
    p.add_argument("--pred", action="append", required=True, metavar="NAME=DIR", help="a model's saved predictions")
    p.add_argument("--images", type=int, default=4, help="rows, evenly spaced through the split")
    p.add_argument("--stems", default="", help="comma-separated image stems instead of --images")
    p.add_argument("--out", required=True, help="PNG to write")
    args = p.parse_args(argv)
    try:
        ds = load_dataset(args.dataset, args.data_root, args.split, args.vocab_file)
        preds = []
        for item in args.pred:
            if "=" not in item:
                raise ValueError(f"--pred {item!r}: expected NAME=DIR")
            name, d = item.split("=", 1)
            preds.append((name, Path(d)))
        if args.stems:
            stems = [s.strip() for s in args.stems.split(",") if s.strip()]
        else:
            n = max(1, min(args.images, len(ds.samples)))
            stems = [ds.samples[int(i)].stem for i in np.linspace(0, len(ds.samples) - 1, n).round()]
        print(compare_picture(ds, preds, stems, args.out))
    except (ValueError, FileNotFoundError) as e:
        print(f"groupseg.eval.compare: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
