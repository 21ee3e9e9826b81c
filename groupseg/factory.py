"""The one model factory: named configs, construction and weight loading."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .convert import CheckpointError, read_hf_dir, read_nvlabs
from .models.groupvit import GroupViT

_CONFIG_DIR = Path(__file__).parent / "model_configs"
HUB_PREFIX = "hf-hub:"  # Hugging Face hub ids are named explicitly, as open_clip does


def list_models() -> list[str]:
    """Names of the architectures in ``groupseg/model_configs``."""
    return sorted(p.stem for p in _CONFIG_DIR.glob("*.json"))


def get_model_config(name: str) -> ModelConfig:
    """The ``ModelConfig`` of a named architecture."""
    path = _CONFIG_DIR / f"{name}.json"
    if not path.exists():
        raise ValueError(f"unknown model {name!r}; known: {', '.join(list_models())}")
    return ModelConfig.load(path)


def create_model(config: str | ModelConfig | dict[str, Any]) -> GroupViT:
    """Build a randomly initialised model.

    Args:
        config: a name from ``list_models()``, a ``ModelConfig`` or its dict.

    >>> model = create_model("groupvit-tiny-test").eval()  # BatchNorm in the projectors: eval for one text
    >>> model.encode_text(torch.tensor([[49406, 320, 49407]])).shape
    torch.Size([1, 16])
    """
    if isinstance(config, str):
        config = get_model_config(config)
    elif isinstance(config, dict):
        config = ModelConfig.from_dict(config)
    return GroupViT(config)


def load_state_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
    """Load ``state`` into ``model``; any missing, unexpected or mis-shaped key is a one-line error."""
    own = model.state_dict()
    for k, v in own.items():  # model order: the first mismatch is the earliest layer
        if k in state and state[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: weight {k!r} has shape {tuple(state[k].shape)} but the model expects {tuple(v.shape)}"
            )
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (first {missing[0]!r})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first {unexpected[0]!r})")
        raise CheckpointError(f"{source}: weights do not fit the model: {', '.join(parts)}")
    model.load_state_dict(state, strict=True)


def _read_own_dir(directory: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    cfg = ModelConfig.load(directory / "config.json")
    st = directory / "model.safetensors"
    if not st.exists():
        raise CheckpointError(f"{directory}: config.json found but no model.safetensors")
    try:
        return cfg, load_file(str(st))
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{st}: unreadable safetensors file ({e})") from None


def read_weights(source: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], str]:
    """Read any supported weights into (groupseg config, groupseg state dict, format name).

    ``source`` is a groupseg directory, a transformers GroupViT directory, a
    ``.safetensors`` file beside a ``config.json``, an NVlabs ``.pth`` file, or a
    Hugging Face hub id behind the ``hf-hub:`` prefix (``hf-hub:nvidia/groupvit-gcc-yfcc``,
    downloaded when the network allows). Anything else that does not exist is "not found":
    a mistyped local path is never sent to the hub.
    """
    source = hub_snapshot(source)
    path = Path(source).expanduser()
    if path.is_dir():
        cfg_file = path / "config.json"
        if not cfg_file.exists():
            raise CheckpointError(f"{path}: no config.json in this directory; not a model directory")
        try:
            meta = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
        if meta.get("model_type") == "groupvit":
            cfg, sd = read_hf_dir(path)
            return cfg, sd, "transformers"
        cfg, sd = _read_own_dir(path)
        return cfg, sd, "groupseg"
    if path.is_file():
        if path.suffix == ".safetensors":
            return (*_read_own_dir(path.parent), "groupseg")
        if path.suffix in {".pth", ".pt", ".bin", ".ckpt"}:
            cfg, sd = read_nvlabs(path)
            return cfg, sd, "nvlabs"
        raise CheckpointError(f"{path}: unknown weights format (expected a directory, .safetensors or .pth)")
    hint = f" (a Hugging Face hub id is written {HUB_PREFIX}{source})" if _looks_like_hub_id(str(source)) else ""
    raise CheckpointError(f"weights not found: {source}{hint}")


def _looks_like_hub_id(text: str) -> bool:
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and all(text.split("/"))


def hub_snapshot(source: str | Path) -> str | Path:
    """``hf-hub:OWNER/NAME`` -> the local folder it downloads to; anything else is returned as is."""
    if isinstance(source, str) and source.startswith(HUB_PREFIX):
        repo_id = source[len(HUB_PREFIX):]
        if not _looks_like_hub_id(repo_id):
            raise CheckpointError(f"{source}: expected {HUB_PREFIX}OWNER/NAME")
        return _hub_download(repo_id)
    return source


def _hub_download(repo_id: str) -> Path:
    """Fetch a transformers GroupViT from the Hugging Face hub (optional; needs the network)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=["config.json", "*.safetensors", "*.bin"]))
    except Exception as e:
        raise CheckpointError(
            f"could not download {repo_id!r} from the Hugging Face hub ({e.__class__.__name__}); "
            "offline? download it elsewhere and pass the directory"
        ) from None


def load_model(source: str | Path | None = None, device: str | torch.device = "cpu") -> GroupViT:
    """Load a model in eval mode from a name, directory, file or hub id.

    Args:
        source: weights (see ``read_weights``) or ``None`` for the default weights
            (``groupseg.pretrained.default_weights``).
        device: where to put the model.

    >>> model = load_model("path/to/weights")  # doctest: +SKIP
    """
    from .pretrained import resolve_weights

    path = resolve_weights(source)
    cfg, state, fmt = read_weights(path)
    model = GroupViT(cfg)
    load_state_strict(model, {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, f"{path} ({fmt})")
    return model.to(device).eval()
