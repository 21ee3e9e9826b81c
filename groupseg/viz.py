"""Pictures and label-map files in one place: palette, font, overlay legend, label-map PNGs,
the evaluation gallery and confusion-matrix pictures.

>>> palette(3).tolist()
[[230, 25, 75], [60, 180, 75], [255, 225, 25]]
"""
from __future__ import annotations

import colorsys
import heapq
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

_BASE = [
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255),
    (170, 110, 40), (255, 250, 200), (128, 0, 0), (170, 255, 195), (128, 128, 0), (255, 215, 180),
    (0, 0, 128), (128, 128, 128),
]
THUMB_WIDTH = 320


def palette(n: int) -> np.ndarray:
    """``n`` distinct RGB colours (uint8, (n, 3)): a fixed 20-colour table, then golden-ratio hues."""
    cols = _BASE[:n]
    for i in range(len(cols), n):
        h = (i * 0.618033988749895) % 1.0
        r, g, b = colorsys.hsv_to_rgb(h, 0.65 + 0.35 * ((i // 7) % 2), 0.95 - 0.3 * ((i // 3) % 2))
        cols.append((int(r * 255), int(g * 255), int(b * 255)))
    return np.array(cols, dtype=np.uint8).reshape(-1, 3)


def font(size: int) -> ImageFont.ImageFont:
    """PIL's default font at ``size`` points (a fixed-size bitmap font on Pillow < 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_legend(img: Image.Image, lines: list[tuple[np.ndarray | None, str]]) -> None:
    """Draw (colour, text) lines in a dark box at the top left of ``img``; long lists end in "+N more"."""
    if not lines:
        return
    w, h = img.size
    size = max(8, min(w, h) // 28)
    fnt = font(size)
    max_lines = max(1, (h - 2 * size) // (size + 4))
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [(None, f"+{len(lines) - max_lines + 1} more")]
    draw = ImageDraw.Draw(img, "RGBA")
    text_w = max(draw.textlength(t, font=fnt) for _, t in lines)
    box_w, box_h = int(text_w + size * 2.2), int(len(lines) * (size + 4) + 6)
    draw.rectangle([2, 2, 2 + box_w, 2 + box_h], fill=(0, 0, 0, 150))
    for k, (c, t) in enumerate(lines):
        y = 5 + k * (size + 4)
        if c is not None:
            draw.rectangle([6, y, 6 + size, y + size], fill=tuple(int(v) for v in c))
        draw.text((10 + size, y - 1), t, fill=(255, 255, 255), font=fnt)


# ----------------------------------------------------------------------------- label-map files
def save_label_map(label_map: np.ndarray, background: int, path: str | Path, num_classes: int | None = None) -> Path:
    """Class indices as PNG: 8-bit with 255 = background, or 16-bit with 65535 for >= 255 classes.

    Args:
        label_map: (H, W) class indices; ``background`` marks background.
        background: the map's background value (255 or -1).
        path: PNG to write (folders are made).
        num_classes: forces 8 bits when known to be < 255 (a wide int map of few classes).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wide = label_map.dtype != np.uint8 and (num_classes is None or num_classes >= 255 or label_map.max(initial=0) >= 255)
    bg = label_map == background
    out = np.where(bg, 65535, label_map).astype(np.uint16) if wide else np.where(bg, 255, label_map).astype(np.uint8)
    Image.fromarray(out).save(path)
    return path


def read_label_map(path: str | Path) -> np.ndarray:
    """A label PNG as stored: palette / grey / 16-bit -> (H, W) indices (never RGB-converted);
    RGB -> (H, W, 3)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"label map not found: {path}")
    with Image.open(path) as im:
        if im.mode in ("P", "L", "I;16", "I;16B", "I;16L", "I"):
            return np.asarray(im).copy()
        if im.mode in ("RGB", "RGBA"):
            return np.asarray(im.convert("RGB")).copy()
        raise ValueError(f"{path}: unsupported label image mode {im.mode}")


# ----------------------------------------------------------------------------- evaluation pictures
def class_colours(num_classes: int, background: bool) -> np.ndarray:
    """Colours of metric classes 0..C-1, then "no class" (black) and "ignored" (grey)."""
    pal = palette(num_classes).astype(np.uint8)
    if background:
        pal[0] = (0, 0, 0)
    return np.concatenate([pal, [[0, 0, 0], [90, 90, 90]]]).astype(np.uint8)


def colour_labels(pal: np.ndarray, lab: np.ndarray, num_classes: int, is_target: bool) -> np.ndarray:
    """(H, W) metric labels -> RGB; outside 0..C-1 is grey in a target (ignored), black in a prediction."""
    idx = np.where((lab >= 0) & (lab < num_classes), lab, num_classes + 1 if is_target else num_classes)
    return pal[idx]


class Gallery:
    """Keeps thumbnails of the ``n`` best and ``n`` worst images by per-image mIoU (bounded memory).

    Args:
        classes: metric class names.
        background: metric class 0 is background (drawn black).
        n: images kept at each end.
    """

    def __init__(self, classes: Sequence[str], background: bool = False, n: int = 3) -> None:
        self.classes, self.n = list(classes), n
        self._best: list = []  # min-heap of (miou, order, stem, thumbs)
        self._worst: list = []  # min-heap of (-miou, ...)
        self._count = 0
        self.pal = class_colours(len(self.classes), background)

    @staticmethod
    def pick(scored: list[tuple[float, str]], n: int = 3) -> list[tuple[float, str]]:
        """The n best, then the n worst (not already among the best) of (score, stem) pairs; NaN skipped."""
        ok = sorted((x for x in scored if not math.isnan(x[0])), key=lambda x: -x[0])
        best = ok[:n]
        return best + [x for x in ok[::-1][:n] if x not in best]

    def _thumbs(self, rgb: np.ndarray, target: np.ndarray, pred: np.ndarray):
        h, w = target.shape
        tw = min(THUMB_WIDTH, w)
        th = max(1, round(h * tw / w))
        C = len(self.classes)
        img = Image.fromarray(rgb).resize((tw, th), Image.BILINEAR)
        gt = Image.fromarray(colour_labels(self.pal, target, C, True)).resize((tw, th), Image.NEAREST)
        pr = Image.fromarray(colour_labels(self.pal, pred, C, False)).resize((tw, th), Image.NEAREST)
        present = set(np.unique(target).tolist()) | set(np.unique(pred).tolist())
        return img, gt, pr, {c for c in present if 0 <= c < C}

    def add(self, miou: float, stem: str, rgb: np.ndarray, target: np.ndarray, pred: np.ndarray) -> None:
        """Offer one image (its mIoU, RGB, metric-space target and prediction)."""
        if math.isnan(miou):
            return
        self._count += 1
        thumbs = None
        for heap, key in ((self._best, miou), (self._worst, -miou)):
            if len(heap) < self.n or (key, self._count) > heap[0][:2]:
                thumbs = thumbs or self._thumbs(rgb, target, pred)
                entry = (key, self._count, stem, thumbs)
                (heapq.heappush if len(heap) < self.n else heapq.heapreplace)(heap, entry)

    def rows(self) -> list[tuple[float, str, tuple]]:
        best = sorted(((k, s, t) for k, _, s, t in self._best), key=lambda r: -r[0])
        names = {s for _, s, _ in best}
        worst = sorted(((-k, s, t) for k, _, s, t in self._worst if s not in names), key=lambda r: r[0])
        return best + worst

    def save(self, path: str | Path) -> None:
        """Write the picture: a header per row (stem, mIoU), image / truth / prediction, and a legend."""
        rows = self.rows()
        fnt = font(13)
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        if not rows:
            img = Image.new("RGB", (3 * THUMB_WIDTH, 40), "white")
            ImageDraw.Draw(img).text((8, 12), "no image with labelled pixels", fill="black", font=fnt)
            img.save(p)
            return
        pad, head = 4, 20
        col_w = max(t[0].width for _, _, t in rows)
        present = sorted(set().union(*(t[3] for _, _, t in rows)))
        H = head + sum(head + t[0].height + pad for _, _, t in rows)
        legend = _legend_height(len(present), 3 * (col_w + pad))
        canvas = Image.new("RGB", (3 * (col_w + pad) + pad, H + legend), "white")
        draw = ImageDraw.Draw(canvas)
        for i, title in enumerate(("image", "ground truth", "prediction")):
            draw.text((pad + i * (col_w + pad), 3), title, fill="black", font=fnt)
        y = head
        for k, (score, stem, (img, gt, pr, _)) in enumerate(rows):
            tag = "best" if k < min(self.n, len(self._best)) else "worst"
            draw.text((pad, y + 3), f"{tag}: {stem}  mIoU {100 * score:.1f}%", fill="black", font=fnt)
            y += head
            for i, t in enumerate((img, gt, pr)):
                canvas.paste(t, (pad + i * (col_w + pad), y))
            y += img.height + pad
        draw_swatches(draw, [(self.pal[c], self.classes[c]) for c in present], y, 3 * (col_w + pad))
        save_quantized(canvas, p)


def _legend_height(n: int, width: int) -> int:
    per_line = max(1, width // 150)
    return 18 * math.ceil(n / per_line) + 8 if n else 0


def draw_swatches(draw: ImageDraw.ImageDraw, items: list[tuple[np.ndarray, str]], y: int, width: int, pad: int = 4) -> None:
    """A legend of colour squares and names below a picture, 150 px per entry."""
    per_line = max(1, width // 150)
    fnt = font(13)
    for j, (colour, name) in enumerate(items):
        x0, y0 = pad + (j % per_line) * 150, y + 4 + 18 * (j // per_line)
        draw.rectangle([x0, y0, x0 + 12, y0 + 12], fill=tuple(int(v) for v in colour), outline="black")
        draw.text((x0 + 16, y0 - 1), name[:18], fill="black", font=fnt)


def save_quantized(img: Image.Image, path: str | Path) -> None:
    """A flat-colour picture as a 256-colour PNG (about 3x smaller)."""
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def plot_confusion(mat, classes: Sequence[str], path: str | Path, title: str = "") -> None:
    """Row-normalised confusion matrix (rows = truth, columns = prediction) with class names on the axes.

    Args:
        mat: (C, C + 1) counts as in ``ConfusionMatrix.mat`` (last column: predictions of no class).
        classes: the C class names.
        path: PNG to write.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = mat.double().cpu().numpy() if hasattr(mat, "cpu") else np.asarray(mat, dtype=np.float64)
    C = len(classes)
    labels_x = list(classes)
    if m.shape[1] > C and m[:, C].sum() == 0:
        m = m[:, :C]
    elif m.shape[1] > C:
        labels_x.append("(none)")
    rows = m.sum(1, keepdims=True)
    norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
    size = float(np.clip(3 + 0.2 * C, 5, 24))
    fig = Figure(figsize=(size * m.shape[1] / C, size), dpi=100 if C <= 60 else 72)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    if C <= 200:
        fs = 9 if C <= 25 else (6 if C <= 80 else 4)
        ax.set_xticks(range(len(labels_x)), labels_x, rotation=90, fontsize=fs)
        ax.set_yticks(range(C), classes, fontsize=fs)
    if C <= 25:
        for i in range(C):
            for j in range(norm.shape[1]):
                if norm[i, j] >= 0.005:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=7,
                            color="black" if norm[i, j] > 0.6 else "white")
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title(title or "confusion matrix (rows sum to 1)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
