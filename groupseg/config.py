"""Model configuration dataclasses.

One dataclass per tower plus the two-tower ``ModelConfig``. They serialise to and
from plain JSON so that a weights directory (``config.json`` + ``model.safetensors``)
rebuilds the model on its own.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional


@dataclass
class StageConfig:
    """One grouping stage of the vision tower.

    A stage runs ``depth`` transformer blocks over [image tokens; group tokens] and,
    when ``num_output_groups`` > 0, ends with a grouping block that merges the image
    tokens into ``num_output_groups`` segments.
    """

    depth: int
    num_heads: int
    num_group_tokens: int = 0  # learnable group tokens concatenated to the image tokens
    num_output_groups: int = 0  # segments out of this stage's grouping block; 0 = no grouping


@dataclass
class VisionConfig:
    image_size: int = 224  # training resolution; inference interpolates positions
    patch_size: int = 16
    in_chans: int = 3
    stem: Literal["patch", "conv"] = "patch"  # patchify convolution (GroupViT) or a convolutional stem
    width: int = 384
    stages: list[StageConfig] = field(
        default_factory=lambda: [StageConfig(6, 6, 64, 64), StageConfig(3, 6, 8, 8), StageConfig(3, 6, 0, 0)]
    )
    mlp_ratio: float = 4.0
    assign_mlp_ratio: tuple[float, float] = (0.5, 4.0)  # (token-mixing, channel) ratios in grouping blocks
    assign_eps: float = 1.0  # added to the per-group sum when averaging assigned tokens
    gumbel_tau: float = 1.0
    # learnable multiplier of the assignment logits, initialised here (None = none, as GroupViT):
    # at GroupViT's initialisation the logits spread ~0.08, far below the Gumbel noise of
    # training, so short runs assign patches at random; a start of ~10 lets groups form early
    assign_scale_init: Optional[float] = None
    hard_assignment: bool = True  # straight-through one-hot assignment (Gumbel noise in training)
    act: Literal["gelu", "quick_gelu"] = "gelu"
    drop_path_rate: float = 0.0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        self.stages = [s if isinstance(s, StageConfig) else StageConfig(**s) for s in self.stages]
        self.assign_mlp_ratio = tuple(self.assign_mlp_ratio)
        if not self.stages:
            raise ValueError("VisionConfig needs at least one stage")
        for i, s in enumerate(self.stages):
            if self.width % s.num_heads:
                raise ValueError(f"stage {i}: width {self.width} is not divisible by num_heads {s.num_heads}")
            if (s.num_output_groups > 0) != (s.num_group_tokens > 0):
                raise ValueError(f"stage {i}: group tokens and output groups must both be 0 or both > 0")
        if self.stages[-1].num_output_groups:
            # the last stage may group too; nothing follows it
            pass

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size


@dataclass
class TextConfig:
    kind: Literal["transformer", "hf"] = "transformer"  # own CLIP-style tower, or a Hugging Face encoder
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 256
    depth: int = 12
    num_heads: int = 4
    mlp_ratio: float = 4.0
    act: Literal["gelu", "quick_gelu"] = "quick_gelu"
    layer_norm_eps: float = 1e-5
    causal: bool = True
    pool: Literal["eot", "mean", "cls"] = "eot"  # eot = token with the highest id (CLIP convention)
    hf_config: Optional[dict[str, Any]] = None  # kind="hf": the transformers config dict of the encoder
    hf_tokenizer: Optional[str] = None  # kind="hf": tokenizer files stored beside the weights


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    embed_dim: int = 256  # joint embedding size
    proj_hidden_dim: int = 4096  # hidden size of the 2-layer projection heads; 0 = single linear layer
    logit_scale_init: float = 2.6592  # log(1/0.07)
    multi_label_logit_scale: bool = True  # separate temperature for the multi-label loss (NVlabs)
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    name: str = ""
    # class names with a fine-tuned classifier (``groupseg finetune``): the Segmenter uses the
    # stored vector ``tuned_class_embeds[i]`` for a class whose label is ``tuned_classes[i]``
    # and the text tower for every other word
    tuned_classes: list[str] = field(default_factory=list)
    # row i of ``tuned_class_embeds`` belongs to class ``tuned_classes[tuned_owner[i]]`` (a class
    # with synonyms keeps one tuned row per synonym and scores as its best); empty = one row per class
    tuned_owner: list[int] = field(default_factory=list)
    # grouping stages that segment at inference (None = all); fine-tuning on the first stage's
    # segments records 1 here so the Segmenter segments the way the classifier was trained
    groupings: Optional[int] = None
    # sliding-window side (pixels) the Segmenter uses by default (None = whole image); fine-tuning
    # records its crop size here, so segments at inference are as fine as those it was tuned on
    window: Optional[int] = None
    # unsupervised STEGO head (``groupseg discover``): {"feature", "in_dim", "dim", "clusters"};
    # the model then has ``stego`` (groupseg.stego.StegoHead) with its cluster centres
    stego: Optional[dict[str, Any]] = None

    def __post_init__(self) -> None:
        self.tuned_classes = list(self.tuned_classes)
        self.tuned_owner = list(self.tuned_owner)
        if isinstance(self.vision, dict):
            self.vision = VisionConfig(**self.vision)
        if isinstance(self.text, dict):
            self.text = TextConfig(**self.text)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown model config keys: {sorted(unknown)}")
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))
