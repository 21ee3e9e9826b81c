"""The model shipped inside the package: loads with no network and no weights argument, and segments."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import groupseg
from groupseg.pretrained import SHIPPED_DIR

DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.delenv("GROUPSEG_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # no user cache in the way


def test_default_weights_are_shipped_small_and_self_contained():
    st = SHIPPED_DIR / "model.safetensors"
    assert st.exists(), f"the default model is missing from the package ({SHIPPED_DIR})"
    total = sum(f.stat().st_size for f in SHIPPED_DIR.rglob("*") if f.is_file())
    assert total <= 60 * 2**20  # the limit on committed weights
    cfg = groupseg.ModelConfig.load(SHIPPED_DIR / "config.json")
    if cfg.text.kind == "hf":  # the text tower's tokenizer travels with the weights, not in a wheel
        assert (SHIPPED_DIR / "tokenizer").is_dir()


@pytest.mark.slow
def test_default_model_segments_offline(offline):
    seg = groupseg.Segmenter.from_pretrained()
    # with no weights argument, no cache and no network, the model is the one shipped in the package
    from safetensors.torch import load_file

    shipped = load_file(SHIPPED_DIR / "model.safetensors")
    state = seg.model.state_dict()
    assert seg.model.cfg == groupseg.ModelConfig.load(SHIPPED_DIR / "config.json")
    assert set(shipped) <= set(state) and all(torch.equal(state[k], v.to(state[k].dtype)) for k, v in shipped.items())
    assert seg.model.tuned_class_embeds is None and not seg.model.training
    r = seg.segment(DOCS / "cat.jpg", ["cat", "grass", "person", "water"])
    assert r.label_map.shape[::-1] == r.image.size
    assert set(np.unique(r.label_map)) <= {0, 1, 2, 3}
    # whole images by default (fast with large vocabularies); windows of the training size on request
    assert seg.window == 0
    win = groupseg.Segmenter.from_pretrained(window=seg.cfg.vision.image_size)
    assert win.segment(DOCS / "cat.jpg", ["cat", "grass"]).label_map.shape == r.label_map.shape
    img = seg.encode_images([DOCS / "cat.jpg", DOCS / "rocket.jpg"])
    txt = seg.encode_texts(["a cat", "a rocket launch", "a dog on grass"])
    assert img.shape == (2, seg.cfg.embed_dim) and txt.shape == (3, seg.cfg.embed_dim)
    torch.testing.assert_close(img.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(txt.norm(dim=-1), torch.ones(3))


@pytest.mark.slow
@pytest.mark.subprocess
def test_cli_segments_with_no_weights_argument(offline, tmp_path):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-m", "groupseg.cli", "segment", str(DOCS / "cat.jpg"), "--vocab", "cat,grass,person",
                        "--out", str(tmp_path / "o"), "--quiet"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "o" / "cat_overlay.png").exists() and (tmp_path / "o" / "cat_labels.png").exists()
