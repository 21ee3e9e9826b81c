"""Readers for the standard segmentation benchmarks, in the layouts their releases unpack to.

Each reader returns a ``SegDataset``: the word list given to the model (``vocab``), the
samples ``(image path, label path or array, stem)``, and how a label file becomes the target
the metrics count. Targets live in *metric space*: when a benchmark scores a background class
(``background=True``: VOC, Pascal Context, COCO-Object, ImageNet-S), metric class 0 is the
background, which the model predicts where no class passes the threshold, and metric class
``i + 1`` is vocabulary class ``i``; otherwise metric class ``i`` is vocabulary class ``i``.
Pixels equal to ``ignore_index`` (or outside the classes) are not counted.

>>> ds = load_dataset("camvid", "/data/camvid", split="val")  # doctest: +SKIP
>>> ds.classes[:3], len(ds)  # doctest: +SKIP
(['sky', 'building', 'pole'], 101)
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
from PIL import Image

from groupseg.prompting import normalize_vocab, parse_class, read_vocab_file, shipped_vocab
from groupseg.viz import read_label_map as read_label  # noqa: F401 - label PNGs are read in one place

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"}

# GroupViT's background thresholds (NVlabs configs: bg_thresh of pascal_voc12, pascal_context, coco).
VOC_THRESHOLD = 0.95
CONTEXT_THRESHOLD = 0.35
COCO_OBJECT_THRESHOLD = 0.95
IMAGENET_S_THRESHOLD = 0.5  # no published value: a middle guess, tune it on the validation split


class Sample(NamedTuple):
    image: Path
    label: Path | np.ndarray  # a label file or an already decoded (H, W) array
    stem: str


@dataclass
class SegDataset:
    """One benchmark split.

    Attributes:
        name: dataset name as given to ``load_dataset``.
        root: the folder the files were found in.
        vocab: class entries given to the model, in label order (synonyms with ``;``).
        samples: the images with their labels, sorted.
        ignore_index: target value that is not counted.
        background: metric class 0 is a background class predicted by threshold.
        default_threshold: background threshold used when none is given.
        decode: raw label array -> metric-space target (identity when ``None``).
        paper_vocab: the class names NVlabs' GroupViT evaluation uses for this benchmark
            (``prompts/vocab/*_groupvit.txt``), for ``--protocol paper``; ``None`` when it has none.
    """

    name: str
    root: Path
    vocab: list[str]
    samples: list[Sample]
    ignore_index: int = 255
    background: bool = False
    default_threshold: float = 0.0
    decode: Callable[[np.ndarray], np.ndarray] | None = field(default=None, repr=False)
    paper_vocab: list[str] | None = field(default=None, repr=False)

    @property
    def labels(self) -> list[str]:
        """The model's class names (first name of each vocabulary entry)."""
        return [parse_class(e)[0] for e in self.vocab]

    @property
    def classes(self) -> list[str]:
        """Metric-space class names: ``background`` first when the benchmark scores it."""
        return (["background"] + self.labels) if self.background else self.labels

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    def load_target(self, sample: Sample) -> np.ndarray:
        """(H, W) int64 target in metric space."""
        raw = sample.label if isinstance(sample.label, np.ndarray) else read_label(sample.label)
        if self.decode is not None:
            raw = self.decode(raw)
        if raw.ndim != 2:
            raise ValueError(f"{sample.label}: label map of shape {raw.shape} is not single-channel")
        return raw.astype(np.int64)

    def to_metric(self, label_map: np.ndarray, background_value: int) -> np.ndarray:
        """A model label map (vocabulary indices, ``background_value`` = no class) -> metric space."""
        lm = label_map.astype(np.int64)
        bg = lm == background_value
        if self.background:
            lm = lm + 1
            lm[bg] = 0
        else:
            lm[bg] = -1  # counted as a miss
        return lm


def read_rgb(path: Path) -> np.ndarray:
    """An image as stored (no EXIF rotation: labels follow the stored pixel grid) -> (H, W, 3) uint8."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"image not found: {path}")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).copy()


# ----------------------------------------------------------------------------- helpers
def _find(root: Path, candidates: Sequence[str], marker: str, what: str) -> Path:
    """The first ``root / candidate`` holding ``marker``; else a one-line FileNotFoundError."""
    for c in candidates:
        d = root / c
        if (d / marker).exists():
            return d
    expected = root / candidates[0]
    raise FileNotFoundError(f"{what} not found: expected the folder {expected / marker} (check --data-root)")


def _need_dir(d: Path, what: str) -> Path:
    if not d.is_dir():
        raise FileNotFoundError(f"{what} not found: expected the folder {d}")
    return d


def _split_ids(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"split list not found: expected the file {path} (check --split)")
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _with_label_suffix(label_dir: Path, suffix: str, image_dir: Path, image_ext: str) -> list[Sample]:
    """Samples from label files ``STEM{suffix}`` and images ``STEM{image_ext}`` (recursively)."""
    out = []
    for lab in sorted(label_dir.rglob(f"*{suffix}")):
        stem = lab.name[: -len(suffix)]
        rel = lab.parent.relative_to(label_dir)
        out.append(Sample(image_dir / rel / f"{stem}{image_ext}", lab, stem))
    if not out:
        raise FileNotFoundError(f"no label maps matching *{suffix} in {label_dir}")
    return out


def _shift_down(raw: np.ndarray) -> np.ndarray:
    """Labels 1..C -> 0..C-1; 0 and 255 -> 255 (ADE20K's 'other', VOC / Context without background)."""
    lab = raw.astype(np.int64)
    return np.where((lab == 0) | (lab == 255), 255, lab - 1)


def _cap(num_classes: int) -> Callable[[np.ndarray], np.ndarray]:
    """Values >= num_classes -> 255 (e.g. CamVid's 11 = unlabelled)."""

    def decode(raw: np.ndarray) -> np.ndarray:
        lab = raw.astype(np.int64)
        return np.where(lab >= num_classes, 255, lab)

    return decode


def _vocab(name: str, override: Sequence[str] | None, count: int) -> list[str]:
    """A shipped vocabulary, or the user's replacement of it (same number of classes, same order)."""
    vocab = normalize_vocab(override if override is not None else shipped_vocab(name))
    if len(vocab) != count:
        src = "--vocab-file" if override is not None else f"prompts/vocab/{name}.txt"
        raise ValueError(f"{src} has {len(vocab)} classes; this benchmark has {count}, one per line in label order")
    return vocab


# ----------------------------------------------------------------------------- readers
def voc(root: Path, split: str = "val", vocab: Sequence[str] | None = None, with_background: bool = True) -> SegDataset:
    """Pascal VOC 2012: ``VOCdevkit/VOC2012/{JPEGImages, SegmentationClass, ImageSets/Segmentation}``.

    With background: 21 metric classes, label 0 = background (threshold), 255 ignored.
    Without (``voc20``): labels 1..20 -> 0..19, 0 and 255 ignored.
    """
    base = _find(root, ["VOCdevkit/VOC2012", "VOC2012", "."], "JPEGImages", "Pascal VOC 2012")
    _need_dir(base / "SegmentationClass", "Pascal VOC 2012 labels")
    ids = _split_ids(base / "ImageSets" / "Segmentation" / f"{split}.txt")
    samples = [Sample(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClass" / f"{i}.png", i) for i in ids]
    words = _vocab("voc", vocab, 20)
    if with_background:
        return SegDataset("voc", base, words, samples, 255, True, VOC_THRESHOLD, paper_vocab=shipped_vocab("voc_groupvit"))
    return SegDataset("voc20", base, words, samples, 255, False, 0.0, _shift_down)


def context(root: Path, split: str = "val", vocab: Sequence[str] | None = None, with_background: bool = True) -> SegDataset:
    """Pascal Context (mmseg layout): ``VOCdevkit/VOC2010/{JPEGImages, SegmentationClassContext,
    ImageSets/SegmentationContext}``; 59 classes + background (label 0), 255 ignored.
    ``context59``: label 0 ignored, 1..59 -> 0..58."""
    base = _find(root, ["VOCdevkit/VOC2010", "VOC2010", "."], "SegmentationClassContext", "Pascal Context")
    ids = _split_ids(base / "ImageSets" / "SegmentationContext" / f"{split}.txt")
    samples = [Sample(base / "JPEGImages" / f"{i}.jpg", base / "SegmentationClassContext" / f"{i}.png", i) for i in ids]
    words = _vocab("context59", vocab, 59)
    if with_background:
        return SegDataset("context", base, words, samples, 255, True, CONTEXT_THRESHOLD, paper_vocab=shipped_vocab("context_groupvit"))
    return SegDataset("context59", base, words, samples, 255, False, 0.0, _shift_down)


def coco_object(root: Path, split: str = "val", vocab: Sequence[str] | None = None) -> SegDataset:
    """COCO-Object (GroupViT): ``images/{split}2017/*.jpg`` + ``annotations/{split}2017/*_instanceTrainIds.png``;
    label 0 = background, 1..80 the objects, 255 ignored."""
    base = _find(root, ["coco", "coco2017", "."], f"annotations/{split}2017", "COCO-Object")
    samples = _with_label_suffix(base / "annotations" / f"{split}2017", "_instanceTrainIds.png", base / "images" / f"{split}2017", ".jpg")
    return SegDataset("coco-object", base, _vocab("coco_object", vocab, 80), samples, 255, True, COCO_OBJECT_THRESHOLD,
                      paper_vocab=shipped_vocab("coco_object_groupvit"))


def coco_stuff(root: Path, split: str = "val", vocab: Sequence[str] | None = None) -> SegDataset:
    """COCO-Stuff 164k (mmseg): ``images/{split}2017/*.jpg`` + ``annotations/{split}2017/*_labelTrainIds.png``;
    171 classes, 255 ignored."""
    base = _find(root, ["coco_stuff164k", "coco", "."], f"annotations/{split}2017", "COCO-Stuff")
    samples = _with_label_suffix(base / "annotations" / f"{split}2017", "_labelTrainIds.png", base / "images" / f"{split}2017", ".jpg")
    return SegDataset("coco-stuff", base, _vocab("coco_stuff", vocab, 171), samples, 255, False)


def ade20k(root: Path, split: str = "val", vocab: Sequence[str] | None = None) -> SegDataset:
    """ADE20K SceneParsing: ``ADEChallengeData2016/{images, annotations}/{training, validation}``;
    label 0 ('other') ignored, 1..150 -> 0..149."""
    sub = {"val": "validation", "train": "training"}.get(split, split)
    base = _find(root, ["ADEChallengeData2016", "."], f"annotations/{sub}", "ADE20K")
    samples = _with_label_suffix(base / "annotations" / sub, ".png", base / "images" / sub, ".jpg")
    return SegDataset("ade20k", base, _vocab("ade20k", vocab, 150), samples, 255, False, 0.0, _shift_down)


def cityscapes(root: Path, split: str = "val", vocab: Sequence[str] | None = None) -> SegDataset:
    """Cityscapes: ``leftImg8bit/{split}/CITY/*_leftImg8bit.png`` + ``gtFine/{split}/CITY/*_gtFine_labelTrainIds.png``
    (made by cityscapesscripts' createTrainIdLabelImgs); 19 classes, 255 ignored."""
    base = _find(root, ["cityscapes", "."], f"gtFine/{split}", "Cityscapes")
    _need_dir(base / "leftImg8bit" / split, "Cityscapes images")
    samples = _with_label_suffix(base / "gtFine" / split, "_gtFine_labelTrainIds.png", base / "leftImg8bit" / split, "_leftImg8bit.png")
    return SegDataset("cityscapes", base, _vocab("cityscapes", vocab, 19), samples, 255, False)


def sequence_of(stem: str) -> str:
    """A video frame's sequence: its name up to the first ``_`` (CamVid ``0016E5_07959`` -> ``0016E5``)."""
    return stem.split("_", 1)[0]


def hold_out_sequence(ds: SegDataset, sequence: str, keep: Literal["rest", "held"]) -> SegDataset:
    """Leave-one-sequence-out: the split without ``sequence`` (``rest``, to train on) or only its
    frames (``held``, to validate on). Frames of one video sequence are near-duplicates, so a model
    is judged on a sequence it never saw (CamVid: train on two of 0001TP / 0006R0 / 0016E5, validate
    on the third).

    Raises a one-line ``ValueError`` when the split has no frame of ``sequence``.
    """
    seqs = sorted({sequence_of(s.stem) for s in ds.samples})
    if sequence not in seqs:
        raise ValueError(f"sequence {sequence!r} is not in this {ds.name} split; its sequences: {', '.join(seqs)}")
    samples = [s for s in ds.samples if (sequence_of(s.stem) == sequence) == (keep == "held")]
    return replace(ds, samples=samples)


def camvid(root: Path, split: str = "val", vocab: Sequence[str] | None = None) -> SegDataset:
    """CamVid, SegNet layout: ``{split}/*.png`` + ``{split}annot/*.png`` (same names); 11 classes, 11 ignored."""
    base = _find(root, [".", "CamVid", "camvid"], f"{split}annot", "CamVid")
    img_dir = _need_dir(base / split, "CamVid images")
    samples = []
    for lab in sorted((base / f"{split}annot").glob("*.png")):
        samples.append(Sample(img_dir / lab.name, lab, lab.stem))
    if not samples:
        raise FileNotFoundError(f"no label maps in {base / f'{split}annot'}")
    return SegDataset("camvid", base, _vocab("camvid", vocab, 11), samples, 255, False, 0.0, _cap(11))


IMAGENET_S_VARIANTS = (50, 300, 919)
IMAGENET_S_IGNORE = 1000


def _decode_imagenet_s(raw: np.ndarray) -> np.ndarray:
    if raw.ndim != 3:
        raise ValueError("ImageNet-S label maps are RGB PNGs (class id = R + 256 * G)")
    return raw[..., 0].astype(np.int64) + 256 * raw[..., 1].astype(np.int64)


def imagenet_s(root: Path, split: str = "val", vocab: Sequence[str] | None = None, variant: int | None = None) -> SegDataset:
    """ImageNet-S (LUSSeg): ``ImageNetS{50,300,919}/{split}/WNID/*.JPEG`` + ``{split}-segmentation/WNID/*.png``.

    Label PNGs are RGB with class id = R + 256 * G: 0 = other (background, by threshold), 1..N the
    classes (ImageNet synsets sorted by WordNet id), 1000 ignored. The variant comes from the folder
    name ``ImageNetS50`` etc., else from the number of class folders of the split.
    """
    sub = {"val": "validation", "train": "train-semi"}.get(split, split)
    names = [f"ImageNetS{variant}"] if variant else [f"ImageNetS{v}" for v in IMAGENET_S_VARIANTS]
    found = [root / n for n in names if (root / n / f"{sub}-segmentation").is_dir()]
    if (root / f"{sub}-segmentation").is_dir():
        found.append(root)
    if not found:
        raise FileNotFoundError(f"ImageNet-S not found: expected the folder {root / names[0] / f'{sub}-segmentation'} (check --data-root)")
    if len(found) > 1 and variant is None:
        raise ValueError(f"{root} holds several ImageNet-S variants: name one, e.g. --dataset imagenet-s50")
    base = found[0]
    if variant is None:
        m = re.fullmatch(r"ImageNetS(\d+)", base.resolve().name)
        if m:
            variant = int(m.group(1))
        else:
            n_dirs = sum(1 for d in (base / sub).iterdir() if d.is_dir()) if (base / sub).is_dir() else 0
            variant = n_dirs if n_dirs in IMAGENET_S_VARIANTS else None
        if variant not in IMAGENET_S_VARIANTS:
            raise ValueError(f"cannot tell which ImageNet-S variant {base} is: name it, e.g. --dataset imagenet-s919")
    lab_dir = base / f"{sub}-segmentation"
    samples = []
    for lab in sorted(lab_dir.rglob("*.png")):
        rel = lab.relative_to(lab_dir).with_suffix("")
        img = next((base / sub / rel.with_suffix(e) for e in (".JPEG", ".jpg", ".jpeg", ".png") if (base / sub / rel.with_suffix(e)).is_file()),
                   base / sub / rel.with_suffix(".JPEG"))
        samples.append(Sample(img, lab, rel.name))
    if not samples:
        raise FileNotFoundError(f"no label maps in {lab_dir}")
    words = _vocab(f"imagenet_s{variant}", vocab, variant)
    return SegDataset(f"imagenet-s{variant}", base, words, samples, IMAGENET_S_IGNORE, True, IMAGENET_S_THRESHOLD, _decode_imagenet_s)


def folder(root: Path, split: str = "val", vocab: Sequence[str] | None = None) -> SegDataset:
    """Your own data: ``images/STEM.*`` + ``labels/STEM.png``; label i = line i of ``--vocab-file``, 255 ignored.

    ``split`` is unused (one folder, one split).
    """
    if vocab is None:
        raise ValueError("the folder dataset needs --vocab-file (line i names label i)")
    img_dir = _need_dir(root / "images", "dataset images")
    lab_dir = _need_dir(root / "labels", "dataset labels")
    samples = []
    for img in sorted(p for p in img_dir.iterdir() if p.suffix.lower() in IMAGE_EXTS):
        lab = lab_dir / f"{img.stem}.png"
        if not lab.is_file():
            raise FileNotFoundError(f"no label map for {img.name}: expected {lab}")
        samples.append(Sample(img, lab, img.stem))
    if not samples:
        raise FileNotFoundError(f"no images in {img_dir}")
    return SegDataset("folder", root, normalize_vocab(vocab), samples, 255, False)


DATASETS: dict[str, Callable[..., SegDataset]] = {
    "voc": voc,
    "voc20": lambda root, split="val", vocab=None: voc(root, split, vocab, with_background=False),
    "context": context,
    "context59": lambda root, split="val", vocab=None: context(root, split, vocab, with_background=False),
    "coco-object": coco_object,
    "coco-stuff": coco_stuff,
    "ade20k": ade20k,
    "cityscapes": cityscapes,
    "camvid": camvid,
    "imagenet-s": imagenet_s,
    "imagenet-s50": lambda root, split="val", vocab=None: imagenet_s(root, split, vocab, 50),
    "imagenet-s300": lambda root, split="val", vocab=None: imagenet_s(root, split, vocab, 300),
    "imagenet-s919": lambda root, split="val", vocab=None: imagenet_s(root, split, vocab, 919),
    "folder": folder,
}


def load_dataset(name: str, root: str | Path, split: str = "val", vocab_file: str | Path | None = None) -> SegDataset:
    """Open a benchmark split.

    Args:
        name: one of ``DATASETS``.
        root: the folder the release was unpacked into (or the dataset folder itself).
        split: ``val`` (default), ``train``, ... as the release names it.
        vocab_file: class names to use instead of the shipped list (one per line, label order);
            required for ``folder``.

    Raises a one-line ``FileNotFoundError`` naming the folder expected when the data is missing.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, flickr8k")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root} (--data-root)")
    vocab = read_vocab_file(vocab_file) if vocab_file else None
    return DATASETS[name](root, split, vocab)
