"""Foreign checkpoint formats -> groupseg state dicts and configs.

Two published formats are read:

* transformers' ``GroupViTModel`` (a ``save_pretrained`` directory: ``config.json`` plus
  ``model.safetensors`` or ``pytorch_model.bin``);
* NVlabs' GroupViT training checkpoints (``.pth``, the model under ``"model"``).

Each converter returns ``(ModelConfig, state_dict)`` in groupseg's own key names.
Loading is strict: unknown keys are errors.
"""
from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Callable

import torch

from .config import ModelConfig, StageConfig, TextConfig, VisionConfig


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model."""


# --------------------------------------------------------------------------- safe .pth loading
class _Inert:
    """Stand-in for any class a checkpoint names that is not a tensor building block."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __call__(self, *args: Any, **kwargs: Any) -> "_Inert":
        return _Inert(*args)


class _InertModule:
    """A pickle module whose Unpickler never imports code outside torch's tensor rebuilders."""

    __name__ = "groupseg_inert_pickle"
    load = pickle.load

    class Unpickler(pickle.Unpickler):
        _ALLOWED = re.compile(r"^(torch(\._utils|\.storage|\._tensor)?|collections|builtins)$")

        def find_class(self, module: str, name: str) -> Any:
            if module == "collections" and name == "OrderedDict":
                return super().find_class(module, name)
            if self._ALLOWED.match(module) and (name.startswith("_rebuild") or name.endswith("Storage") or name in {"Size", "device", "dtype"}):
                return super().find_class(module, name)
            if module == "builtins" and name in {"set", "frozenset", "slice", "complex"}:
                return super().find_class(module, name)
            return _Inert


def load_pth(path: str | Path) -> dict[str, Any]:
    """Load a ``.pth`` checkpoint without ever running code from it.

    ``torch.load(weights_only=True)`` first; a checkpoint that also pickles
    non-tensor objects (NVlabs stores its OmegaConf config) is read with an
    unpickler that replaces every such object by an inert placeholder.
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_InertModule)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({e.__class__.__name__}: {msg})") from None


# --------------------------------------------------------------------------- key mapping helpers
def _qkv(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor], src: str, dst: str) -> None:
    """Fuse ``src.{q,k,v}_proj`` into ``dst.qkv``."""
    for t in ("weight", "bias"):
        parts = [sd.pop(f"{src}.{n}_proj.{t}") for n in "qkv"]
        out[f"{dst}.qkv.{t}"] = torch.cat(parts, 0)


def _move(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor], src: str, dst: str) -> None:
    """Move every key under prefix ``src`` to prefix ``dst``."""
    for k in [k for k in sd if k == src or k.startswith(src + ".")]:
        out[dst + k[len(src) :]] = sd.pop(k)


def _indices(sd: dict[str, torch.Tensor], prefix: str) -> list[int]:
    """Sorted ``i`` of the keys ``prefix.i.*``."""
    pat = re.compile(rf"{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in sd if (m := pat.match(k))})


def _stage_grouping(sd, out, src: str, dst: str, attn_out: str | None) -> None:
    """A stage's group projector and grouping block (same layout in both formats but for the
    fused q/k/v and, in transformers, the name of the cross-attention's output projection)."""
    if f"{src}.group_projector.0.weight" in sd:
        _move(sd, out, f"{src}.group_projector.0", f"{dst}.group_projector.norm")
        _move(sd, out, f"{src}.group_projector.1", f"{dst}.group_projector.mlp")
    ds, dd = f"{src}.downsample", f"{dst}.grouping"
    if f"{ds}.norm_tokens.weight" in sd:
        _qkv(sd, out, f"{ds}.pre_assign_attn.attn", f"{dd}.pre_assign_attn.attn")
        if attn_out:
            _move(sd, out, f"{ds}.pre_assign_attn.attn.{attn_out}", f"{dd}.pre_assign_attn.attn.proj")
        _qkv(sd, out, f"{ds}.assign", f"{dd}.assign")
        _move(sd, out, ds, dd)


def _finish(sd: dict[str, torch.Tensor], out: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    if sd:
        raise CheckpointError(f"{fmt} checkpoint has {len(sd)} keys groupseg does not know, first {sorted(sd)[0]!r}")
    return out


# --------------------------------------------------------------------------- transformers
def _hf_block(sd, out, src, dst) -> None:
    _qkv(sd, out, f"{src}.self_attn", f"{dst}.attn")
    _move(sd, out, f"{src}.self_attn.out_proj", f"{dst}.attn.proj")
    _move(sd, out, f"{src}.layer_norm1", f"{dst}.norm1")
    _move(sd, out, f"{src}.layer_norm2", f"{dst}.norm2")
    _move(sd, out, f"{src}.mlp", f"{dst}.mlp")


def hf_config_to_groupseg(hf: dict[str, Any]) -> ModelConfig:
    """Translate a transformers ``GroupViTConfig`` dict."""
    v, t = hf.get("vision_config", {}), hf.get("text_config", {})
    vd = dict(hidden_size=384, intermediate_size=1536, depths=[6, 3, 3], num_group_tokens=[64, 8, 0],
              num_output_groups=[64, 8, 8], num_attention_heads=6, image_size=224, patch_size=16, num_channels=3,
              hidden_act="gelu", layer_norm_eps=1e-5, assign_eps=1.0, assign_mlp_ratio=[0.5, 4])
    vd.update(v)
    td = dict(vocab_size=49408, hidden_size=256, intermediate_size=1024, num_hidden_layers=12, num_attention_heads=4,
              max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
    td.update(t)
    stages = [
        StageConfig(d, vd["num_attention_heads"], g, vd["num_output_groups"][i] if g else 0)
        for i, (d, g) in enumerate(zip(vd["depths"], vd["num_group_tokens"]))
    ]
    vision = VisionConfig(
        image_size=vd["image_size"], patch_size=vd["patch_size"], in_chans=vd["num_channels"], width=vd["hidden_size"],
        stages=stages, mlp_ratio=vd["intermediate_size"] / vd["hidden_size"], assign_mlp_ratio=tuple(vd["assign_mlp_ratio"]),
        assign_eps=vd["assign_eps"], act=vd["hidden_act"], layer_norm_eps=vd["layer_norm_eps"],
    )
    text = TextConfig(
        vocab_size=td["vocab_size"], context_length=td["max_position_embeddings"], width=td["hidden_size"],
        depth=td["num_hidden_layers"], num_heads=td["num_attention_heads"], mlp_ratio=td["intermediate_size"] / td["hidden_size"],
        act=td["hidden_act"], layer_norm_eps=td["layer_norm_eps"],
    )
    return ModelConfig(
        vision=vision, text=text, embed_dim=hf.get("projection_dim", 256),
        proj_hidden_dim=hf.get("projection_intermediate_dim", 4096),
        logit_scale_init=hf.get("logit_scale_init_value", 2.6592), multi_label_logit_scale=False,
        image_mean=(0.485, 0.456, 0.406), image_std=(0.229, 0.224, 0.225), name="hf-groupvit",
    )


def convert_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``GroupViTModel`` keys -> groupseg keys."""
    sd = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    out: dict[str, torch.Tensor] = {}
    _move(sd, out, "logit_scale", "logit_scale")
    V = "vision_model"
    _move(sd, out, f"{V}.embeddings.patch_embeddings.projection", "visual.patch_embed.proj")
    _move(sd, out, f"{V}.embeddings.layernorm", "visual.patch_embed.norm")
    _move(sd, out, f"{V}.embeddings.position_embeddings", "visual.pos_embed")
    _move(sd, out, f"{V}.layernorm", "visual.norm")
    for i in _indices(sd, f"{V}.encoder.stages"):
        s, d = f"{V}.encoder.stages.{i}", f"visual.stages.{i}"
        _move(sd, out, f"{s}.group_token", f"{d}.group_token")
        for j in _indices(sd, f"{s}.layers"):
            _hf_block(sd, out, f"{s}.layers.{j}", f"{d}.blocks.{j}")
        _stage_grouping(sd, out, s, d, attn_out="out_proj")
    T = "text_model"
    _move(sd, out, f"{T}.embeddings.token_embedding", "text.token_embed")
    if f"{T}.embeddings.position_embedding.weight" in sd:
        out["text.pos_embed"] = sd.pop(f"{T}.embeddings.position_embedding.weight")
    _move(sd, out, f"{T}.final_layer_norm", "text.norm")
    for j in _indices(sd, f"{T}.encoder.layers"):
        _hf_block(sd, out, f"{T}.encoder.layers.{j}", f"text.blocks.{j}")
    for src, dst in (("visual_projection", "visual_proj"), ("text_projection", "text_proj")):
        _move(sd, out, f"{src}.0", f"{dst}.fc1")
        _move(sd, out, f"{src}.1", f"{dst}.bn")
        _move(sd, out, f"{src}.3", f"{dst}.fc2")
    return _finish(sd, out, "transformers GroupViT")


def read_hf_dir(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a ``GroupViTModel.save_pretrained`` directory."""
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    if cfg.get("model_type") != "groupvit":
        raise CheckpointError(f"{directory}: config.json is a {cfg.get('model_type')!r} model, not groupvit")
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    if st.exists():
        from safetensors.torch import load_file

        state = load_file(str(st))
    elif binf.exists():
        state = load_pth(binf)
    else:
        raise CheckpointError(f"{directory}: no model.safetensors or pytorch_model.bin")
    return hf_config_to_groupseg(cfg), convert_hf_state_dict(state)


# --------------------------------------------------------------------------- NVlabs
def convert_nvlabs_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """NVlabs ``MultiLabelContrastive`` keys -> groupseg keys."""
    sd = {re.sub(r"^module\.", "", k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    _move(sd, out, "logit_scale", "logit_scale")
    _move(sd, out, "multi_label_logit_scale", "multi_label_logit_scale")
    I = "img_encoder"
    _move(sd, out, f"{I}.patch_embed", "visual.patch_embed")
    _move(sd, out, f"{I}.pos_embed", "visual.pos_embed")
    _move(sd, out, f"{I}.norm", "visual.norm")
    for i in _indices(sd, f"{I}.layers"):
        s, d = f"{I}.layers.{i}", f"visual.stages.{i}"
        _move(sd, out, f"{s}.group_token", f"{d}.group_token")
        _move(sd, out, f"{s}.blocks", f"{d}.blocks")  # NVlabs blocks already use norm1/attn.qkv/attn.proj/norm2/mlp
        _stage_grouping(sd, out, s, d, attn_out=None)
    T = "text_encoder"
    _move(sd, out, f"{T}.token_embedding", "text.token_embed")
    _move(sd, out, f"{T}.positional_embedding", "text.pos_embed")
    _move(sd, out, f"{T}.ln_final", "text.norm")
    for j in _indices(sd, f"{T}.transformer.resblocks"):
        s, d = f"{T}.transformer.resblocks.{j}", f"text.blocks.{j}"
        out[f"{d}.attn.qkv.weight"] = sd.pop(f"{s}.attn.in_proj_weight")
        out[f"{d}.attn.qkv.bias"] = sd.pop(f"{s}.attn.in_proj_bias")
        _move(sd, out, f"{s}.attn.out_proj", f"{d}.attn.proj")
        _move(sd, out, f"{s}.ln_1", f"{d}.norm1")
        _move(sd, out, f"{s}.ln_2", f"{d}.norm2")
        _move(sd, out, f"{s}.mlp.c_fc", f"{d}.mlp.fc1")
        _move(sd, out, f"{s}.mlp.c_proj", f"{d}.mlp.fc2")
    for src, dst in (("img_projector", "visual_proj"), ("text_projector", "text_proj")):
        if f"{src}.linear_hidden.0.weight" in sd:
            out[f"{dst}.fc1.weight"] = sd.pop(f"{src}.linear_hidden.0.weight").squeeze(-1)
            out[f"{dst}.fc1.bias"] = sd.pop(f"{src}.linear_hidden.0.bias")
            _move(sd, out, f"{src}.linear_hidden.1", f"{dst}.bn")
        out[f"{dst}.fc2.weight"] = sd.pop(f"{src}.linear_out.weight").squeeze(-1)
        out[f"{dst}.fc2.bias"] = sd.pop(f"{src}.linear_out.bias")
    return _finish(sd, out, "NVlabs GroupViT")


def nvlabs_config_from_state(sd: dict[str, torch.Tensor]) -> ModelConfig:
    """Infer the architecture of an NVlabs checkpoint from its tensor shapes.

    Head counts are not stored in weights; NVlabs uses width // 64 everywhere.
    """
    width = sd["visual.pos_embed"].shape[-1]
    patch = sd["visual.patch_embed.proj.weight"].shape[-1]
    grid = int(round(sd["visual.pos_embed"].shape[1] ** 0.5))
    stages = []
    i = 0
    while any(k.startswith(f"visual.stages.{i}.") for k in sd):
        depth = len({k.split(".")[4] for k in sd if k.startswith(f"visual.stages.{i}.blocks.")})
        gt = sd.get(f"visual.stages.{i}.group_token")
        groups = sd.get(f"visual.stages.{i}.grouping.mlp_inter.fc2.weight")
        stages.append(StageConfig(depth, max(width // 64, 1), 0 if gt is None else gt.shape[1], 0 if groups is None else groups.shape[0]))
        i += 1
    mlp_hidden = sd["visual.stages.0.blocks.0.mlp.fc1.weight"].shape[0]
    tw = sd["text.token_embed.weight"].shape[1]
    tdepth = len({k.split(".")[2] for k in sd if k.startswith("text.blocks.")})
    vision = VisionConfig(image_size=grid * patch, patch_size=patch, width=width, stages=stages, mlp_ratio=mlp_hidden / width)
    text = TextConfig(
        vocab_size=sd["text.token_embed.weight"].shape[0], context_length=sd["text.pos_embed"].shape[0], width=tw,
        depth=tdepth, num_heads=max(tw // 64, 1), mlp_ratio=sd["text.blocks.0.mlp.fc1.weight"].shape[0] / tw,
    )
    hidden = sd["visual_proj.fc1.weight"].shape[0] if "visual_proj.fc1.weight" in sd else 0
    return ModelConfig(
        vision=vision, text=text, embed_dim=sd["visual_proj.fc2.weight"].shape[0], proj_hidden_dim=hidden,
        multi_label_logit_scale="multi_label_logit_scale" in sd, name="nvlabs-groupvit",
    )


def read_nvlabs(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an NVlabs GroupViT ``.pth`` training checkpoint."""
    ckpt = load_pth(path)
    state = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not any(re.sub(r"^module\.", "", str(k)).startswith("img_encoder.") for k in state):
        raise CheckpointError(f"{path}: not an NVlabs GroupViT checkpoint (no 'img_encoder.*' weights)")
    sd = convert_nvlabs_state_dict({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
    return nvlabs_config_from_state(sd), sd


def to_nvlabs_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """groupseg keys -> NVlabs keys (the inverse of ``convert_nvlabs_state_dict``), for export and tests."""
    out: dict[str, torch.Tensor] = {}
    rules: list[tuple[str, Callable[[re.Match], str]]] = [
        (r"^visual\.stages\.(\d+)\.grouping\.(pre_assign_attn\.attn|assign)\.qkv\.(weight|bias)$", None),
        (r"^text\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", lambda m: f"text_encoder.transformer.resblocks.{m[1]}.attn.in_proj_{m[2]}"),
        (r"^text\.blocks\.(\d+)\.attn\.proj\.(.*)$", lambda m: f"text_encoder.transformer.resblocks.{m[1]}.attn.out_proj.{m[2]}"),
        (r"^text\.blocks\.(\d+)\.norm([12])\.(.*)$", lambda m: f"text_encoder.transformer.resblocks.{m[1]}.ln_{m[2]}.{m[3]}"),
        (r"^text\.blocks\.(\d+)\.mlp\.fc1\.(.*)$", lambda m: f"text_encoder.transformer.resblocks.{m[1]}.mlp.c_fc.{m[2]}"),
        (r"^text\.blocks\.(\d+)\.mlp\.fc2\.(.*)$", lambda m: f"text_encoder.transformer.resblocks.{m[1]}.mlp.c_proj.{m[2]}"),
        (r"^text\.token_embed\.(.*)$", lambda m: f"text_encoder.token_embedding.{m[1]}"),
        (r"^text\.pos_embed$", lambda m: "text_encoder.positional_embedding"),
        (r"^text\.norm\.(.*)$", lambda m: f"text_encoder.ln_final.{m[1]}"),
        (r"^visual\.stages\.(\d+)\.group_projector\.norm\.(.*)$", lambda m: f"img_encoder.layers.{m[1]}.group_projector.0.{m[2]}"),
        (r"^visual\.stages\.(\d+)\.group_projector\.mlp\.(.*)$", lambda m: f"img_encoder.layers.{m[1]}.group_projector.1.{m[2]}"),
        (r"^visual\.stages\.(\d+)\.grouping\.(.*)$", lambda m: f"img_encoder.layers.{m[1]}.downsample.{m[2]}"),
        (r"^visual\.stages\.(\d+)\.(.*)$", lambda m: f"img_encoder.layers.{m[1]}.{m[2]}"),
        (r"^visual\.(.*)$", lambda m: f"img_encoder.{m[1]}"),
        (r"^(visual|text)_proj\.fc1\.(.*)$", lambda m: f"{'img' if m[1] == 'visual' else 'text'}_projector.linear_hidden.0.{m[2]}"),
        (r"^(visual|text)_proj\.bn\.(.*)$", lambda m: f"{'img' if m[1] == 'visual' else 'text'}_projector.linear_hidden.1.{m[2]}"),
        (r"^(visual|text)_proj\.fc2\.(.*)$", lambda m: f"{'img' if m[1] == 'visual' else 'text'}_projector.linear_out.{m[2]}"),
        (r"^(.*)$", lambda m: m[1]),
    ]
    for k, v in state.items():
        for pat, fn in rules:
            m = re.match(pat, k)
            if not m:
                continue
            if fn is None:  # split a fused qkv back into q/k/v
                base = f"img_encoder.layers.{m[1]}.downsample.{m[2]}"
                for n, part in zip("qkv", v.chunk(3, 0)):
                    out[f"{base}.{n}_proj.{m[3]}"] = part.clone()
            else:
                nk = fn(m)
                out[nk] = v.unsqueeze(-1) if re.search(r"projector\.linear_(hidden\.0|out)\.weight$", nk) else v
            break
    return out
