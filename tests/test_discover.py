"""STEGO head, cluster probe, self-training and ``groupseg discover`` on tiny data the tests write."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import groupseg
from groupseg.loss.correspondence import correspondence_loss, derangement, pair_loss
from groupseg.stego import MiniBatchKMeans, StegoHead, fit_cluster_probe, knn_pairs
from groupseg.training.selftrain import UNSURE, keep_thresholds, margins, pseudo_labels


# ----------------------------------------------------------------------------- loss vs brute force
def _cos(a, b):
    return float(a @ b / (a.norm() * b.norm()))


def _brute_pair(f1, f2, c1, c2, shift):
    """Per position pair, as the paper writes it: -(F_hwij - mean_i'j' F_hwi'j' - b) max(S_hwij, 0)."""
    B, _, P = f1.shape
    Q = f2.shape[2]
    out = torch.zeros(B, P, Q)
    for b in range(B):
        for p in range(P):
            Fp = [_cos(f1[b, :, p], f2[b, :, q]) for q in range(Q)]
            mean = sum(Fp) / Q
            for q in range(Q):
                S = _cos(c1[b, :, p], c2[b, :, q])
                out[b, p, q] = -(Fp[q] - mean - shift) * max(S, 0.0)
    return out


def _bilinear(x, cx, cy):
    """x (C, h, w) at normalised (cx, cy) in [-1, 1], align_corners=True, by hand."""
    _, h, w = x.shape
    px, py = (cx + 1) / 2 * (w - 1), (cy + 1) / 2 * (h - 1)
    x0, y0 = int(np.floor(px)), int(np.floor(py))
    x1, y1 = min(x0 + 1, w - 1), min(y0 + 1, h - 1)
    ax, ay = px - x0, py - y0
    return (x[:, y0, x0] * (1 - ax) * (1 - ay) + x[:, y0, x1] * ax * (1 - ay)
            + x[:, y1, x0] * (1 - ax) * ay + x[:, y1, x1] * ax * ay)


def test_pair_loss_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    f1, f2 = torch.randn(2, 5, 4, generator=g), torch.randn(2, 5, 3, generator=g)
    c1, c2 = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 3, generator=g)
    got = pair_loss(f1, f2, c1, c2, 0.2)
    want = _brute_pair(f1, f2, c1, c2, 0.2)
    assert torch.allclose(got, want, atol=1e-5)
    assert (want == 0).any() and (want != 0).any()  # the zero clamp acted on some pairs, not all


def test_correspondence_loss_matches_brute_force_per_pixel():
    g = torch.Generator().manual_seed(1)
    B, C, D, h, w, n = 3, 6, 4, 5, 4, 3
    feats, feats_k = torch.randn(B, C, h, w, generator=g), torch.randn(B, C, h, w, generator=g)
    codes, codes_k = torch.randn(B, D, h, w, generator=g), torch.randn(B, D, h, w, generator=g)
    shifts, weights = (0.1, 0.2, 0.3), (0.7, 0.5, 0.9)
    got, parts = correspondence_loss(feats, feats_k, codes, codes_k, shifts, weights, torch.Generator().manual_seed(5), n, 2)
    # replay the same draws: positions of the images, of their neighbours, then the random pairings
    rg = torch.Generator().manual_seed(5)
    p1 = torch.rand(B, n * n, 2, generator=rg) * 2 - 1
    p2 = torch.rand(B, n * n, 2, generator=rg) * 2 - 1
    perms = [derangement(B, rg) for _ in range(2)]

    def at(x, pts):
        return torch.stack([torch.stack([_bilinear(x[b], *pts[b, i].tolist()) for i in range(n * n)], 1) for b in range(B)])

    f, c, fk, ck = at(feats, p1), at(codes, p1), at(feats_k, p2), at(codes_k, p2)
    self_ = _brute_pair(f, f, c, c, shifts[0]).mean()
    knn = _brute_pair(f, fk, c, ck, shifts[1]).mean()
    rand = torch.stack([_brute_pair(f, fk[p], c, ck[p], shifts[2]).mean() for p in perms]).mean()
    assert parts["self"] == pytest.approx(float(self_), abs=1e-5)
    assert parts["knn"] == pytest.approx(float(knn), abs=1e-5)
    assert parts["rand"] == pytest.approx(float(rand), abs=1e-5)
    assert float(got) == pytest.approx(float(0.7 * self_ + 0.5 * knn + 0.9 * rand), abs=1e-5)


def test_derangement_has_no_fixed_point():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7):
        for _ in range(20):
            assert not (derangement(n, g) == torch.arange(n)).any()


# ----------------------------------------------------------------------------- the loss on a toy case
def _toy_features(seed=0, B=8, C=16, h=6, w=6):
    """Two kinds of pixels (left / right half of each image, which side is which varies), each
    with its own feature direction plus noise: correlated within a kind, not across."""
    g = torch.Generator().manual_seed(seed)
    a, b = torch.randn(C, generator=g), torch.randn(C, generator=g)
    kind = torch.zeros(B, h, w, dtype=torch.long)
    kind[:, :, w // 2 :] = 1
    kind[::2] = 1 - kind[::2]
    base = torch.where(kind[:, None].bool(), b[None, :, None, None], a[None, :, None, None])
    return base + 0.3 * torch.randn(B, C, h, w, generator=g), kind


def _eval_loss(head, feats, seed=3):
    with torch.no_grad():
        codes = head(feats)
        loss, _ = correspondence_loss(feats, feats.roll(1, 0), codes, codes.roll(1, 0), (0.1, 0.1, 0.2), (1, 1, 1),
                                      torch.Generator().manual_seed(seed), 6, 3)
    return float(loss)


def test_loss_pulls_correlated_pixels_together_and_pushes_the_others_apart():
    torch.manual_seed(0)
    feats, kind = _toy_features()
    head = StegoHead(16, 8, dropout=0.0)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    before = _eval_loss(head, feats)
    for _ in range(150):
        codes = head(feats)
        loss, _ = correspondence_loss(feats, feats.roll(1, 0), codes, codes.roll(1, 0), (0.1, 0.1, 0.2), (1, 1, 1), gen, 6, 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        z = F.normalize(head(feats), dim=1).permute(0, 2, 3, 1).reshape(-1, 8)
    sim, same = z @ z.T, (kind.reshape(-1)[:, None] == kind.reshape(-1)[None])
    assert sim[same].mean() > 0.9  # same kind: one direction
    assert sim[~same].mean() < 0.1  # the other kind: pushed to orthogonal (the zero clamp) or beyond
    trained = _eval_loss(head, feats)
    collapsed = StegoHead(16, 8, dropout=0.0)  # every pixel the same code
    with torch.no_grad():
        for conv in (collapsed.linear, collapsed.nonlinear[2]):
            conv.weight.zero_()
        collapsed.linear.bias.fill_(1.0)
    assert trained < before and trained < _eval_loss(collapsed, feats) - 0.05


# ----------------------------------------------------------------------------- neighbours and probe
def test_knn_pairs_are_never_the_image_itself():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randn(12, 8, generator=g)
    glob = imgs.repeat_interleave(5, 0) + 0.01 * torch.randn(60, 8, generator=g)  # five near-identical crops per photo
    groups = torch.arange(12).repeat_interleave(5)
    nb = knn_pairs(glob, 4, groups, chunk=7)
    assert nb.shape == (60, 4)
    assert not (nb == torch.arange(60)[:, None]).any()
    assert not (groups[nb] == groups[:, None]).any()  # not even another crop of the same photo
    # and they are the nearest of the other photos' crops
    sim = F.normalize(glob, dim=-1) @ F.normalize(glob, dim=-1).T
    sim[groups[:, None] == groups[None]] = -2
    assert torch.equal(nb, sim.topk(4, dim=1).indices)
    with pytest.raises(ValueError):
        knn_pairs(glob[:10], 8, groups[:10])  # 2 photos cannot give 8 neighbours from other photos


def test_cluster_probe_recovers_a_planted_clustering():
    g = torch.Generator().manual_seed(0)
    true_centres = F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    truth = torch.randint(5, (3000,), generator=g)
    x = true_centres[truth] + 0.15 * torch.randn(3000, 16, generator=g)
    batches = [x[i : i + 200] for i in range(0, 3000, 200)]  # a stream of mini-batches
    centres = fit_cluster_probe(batches, 5, epochs=3, seed=0)
    pred = (F.normalize(x, dim=-1) @ centres.T).argmax(1)
    conf = torch.zeros(5, 5, dtype=torch.long).index_put_((pred, truth), torch.ones(3000, dtype=torch.long), accumulate=True)
    assert (conf.max(1).values.sum() / 3000) > 0.98  # each found cluster is one planted cluster
    assert (conf > 50).sum(0).eq(1).all()  # and each planted cluster is found once
    with pytest.raises(ValueError):
        MiniBatchKMeans(1)


# ----------------------------------------------------------------------------- self-training
def test_pseudo_labels_never_include_unsure_pixels():
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    codes = F.normalize(torch.randn(5000, 8, generator=g), dim=-1)
    thr = keep_thresholds([margins(codes[i : i + 500], centres) for i in range(0, 5000, 500)], 4, keep=0.4)
    nearest, m = margins(codes, centres)
    lab = pseudo_labels(nearest, m, thr)
    unsure = m < thr[nearest]
    assert unsure.any() and (~unsure).any()
    assert (lab[unsure] == UNSURE).all()
    assert torch.equal(lab[~unsure], nearest[~unsure])
    for k in range(4):  # about the surest 40 % of each cluster keep their label (histogram bins: a little more)
        share = (lab[nearest == k] != UNSURE).float().mean()
        assert 0.38 < share < 0.5


# ----------------------------------------------------------------------------- the command
def _photos(d, n=6, seed=0):
    d.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        a = np.zeros((48, 64, 3), np.uint8)
        a[:24] = rng.integers(0, 255, 3)  # two flat regions per photo
        a[24:] = rng.integers(0, 255, 3)
        Image.fromarray(a).save(d / f"p{i}.png")
    return d


def _discover(tiny_weights, photos, out, *extra):
    from groupseg.cli import main

    return main(["discover", "--images-dir", str(photos), "--weights", str(tiny_weights), "--out", str(out),
                 "--res", "32", "--steps", "4", "--batch-size", "4", "--knn", "2", "--samples", "3",
                 "--self-train-steps", "2", "--checkpoint-every", "2", "--device", "cpu", *extra])


def test_discover_output_loads_with_load_model(tiny_weights, tmp_path):
    photos = _photos(tmp_path / "photos")
    assert _discover(tiny_weights, photos, tmp_path / "out", "--clusters", "3") == 0
    model = groupseg.load_model(tmp_path / "out")
    assert model.cfg.stego["clusters"] == 3 and model.stego.centres.shape == (3, 70)
    assert torch.allclose(model.stego.centres.norm(dim=1), torch.ones(3), atol=1e-5)  # fitted, not the zero init
    assert (tmp_path / "out" / "checkpoints" / "head.pt").is_file()
    record = json.loads((tmp_path / "out" / "discover.json").read_text())
    assert record["config"]["clusters"] == 3
    from groupseg.stego import code_map, dense_features

    px = torch.randn(1, 3, 32, 48)
    codes = code_map(model, px)
    assert codes.shape == (1, 70, 4, 6)
    same, joint = code_map(model, px, joint=True)  # one backbone pass for both: the same codes, the joint features
    with torch.no_grad():
        assert torch.equal(same, codes) and torch.equal(joint, dense_features(model, px, "joint"))


def test_discover_bad_input_is_one_line(tiny_weights, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    (tmp_path / "empty").mkdir()
    cases = [
        (["--images-dir", str(tmp_path / "empty"), "--clusters", "3"], "no images"),
        (["--clusters", "1"], "--clusters must be at least 2"),
        (["--clusters", "100000"], "K=100000 clusters but the training crops have only"),
        ([], "--clusters K is needed"),
        (["--keep", "0"], "--keep must be in (0, 1]"),
        (["--self-train-kernel", "4"], "--self-train-kernel must be an odd number >= 1"),
        (["--shifts", "0.1", "0.2"], "--shifts: expected 3 arguments"),
    ]
    for extra, msg in cases:
        args = [a for a in extra if a]
        if "--images-dir" in args:
            from groupseg.cli import main

            code = main(["discover", *args, "--weights", str(tiny_weights), "--out", str(tmp_path / "o"), "--device", "cpu"])
        else:
            try:
                code = _discover(tiny_weights, photos, tmp_path / "o", *args)
            except SystemExit as e:  # argparse's own errors (one line with groupseg's parser)
                code = e.code
        err = capsys.readouterr().err.strip()
        assert code == 2 and msg in err and len(err.splitlines()) == 1, (extra, err)
    # a backbone without first-stage grouping has no such feature
    cfg = groupseg.get_model_config("groupvit-tiny-test")
    for s in cfg.vision.stages:
        s.num_group_tokens = s.num_output_groups = 0
    flat = tmp_path / "flat"
    groupseg.create_model(cfg).save_pretrained(flat)
    code = _discover(flat, photos, tmp_path / "o2", "--clusters", "3")
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no grouping stage" in err and len(err.splitlines()) == 1


def test_discovered_weights_drive_segment_and_the_unsupervised_eval(tiny_weights, tmp_path):
    from groupseg.cli import main
    from groupseg.clusters import cluster_segment

    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    assert _discover(tiny_weights, photos, out, "--clusters", "3", "--self-train-rounds", "0") == 0
    seg = groupseg.Segmenter.from_pretrained(out, short_side=64, templates="simple")
    img = np.asarray(Image.open(photos / "p0.png"))
    res = cluster_segment(seg, img, 3, vocab="sky,road,car,tree,dog")  # the stored centres, named by their directions
    assert res.label_map.shape == (48, 64) and 1 <= len(res.classes) <= 3
    assert all(c.split(" ")[0] in {"sky", "road", "car", "tree", "dog"} for c in res.classes)
    assert res.scores.shape == (len(res.classes), 48, 64)
    assert len(cluster_segment(seg, img, 2, vocab="sky,road").classes) <= 2  # another K: k-means of this image's codes
    with pytest.raises(ValueError, match="feature pixels"):
        cluster_segment(seg, img, 10_000, vocab="sky")
    # the Hungarian protocol with the head: a CamVid layout whose labels are the photos' two halves
    root = tmp_path / "camvid"
    (root / "val").mkdir(parents=True)
    (root / "valannot").mkdir()
    for p in sorted(photos.glob("*.png"))[:3]:
        Image.open(p).save(root / "val" / p.name)
        lab = np.zeros((48, 64), np.uint8)
        lab[24:] = 3
        Image.fromarray(lab).save(root / "valannot" / p.name)
    res_json = tmp_path / "r.json"
    rc = main(["eval", "--dataset", "camvid", "--data-root", str(root), "--weights", str(out), "--protocol", "unsupervised",
               "--clusters", "3", "--short-side", "64", "--templates", "simple", "--device", "cpu", "--pamr", "--out", str(res_json)])
    r = json.loads(res_json.read_text())
    assert rc == 0 and r["protocol"] == "unsupervised" and r["num_images"] == 3 and 0 <= r["pixel_acc"] <= 1
    # the weights' own refinement (discover records PAMR by default) unless --pamr / --no-pamr says otherwise
    assert groupseg.load_model(out).cfg.stego["refine"] == "pamr" and r["settings"]["refine"] == "pamr"
    base = ["eval", "--dataset", "camvid", "--data-root", str(root), "--weights", str(out), "--protocol", "unsupervised",
            "--clusters", "3", "--short-side", "64", "--templates", "simple", "--device", "cpu", "--out", str(res_json)]
    own = []
    for extra, expect in (([], "pamr"), (["--no-pamr"], "none")):
        assert main(base + extra) == 0
        own.append(json.loads(res_json.read_text()))
        assert own[-1]["settings"]["refine"] == expect
    assert own[0]["pixel_acc"] == r["pixel_acc"]  # the default is exactly --pamr
    from groupseg.stego import cluster_refinement

    assert cluster_refinement(groupseg.Segmenter.from_pretrained(out, refine="")) == ""
    assert cluster_refinement(groupseg.Segmenter.from_pretrained(tiny_weights)) == ""  # no head: nothing recorded


def test_self_training_with_the_backbone_moves_it_and_resumes(tiny_weights, tmp_path, capsys):
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    args = ("--clusters", "3", "--self-train-backbone", "0.5", "--lr", "1e-2")
    assert _discover(tiny_weights, photos, out, *args) == 0
    before, after = groupseg.load_model(tiny_weights), groupseg.load_model(out)
    moved = [n for n, p in after.visual.state_dict().items() if not torch.equal(p, before.visual.state_dict()[n])]
    assert moved and all(not n.startswith("stages.2") for n in moved)  # only what the first stage's tokens reach
    for a, b in zip(after.text_proj.parameters(), before.text_proj.parameters()):
        assert torch.equal(a, b)  # the text side is never trained
    assert (out / "checkpoints" / "self-train-1.pt").is_file() and (out / "cache-self-train-1" / "meta.json").is_file()
    assert after.cfg.stego["kernel"] == 5 and after.stego.nonlinear[0].kernel_size == (5, 5)  # the default student sees 5 x 5 patches
    capsys.readouterr()
    assert _discover(tiny_weights, photos, out, *args) == 0  # resumed: the finished round is restored, not redone
    assert "self-training round 1 restored" in capsys.readouterr().out
    again = groupseg.load_model(out)
    for n, p in again.visual.state_dict().items():
        assert torch.equal(p, after.visual.state_dict()[n]), n
    # resuming with another student kernel than the checkpoint's: one line, not a state-dict traceback
    assert _discover(tiny_weights, photos, out, *args, "--self-train-kernel", "3") == 2
    err = capsys.readouterr().err.strip()
    assert "trained with --self-train-kernel 5, not 3" in err and len(err.splitlines()) == 1, err


def test_flipped_teacher_labels_average_each_crop_with_its_mirror_image(tiny_weights, tmp_path):
    from groupseg.stego import cluster_scores, code_map
    from groupseg.training.selftrain import UPSAMPLE, teacher_targets
    from groupseg.training.stego_train import FeatureCache, crop_pixels

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(3)
    for i in range(4):  # left and right differ, so a mirror image that is not mirrored back would show
        a = np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), 8, 0), 8, 1)
        Image.fromarray(a).save(photos / f"p{i}.png")
    out = tmp_path / "out"
    assert _discover(tiny_weights, photos, out, "--clusters", "3", "--self-train-rounds", "0") == 0
    model = groupseg.load_model(out).eval()
    cache = FeatureCache.build(model, sorted(photos.glob("*.png")), out / "cache", 32, 0.5, torch.device("cpu"))
    labels, marg = teacher_targets(model, model.stego, cache, tmp_path / "pseudo", "none", flip=True)
    side = UPSAMPLE * cache.grid
    for i, path in enumerate(cache.meta["images"]):
        px = crop_pixels(model, path, 32, 0.5)
        probs = [(cluster_scores(code_map(model, x), model.stego.centres, (32, 32)) / 0.1).softmax(1) for x in (px, px.flip(-1))]
        top = F.adaptive_avg_pool2d((probs[0] + probs[1].flip(-1)) / 2, side).topk(2, dim=1)
        want_lab, want_m = top.indices[:, 0], top.values[:, 0] - top.values[:, 1]
        got_lab, got_m = torch.from_numpy(labels[5 * i : 5 * i + 5]).long(), torch.from_numpy(marg[5 * i : 5 * i + 5].astype(np.float32))
        assert torch.allclose(got_m, want_m, atol=0.02)  # the cache holds float16 features
        sure = want_m > 0.05
        assert sure.float().mean() > 0.5 and torch.equal(got_lab[sure], want_lab[sure])


def test_flipped_cluster_maps_average_the_image_with_its_mirror_image(tiny_weights, tmp_path, capsys):
    from groupseg.cli import main
    from groupseg.stego import _image_codes, cluster_flip, cluster_scores, code_map, stego_label_map
    from groupseg.transforms import resize_nearest

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i in range(3):  # left and right differ, so a mirrored score map that is not mirrored back would show
        Image.fromarray(np.repeat(np.repeat(rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), 8, 0), 8, 1)).save(photos / f"p{i}.png")
    out = tmp_path / "out"
    assert _discover(tiny_weights, photos, out, "--clusters", "3", "--self-train-rounds", "0") == 0
    seg = groupseg.Segmenter.from_pretrained(out, short_side=48, refine="")
    centres = seg.model.stego.centres
    img = np.asarray(Image.open(photos / "p0.png"))
    _, px, _ = _image_codes(seg, img)
    size = tuple(px.shape[-2:])
    mean = (cluster_scores(code_map(seg.model, px), centres, size) + cluster_scores(code_map(seg.model, px.flip(-1)), centres, size).flip(-1)) / 2
    want = resize_nearest(mean[0].argmax(0), img.shape[:2])
    got = stego_label_map(seg, img, centres, flip=True)
    assert torch.equal(got, want)
    assert not torch.equal(got, stego_label_map(seg, img, centres, flip=False))  # the mirror image's scores do count
    assert seg.model.cfg.stego["flip"] is True and torch.equal(stego_label_map(seg, img, centres), got)  # discover's default
    assert cluster_flip(groupseg.Segmenter.from_pretrained(tiny_weights)) is False  # nothing recorded: no flip
    # symmetric: the flipped map of the mirror image is the mirror of the flipped map
    assert (stego_label_map(seg, img[:, ::-1].copy(), centres, flip=True) == got.flip(-1)).float().mean() > 0.99
    # the unsupervised eval takes --flip for a STEGO head, records it, and refuses it for other weights
    root = tmp_path / "camvid"
    (root / "val").mkdir(parents=True)
    (root / "valannot").mkdir()
    for p in sorted(photos.glob("*.png")):
        Image.open(p).save(root / "val" / p.name)
        Image.fromarray(np.zeros((48, 64), np.uint8)).save(root / "valannot" / p.name)
    base = ["eval", "--dataset", "camvid", "--data-root", str(root), "--protocol", "unsupervised", "--clusters", "3",
            "--short-side", "48", "--templates", "simple", "--device", "cpu", "--out", str(tmp_path / "r.json")]
    for extra, expect in (([], True), (["--no-flip"], False), (["--flip"], True)):  # the weights' own unless told
        assert main(base + ["--weights", str(out), *extra]) == 0
        assert json.loads((tmp_path / "r.json").read_text())["settings"]["flip"] is expect
    capsys.readouterr()
    assert main(base + ["--weights", str(tiny_weights), "--flip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--flip" in err[0] and "STEGO head" in err[0]


# ----------------------------------------------------------------------------- linear probe
def test_linear_probe_recovers_a_linearly_separable_labelling_on_unseen_points():
    from groupseg.stego import fit_linear_probe

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 8, generator=g)
    y = (x[:, 0] > 0).long() + 2 * (x[:, 1] > 0).long()  # four classes, split by two hyperplanes
    probe = fit_linear_probe(x[:1000], y[:1000], 4, steps=300)
    assert (probe(x[1000:]).argmax(1) == y[1000:]).float().mean() > 0.95  # chance: 0.25
    shuffled = fit_linear_probe(x[:1000], y[torch.randperm(1000, generator=g) + 1000], 4, steps=300)
    assert (shuffled(x[1000:]).argmax(1) == y[1000:]).float().mean() < 0.5  # labels unrelated to the codes: nothing to find
    with pytest.raises(ValueError, match="no labelled pixels"):
        fit_linear_probe(x[:0], y[:0], 4)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        fit_linear_probe(x, torch.full((3000,), 255), 4)


def test_probe_reads_the_codes_bilinear_upsampling_would_give(tiny_weights, tmp_path):
    from groupseg.stego import _image_codes, fit_linear_probe, pixel_codes, probe_label_map

    photos = _photos(tmp_path / "photos")
    out = tmp_path / "out"
    assert _discover(tiny_weights, photos, out, "--clusters", "3", "--self-train-rounds", "0") == 0
    seg = groupseg.Segmenter.from_pretrained(out, short_side=32, templates="simple")
    img = np.asarray(Image.open(photos / "p1.png"))  # 48 x 64: the codes' grid is 2 x 2 at short side 32
    codes = _image_codes(seg, img)[2]
    up = F.interpolate(codes, size=(48, 64), mode="bilinear", align_corners=False)[0]  # (dim, 48, 64)
    ys, xs = torch.tensor([0, 0, 47, 23, 24, 11, 47]), torch.tensor([0, 63, 63, 31, 32, 5, 0])
    assert torch.allclose(pixel_codes(seg, img, ys, xs), up[:, ys, xs].T, atol=1e-5)
    torch.manual_seed(0)
    probe = fit_linear_probe(torch.randn(50, codes.shape[1]), torch.randint(3, (50,)), 3, steps=5)
    want = (torch.einsum("dhw,cd->chw", up, probe.weight) + probe.bias[:, None, None]).argmax(0)
    got = probe_label_map(seg, img, probe)
    assert got.shape == (48, 64) and (got == want).float().mean() > 0.999  # ties at most


def test_eval_reports_the_linear_probe_fitted_on_another_split(tiny_weights, tmp_path, capsys):
    from groupseg.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):  # the same two colours, a little changed per photo: top red, bottom blue
        a = np.zeros((48, 64, 3), np.uint8)
        a[:24] = np.array([200, 60, 60]) + rng.integers(-20, 20, 3)
        a[24:] = np.array([40, 90, 200]) + rng.integers(-20, 20, 3)
        Image.fromarray(a).save(photos / f"p{i}.png")
    out = tmp_path / "out"
    assert _discover(tiny_weights, photos, out, "--clusters", "3", "--self-train-rounds", "0") == 0
    root = tmp_path / "camvid"
    for split, names in (("train", [f"p{i}.png" for i in range(5)]), ("val", [f"p{i}.png" for i in range(5, 8)]),
                         ("p1only", ["p1.png"])):  # a split of one "sequence"
        (root / split).mkdir(parents=True)
        (root / f"{split}annot").mkdir()
        for n in names:
            Image.open(photos / n).save(root / split / n)
            lab = np.zeros((48, 64), np.uint8)
            lab[24:] = 3  # the labels are the photos' two flat halves
            lab[:2] = 11  # CamVid's ignored label
            Image.fromarray(lab).save(root / f"{split}annot" / n)
    base = ["eval", "--dataset", "camvid", "--data-root", str(root), "--weights", str(out), "--protocol", "unsupervised",
            "--short-side", "64", "--templates", "simple", "--device", "cpu", "--no-pamr", "--out", str(tmp_path / "r.json")]
    assert main(base + ["--linear-probe", "train"]) == 0
    lp = json.loads((tmp_path / "r.json").read_text())["settings"]["linear_probe"]
    assert lp["fit_split"] == "train" and lp["fit_images"] == 5
    assert lp["pixel_acc"] > 0.9  # the halves are found in photos the probe never saw
    assert "linear probe (fitted on train, 5 images)" in capsys.readouterr().out
    # leave-one-sequence-out: frames of the held-out "sequence" (p1) are scored, the rest of train fits
    assert main(base + ["--split", "train", "--holdout-sequence", "p1", "--linear-probe", "train"]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["num_images"] == 1 and r["settings"]["linear_probe"]["fit_images"] == 4
    for extra, msg in ((["--linear-probe", "val"], "would fit on the evaluated images"),
                       (["--linear-probe", "test"], "testannot"),
                       (["--linear-probe", "train", "--protocol", "groupseg"], "applies to --protocol unsupervised"),
                       (["--split", "train", "--holdout-sequence", "p1", "--linear-probe", "p1only"], "no images left to fit on")):
        capsys.readouterr()
        assert main(base + extra) == 2
        err = capsys.readouterr().err.strip()
        assert msg in err and len(err.splitlines()) == 1, err
    no_head = base[:5] + ["--weights", str(tiny_weights)] + base[7:]
    assert main(no_head + ["--linear-probe", "train"]) == 2
    assert "needs weights with a STEGO head" in capsys.readouterr().err


def test_discover_optimizers_are_the_projects_one_without_weight_decay(tiny_weights, tmp_path, monkeypatch):
    import groupseg.training.selftrain as selftrain
    from groupseg.optim import build_optimizer

    built = []

    def recording(groups, lr, **kw):
        built.append([g.get("weight_decay") for g in groups])
        return build_optimizer(groups, lr, **kw)

    monkeypatch.setattr(selftrain, "build_optimizer", recording)
    photos = _photos(tmp_path / "photos")
    assert _discover(tiny_weights, photos, tmp_path / "out", "--clusters", "3") == 0
    assert built == [[0.0], [0.0]]  # each self-training round's student (two by default): the project's builder, no decay
    groups = torch.load(tmp_path / "out" / "checkpoints" / "head.pt", weights_only=False)["opt"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.0] and groups[0]["decoupled_weight_decay"]  # the head's: AdamW, no decay
    # and AdamW without decay steps exactly as torch's Adam (STEGO's optimizer)
    torch.manual_seed(0)
    heads = [StegoHead(12, 6, dropout=0.0) for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    start = [p.detach().clone() for p in heads[0].parameters()]
    opts = [torch.optim.Adam(heads[0].parameters(), lr=5e-3),
            build_optimizer([{"params": list(heads[1].parameters()), "weight_decay": 0.0}], 5e-3)]
    x = torch.randn(4, 12, 5, 5)
    for _ in range(20):
        for head, opt in zip(heads, opts):
            opt.zero_grad()
            head(x).square().mean().backward()
            opt.step()
    moved = max((p - p0).abs().max().item() for p, p0 in zip(heads[1].parameters(), start))
    assert moved > 1e-2  # 20 steps at 5e-3 move the weights ...
    for a, b in zip(heads[0].parameters(), heads[1].parameters()):
        assert torch.allclose(a, b, atol=1e-6)  # ... exactly as torch's Adam would
