"""Leave-one-sequence-out model selection: the held-out sequence never reaches training."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groupseg.eval.datasets import hold_out_sequence, load_dataset, sequence_of
from groupseg.training import finetune as FT
from groupseg.training.finetune_data import photometric

SEQUENCES = {"0001TP": 3, "0006R0": 2, "0016E5": 4}


def make_sequences(root: Path, h: int = 32, w: int = 48) -> Path:
    """A CamVid-layout train split whose frames come from three sequences (names as CamVid's)."""
    rng = np.random.default_rng(1)
    (root / "train").mkdir(parents=True)
    (root / "trainannot").mkdir(parents=True)
    for seq, n in SEQUENCES.items():
        for i in range(n):
            name = f"{seq}_{1000 + 30 * i:06d}.png"
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / name)
            lab = np.zeros((h, w), np.uint8)
            lab[h // 2 :] = 3
            Image.fromarray(lab, "L").save(root / "trainannot" / name)
    return root


def test_sequence_of_camvid_names():
    assert sequence_of("0016E5_07959") == "0016E5" and sequence_of("Seq05VD_f00030") == "Seq05VD"


def test_held_and_rest_partition_the_split_by_sequence(tmp_path):
    ds = load_dataset("camvid", make_sequences(tmp_path / "camvid"), "train")
    for seq, n in SEQUENCES.items():
        held, rest = hold_out_sequence(ds, seq, "held"), hold_out_sequence(ds, seq, "rest")
        assert len(held) == n and {sequence_of(s.stem) for s in held.samples} == {seq}
        assert seq not in {sequence_of(s.stem) for s in rest.samples}
        assert sorted(s.stem for s in held.samples + rest.samples) == sorted(s.stem for s in ds.samples)
        assert hold_out_sequence(ds, seq, "rest").samples == rest.samples  # reproducible
    with pytest.raises(ValueError, match="sequence 'Seq05VD' is not in this camvid split; its sequences: 0001TP, 0006R0, 0016E5"):
        hold_out_sequence(ds, "Seq05VD", "rest")


def test_finetuning_never_sees_a_frame_of_the_held_out_sequence(tiny_weights, tmp_path):
    root = make_sequences(tmp_path / "camvid")
    cfg = FT.FinetuneConfig(dataset="camvid", data_root=str(root), split="train", weights=str(tiny_weights),
                            out=str(tmp_path / "out"), holdout_sequence="0006R0", epochs=1, batch_size=2,
                            crop_size=32, short_side=32, workers=0, precision="fp32", templates="simple",
                            min_steps=0, objective="ce")
    ft = FT.Finetuner(cfg)
    used = [ft.ds.samples[i].stem for i in ft.subset]
    assert len(used) == 7 and not any(s.startswith("0006R0") for s in used)
    seen = {ft.data.ds.samples[i].stem for i in ft.data.indices}
    assert seen == set(used)
    with pytest.raises(ValueError, match="sequence 'nope'"):
        FT.Finetuner(FT.FinetuneConfig(**{**cfg.__dict__, "holdout_sequence": "nope"}))


def test_photometric_augmentation_is_seeded_and_changes_colours():
    px = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8))
    a = photometric(px, 0.4, np.random.default_rng(5))
    b = photometric(px, 0.4, np.random.default_rng(5))
    c = photometric(px, 0.4, np.random.default_rng(6))
    assert a.dtype == torch.uint8 and a.shape == px.shape
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, px)
    with pytest.raises(ValueError, match="--color-jitter must be in \\[0, 1\\], got 2"):
        FT.FinetuneConfig(dataset="camvid", data_root=".", out="x", color_jitter=2.0)


def test_eval_scores_only_the_held_out_sequence(tiny_weights, tmp_path):
    import json

    from groupseg.eval.main import main as eval_main

    root = make_sequences(tmp_path / "camvid")
    out = tmp_path / "r.json"
    rc = eval_main(["--dataset", "camvid", "--data-root", str(root), "--split", "train", "--holdout-sequence", "0001TP",
                    "--weights", str(tiny_weights), "--short-side", "32", "--out", str(out), "--device", "cpu"])
    assert rc == 0
    assert json.loads(out.read_text())["num_images"] == SEQUENCES["0001TP"]
