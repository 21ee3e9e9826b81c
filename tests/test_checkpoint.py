import argparse
import os

import pytest
import torch

import groupseg
from groupseg.convert import CheckpointError, to_nvlabs_state_dict

from conftest import perturb_


def nvlabs_keys(cfg: groupseg.ModelConfig) -> set[str]:
    """Key names of NVlabs' MultiLabelContrastive(GroupViT, TextTransformer), written from its source."""
    wb = lambda p: {f"{p}.weight", f"{p}.bias"}  # noqa: E731
    keys = {"logit_scale", "multi_label_logit_scale", "img_encoder.pos_embed"}
    keys |= wb("img_encoder.patch_embed.proj") | wb("img_encoder.patch_embed.norm") | wb("img_encoder.norm")
    for i, s in enumerate(cfg.vision.stages):
        L = f"img_encoder.layers.{i}"
        if s.num_group_tokens:
            keys.add(f"{L}.group_token")
        for j in range(s.depth):
            for n in ("norm1", "norm2", "attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
                keys |= wb(f"{L}.blocks.{j}.{n}")
        if i > 0 and s.num_group_tokens:
            keys |= wb(f"{L}.group_projector.0") | wb(f"{L}.group_projector.1.fc1") | wb(f"{L}.group_projector.1.fc2")
        if s.num_output_groups:
            D = f"{L}.downsample"
            for n in ("norm_tokens", "norm_post_tokens", "norm_x", "norm_new_x", "mlp_inter.fc1", "mlp_inter.fc2",
                      "pre_assign_attn.norm_post", "pre_assign_attn.norm2", "pre_assign_attn.attn.q_proj",
                      "pre_assign_attn.attn.k_proj", "pre_assign_attn.attn.v_proj", "pre_assign_attn.attn.proj",
                      "pre_assign_attn.mlp.fc1", "pre_assign_attn.mlp.fc2", "assign.q_proj", "assign.k_proj",
                      "assign.v_proj", "assign.proj", "mlp_channels.fc1", "mlp_channels.fc2"):
                keys |= wb(f"{D}.{n}")
    keys |= {"text_encoder.token_embedding.weight", "text_encoder.positional_embedding"} | wb("text_encoder.ln_final")
    for j in range(cfg.text.depth):
        R = f"text_encoder.transformer.resblocks.{j}"
        keys |= {f"{R}.attn.in_proj_weight", f"{R}.attn.in_proj_bias"}
        for n in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj"):
            keys |= wb(f"{R}.{n}")
    for p in ("img_projector", "text_projector"):
        keys |= wb(f"{p}.linear_hidden.0") | wb(f"{p}.linear_hidden.1") | wb(f"{p}.linear_out")
        keys |= {f"{p}.linear_hidden.1.running_mean", f"{p}.linear_hidden.1.running_var", f"{p}.linear_hidden.1.num_batches_tracked"}
    return keys


@pytest.fixture
def tiny_model():
    torch.manual_seed(0)
    return perturb_(groupseg.create_model("groupvit-tiny-test")).eval()


def _outputs(model):
    torch.manual_seed(3)
    px = torch.randn(2, 3, 32, 32)
    ids = torch.tensor([[49406, 320, 1929, 49407], [49406, 530, 49407, 0]])
    with torch.no_grad():
        return model.encode_image(px), model.encode_text(ids)


def test_nvlabs_checkpoint_loads_exactly(tmp_path):
    # NVlabs stores no head counts: it always uses width // 64 heads (at least 1), so build the model that way
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    for s in cfg.vision.stages:
        s.num_heads = 1
    cfg.text.num_heads = 1
    torch.manual_seed(0)
    tiny_model = perturb_(groupseg.create_model(cfg)).eval()
    sd = to_nvlabs_state_dict(tiny_model.state_dict())
    assert set(sd) == nvlabs_keys(tiny_model.cfg)
    assert sd["img_projector.linear_out.weight"].ndim == 3  # Conv1d kernels
    assert sd["text_encoder.transformer.resblocks.0.attn.in_proj_weight"].shape == (96, 32)
    # NVlabs checkpoints also pickle their config object: loading must not need (or run) its class
    path = tmp_path / "nv.pth"
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "config": argparse.Namespace(lr=1), "epoch": 3}, path)
    loaded = groupseg.load_model(path)
    for a, b in zip(_outputs(tiny_model), _outputs(loaded)):
        assert torch.allclose(a, b, atol=1e-6)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch /tmp/groupseg_pwned",))


def test_pth_loading_never_runs_pickled_code(tiny_model, tmp_path):
    if os.path.exists("/tmp/groupseg_pwned"):
        os.remove("/tmp/groupseg_pwned")
    sd = to_nvlabs_state_dict(tiny_model.state_dict())
    path = tmp_path / "evil.pth"
    torch.save({"model": sd, "payload": _Evil()}, path)
    groupseg.load_model(path)
    assert not os.path.exists("/tmp/groupseg_pwned")


def test_wrong_shape_names_key_and_shapes(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "w")
    cfg = groupseg.ModelConfig.load(tmp_path / "w" / "config.json")
    cfg.embed_dim = 24
    cfg.save(tmp_path / "w" / "config.json")
    with pytest.raises(CheckpointError, match=r"visual_proj\.fc2\.weight.*\(16, 32\).*\(24, 32\)"):
        groupseg.load_model(tmp_path / "w")


def test_unknown_keys_are_an_error(tiny_model, tmp_path):
    sd = to_nvlabs_state_dict(tiny_model.state_dict())
    sd["img_encoder.extra_head.weight"] = torch.zeros(3)
    torch.save({"model": sd}, tmp_path / "nv.pth")
    with pytest.raises(CheckpointError, match="does not know.*extra_head"):
        groupseg.load_model(tmp_path / "nv.pth")


def test_foreign_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        groupseg.load_model(tmp_path / "nothing")
    torch.save({"state_dict": {"encoder.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not an NVlabs GroupViT checkpoint"):
        groupseg.load_model(tmp_path / "other.pth")
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="garbage.pth"):
        groupseg.load_model(tmp_path / "garbage.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        groupseg.load_model(tmp_path / "empty")


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="nvidia/groupvit-gcc-yfcc"):
        groupseg.load_model("nvidia/groupvit-gcc-yfcc")


def test_named_architectures():
    names = groupseg.list_models()
    assert {"groupvit-s-2stage", "groupvit-s-1stage", "groupvit-tiny-test"} <= set(names)
    m = groupseg.create_model("groupvit-s-2stage")
    n = sum(p.numel() for p in m.parameters())
    assert 54e6 < n < 57e6, n  # the published gvit-s: 55.7 M parameters
    assert [s.num_group_tokens for s in m.cfg.vision.stages] == [64, 8, 0]


def test_convert_command_writes_own_format(tiny_model, tmp_path):
    from groupseg.cli import main as cli_main

    torch.save({"model": to_nvlabs_state_dict(tiny_model.state_dict())}, tmp_path / "nv.pth")
    assert cli_main(["convert", str(tmp_path / "nv.pth"), str(tmp_path / "out"), "--dtype", "fp16"]) == 0
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sd["visual.pos_embed"].dtype == torch.float16
    assert groupseg.load_model(tmp_path / "out").cfg.vision.stages == groupseg.load_model(tmp_path / "nv.pth").cfg.vision.stages


def test_one_stage_architecture_segments():
    cfg = groupseg.get_model_config("groupvit-s-1stage")
    assert [(s.num_group_tokens, s.num_output_groups) for s in cfg.vision.stages] == [(64, 8), (0, 0)]
    cfg.vision.width, cfg.text.width, cfg.text.depth, cfg.proj_hidden_dim = 64, 32, 1, 32
    for s in cfg.vision.stages:
        s.depth, s.num_heads = 1, 2
    cfg.text.num_heads = 2
    m = groupseg.create_model(cfg).eval()
    with torch.no_grad():
        seg = m.segmentation_logits(torch.randn(1, 3, 64, 96), m.encode_text(torch.tensor([[49406, 320, 49407]])))
    assert seg.shape == (1, 1, 64, 96)
