"""Pictures of the learned groups, as the GroupViT paper shows them (its figures 6-7)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .classify import class_logits
from .segment import Segmenter
from .transforms import ImageLike, load_image, target_size, to_tensor
from .viz import font, palette


@torch.no_grad()
def stage_partitions(seg: Segmenter, image: ImageLike) -> tuple[Image.Image, list[np.ndarray], torch.Tensor]:
    """Hard group index per pixel after each grouping stage (chained), at the image's size.

    Returns the RGB image, one (H, W) int map per stage, and the final group embeddings (G, D).
    """
    img = load_image(image)
    W0, H0 = img.size
    cfg = seg.cfg
    h, w = target_size(H0, W0, seg.short_side, cfg.vision.patch_size)
    g = seg.model.encode_groups(to_tensor(img, (h, w), cfg.image_mean, cfg.image_std)[None].to(seg.device))
    maps, chain = [], None
    for a in g["assignments"]:  # (1, G_i, N_{i-1}), softmax over G_i
        chain = a if chain is None else a @ chain  # soft chain onto the patches
        grid = chain.reshape(1, chain.shape[1], *g["grid"]).float()
        up = F.interpolate(grid, size=(H0, W0), mode="bilinear", align_corners=False)
        maps.append(up[0].argmax(0).cpu().numpy())
    return img, maps, g["group_embeds"][0].float()


def groups_picture(seg: Segmenter, image: ImageLike, vocab: str | Sequence[str] | None = None, alpha: float = 0.6) -> Image.Image:
    """Image | stage-1 groups | stage-2 groups ..., one colour per group; with a vocabulary the
    final groups carry the word each is given."""
    img, maps, groups = stage_partitions(seg, image)
    base = np.asarray(img, dtype=np.float32)
    panels = [img]
    for i, m in enumerate(maps):
        pal = palette(int(m.max()) + 1).astype(np.float32)
        panel = Image.fromarray((base * (1 - alpha) + pal[m] * alpha).clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(panel, "RGBA")
        size = max(9, min(panel.size) // 22)
        fnt = font(size)
        draw.text((4, 2), f"stage {i + 1}: {len(np.unique(m))} groups", fill=(255, 255, 255), font=fnt, stroke_width=2, stroke_fill=(0, 0, 0))
        if vocab is not None and i == len(maps) - 1:
            labels, text, owner = seg.class_embeddings(vocab)
            best = class_logits(groups, text, owner, len(labels), 1.0).argmax(-1).cpu()  # a class per group
            for gi in np.unique(m):
                ys, xs = np.nonzero(m == gi)
                cy, cx = int(np.median(ys)), int(np.median(xs))
                draw.text((cx, cy), labels[int(best[gi])], fill=(255, 255, 255), font=fnt, anchor="mm",
                          stroke_width=2, stroke_fill=(0, 0, 0))
        panels.append(panel)
    W, H = img.size
    out = Image.new("RGB", (W * len(panels) + 4 * (len(panels) - 1), H), (255, 255, 255))
    for k, p in enumerate(panels):
        out.paste(p, (k * (W + 4), 0))
    return out


def save_groups(seg: Segmenter, image: ImageLike, out_dir: str | Path, vocab=None, stem: str | None = None) -> Path:
    """Write ``OUT/STEM_groups.png``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = stem or (Path(image).stem if isinstance(image, (str, Path)) else "image")
    path = out_dir / f"{stem}_groups.png"
    groups_picture(seg, image, vocab).save(path)
    return path
