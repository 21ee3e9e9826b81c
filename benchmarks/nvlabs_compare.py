"""Label maps of groupseg's ``--protocol paper`` against NVlabs' own inference code, pixel by pixel.

    python benchmarks/nvlabs_compare.py --nvlabs /path/to/GroupViT-checkout [--images a.jpg b.jpg ...]

Not part of CI, and it contains none of NVlabs' code: it imports their model
(``models/``) and loads ``segmentation/evaluation/group_vit_seg.py`` on its own from the checkout
given, with stand-ins for what that code needs and this machine lacks: the mmcv registry and
``Config``, ``diffdist``, NVlabs' ``utils.get_logger``, and mmseg's ``EncoderDecoder`` base class,
whose slide inference is written out below from mmseg's algorithm (pad-and-add each crop's scores,
divide by the per-pixel crop count, bilinear resize to the image, softmax, argmax). Pixels are
resized as mmcv does it (OpenCV ``INTER_LINEAR``, size by ``mmcv.rescale_size``'s rounding): OpenCV
must be importable (``pip install opencv-python-headless``; ``--extra-path`` adds a folder to
``sys.path`` for it).

The model is NVlabs' GroupViT-S (gcc-yfcc config) with random weights (seeded, logit scale set to
its clamp, 100, so that class probabilities are peaked as in a trained model); groupseg gets the
same weights through its own converter (``groupseg.convert.convert_nvlabs_state_dict``). Each image
is run with the VOC (20 classes, threshold 0.95) and Context (59 classes, threshold 0.35) names of
NVlabs' configs and the ``simple`` template, and once more with the VOC names and no background
(``with_bg=False``, every pixel a class: random weights often leave a crop's best segment without
pixels, and then NVlabs' rule makes the whole crop background). Reported per image and in total:
agreement over all pixels, and over the pixels that either side calls foreground.
"""
from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
import time
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

MEAN = np.array([123.675, 116.28, 103.53], dtype=np.float32)  # mmseg img_norm_cfg of NVlabs' configs
STD = np.array([58.395, 57.12, 57.375], dtype=np.float32)
REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- stand-ins
class _Registry:
    """The part of mmcv's ``Registry`` that NVlabs' model files use."""

    def __init__(self, name: str) -> None:
        self.name, self.modules = name, {}

    def register_module(self, name=None, force=False, module=None):
        def deco(cls):
            self.modules[cls.__name__] = cls
            return cls

        return deco(module) if module is not None else deco

    def build(self, cfg: dict):
        cfg = dict(cfg)
        return self.modules[cfg.pop("type")](**cfg)


class _Config(dict):
    def __getattr__(self, k):
        return self[k]


class _EncoderDecoder(torch.nn.Module):
    """mmseg's ``EncoderDecoder`` test path (slide mode) for a subclass that defines ``encode_decode``."""

    def slide_logits(self, img: torch.Tensor) -> torch.Tensor:
        h_stride, w_stride = self.test_cfg["stride"]
        h_crop, w_crop = self.test_cfg["crop_size"]
        _, _, h_img, w_img = img.shape
        h_grids = max(h_img - h_crop + h_stride - 1, 0) // h_stride + 1
        w_grids = max(w_img - w_crop + w_stride - 1, 0) // w_stride + 1
        preds = img.new_zeros((1, self.num_classes, h_img, w_img))
        count = img.new_zeros((1, 1, h_img, w_img))
        for hi in range(h_grids):
            for wi in range(w_grids):
                y2, x2 = min(hi * h_stride + h_crop, h_img), min(wi * w_stride + w_crop, w_img)
                y1, x1 = max(y2 - h_crop, 0), max(x2 - w_crop, 0)
                out = self.encode_decode(img[:, :, y1:y2, x1:x2], None)
                preds += F.pad(out, (x1, w_img - x2, y1, h_img - y2))
                count[:, :, y1:y2, x1:x2] += 1
        assert (count == 0).sum() == 0
        return preds / count

    def predict(self, img: torch.Tensor, ori_shape: tuple[int, int]) -> np.ndarray:
        logits = F.interpolate(self.slide_logits(img), size=ori_shape, mode="bilinear", align_corners=False)
        return F.softmax(logits, dim=1).argmax(1)[0].numpy()


def load_nvlabs(root: Path):
    """NVlabs' ``models`` package and ``GroupViTSegInference`` class, imported from ``root``."""
    mmcv = types.ModuleType("mmcv")
    mmcv.utils = types.ModuleType("mmcv.utils")
    mmcv.utils.Registry = _Registry
    mmcv.Config = _Config
    omegaconf = types.ModuleType("omegaconf")
    omegaconf.OmegaConf = None
    diffdist = types.ModuleType("diffdist")
    diffdist.functional = types.ModuleType("diffdist.functional")
    mmseg = types.ModuleType("mmseg")
    mmseg.models = types.ModuleType("mmseg.models")
    mmseg.models.EncoderDecoder = _EncoderDecoder
    utils = types.ModuleType("utils")
    utils.get_logger = lambda *a, **k: logging.getLogger("nvlabs")
    sys.modules.update({"mmcv": mmcv, "mmcv.utils": mmcv.utils, "omegaconf": omegaconf, "diffdist": diffdist,
                        "diffdist.functional": diffdist.functional, "mmseg": mmseg, "mmseg.models": mmseg.models,
                        "utils": utils})
    sys.path.insert(0, str(root))
    import models  # NVlabs' models/ package

    spec = importlib.util.spec_from_file_location("nvlabs_group_vit_seg", root / "segmentation" / "evaluation" / "group_vit_seg.py")
    seg_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(seg_mod)
    return models, seg_mod.GroupViTSegInference


def build_nvlabs_model(models, seed: int):
    """GroupViT-S of configs/group_vit_gcc_yfcc_30e.yml with random weights, in eval mode."""
    torch.manual_seed(seed)
    model = models.MultiLabelContrastive(
        img_encoder=dict(type="GroupViT", embed_dim=384, num_heads=[6, 6, 6], depths=[6, 3, 3], num_group_tokens=[64, 8, 0],
                         num_output_groups=[64, 8], drop_rate=0.0, drop_path_rate=0.1),
        text_encoder=dict(type="TextTransformer", context_length=77, width=256, layers=12, vocab_size=49408),
        contrast_temperature=0.07, proj_num_layers=2, output_dim=256, multi_label=3,
    )
    with torch.no_grad():
        model.logit_scale.fill_(float(np.log(100.0)))
    return model.eval()


# ----------------------------------------------------------------------------- reference pipeline
def mmcv_resize(rgb: np.ndarray, scale=(2048, 448)) -> np.ndarray:
    """``Resize(keep_ratio=True)``: mmcv.rescale_size's factor and rounding, OpenCV bilinear."""
    import cv2

    h, w = rgb.shape[:2]
    f = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return cv2.resize(rgb, (int(w * f + 0.5), int(h * f + 0.5)), interpolation=cv2.INTER_LINEAR)


def nvlabs_label_map(seg_model, rgb: np.ndarray) -> np.ndarray:
    x = (mmcv_resize(rgb).astype(np.float32) - MEAN) / STD
    img = torch.from_numpy(x).permute(2, 0, 1)[None].contiguous()
    with torch.no_grad():
        return seg_model.predict(img, rgb.shape[:2])


# ----------------------------------------------------------------------------- comparison
def default_images(tmp: Path) -> list[tuple[str, np.ndarray]]:
    """Real photos of several aspect ratios, plus two made from them: a 4000 px upscale and a panorama."""
    out = []
    for name in ("astronaut.jpg", "cat.jpg", "coffee.jpg", "rocket.jpg"):  # the photos of docs/
        if (REPO / "docs" / name).is_file():
            out.append((name, np.asarray(Image.open(REPO / "docs" / name).convert("RGB"))))
    shared = REPO.parent / "shared" / "data"
    camvid = sorted((shared / "camvid" / "val").glob("*.png"))[:3]
    for p in camvid[:2]:
        out.append((f"camvid/{p.name}", np.asarray(Image.open(p).convert("RGB"))))
    for p in sorted((shared / "flickr8k" / "images").glob("*.jpg"))[:2]:
        out.append((f"flickr8k/{p.name}", np.asarray(Image.open(p).convert("RGB"))))
    if out:
        name, rgb = out[0]
        big = np.asarray(Image.fromarray(rgb).resize((4000, round(4000 * rgb.shape[0] / rgb.shape[1])), Image.BICUBIC))
        out.append((f"{name} upscaled to 4000 px", big))
        out.append((f"{name} portrait crop (upscaled)", np.ascontiguousarray(big[200:3800, 1300:2700])))
    if len(camvid) >= 3:
        pano = np.concatenate([np.asarray(Image.open(p).convert("RGB")) for p in camvid[:3]], axis=1)
        out.append(("camvid panorama 1440x360", pano))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nvlabs", required=True, type=Path, help="a local checkout of github.com/NVlabs/GroupViT")
    ap.add_argument("--images", nargs="*", type=Path, help="photos (default: docs/*.jpg, CamVid, Flickr8k and two made from them)")
    ap.add_argument("--extra-path", action="append", default=[], help="a folder to append to sys.path (e.g. where OpenCV is)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    sys.path.extend(args.extra_path)
    torch.set_num_threads(args.threads)
    import groupseg
    from groupseg.convert import convert_nvlabs_state_dict, nvlabs_config_from_state
    from groupseg.factory import load_state_strict
    from groupseg.prompting import shipped_vocab
    from groupseg.segment import Segmenter

    models, GroupViTSegInference = load_nvlabs(args.nvlabs)
    ref = build_nvlabs_model(models, args.seed)
    sd = convert_nvlabs_state_dict(ref.state_dict())
    ours = groupseg.GroupViT(nvlabs_config_from_state(sd))
    load_state_strict(ours, sd, "random NVlabs weights")
    images = [(p.name, np.asarray(Image.open(p).convert("RGB"))) for p in args.images] if args.images else default_images(Path("."))

    totals = {}
    for bench, vocab, thr in (("voc", "voc", 0.95), ("context", "context", 0.35), ("voc names, no background", "voc", 0.0)):
        names = shipped_vocab(f"{vocab}_groupvit")
        seg = Segmenter(ours, protocol="paper", threshold=thr)
        ids = seg.tokenizer([f"a photo of a {n}." for n in names])  # the simple template, NVlabs' tokens
        with torch.no_grad():
            text = ref.build_text_embedding(ids[:, None, :])
        nv = GroupViTSegInference(ref, text, with_bg=thr > 0,
                                  test_cfg=dict(bg_thresh=thr, mode="slide", stride=(224, 224), crop_size=(448, 448)))
        all_eq = all_n = fg_eq = fg_n = 0
        print(f"\n{bench}: {len(names)} classes, threshold {thr}")
        for name, rgb in images:
            t0 = time.perf_counter()
            a = nvlabs_label_map(nv, rgb)  # with background: 0 = background, c = class c - 1
            t1 = time.perf_counter()
            lm = seg.segment(rgb, names).label_map.astype(np.int64)
            b = np.where(lm == 255, 0, lm + 1) if thr > 0 else lm
            t2 = time.perf_counter()
            fg = (a != 0) | (b != 0) if thr > 0 else np.ones_like(a, dtype=bool)
            eq = a == b
            all_eq, all_n = all_eq + int(eq.sum()), all_n + eq.size
            fg_eq, fg_n = fg_eq + int(eq[fg].sum()), fg_n + int(fg.sum())
            print(f"  {name:<44} {rgb.shape[1]:>4}x{rgb.shape[0]:<4} all {100 * eq.mean():6.2f} %  "
                  f"foreground {100 * eq[fg].mean() if fg.any() else float('nan'):6.2f} % of {100 * fg.mean():5.1f} %  "
                  f"(nvlabs {t1 - t0:.1f} s, groupseg {t2 - t1:.1f} s)")
        totals[bench] = (100 * all_eq / all_n, 100 * fg_eq / max(fg_n, 1), 100 * fg_n / all_n)
        print(f"  {bench} total: all pixels {totals[bench][0]:.3f} % ({all_n - all_eq} of {all_n} differ), foreground pixels "
              f"{totals[bench][1]:.3f} % ({fg_n - fg_eq} of {fg_n} differ; foreground = {totals[bench][2]:.1f} % of pixels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
