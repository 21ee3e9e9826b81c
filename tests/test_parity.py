"""groupseg equals transformers' GroupViT when it loads the same weights."""
import pytest
import torch

import groupseg
from groupseg.tokenizer import tokenize

from conftest import tiny_transformers_groupvit

transformers = pytest.importorskip("transformers")


def _hf_model(tmp_path):
    return tiny_transformers_groupvit(tmp_path / "hf")


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

