"""Image loading and inference preprocessing."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

ImageLike = Union[str, Path, Image.Image, np.ndarray, torch.Tensor]


class ImageError(ValueError):
    """An input image that cannot be used; the message names it and the problem."""


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    arr = arr.astype(np.float64)
    if np.issubdtype(arr.dtype, np.floating) and arr.size and arr.max() <= 1.0 and arr.min() >= 0.0:
        arr = arr * 255.0  # float images in [0, 1]
    else:
        hi = arr.max() if arr.size else 1.0
        arr = arr * (255.0 / hi) if hi > 255 else arr  # 16-bit and other wide ranges: scale to 8 bits
    return np.clip(np.rint(arr), 0, 255).astype(np.uint8)


def _pil_to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img))).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # transparent -> white
    return img.convert("RGB")  # L, P, CMYK, YCbCr, 1, ...


def load_image(image: ImageLike, name: str | None = None) -> Image.Image:
    """Any supported input -> an RGB ``PIL.Image``, EXIF orientation applied.

    Accepts a path, a PIL image, an (H, W) / (H, W, 3|4) array (uint8, uint16 or float
    in [0, 1]) or a (3, H, W) tensor. Raises ``FileNotFoundError`` or ``ImageError``
    with a one-line message naming the image.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        label = name or str(path)
        if not path.exists():
            raise FileNotFoundError(f"image not found: {label}")
        if path.is_dir():
            raise ImageError(f"{label}: is a directory, not an image")
        try:
            with Image.open(path) as im:
                im = ImageOps.exif_transpose(im)
                im.load()
                return _pil_to_rgb(im)
        except Image.DecompressionBombError:
            raise ImageError(f"{label}: image too large for PIL's safety limit (Image.MAX_IMAGE_PIXELS)") from None
        except UnidentifiedImageError:
            raise ImageError(f"{label}: not a readable image file") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{label}: unreadable or truncated image ({e})") from None
    label = name or "image"
    if isinstance(image, Image.Image):
        return _pil_to_rgb(ImageOps.exif_transpose(image))
    if isinstance(image, torch.Tensor):
        t = image.detach().cpu()
        if t.ndim == 4 and t.shape[0] == 1:
            t = t[0]
        if t.ndim != 3 or t.shape[0] not in (1, 3, 4):
            raise ImageError(f"{label}: tensor of shape {tuple(t.shape)} is not (C, H, W) with C in 1, 3, 4")
        image = t.permute(1, 2, 0).numpy()
    if isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)) or 0 in arr.shape:
            raise ImageError(f"{label}: array of shape {arr.shape} is not an (H, W) or (H, W, 3|4) image")
        arr = _to_uint8(arr)
        return _pil_to_rgb(Image.fromarray(arr))
    raise ImageError(f"{label}: unsupported image type {type(image).__name__}")


def target_size(height: int, width: int, short_side: int, multiple: int) -> tuple[int, int]:
    """Resize so the short side is ``short_side``, both sides rounded to a multiple of ``multiple``."""
    scale = short_side / min(height, width)
    h = max(multiple, int(round(height * scale / multiple)) * multiple)
    w = max(multiple, int(round(width * scale / multiple)) * multiple)
    return h, w


def to_tensor(img: Image.Image, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """RGB PIL -> normalised (3, H, W) float tensor at ``size`` (antialiased resize on uint8)."""
    from torchvision.transforms.v2 import functional as TF

    t = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    if tuple(t.shape[1:]) != tuple(size):
        t = TF.resize(t, list(size), antialias=True)
    return normalize_pixels(t, mean, std)


def normalize_pixels(pixels: torch.Tensor, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 pixels in 0..255, (3, H, W) or (B, 3, H, W) -> ``(x / 255 - mean) / std`` as ``dtype``,
    on ``pixels.device`` (torchvision's ``ToTensor`` + ``Normalize``). The one pixel normalisation
    of the project: inference, training batches and fine-tuning crops all call it.

    Args:
        pixels: uint8 (or already float 0..255) RGB pixels, channels first.
        mean: per-channel mean on the 0..1 scale (a sequence or a tensor of 3).
        std: per-channel standard deviation on the 0..1 scale.
        dtype: output dtype (computed in float32).

    >>> normalize_pixels(torch.full((3, 1, 1), 255, dtype=torch.uint8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)).flatten().tolist()
    [1.0, 1.0, 1.0]
    """
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=pixels.device).view(3, 1, 1)
    out = pixels.to(torch.float32, copy=True).div_(255.0).sub_(mean_t).div_(std_t)  # never in place on the input
    return out if dtype == torch.float32 else out.to(dtype)


def keep_ratio_size(height: int, width: int, scale: tuple[int, int] = (2048, 448)) -> tuple[int, int]:
    """mmcv's keep-ratio rescale (``Resize(keep_ratio=True)``, ``mmcv.rescale_size``): the largest
    size whose long side is at most ``max(scale)`` and short side at most ``min(scale)``, each side
    rounded half up (``int(x * f + 0.5)``), not to a patch multiple. Returns (height, width).

    >>> keep_ratio_size(375, 500)  # a VOC photo: the short side becomes 448
    (448, 597)
    >>> keep_ratio_size(400, 4000)  # a panorama: the long side is capped at 2048
    (205, 2048)
    """
    f = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * f + 0.5), int(width * f + 0.5)


def _linear_taps(n_in: int, n_out: int, clamp_weights: bool) -> tuple[torch.Tensor, ...]:
    """Source indices and 11-bit fixed-point weights of each output position, as OpenCV's
    ``INTER_LINEAR`` computes them: columns clamp their weights at the borders, rows only their
    indices (a border row mixes a row with itself, with the weights of its position)."""
    f = ((np.arange(n_out, dtype=np.float64) + 0.5) * (n_in / n_out) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f = (f - s).astype(np.float32)
    if clamp_weights:
        f[s < 0], s[s < 0] = 0, 0
        f[s >= n_in - 1], s[s >= n_in - 1] = 0, n_in - 1
    w0, w1 = np.rint((np.float32(1) - f) * 2048), np.rint(f * 2048)
    return (torch.from_numpy(np.clip(s, 0, n_in - 1)), torch.from_numpy(np.clip(s + 1, 0, n_in - 1)),
            torch.from_numpy(w0.astype(np.int64)), torch.from_numpy(w1.astype(np.int64)))


def resize_bilinear(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """RGB -> (height, width) exactly as mmcv's default resize (OpenCV ``cv2.resize``,
    ``INTER_LINEAR``, uint8): bilinear on pixel centres, no antialiasing, OpenCV's fixed-point
    arithmetic (11-bit weights, a horizontal then a vertical pass with its rounding), so the
    pixels match bit for bit. Used by the paper protocol."""
    H, W = size
    if (img.height, img.width) == (H, W):
        return img
    src = torch.from_numpy(np.asarray(img, dtype=np.uint8).astype(np.int64))  # (h, w, 3)
    x0, x1, a0, a1 = _linear_taps(img.width, W, True)
    y0, y1, b0, b1 = _linear_taps(img.height, H, False)
    rows = src[:, x0] * a0[None, :, None] + src[:, x1] * a1[None, :, None]  # (h, W, 3), scaled by 2048
    out = (((rows[y0] >> 4) * b0[:, None, None]) >> 16) + (((rows[y1] >> 4) * b1[:, None, None]) >> 16)
    return Image.fromarray(((out + 2) >> 2).clamp_(0, 255).to(torch.uint8).numpy())


def sliding_windows(height: int, width: int, window: int, stride: int) -> list[tuple[int, int]]:
    """Top-left corners of windows covering an (height, width) image, mmseg's slide placement:
    starts every ``stride`` pixels, the last window flush with the far edge, one window (the whole
    side) where the side is not longer than ``window``.

    >>> sliding_windows(448, 597, 448, 224)
    [(0, 0), (0, 149)]
    """
    def starts(n: int) -> list[int]:
        if n <= window:
            return [0]
        k = math.ceil((n - window) / stride) + 1
        return sorted({min(i * stride, n - window) for i in range(k)})

    return [(y, x) for y in starts(height) for x in starts(width)]


def _bilinear_taps(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (i0, i1) and weight of i1 of each output position, as ``F.interpolate``
    (bilinear, align_corners=False) computes them."""
    scale = n_in / n_out
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_min(0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    return i0, i1, src - i0


def resize_bilinear_argmax(scores: torch.Tensor, size: tuple[int, int], max_elements: int = 1 << 26) -> torch.Tensor:
    """``F.interpolate(scores, size, bilinear).argmax(0)`` for (C, h, w) scores, computed in bands of
    output rows so that large images with many classes stay within ``max_elements`` floats."""
    C, h, w = scores.shape
    H, W = size
    if C * H * W <= max_elements:
        return F.interpolate(scores[None].float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)
    y0, y1, wy = _bilinear_taps(h, H)
    cols = F.interpolate(scores[None].float(), size=(h, W), mode="bilinear", align_corners=False)[0]  # (C, h, W)
    out = torch.empty(H, W, dtype=torch.long)
    band = max(1, max_elements // (C * W))
    for r in range(0, H, band):
        a, b, t = cols[:, y0[r : r + band]], cols[:, y1[r : r + band]], wy[r : r + band, None]
        out[r : r + band] = (a + (b - a) * t).argmax(0)
    return out


def resize_nearest(labels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest-neighbour resize of an (H, W) integer map."""
    if tuple(labels.shape) == tuple(size):
        return labels
    return F.interpolate(labels[None, None].float(), size=size, mode="nearest")[0, 0].to(labels.dtype)
