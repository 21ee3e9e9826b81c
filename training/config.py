"""``TrainConfig``: one dataclass, set by YAML files, overridden by command-line flags."""
from __future__ import annotations

import dataclasses
import json
import typing
from importlib import resources
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto = bf16 where the hardware has it
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


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
