"""groupseg finetune: subsets, weak-class hiding, tags, the loop, outputs that load and still segment any word (its losses: test_segmentation_loss.py)."""
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import groupseg
from groupseg.layers.grouping import AssignAttention
from groupseg.training import finetune as FT
from groupseg.training import finetune_data as FD

RNG = np.random.default_rng(0)


def make_camvid_train(root: Path, n: int = 6, h: int = 32, w: int = 48) -> Path:
    """A CamVid-layout train split: left half sky (0), right half car (8), bottom rows road (3), some void (11)."""
    for i in range(n):
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "trainannot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "train" / f"f{i:03d}.png")
        lab = np.zeros((h, w), np.uint8)
        lab[:, w // 2 :] = 8 if i % 2 == 0 else 0  # car in every other image
        lab[-8:, :] = 3
        lab[0, :4] = 11
        Image.fromarray(lab, "L").save(root / "trainannot" / f"f{i:03d}.png")
    return root


def cfg_for(tmp_path: Path, weights: Path, root: Path, **kw) -> FT.FinetuneConfig:
    base = dict(dataset="camvid", data_root=str(root), split="train", weights=str(weights), out=str(tmp_path / "out"),
                epochs=2, batch_size=2, crop_size=32, short_side=32, scale_range=(1.0, 1.25), workers=0,
                precision="fp32", patches_per_class=4, templates="simple", log_every=1, min_steps=0, objective="ce")
    base.update(kw)
    return FT.FinetuneConfig(**base)


def test_subsets_are_seeded_and_sized():
    a = FD.select_subset(100, fraction=0.1, seed=3)
    assert a == FD.select_subset(100, fraction=0.1, seed=3) and len(a) == 10 and a == sorted(a)
    assert a != FD.select_subset(100, fraction=0.1, seed=4)
    assert len(FD.select_subset(100, images=7, seed=0)) == 7
    assert FD.select_subset(5) == [0, 1, 2, 3, 4]
    assert FD.select_subset(5, images=0) == []
    for bad in (1.5, -0.1):
        with pytest.raises(ValueError, match=r"--fraction must be in \(0, 1\]"):
            FD.select_subset(10, fraction=bad)


def test_tags_hiding_and_weak_class_names():
    t = np.array([[0, 0, 8], [3, 255, 8]])
    np.testing.assert_array_equal(FD.image_tags(t, 11).nonzero()[0], [0, 3, 8])
    hidden = FD.hide_classes(t, [8])
    np.testing.assert_array_equal(hidden, [[0, 0, 255], [3, 255, 255]])
    assert FD.resolve_weak_classes("Car, sky", ["sky", "road", "car"]) == [0, 2]
    with pytest.raises(ValueError, match="'boat' is not a class of this dataset"):
        FD.resolve_weak_classes("car,boat", ["sky", "road", "car"])


def test_median_frequency_weights_by_hand():
    a = np.array([[0, 0, 0, 1]])  # class 0: 3 of 4 pixels, class 1: 1 of 4
    b = np.array([[0, 2, 2, 255]])  # class 0: 1 of 3, class 2: 2 of 3 (ignore not counted)
    w = FD.median_frequency_weights([a, b], 4)
    f = np.array([4 / 7, 1 / 4, 2 / 3])  # pixels / pixels of the images where the class appears
    np.testing.assert_allclose(w[:3].numpy(), np.median(f) / f, rtol=1e-6)
    assert w[3] == 1.0  # never seen: no pixel of it reaches the loss anyway
    soft = FD.median_frequency_weights([a, b], 4, power=0.5)  # the square root: same order, smaller spread
    np.testing.assert_allclose(soft[:3].numpy(), np.sqrt(np.median(f) / f), rtol=1e-6)
    rare = np.zeros((10, 10), np.int64)
    rare[0, 0] = 1
    assert FD.median_frequency_weights([rare], 2, max_weight=10.0)[1] == 10.0  # capped (50 uncapped)
    assert FD.median_frequency_weights([rare], 2, max_weight=10.0, power=0.5)[1] == pytest.approx(10.0 ** 0.5)  # root of the capped
    # hidden weak pixels are IGNORE before counting: they never shape the weights either
    assert FD.median_frequency_weights([FD.hide_classes(a, [1])], 2)[1] == 1.0


def test_class_weight_choices_give_the_weights_they_name(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    w = {c: FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, class_weights=c)).class_weights
         for c in ("median-freq", "sqrt-median-freq", "none")}
    assert w["none"] is None
    assert w["median-freq"].max() > 1.0 > w["median-freq"].min()  # a real spread, so the roots differ from them
    torch.testing.assert_close(w["sqrt-median-freq"], w["median-freq"].sqrt())


def test_loader_hides_weak_pixels_and_keeps_their_tags(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, weak_classes="car"))
    assert ft.hidden == [8]
    for batch in ft._loader(0):
        assert not (batch["target"] == 8).any()
        assert set(batch["target"].unique().tolist()) <= {0, 3, 255}
    tags = torch.stack([ft.data[i]["tags"] for i in range(len(ft.data))])
    assert tags[:, 8].tolist() == [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]  # car present in even images only
    assert tags[:, 3].all() and not tags[:, 11 - 1].any()


def test_tags_are_those_of_the_crop_the_model_sees(tiny_weights, tmp_path):
    # car only in the right 6 of 48 columns: a 32-px crop shows it or not, and its tags say which
    root = tmp_path / "camvid"
    for i in range(6):
        (root / "train").mkdir(parents=True, exist_ok=True)
        (root / "trainannot").mkdir(parents=True, exist_ok=True)
        Image.fromarray(RNG.integers(0, 255, (32, 48, 3), dtype=np.uint8)).save(root / "train" / f"f{i:03d}.png")
        lab = np.zeros((32, 48), np.uint8)
        lab[:, -6:] = 8
        Image.fromarray(lab, "L").save(root / "trainannot" / f"f{i:03d}.png")
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, weak_classes="car", scale_range=(1.0, 1.0)))
    shown = []
    for epoch in range(4):
        ft.data.epoch = epoch
        for i in range(len(ft.data)):
            item = ft.data[i]
            hidden_px = int((item["target"] == 255).sum())  # the only ignore pixels are the hidden car
            assert item["tags"][8] == float(hidden_px > 0) and item["tags"][0] == float(hidden_px < 32 * 32)
            shown.append(hidden_px > 0)
    assert any(shown) and not all(shown)  # some crops show the car, some do not


def test_weak_pixels_never_reach_the_loss(tiny_weights, tmp_path, monkeypatch):
    root = make_camvid_train(tmp_path / "camvid")
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, weak_classes="car", epochs=1))
    seen = []
    real = ft.pixel_loss

    def spy(logp, target):
        seen.append(target.clone())
        return real(logp, target)

    real_comp = FT.complementary_loss
    comp_targets = []

    def spy_comp(logp, target, weak, tags, balance):
        comp_targets.append(target.clone())
        return real_comp(logp, target, weak, tags, balance)

    monkeypatch.setattr(ft, "pixel_loss", spy)
    monkeypatch.setattr(FT, "complementary_loss", spy_comp)
    ft.fit()
    assert seen and all(not (t == 8).any() for t in seen)
    assert comp_targets and all(not (t == 8).any() for t in comp_targets)  # the complementary loss sees only IGNORE
    import json

    recs = [json.loads(ln) for ln in (Path(ft.cfg.out) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3]  # log_every=1: every step logged ...
    assert all(r["tag_loss"] > 0 and r["comp_loss"] >= 0 and "ce_loss" in r for r in recs)  # ... with its weak-shot terms
    assert len(seen) == len(comp_targets) == 3


def test_finetune_writes_weights_that_segment_any_word(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    cfg = cfg_for(tmp_path, tiny_weights, root, objective="mix-match", epochs=3, mix_match_epochs=1)
    out = FT.Finetuner(cfg).fit()
    model = groupseg.load_model(out)
    assert model.cfg.tuned_classes[:4] == ["sky", "building", "pole", "road"]
    # one tuned row per class name and synonym (CamVid: 11 classes, 9 with one synonym each)
    assert model.tuned_class_embeds.shape == (20, model.cfg.embed_dim)
    assert model.cfg.tuned_owner[:5] == [0, 1, 1, 2, 2] and model.tuned_class_rows("road").shape == (2, model.cfg.embed_dim)
    assert model.cfg.groupings == 1  # tuned on the first stage's segments, and segments with them
    assert (out / "loss_curve.png").exists() and (out / "subset.txt").read_text().split() == [f"f{i:03d}" for i in range(6)]
    seg = groupseg.Segmenter.from_pretrained(out, templates="simple")
    assert seg.groupings == 1 and groupseg.Segmenter.from_pretrained(out, groupings=2).groupings == 2
    assert model.cfg.window == 32 and seg.window == 32  # segments in windows of the crop size it was tuned on
    assert groupseg.Segmenter.from_pretrained(out, window=0).window == 0
    labels, emb, owner = seg.class_embeddings(["road;street", "banana"])
    rows, own = model.tuned_class_rows("road"), emb[owner == 0]
    assert len(own) in (1, len(rows))  # tuned class: its first tuned row, or all of them (one per tuned synonym) ...
    torch.testing.assert_close(own, rows[: len(own)])  # ... never the text tower's embedding of "street"
    assert owner.tolist()[-1] == 1 and int((owner == 1).sum()) == 1  # banana via the text tower
    base = groupseg.Segmenter.from_pretrained(tiny_weights, templates="simple")
    torch.testing.assert_close(emb[-1], base.word_embeddings(["banana"])[0])  # the text side is untouched ...
    moved = [k for k, v in base.model.state_dict().items() if k.startswith("visual.") and not torch.equal(v, model.state_dict()[k])]
    assert moved  # ... while the vision tower was fine-tuned
    res = seg.segment(root / "train" / "f000.png", ["road", "banana", "kite"])
    assert res.label_map.shape == (32, 48) and set(np.unique(res.label_map)) <= {0, 1, 2}


def test_zero_images_is_the_zero_shot_model(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    out = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, images=0)).fit()
    base = groupseg.Segmenter.from_pretrained(tiny_weights, templates="simple")
    tuned = groupseg.Segmenter.from_pretrained(out, templates="simple")
    img = root / "train" / "f001.png"
    vocab = (Path(groupseg.__file__).parents[1] / "prompts" / "vocab" / "camvid.txt").read_text()
    vocab = [ln for ln in vocab.splitlines() if ln.strip() and not ln.startswith("#")]
    a, b = base.segment(img, vocab), tuned.segment(img, vocab)
    np.testing.assert_array_equal(a.label_map, b.label_map)
    torch.testing.assert_close(a.scores, b.scores)


def test_classifier_starts_from_the_class_text_embeddings(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    vf = tmp_path / "names.txt"
    names = [f"thing{i}" for i in range(11)]
    vf.write_text("\n".join(["thing0;alias0"] + names[1:]) + "\n")  # class 0 has a synonym
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, vocab_file=str(vf)))
    seg = groupseg.Segmenter.from_pretrained(tiny_weights, templates="simple")
    # one row per name, each its own prompt-ensembled embedding (not the sum of a class's synonyms)
    torch.testing.assert_close(ft.head.classifier.data, seg.word_embeddings(["thing0", "alias0"] + names[1:]))
    assert ft.head.owner.tolist() == [0, 0] + list(range(1, 11)) and ft.labels[0] == "thing0"


def test_head_scores_synonyms_as_inference_at_initialisation(tiny_weights, tmp_path):
    from groupseg.classify import class_logits

    root = make_camvid_train(tmp_path / "camvid")
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, assign_scale=0.0))  # the CamVid vocabulary, with synonyms
    seg = groupseg.Segmenter.from_pretrained(tiny_weights, templates="simple")
    labels, text, owner = seg.class_embeddings(ft.ds.vocab)
    assert len(labels) == 11 and len(text) == 20  # synonyms: a class scores as its best name
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = ft.head.eval()(px)["group_logits"]
        g = seg.model.encode_groups(px, 1)
        want = class_logits(g["group_embeds"].float(), text, owner, 11, seg.model.logit_scale.exp().clamp(max=100).float())
    torch.testing.assert_close(got, want)
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_resume_auto_continues_and_fresh_run_refuses_old_checkpoints(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=1)).fit()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=2)).fit()
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=2, resume="auto"))
    ft.fit()
    assert ft.epoch == 2 and ft.step == 6  # 3 batches of 2 per epoch, the first epoch not redone
    with pytest.raises(ValueError, match="different image subset"):
        FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=3, resume="auto", images=2)).fit()


def test_small_subsets_get_at_least_min_steps(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, images=2, epochs=1, min_steps=5))
    ft.fit()
    assert ft.epochs == 5 and ft.step == 5  # one batch of the 2 images per epoch


def test_cli_bad_input_is_one_line(tiny_weights, tmp_path, capsys):
    from groupseg.cli import main

    root = make_camvid_train(tmp_path / "camvid")
    common = ["finetune", "--dataset", "camvid", "--data-root", str(root), "--weights", str(tiny_weights), "--out", str(tmp_path / "o")]
    assert main(common + ["--weak-classes", "car,boat"]) == 2
    assert "'boat' is not a class" in capsys.readouterr().err
    assert main(common + ["--fraction", "1.5"]) == 2
    assert "--fraction must be in (0, 1]" in capsys.readouterr().err
    assert main(common + ["--assign-scale", "-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--assign-scale must be >= 0, got -1.0" in err and len(err.splitlines()) == 1
    assert main(common + ["--weak-classes", "car", "--tag-topk", "0"]) == 2
    assert "--tag-topk must be in (0, 1], got 0.0" in capsys.readouterr().err
    assert main(common + ["--weak-classes", "car", "--comp-balance", "-0.5"]) == 2
    assert "--comp-balance must be >= 0, got -0.5" in capsys.readouterr().err
    assert main(common + ["--workers", "-2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--workers must be >= 0 or -1 (auto), got -2" in err and len(err.splitlines()) == 1
    assert main(common + ["--batch-size", "0"]) == 2
    assert "--batch-size must be >= 1, got 0" in capsys.readouterr().err
    (root / "val").mkdir()
    assert main(common + ["--split", "val"]) == 2
    err = capsys.readouterr().err.strip()
    assert "valannot" in err and len(err.splitlines()) == 1


def test_assign_scale_sharpens_without_moving_segments_and_survives_export(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    img = root / "train" / "f000.png"
    model = groupseg.load_model(tiny_weights).eval()
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a0 = model.visual(px).assignments[0]
    model.sharpen_assignments(20.0)
    with torch.no_grad():
        a1 = model.visual(px).assignments[0]
    assert a1.amax(1).mean() > a0.amax(1).mean()  # sharper soft assignment
    torch.testing.assert_close(a1.argmax(1), a0.argmax(1), rtol=0, atol=0)  # same hard segments
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, assign_scale=20.0, grouping_loss="hard", assign_noise=False, epochs=1))
    scales = [n for n, p in ft.head.named_parameters() if n.endswith("assign.logit_scale")]
    assert scales and all(p.requires_grad for n, p in ft.head.named_parameters() if n in scales)
    ft._train_mode()
    assert all(not m.training for m in ft.head.modules() if isinstance(m, AssignAttention))  # no Gumbel noise
    assert ft.head.model.visual.training
    out = ft.fit()
    tuned = groupseg.load_model(out)
    assert tuned.cfg.vision.assign_scale_init == 20.0
    assert any(k.endswith("assign.logit_scale") for k in tuned.state_dict())
    res = groupseg.Segmenter.from_pretrained(out, templates="simple").segment(img, ["road", "kite"])
    assert res.label_map.shape == (32, 48) and set(np.unique(res.label_map)) <= {0, 1}


def test_optimizer_gives_norms_biases_and_scales_no_weight_decay(tiny_weights, tmp_path):
    root = make_camvid_train(tmp_path / "camvid")
    cfg = cfg_for(tmp_path, tiny_weights, root, weight_decay=0.05, lr=1e-3, backbone_lr_mult=0.3, assign_scale=20.0)
    ft = FT.Finetuner(cfg)
    opt = ft.build_optimizer()
    decay = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    lr = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    named = dict(ft.head.named_parameters())
    # each trainable parameter once (the text tower is frozen; the multi-label temperature is a pretraining loss's)
    trainable = [n for n, p in named.items() if p.requires_grad and n != "model.multi_label_logit_scale"]
    assert sorted(id(named[n]) for n in trainable) == sorted(decay)
    # LayerNorms, biases, the logit scale, the assignment scales and the model's no_weight_decay() names take none
    skip = {f"model.{n}" for n in ft.head.model.no_weight_decay()}
    for n in ("model.visual.norm.weight", "model.visual.norm.bias", "model.visual_proj.fc2.bias", "model.logit_scale",
              "model.visual.pos_embed", "model.visual.stages.0.group_token"):
        assert n in named and decay[id(named[n])] == 0.0, n
    scales = [n for n in named if n.endswith("assign.logit_scale")]
    assert scales and all(decay[id(named[n])] == 0.0 for n in scales)
    assert all(decay[id(named[n])] == 0.0 for n in named if n in skip and id(named[n]) in decay)
    # weight matrices and the classifier keep it
    for n in ("model.visual.stages.0.blocks.0.attn.qkv.weight", "model.visual_proj.fc2.weight", "classifier", "sim_head.0.weight"):
        assert decay[id(named[n])] == 0.05, n
    assert lr[id(named["model.visual.norm.weight"])] == pytest.approx(1e-3 * 0.3)  # the backbone's rate ...
    assert lr[id(named["model.logit_scale"])] == lr[id(named[scales[0]])] == pytest.approx(1e-3)  # ... and the heads'


def test_resume_on_a_non_main_process_leaves_metrics_alone(tiny_weights, tmp_path, monkeypatch):
    import json

    root = make_camvid_train(tmp_path / "camvid")
    FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=1)).fit()
    metrics = tmp_path / "out" / "metrics.jsonl"
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3]
    late = json.dumps({"step": 99, "epoch": 1, "loss": 1.0, "lr": 0.0}) + "\n"  # logged after the last checkpoint
    metrics.write_text(metrics.read_text() + late)
    before = metrics.read_text()
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=1, resume="auto"))
    with monkeypatch.context() as m:  # this process is rank 1 of 2: the file is the main process's to rewrite
        m.setattr(type(ft.acc), "is_main_process", property(lambda self: False))
        ft.fit()
    assert ft.step == 3  # it did resume ...
    assert metrics.read_text() == before  # ... without touching the main process's file
    FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=1, resume="auto")).fit()
    assert [json.loads(ln)["step"] for ln in metrics.read_text().splitlines()] == [1, 2, 3]  # the main process trims it


def _argv(cfg: FT.FinetuneConfig) -> list[str]:
    """``groupseg finetune`` options that build ``cfg``."""
    import dataclasses

    out = ["finetune"]
    for k, v in dataclasses.asdict(cfg).items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + flag[2:])
        elif isinstance(v, (tuple, list)):
            out += [flag, *map(str, v)]
        else:
            out += [flag, str(v)]
    return out


@pytest.mark.slow
def test_cli_resume_auto_skips_a_damaged_checkpoint_and_ends_bitwise_equal(tiny_weights, tmp_path, capsys, caplog):
    from safetensors.torch import load_file

    from groupseg.cli import main
    from groupseg.training.checkpoint import list_checkpoints

    root = make_camvid_train(tmp_path / "camvid")
    ref = cfg_for(tmp_path, tiny_weights, root, epochs=8, out=str(tmp_path / "ref"))
    FT.Finetuner(ref).fit()
    run = cfg_for(tmp_path, tiny_weights, root, epochs=8, out=str(tmp_path / "run"))
    assert main(_argv(run)) == 0
    ckpts = Path(run.out) / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpts)] == ["ckpt-00000021", "ckpt-00000024"]  # every 7 epochs of 3 steps, and the last
    newest = ckpts / "ckpt-00000024" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[:-100])  # truncated
    (Path(run.out) / "model.safetensors").unlink()  # the weights must come from the resumed run
    capsys.readouterr()
    assert main(_argv(dataclasses_replace(run, resume="auto"))) == 0
    cap = capsys.readouterr()
    skips = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skips) == 1 and "ckpt-00000024: model.safetensors has" in skips[0]  # one line, naming it and why
    assert cap.out.strip().splitlines()[-1].endswith("48 labelled crops read over 24 steps, 0 skipped")
    assert (ckpts / "ckpt-00000024.damaged").is_dir()  # kept, not deleted
    a, b = load_file(str(Path(ref.out) / "model.safetensors")), load_file(str(Path(run.out) / "model.safetensors"))
    assert a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def dataclasses_replace(cfg, **kw):
    import dataclasses

    return dataclasses.replace(cfg, **kw)


def test_patch_tokens_come_from_the_model_api(tiny_weights, tmp_path):
    model = groupseg.load_model(tiny_weights).eval()
    px = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    grabbed = []  # what the fine-tuning head used to take with a hook: the first stage's last block, patch part
    hook = model.visual.stages[0].blocks[-1].register_forward_hook(lambda m, i, o: grabbed.append(o))
    with torch.no_grad():
        g = model.encode_groups(px, 1, return_patch_tokens=True)
        plain = model.encode_groups(px, 1)
    hook.remove()
    h, w = g["grid"]
    assert g["patch_tokens"].shape == (2, h * w, model.visual.width) and "patch_tokens" not in plain
    torch.testing.assert_close(g["patch_tokens"], grabbed[0][:, : h * w], rtol=0, atol=0)
    torch.testing.assert_close(g["group_embeds"], plain["group_embeds"], rtol=0, atol=0)  # same segments either way
    root = make_camvid_train(tmp_path / "camvid")
    ft = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root))
    assert not any(m._forward_hooks for m in ft.head.modules())  # the head reaches into nothing


def test_crops_equal_resizing_the_whole_image_then_cropping(tiny_weights, tmp_path):
    # the loader resamples only the crop's box of the photo; the reference resizes the whole photo
    # to the random scale, then crops (the same draws of the crop's generator)
    root = make_camvid_train(tmp_path / "camvid", n=3, h=60, w=90)
    cfg = cfg_for(tmp_path, tiny_weights, root, short_side=48, scale_range=(0.8, 1.6), color_jitter=0.0)
    ft = FT.Finetuner(cfg)
    mean, std = torch.tensor(ft.data.mean).view(3, 1, 1), torch.tensor(ft.data.std).view(3, 1, 1)
    for epoch in range(3):
        ft.data.epoch = epoch
        for i in range(len(ft.data)):
            sample = ft.data.ds.samples[ft.data.indices[i]]
            img = Image.open(sample.image).convert("RGB")
            lab = Image.fromarray(FD.vocab_targets(ft.data.ds, sample).astype(np.uint8))
            rng = np.random.default_rng([cfg.seed, epoch, ft.data.indices[i]])
            s = cfg.short_side * rng.uniform(*cfg.scale_range) / min(img.size)
            w, h = round(img.width * s), round(img.height * s)
            y, x = int(rng.integers(0, h - 32 + 1)), int(rng.integers(0, w - 32 + 1))
            px = torch.from_numpy(np.array(img.resize((w, h), Image.BILINEAR))).permute(2, 0, 1)[:, y : y + 32, x : x + 32]
            t = torch.from_numpy(np.asarray(lab.resize((w, h), Image.NEAREST)).astype(np.int64))[y : y + 32, x : x + 32]
            flipped = rng.random() < 0.5
            if flipped:
                px, t = px.flip(-1), t.flip(-1)
            item = ft.data[i]
            # nearest neighbour: equal, except where a pixel centre falls exactly on a source pixel edge
            centre = [(np.arange(32) + o + 0.5) * n / m for o, n, m in ((y, img.height, h), (x, img.width, w))]
            clear = [np.abs(c - np.round(c)) > 1e-6 for c in centre]
            exact = torch.from_numpy(clear[0][:, None] & clear[1][None, :])
            exact = exact.flip(-1) if flipped else exact
            assert exact.float().mean() > 0.8 and torch.equal(item["target"][exact], t[exact])
            got = (item["pixels"] * std + mean) * 255  # back to 0..255
            diff = (got - px.float()).abs()  # the same filter taps; fixed-point rounding differs by a level or two
            assert diff.max() <= 2.01 and diff.mean() < 0.25


def test_decoded_photos_are_kept_within_budget_and_give_the_same_crops(tiny_weights, tmp_path, monkeypatch):
    # the training process keeps decoded photos between epochs; its crops equal those of a dataset
    # that decodes every time (budget 0), and the budget bounds what it keeps
    root = make_camvid_train(tmp_path / "camvid", n=4, h=40, w=60)
    def items(data):
        out = []
        for epoch in range(3):
            data.epoch = epoch
            out += [data[i] for i in range(len(data))]
        return out

    kept = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, color_jitter=0.4)).data
    from_memory = items(kept)
    assert len(kept._decoded) == 4 and kept._decoded_bytes == 4 * 5 * 40 * 60
    monkeypatch.setattr(FD, "DECODED_CACHE_BYTES", 0)
    fresh = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, color_jitter=0.4)).data
    for a, b in zip(from_memory, items(fresh), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in ("pixels", "target", "tags"))
    assert not fresh._decoded
    monkeypatch.setattr(FD, "DECODED_CACHE_BYTES", 2 * 5 * 40 * 60)  # room for two photos
    half = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root)).data
    [half[i] for i in range(len(half))]
    assert sorted(half._decoded) == [0, 1]


def _params_after_each_step(ft: FT.Finetuner) -> list[dict[str, torch.Tensor]]:
    """Record ``ft``'s trainable parameters (by name, under ``model.``) after every optimizer step of its run."""
    names = {id(p): n[len("model."):] for n, p in ft.head.named_parameters() if n.startswith("model.visual_proj.")}
    seen: list[dict[str, torch.Tensor]] = []

    def hook(opt, args, kwargs):
        seen.append({names[id(p)]: p.detach().clone() for g in opt.param_groups for p in g["params"] if id(p) in names})

    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(hook)
    try:
        ft.fit()
    finally:
        handle.remove()
    return seen


def test_average_weights_exports_the_mean_of_the_last_steps_and_survives_resume(tiny_weights, tmp_path):
    from safetensors.torch import load_file

    root = make_camvid_train(tmp_path / "camvid")
    # 3 steps an epoch, 8 epochs: checkpoints after steps 21 and 24; --average-weights 0.5 averages steps 13-24
    plain = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=8, out=str(tmp_path / "plain")))
    steps = _params_after_each_step(plain)
    assert len(steps) == 24 and set(steps[0]) and all(s.keys() == steps[0].keys() for s in steps)
    avg = FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=8, out=str(tmp_path / "avg"), average_weights=0.5))
    assert len(_params_after_each_step(avg)) == 24  # the same run: averaging never touches the trained weights
    last, mean = load_file(str(tmp_path / "plain" / "model.safetensors")), load_file(str(tmp_path / "avg" / "model.safetensors"))
    for name in steps[0]:
        want = torch.stack([s[name] for s in steps[12:]]).mean(0)
        assert torch.allclose(last[name], steps[-1][name]) and not torch.allclose(mean[name], steps[-1][name])
        assert torch.allclose(mean[name], want, atol=1e-6), name
    # the running average is part of every checkpoint: resuming from step 21 ends with the same export
    ckpts = tmp_path / "avg" / "checkpoints"
    import shutil

    shutil.rmtree(ckpts / "ckpt-00000024")
    (tmp_path / "avg" / "model.safetensors").unlink()
    FT.Finetuner(cfg_for(tmp_path, tiny_weights, root, epochs=8, out=str(tmp_path / "avg"), average_weights=0.5, resume="auto")).fit()
    again = load_file(str(tmp_path / "avg" / "model.safetensors"))
    assert all(torch.allclose(again[n], mean[n], atol=1e-6) for n in steps[0])


def test_average_weights_out_of_range_is_refused(tiny_weights, tmp_path):
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="--average-weights must be in"):
            cfg_for(tmp_path, tiny_weights, tmp_path, average_weights=bad)
