"""``TrainConfig``, ``FinetuneConfig`` and ``DiscoverConfig``: dataclasses set by YAML files / defaults, overridden by
command-line flags generated from their fields (``groupseg.dataclass_cli``). The comment after a
field is its ``--help`` text."""
from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from groupseg.prompting import DEFAULT_TEMPLATES


@dataclass
class TrainConfig:
    # model
    model: str = "groupvit-ti-2stage"  # architecture name (groupseg.list_models()) or a model-config JSON file
    init_weights: str = ""  # start from these weights (any format groupseg.load_model reads)
    model_overrides: dict = field(default_factory=dict)  # nested dict merged into the model config
    text_encoder: str = ""  # a Hugging Face encoder directory/id used as the text tower (e.g. MiniLM)
    lock_text: bool = False  # LiT: freeze the text tower (its projection still trains)
    # data
    train_data: str = ""  # shard spec: brace pattern, glob, several joined by '::'
    val_data: str = ""  # shards for retrieval evaluation (optional)
    epoch_samples: int = 0  # samples per epoch; 0 = count the shards
    resampled: bool = False  # sample shards with replacement (multi-node); needs epoch_samples
    shuffle_buffer: int = 1000
    workers: int = 2
    num_prompts: int = 3  # noun prompts per caption for the multi-label loss; 0 = captions only
    crop_scale: tuple[float, float] = (0.08, 1.0)  # random-resized-crop area range
    # optimisation
    epochs: int = 30
    max_steps: int = 0  # stop after this many optimizer steps (0 = run all epochs)
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1.6e-3
    min_lr: float = 4e-5
    warmup_steps: int = 0
    warmup_epochs: float = 2.0  # used when warmup_steps == 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    clip_grad: float = 5.0  # max gradient norm; 0 = off
    multi_label_weight: float = 1.0
    group_label_weight: float = 0.0  # multi-label loss with each pair scored by its best segment (groupseg.loss)
    group_usage_weight: float = 0.0  # 1 - patch/group mutual information: confident assignments, all groups used
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 where the hardware runs it faster than fp32 (measured on CPUs)
    grad_checkpointing: bool = False
    compile: bool = False  # torch.compile the model
    seed: int = 0
    # output
    output_dir: str = "runs/default"
    save_every: int = 200  # optimizer steps between checkpoints
    keep_last: int = 3
    log_every: int = 10
    eval_every: int = 0  # optimizer steps between evaluations (0 = at the end only, when val_data is set)
    tracker: Literal["tensorboard", "wandb", "none"] = "tensorboard"
    resume: str = ""  # "" = fresh run, "auto" = latest valid checkpoint in output_dir, or a checkpoint directory
    export_dtype: Literal["fp32", "fp16", "bf16"] = "fp32"  # precision of the exported model weights

    def __post_init__(self) -> None:
        """Range checks, before any work: one-line ``ValueError`` naming the key."""
        for name, lo in (("batch_size", 1), ("grad_accum", 1), ("save_every", 1), ("log_every", 1), ("epochs", 0),
                         ("max_steps", 0), ("epoch_samples", 0), ("warmup_steps", 0), ("keep_last", 0), ("workers", 0),
                         ("num_prompts", 0), ("shuffle_buffer", 0), ("eval_every", 0)):
            if getattr(self, name) < lo:
                raise ValueError(f"config key {name!r} must be >= {lo}, got {getattr(self, name)}")
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "warmup_epochs", "eps"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"config key {name!r} must be >= 0, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _required(help_: str) -> Any:
    return field(default="", metadata={"required": True, "help": help_})


def _check_at_least(cfg: Any, bounds: dict[str, float]) -> None:
    """``--name must be >= lo`` for each field of a command's config below its bound."""
    for name, lo in bounds.items():
        if getattr(cfg, name) < lo:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}, got {getattr(cfg, name)}")


def _check_choices(cfg: Any, names: tuple[str, ...]) -> None:
    """``--name must be one of ...`` for each ``Literal`` field of a command's config holding another value."""
    hints = typing.get_type_hints(type(cfg))
    for name in names:
        allowed = typing.get_args(hints[name])
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got {getattr(cfg, name)!r}")


@dataclass
class FinetuneConfig:
    dataset: str = _required("camvid, voc, ade20k, coco-stuff, imagenet-s, folder, ... (as groupseg eval)")
    data_root: str = _required("the dataset's folder")
    out: str = _required("output directory: groupseg weights + checkpoints/")
    split: str = "train"
    holdout_sequence: str = ""  # train without this video sequence's frames (leave-one-sequence-out; validate with groupseg eval --holdout-sequence)
    vocab_file: str = ""  # class names, one per line in label order (required for folder)
    weights: str = ""  # starting weights ("" = the shipped model)
    images: int = -1  # use N labelled images, a seeded subset (-1 = all)
    fraction: float = 0.0  # or this fraction of the labelled images, in (0, 1] (0 = unset)
    weak_classes: str = ""  # comma-separated classes with image-level tags only (weak-shot)
    weak_loss: Literal["tags", "none"] = "tags"  # none = base-only fine-tuning
    objective: Literal["ce", "mix-match"] = "mix-match"  # mix-match: triplets over patches of the labelled images for a third of the epochs, then per-pixel; ce: per-pixel only
    groupings: int = 1  # train on the first N grouping stages' segments (1: the first stage's; 0 = all)
    epochs: int = 30
    min_steps: int = 1000  # small subsets run more epochs, so that every budget gets at least this many steps
    mix_match_epochs: int = 0  # triplet-only epochs first for mix-match (0 = a third of the epochs)
    seed: int = 0
    batch_size: int = 8
    lr: float = 1e-3  # classifier and projection head
    backbone_lr_mult: float = 0.3  # the vision tower learns at lr * this
    weight_decay: float = 0.01  # on weight matrices (norms, biases, scales, tokens take none)
    class_weights: Literal["median-freq", "sqrt-median-freq", "none"] = "median-freq"  # per-pixel loss balancing (SegNet's median frequency, or its square root)
    grouping_loss: Literal["soft", "hard"] = "hard"  # per-pixel loss on the soft group mixture, or on each patch's argmax group (straight-through)
    assign_scale: float = 50.0  # > 0: learnable multiplier of the grouping logits, starting here (sharpens flat assignments)
    assign_noise: bool = False  # Gumbel noise in the grouping assignment while training
    warmup_epochs: float = 1.0
    average_weights: float = 0.0  # export the uniform average of the weights over this last fraction of the steps (SWA; 0 = the last weights)
    short_side: int = 448  # images are resized to this short side (times a random scale) ...
    scale_range: tuple[float, float] = (0.75, 1.5)  # ... the random scale's range
    color_jitter: float = 0.4  # photometric augmentation strength: brightness, contrast and saturation in [1 - s, 1 + s], hue +-s/8, blur half the time (0 = off; 0.4 chosen on a held-out sequence)
    crop_size: int = 256  # ... then randomly cropped to this square
    margin: float = 0.3  # triplet margin (Euclidean distance of centred, normalised features)
    patches_per_class: int = 32  # mix-match / similarity: patches sampled per class per batch
    tag_weight: float = 0.5  # weight of the weak-shot tag loss
    comp_weight: float = 1.0  # weak-shot complementary loss: pixels no base class claims go to the image's tagged weak classes (0 = off)
    tag_topk: float = 0.02  # weak-shot tag loss: fraction of patches pooled per class (their mean scores the image)
    comp_balance: float = 0.5  # complementary loss: each tagged weak class's share divided by its mean share of the unclaimed pixels ** this (0 = off)
    sim_weight: float = 0.5  # weight of the weak-shot pixel-pair similarity terms
    templates: str = DEFAULT_TEMPLATES  # prompt templates for the initial classifier
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 where the hardware runs it faster than fp32 (measured on CPUs)
    workers: int = -1  # data-loading processes (-1 = auto: one where the CPU has a core beyond torch's threads, else none, as a worker on a fully used 2-core CPU slows every step by ~7 %)
    keep_last: int = 2  # checkpoints kept
    resume: str = ""  # "auto" = continue from the latest valid checkpoint in OUT/checkpoints, or a checkpoint directory
    log_every: int = 10

    def __post_init__(self) -> None:
        """Range checks, once, before any work: each a one-line ``ValueError`` naming the option."""
        self.scale_range = tuple(self.scale_range)
        if self.fraction and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"--fraction must be in (0, 1], got {self.fraction}")
        if self.fraction and self.images >= 0:
            raise ValueError("--images and --fraction exclude each other: give one")
        if not 0 <= self.average_weights < 1:
            raise ValueError(f"--average-weights must be in [0, 1), got {self.average_weights}")
        if not 0 <= self.color_jitter <= 1:
            raise ValueError(f"--color-jitter must be in [0, 1], got {self.color_jitter}")
        for name in ("assign_scale", "comp_weight", "tag_weight", "comp_balance", "sim_weight", "weight_decay"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {float(getattr(self, name))}")
        if not 0 < self.tag_topk <= 1:
            raise ValueError(f"--tag-topk must be in (0, 1], got {self.tag_topk}")
        if self.workers < -1:
            raise ValueError(f"--workers must be >= 0 or -1 (auto), got {self.workers}")
        _check_at_least(self, {"epochs": 0, "min_steps": 0, "mix_match_epochs": 0, "groupings": 0, "keep_last": 0,
                               "batch_size": 1, "crop_size": 1, "short_side": 1, "log_every": 1, "patches_per_class": 1})
        if self.lr <= 0 or self.backbone_lr_mult < 0:
            raise ValueError(f"--lr must be > 0 and --backbone-lr-mult >= 0, got {self.lr} and {self.backbone_lr_mult}")
        _check_choices(self, ("weak_loss", "objective", "class_weights", "grouping_loss", "precision"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class DiscoverConfig:
    """``groupseg discover``: a STEGO head over the frozen backbone, then PASS-style self-training."""
    dataset: str = ""  # a dataset groupseg eval reads (camvid, voc, ...); its labels are never read
    images_dir: str = ""  # or a plain folder of photos instead of a dataset
    data_root: str = ""  # folder the dataset was unpacked into (with --dataset)
    split: str = "train"  # split whose images are used
    out: str = _required("output directory: groupseg weights + cache/ + checkpoints/")
    weights: str = ""  # backbone weights ("" = the shipped model)
    cache: str = ""  # feature cache folder ("" = OUT/cache; runs with the same images and crops share it)
    clusters: int = 0  # K, clusters kept with the weights (0 = the dataset's number of classes)
    feature: Literal["tokens", "joint", "both"] = "tokens"  # dense backbone feature: first-stage patch tokens, their joint-space projection, or both
    dim: int = 70  # code channels (0 = no head: k-means on the features)
    res: int = 224  # crop side in pixels (a multiple of the patch size)
    crop_ratio: float = 0.5  # crop side / image short side (five-crop)
    knn: int = 7  # neighbours per crop
    steps: int = 1500  # head training steps
    batch_size: int = 16
    lr: float = 5e-4
    shifts: tuple[float, float, float] = (0.18, 0.12, 0.46)  # b_self b_knn b_rand (STEGO's shifts)
    loss_weights: tuple[float, float, float] = (0.67, 0.25, 0.63)  # l_self l_knn l_rand (STEGO's weights)
    samples: int = 11  # sampled positions per side per crop
    rand_pairs: int = 5  # random pairings per batch
    probe_epochs: int = 2  # passes of the mini-batch k-means
    self_train_rounds: int = 2  # PASS-style rounds: pseudo labels -> a new head -> re-cluster (0 = off; 2 chosen on CamVid val)
    self_train_steps: int = 1000  # head steps per self-training round
    self_train_kernel: int = 5  # self-training: the new head's nonlinear branch sees each patch's K x K neighbourhood (odd; 5 chosen on CamVid val, 3 before 2026-12-02)
    keep: float = 0.5  # self-training: fraction of each cluster's pixels kept as pseudo labels (the surest)
    self_train_backbone: float = 0.0  # self-training: also fine-tune the backbone's first stage at this multiple of --lr (0 = only the new head, on cached features)
    pseudo_refine: Literal["pamr", "none"] = "pamr"  # self-training: refine the teacher's pseudo labels onto image edges with PAMR before training on them
    pseudo_flip: bool = True  # self-training: average the teacher's probabilities over each crop and its mirror image (chosen on CamVid val)
    refine: Literal["pamr", "none"] = "pamr"  # refinement the output weights apply to their cluster maps by default (segment / eval: --pamr, --no-pamr override it)
    flip: bool = True  # the output weights average each image's cluster scores with its mirror image's by default (eval --flip / --no-flip override it; chosen on CamVid val)
    seed: int = 0
    resume: Literal["auto", "none"] = "auto"  # auto = continue from OUT/checkpoints
    checkpoint_every: int = 500  # steps between checkpoints
    device: str = "auto"  # torch device (auto = cuda when visible, else cpu)
    limit: int = 0  # use only the first N images (0 = all)

    def __post_init__(self) -> None:
        """Range checks, once, before any work: each a one-line ``ValueError`` naming the option."""
        self.shifts, self.loss_weights = tuple(self.shifts), tuple(self.loss_weights)
        if bool(self.dataset) == bool(self.images_dir):
            raise ValueError("give one of --dataset NAME (with --data-root) or --images-dir DIR")
        if self.dataset and not self.data_root:
            raise ValueError("--dataset needs --data-root")
        if self.clusters == 1 or self.clusters < 0:
            raise ValueError(f"--clusters must be at least 2 (got {self.clusters})")
        _check_at_least(self, {"dim": 0, "res": 32, "knn": 1, "steps": 0, "batch_size": 2, "samples": 2, "rand_pairs": 0,
                               "probe_epochs": 1, "self_train_rounds": 0, "self_train_steps": 1, "checkpoint_every": 1,
                               "limit": 0})
        if not self.lr > 0:
            raise ValueError(f"--lr must be > 0, got {self.lr}")
        if self.self_train_kernel < 1 or self.self_train_kernel % 2 == 0:
            raise ValueError(f"--self-train-kernel must be an odd number >= 1, got {self.self_train_kernel}")
        if not self.self_train_backbone >= 0:
            raise ValueError(f"--self-train-backbone must be >= 0, got {self.self_train_backbone}")
        for name in ("crop_ratio", "keep"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"--{name.replace('_', '-')} must be in (0, 1], got {getattr(self, name)}")
        _check_choices(self, ("feature", "pseudo_refine", "refine", "resume"))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(TrainConfig)}


def _coerce(name: str, value: Any) -> Any:
    """Convert a YAML or command-line value to the field's type; one-line errors."""
    hint = typing.get_type_hints(TrainConfig)[name]
    origin = typing.get_origin(hint)
    try:
        if hint is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if hint in (int, float, str):
            return hint(value)
        if origin is tuple:
            if isinstance(value, str):
                value = [v for v in value.replace("(", "").replace(")", "").split(",") if v.strip()]
            args = typing.get_args(hint)
            if len(value) != len(args):
                raise ValueError
            return tuple(t(v) for t, v in zip(args, value))
        if origin is Literal:
            if value not in typing.get_args(hint):
                raise ValueError
            return value
        if hint is dict or origin is dict:
            return json.loads(value) if isinstance(value, str) else dict(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        allowed = f" (one of {', '.join(map(str, typing.get_args(hint)))})" if origin is Literal else ""
        raise ValueError(f"config key {name!r}: bad value {value!r}{allowed}") from None
    return value


def list_configs() -> list[str]:
    """Names of the configs that ship with groupseg (``groupseg train --config NAME``)."""
    folder = resources.files(__package__) / "configs"
    return sorted(f.name[: -len(".yaml")] for f in folder.iterdir() if f.name.endswith(".yaml"))


def config_text(path_or_name: str) -> str:
    """The YAML text of a config file path or of a shipped config's name (``flickr8k-default``)."""
    p = Path(path_or_name)
    if p.is_file():
        return p.read_text()
    name = path_or_name[: -len(".yaml")] if path_or_name.endswith(".yaml") else path_or_name
    if "/" not in name and name in list_configs():
        return (resources.files(__package__) / "configs" / f"{name}.yaml").read_text()
    raise FileNotFoundError(f"config file not found: {path_or_name} (a YAML file, or one of: {', '.join(list_configs())})")


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML file or shipped config by name (optional) and apply overrides; unknown keys are an error."""
    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(config_text(path)) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping of keys to values")
        values.update(loaded)
    values.update(overrides or {})
    known = _fields()
    for k in values:
        if k not in known:
            close = [n for n in known if n.startswith(k[:4])]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"unknown config key {k!r}{hint}")
    return TrainConfig(**{k: _coerce(k, v) for k, v in values.items()})


def parse_overrides(tokens: list[str]) -> dict[str, str]:
    """``['--batch-size', '32', '--lr=1e-3', '--lock-text']`` -> {'batch_size': '32', 'lr': '1e-3', 'lock_text': 'true'}."""
    out: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if not tok.startswith("--"):
            raise ValueError(f"unexpected argument {tok!r}: overrides are --key value")
        key, _, val = tok[2:].partition("=")
        key = key.replace("-", "_")
        if not _:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                val = tokens[i + 1]
                i += 1
            else:
                val = "true"  # a bare flag
        out[key] = val
        i += 1
    return out
