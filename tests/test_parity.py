"""groupseg equals transformers' GroupViT when it loads the same weights."""
import pytest
import torch

import groupseg
from groupseg.tokenizer import tokenize

from conftest import perturb_

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path, image_size=64):
    from transformers import GroupViTConfig, GroupViTModel

    cfg = GroupViTConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=96, depths=[2, 1, 1], num_hidden_layers=4,
                           num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16, projection_intermediate_dim=48,
    )
    torch.manual_seed(0)
    hf = perturb_(GroupViTModel(cfg)).eval()
    hf.save_pretrained(tmp_path / "hf")
    return hf


def test_transformers_parity(tmp_path):
    hf = _hf_model(tmp_path)
    model = groupseg.load_model(tmp_path / "hf")  # zero missing / unexpected keys, or it raises
    torch.manual_seed(1)
    px = torch.randn(3, 3, 64, 64)
    ids = tokenize(["a photo of a dog.", "two cats on a red sofa", "road"])
    with torch.no_grad():
        ref = hf(input_ids=ids, pixel_values=px, output_segmentation=True)
        img = model.encode_image(px)
        txt = model.encode_text(ids)
        seg = model.segmentation_logits(px, txt)
    assert (img - ref.image_embeds).abs().max() < 1e-4
    assert (txt - ref.text_embeds).abs().max() < 1e-4
    assert seg.shape == ref.segmentation_logits.shape == (3, 3, 64, 64)
    agree = (seg.argmax(1) == ref.segmentation_logits.argmax(1)).float().mean().item()
    assert agree >= 0.999


def test_converted_weights_round_trip(tmp_path):
    _hf_model(tmp_path)
    model = groupseg.load_model(tmp_path / "hf")
    model.save_pretrained(tmp_path / "own")
    again = groupseg.load_model(tmp_path / "own")
    px = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.encode_image(px), again.encode_image(px))
    assert again.cfg == model.cfg
