"""Save / load round trips of groupseg's own weights format (config.json + model.safetensors).

One parametrised test for every model variant whose weights must survive the trip: the plain tiny
model, the convolutional stem, the learnable assignment scale, and a model converted from
transformers' GroupViT.
"""
import pytest
import torch

import groupseg

from conftest import perturb_, tiny_transformers_groupvit


def _plain(tmp_path):
    return groupseg.create_model("groupvit-tiny-test")


def _conv_stem(tmp_path):
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    cfg.vision.stem = "conv"
    return groupseg.GroupViT(cfg)


def _assign_scale(tmp_path):
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    cfg.vision.assign_scale_init = 5.0
    return groupseg.GroupViT(cfg)


def _from_transformers(tmp_path):
    pytest.importorskip("transformers")
    tiny_transformers_groupvit(tmp_path / "hf")
    return groupseg.load_model(tmp_path / "hf")


VARIANTS = {"plain": _plain, "conv-stem": _conv_stem, "assign-scale": _assign_scale, "from-transformers": _from_transformers}


def _outputs(model, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    px = torch.randn(2, 3, size, size + 8, generator=g)
    ids = torch.tensor([[49406, 320, 1929, 49407], [49406, 530, 49407, 0]])
    with torch.no_grad():
        return model.encode_image(px), model.encode_text(ids)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_save_load_round_trip(variant, tmp_path):
    torch.manual_seed(0)
    model = VARIANTS[variant](tmp_path)
    if variant != "from-transformers":  # converted weights are perturbed already
        perturb_(model, seed=1)
    model.eval()
    model.save_pretrained(tmp_path / "w")
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == ["config.json", "model.safetensors"]
    size = model.cfg.vision.image_size
    ref = _outputs(model, size)
    for source in (tmp_path / "w", tmp_path / "w" / "model.safetensors"):  # the folder, or the file itself
        loaded = groupseg.load_model(source)
        assert loaded.cfg == model.cfg and not loaded.training
        for a, b in zip(ref, _outputs(loaded, size)):
            assert torch.equal(a, b), (variant, source.name)
    state = loaded.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # buffers too (BatchNorm stats)
