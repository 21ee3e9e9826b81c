"""Evaluation: metrics by hand, dataset readers on fake layouts, the Hungarian protocol, ``groupseg eval``."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from groupseg.eval.clusters import Reservoir, hungarian_match, matched_confusion
from groupseg.clusters import GroupFeatures, cluster_label_map, cluster_segment, kmeans
from groupseg.eval.datasets import DATASETS, load_dataset
from groupseg.eval.metrics import ConfusionMatrix
from groupseg.cli import main as cli_main
from groupseg.segment import SegmentationResult, Segmenter

from conftest import CAMVID

RNG = np.random.default_rng(0)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one intra-op thread is much faster than several on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- metrics
def test_confusion_matrix_by_hand():
    cm = ConfusionMatrix(4, ignore_index=255)
    target = torch.tensor([[0, 0, 1, 1], [1, 255, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1], [255, 0, 2, 0]])  # 255 predicted = a miss; truth 255 = skipped
    cm.update(pred, target)
    # rows = truth 0..3, columns = prediction 0..3 + "no class"
    expected = torch.tensor([[1, 1, 0, 0, 0], [0, 2, 0, 0, 1], [1, 0, 1, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(cm.mat, expected)
    r = cm.compute()
    # IoU: class 0: tp 1 / (gt 2 + pred 2 - 1) = 1/3; class 1: 2 / (3 + 3 - 2) = 1/2; class 2: 1 / (2 + 1 - 1) = 1/2
    iou = r["per_class_iou"]
    assert iou[:3] == pytest.approx([1 / 3, 1 / 2, 1 / 2])
    assert math.isnan(iou[3])  # absent from truth and prediction: left out of the mean
    assert r["miou"] == pytest.approx((1 / 3 + 1 / 2 + 1 / 2) / 3)
    assert r["pixel_acc"] == pytest.approx(4 / 7)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert r["fwiou"] == pytest.approx(2 / 7 * 1 / 3 + 3 / 7 * 1 / 2 + 2 / 7 * 1 / 2)
    assert r["num_pixels"] == 7


def test_confusion_matrix_accumulates_and_rejects_other_sizes():
    cm = ConfusionMatrix(2)
    cm.update(torch.tensor([0, 1]), torch.tensor([0, 1]))
    cm.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert cm.compute()["per_class_iou"] == pytest.approx([1 / 2, 2 / 3])
    with pytest.raises(ValueError, match=r"prediction shape \(4, 4\) differs from label shape \(8, 8\)"):
        cm.update(torch.zeros(4, 4), torch.zeros(8, 8))


# ----------------------------------------------------------------------------- fake layouts
def _img(path: Path, h: int = 8, w: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(RNG.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _lab(path: Path, arr: np.ndarray, palette: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.asarray(arr)
    if arr.ndim == 3:
        Image.fromarray(arr.astype(np.uint8), "RGB").save(path)
        return
    im = Image.fromarray(arr.astype(np.uint8), "L")
    if palette:
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def _labels(values, h=8, w=8) -> np.ndarray:
    """An (h, w) map whose columns cycle through ``values``."""
    return np.array([values[j % len(values)] for j in range(w)] * h).reshape(h, w)


def make_voc(root: Path, values=(0, 1, 20, 255)) -> None:
    base = root / "VOCdevkit" / "VOC2012"
    ids = ["2007_000032", "2007_000039"]
    for i in ids:
        _img(base / "JPEGImages" / f"{i}.jpg")
        _lab(base / "SegmentationClass" / f"{i}.png", _labels(values), palette=True)
    (base / "ImageSets" / "Segmentation").mkdir(parents=True)
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(ids) + "\n")


def make_context(root: Path) -> None:
    base = root / "VOCdevkit" / "VOC2010"
    ids = ["2008_000002", "2008_000003", "2008_000007"]
    for i in ids:
        _img(base / "JPEGImages" / f"{i}.jpg")
        _lab(base / "SegmentationClassContext" / f"{i}.png", _labels([0, 1, 59]), palette=True)
    (base / "ImageSets" / "SegmentationContext").mkdir(parents=True)
    (base / "ImageSets" / "SegmentationContext" / "val.txt").write_text("\n".join(ids) + "\n")


def make_coco(root: Path, suffix: str, values) -> None:
    for stem in ("000000000139", "000000000285"):
        _img(root / "images" / "val2017" / f"{stem}.jpg")
        _lab(root / "annotations" / "val2017" / f"{stem}{suffix}", _labels(values))


def make_ade(root: Path) -> None:
    base = root / "ADEChallengeData2016"
    for stem in ("ADE_val_00000001", "ADE_val_00000002"):
        _img(base / "images" / "validation" / f"{stem}.jpg")
        _lab(base / "annotations" / "validation" / f"{stem}.png", _labels([0, 1, 150]))


def make_cityscapes(root: Path) -> None:
    for city, stem in (("frankfurt", "frankfurt_000000_000294"), ("lindau", "lindau_000000_000019")):
        _img(root / "leftImg8bit" / "val" / city / f"{stem}_leftImg8bit.png", 8, 16)
        _lab(root / "gtFine" / "val" / city / f"{stem}_gtFine_labelTrainIds.png", _labels([0, 18, 255], 8, 16))


def make_camvid(root: Path, n: int = 3) -> None:
    for i in range(n):
        _img(root / "val" / f"0016E5_0{i}.png", 8, 12)
        _lab(root / "valannot" / f"0016E5_0{i}.png", _labels([0, 3, 11, 8], 8, 12))


def make_imagenet_s(root: Path, variant: int = 50) -> None:
    base = root / f"ImageNetS{variant}"
    ids = np.array([0, 1, variant, 1000])  # other, first class, last class, ignore
    rgb = np.stack([ids % 256, ids // 256, np.zeros_like(ids)], -1)  # class id = R + 256 * G
    for wnid, name in (("n01443537", "ILSVRC2012_val_00004677"), ("n01491361", "ILSVRC2012_val_00000732")):
        _img(base / "validation" / wnid / f"{name}.JPEG")
        _lab(base / "validation-segmentation" / wnid / f"{name}.png", np.stack([_labels(rgb[:, c]) for c in range(3)], -1))


def make_folder(root: Path, n: int = 3) -> Path:
    for i in range(n):
        _img(root / "images" / f"im{i}.jpg", 8, 10)
        _lab(root / "labels" / f"im{i}.png", _labels([0, 1, 2, 255], 8, 10))
    vf = root / "classes.txt"
    vf.write_text("# three classes\nsky\nroad;street\ncar\n")
    return vf


def _first_row(ds) -> list[int]:
    return ds.load_target(ds.samples[0])[0, : 4].tolist()


@pytest.mark.parametrize(
    "name, make, n, classes, row",
    [
        ("voc", make_voc, 2, 21, [0, 1, 20, 255]),  # palette PNG read as indices, 0 = background
        ("voc20", make_voc, 2, 20, [255, 0, 19, 255]),
        ("context", make_context, 3, 60, [0, 1, 59, 0]),
        ("context59", make_context, 3, 59, [255, 0, 58, 255]),
        ("coco-object", lambda r: make_coco(r, "_instanceTrainIds.png", [0, 1, 80, 255]), 2, 81, [0, 1, 80, 255]),
        ("coco-stuff", lambda r: make_coco(r, "_labelTrainIds.png", [0, 170, 255]), 2, 171, [0, 170, 255, 0]),
        ("ade20k", make_ade, 2, 150, [255, 0, 149, 255]),
        ("cityscapes", make_cityscapes, 2, 19, [0, 18, 255, 0]),
        ("camvid", make_camvid, 3, 11, [0, 3, 255, 8]),
        ("imagenet-s", make_imagenet_s, 2, 51, [0, 1, 50, 1000]),
    ],
)
def test_dataset_readers(name, make, n, classes, row, tmp_path):
    make(tmp_path)
    ds = load_dataset(name, tmp_path, "val")
    assert len(ds) == n and ds.num_classes == classes
    assert all(s.image.is_file() and Path(s.label).is_file() for s in ds)
    assert _first_row(ds) == row
    assert len(ds.vocab) == classes - ds.background
    assert ds.classes[0] == ("background" if ds.background else ds.labels[0])
    assert ds.samples[0].stem in ds.samples[0].image.name


def test_folder_reader_and_metric_space(tmp_path):
    vf = make_folder(tmp_path)
    ds = load_dataset("folder", tmp_path, vocab_file=vf)
    assert ds.classes == ["sky", "road", "car"] and ds.vocab[1] == "road;street"
    assert [s.stem for s in ds] == ["im0", "im1", "im2"] and _first_row(ds) == [0, 1, 2, 255]
    lm = np.array([[0, 2, 255]], dtype=np.uint8)
    assert ds.to_metric(lm, 255).tolist() == [[0, 2, -1]]  # no background class: 255 is a miss
    voc = DATASETS["voc"]
    make_voc(tmp_path / "v")
    assert voc(tmp_path / "v").to_metric(lm, 255).tolist() == [[1, 3, 0]]  # background class 0
    with pytest.raises(ValueError, match="needs --vocab-file"):
        load_dataset("folder", tmp_path)
    wrong = tmp_path / "two.txt"
    wrong.write_text("a\nb\n")
    make_camvid(tmp_path / "c")
    with pytest.raises(ValueError, match="has 2 classes; this benchmark has 11"):
        load_dataset("camvid", tmp_path / "c", vocab_file=wrong)


def test_imagenet_s_variants(tmp_path):
    make_imagenet_s(tmp_path, 300)
    ds = load_dataset("imagenet-s", tmp_path / "ImageNetS300")
    assert ds.name == "imagenet-s300" and ds.num_classes == 301 and ds.ignore_index == 1000
    assert _first_row(ds) == [0, 1, 300, 1000]
    with pytest.raises(FileNotFoundError, match="ImageNetS919/validation-segmentation"):
        load_dataset("imagenet-s919", tmp_path)


@pytest.mark.parametrize("name, expected", [
    ("voc", "VOCdevkit/VOC2012/JPEGImages"), ("context", "VOCdevkit/VOC2010/SegmentationClassContext"),
    ("coco-stuff", "coco_stuff164k/annotations/val2017"), ("ade20k", "ADEChallengeData2016/annotations/validation"),
    ("cityscapes", "cityscapes/gtFine/val"), ("camvid", "valannot"), ("folder", "images"),
])
def test_missing_dataset_names_the_expected_folder(name, expected, tmp_path):
    with pytest.raises(FileNotFoundError, match=expected) as e:
        load_dataset(name, tmp_path, vocab_file=make_folder(tmp_path / "v") if name == "folder" else None)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- clustering
def test_hungarian_recovers_a_permuted_labelling():
    C = 5
    target = torch.from_numpy(RNG.integers(0, C, (40, 40)))
    target[0, :5] = 255  # ignored pixels
    perm = torch.tensor([3, 0, 4, 1, 2])  # cluster id of each class
    clusters = torch.where(target == 255, 0, perm[target.clamp(max=C - 1)])
    valid = target != 255
    conf = torch.bincount(clusters[valid] * C + target[valid], minlength=C * C).view(C, C)  # (cluster, class)
    mapping = hungarian_match(conf)
    assert mapping.tolist() == torch.argsort(perm).tolist()  # cluster -> class inverts the permutation
    cm = ConfusionMatrix(C)
    cm.mat = matched_confusion(conf, mapping)
    r = cm.compute()
    assert r["miou"] == pytest.approx(1.0) and r["pixel_acc"] == pytest.approx(1.0)


def test_hungarian_with_more_clusters_than_classes():
    conf = np.array([[5, 0], [0, 7], [3, 1]])  # cluster 2 is left over: its pixels count as misses
    mapping = hungarian_match(conf)
    assert mapping.tolist() == [0, 1, -1]
    mat = matched_confusion(conf, mapping)
    assert mat.tolist() == [[5, 0, 3], [0, 7, 1]]


def test_kmeans_separates_blobs_and_is_seeded():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 6)
    x = torch.cat([c + 0.05 * torch.randn(30, 6, generator=g) for c in centres])
    truth = torch.arange(3).repeat_interleave(30)
    c, a = kmeans(x, 3, seed=1)
    assert c.shape == (3, 6) and torch.allclose(c.norm(dim=-1), torch.ones(3))
    assert all(len(set(a[truth == t].tolist())) == 1 for t in range(3))  # each blob one cluster
    c2, a2 = kmeans(x, 3, seed=1)
    assert torch.equal(a, a2) and torch.equal(c, c2)
    cb, ab = kmeans(torch.stack([x, x.flip(0)]), 3, weights=torch.ones(2, 90))  # batched problems
    assert cb.shape == (2, 3, 6) and ab.shape == (2, 90)
    _, few = kmeans(x[:2], 5)  # fewer points than clusters
    assert few.shape == (2,)


def test_cluster_label_map_from_soft_groups():
    grouping = torch.zeros(3, 2, 2)
    grouping[0, 0, :] = 1  # segment 0: top row; 1: bottom left; 2: bottom right
    grouping[1, 1, 0] = 1
    grouping[2, 1, 1] = 1
    feats = GroupFeatures(torch.eye(3, 4), grouping.sum((1, 2)), [(0, 0, 4, 4, 0, 3, grouping)], (4, 4), (8, 8))
    lab = cluster_label_map(feats, torch.tensor([5, 2, 2]))  # segments 1 and 2 in the same cluster
    assert lab.shape == (8, 8)
    assert (lab[:2] == 5).all() and (lab[-2:] == 2).all()


def test_reservoir_is_bounded():
    r = Reservoir(cap=10, seed=0)
    for i in range(7):
        r.add(torch.full((4, 2), float(i)), torch.ones(4))
    assert r.x.shape == (10, 2) and r.seen == 28 and r.x.max() > 2  # later items made it in


@pytest.fixture(scope="module")
def seg(tiny_weights):
    return Segmenter.from_pretrained(tiny_weights, short_side=64, templates="simple")


def test_cluster_segment_returns_a_result(seg, tmp_path):
    img = RNG.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    res = cluster_segment(seg, img, 3, vocab="sky,road,car,tree,dog")
    assert isinstance(res, SegmentationResult)
    assert res.label_map.shape == (24, 40) and res.label_map.dtype == np.uint8
    assert 1 <= len(res.classes) <= 3 and len(set(res.classes)) == len(res.classes)
    assert res.label_map.max() < len(res.classes)
    assert all(c.split(" ")[0] in {"sky", "road", "car", "tree", "dog"} for c in res.classes)
    assert res.scores.shape == (len(res.classes), 24, 40)
    paths = res.save(tmp_path / "img")
    assert all(p.exists() for p in paths.values())
    assert len(cluster_segment(seg, img, 2).classes) >= 1  # default naming vocabulary
    with pytest.raises(ValueError, match="at least 1"):
        cluster_segment(seg, img, 0)


# ----------------------------------------------------------------------------- groupseg eval
def _eval(tiny_weights, *args) -> int:
    """``groupseg eval`` on the tiny model; groupseg's protocol at a small size unless ``--protocol`` is given."""
    args = [str(a) for a in args]
    small = [] if "--protocol" in args else ["--protocol", "groupseg", "--short-side", "64"]
    return cli_main(["eval", "--weights", str(tiny_weights), "--templates", "simple", "--device", "cpu", *small, *args])


def test_eval_folder_end_to_end(tiny_weights, tmp_path, capsys):
    vf = make_folder(tmp_path / "data")
    out, preds = tmp_path / "results.json", tmp_path / "preds"
    rc = _eval(tiny_weights, "--dataset", "folder", "--data-root", tmp_path / "data", "--vocab-file", vf,
               "--out", out, "--save-predictions", preds, "--gallery", tmp_path / "g.png", "--confusion", tmp_path / "cm.png")
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("miou", "per_class_iou", "pixel_acc", "mean_acc", "fwiou", "num_images", "command", "weights"):
        assert key in r
    assert r["num_images"] == 3 and list(r["per_class_iou"]) == ["sky", "road", "car"]
    assert r["command"][:2] == ["groupseg", "eval"] and "--vocab-file" in r["command"]
    assert r["weights"] == str(tiny_weights)
    assert 0 <= r["pixel_acc"] <= 1
    for i in range(3):
        p = np.asarray(Image.open(preds / f"im{i}.png"))
        assert p.shape == (8, 10) and p.max() <= 2
    for pic in ("g.png", "cm.png"):
        im = Image.open(tmp_path / pic)
        assert im.format == "PNG" and im.width <= 1200
    table = capsys.readouterr().out
    assert "mIoU" in table and "road" in table


def test_eval_camvid_layout_flip_scales_and_unsupervised(tiny_weights, tmp_path):
    make_camvid(tmp_path / "camvid")
    out = tmp_path / "r.json"
    rc = _eval(tiny_weights, "--dataset", "camvid", "--data-root", tmp_path / "camvid", "--out", out,
               "--flip", "--scales", "0.5,1", "--limit", "2", "--threshold", "0.5")
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 2 and len(r["per_class_iou"]) == 11 and r["threshold"] == 0.5
    for extra in ([], ["--flip"]):  # PAMR on the plain path and on averaged scores
        rc = _eval(tiny_weights, "--dataset", "camvid", "--data-root", tmp_path / "camvid", "--out", out, "--pamr", *extra)
        assert rc == 0 and json.loads(out.read_text())["num_images"] == 3
    rc = _eval(tiny_weights, "--dataset", "camvid", "--data-root", tmp_path / "camvid", "--out", out,
               "--protocol", "unsupervised", "--short-side", "64", "--gallery", tmp_path / "g.png", "--save-predictions", tmp_path / "p")
    assert rc == 0
    r = json.loads(out.read_text())
    assert r["protocol"] == "unsupervised" and r["num_images"] == 3 and 0 <= r["pixel_acc"] <= 1
    assert (tmp_path / "g.png").exists() and len(list((tmp_path / "p").glob("*.png"))) == 3


def test_eval_voc_background_by_threshold(tiny_weights, tmp_path):
    make_voc(tmp_path, values=(0, 0, 0, 255))  # everything background: a threshold of 1 gets it all right
    out = tmp_path / "r.json"
    assert _eval(tiny_weights, "--dataset", "voc", "--data-root", tmp_path, "--out", out, "--threshold", "1") == 0
    r = json.loads(out.read_text())
    assert r["per_class_iou"]["background"] == 1.0 and r["pixel_acc"] == 1.0
    assert r["per_class_iou"]["aeroplane"] is None  # absent from truth and prediction -> null, not NaN


def test_eval_flickr8k_retrieval(tiny_weights, tmp_path):
    root = tmp_path / "flickr8k"
    names = [f"{i}_abc.jpg" for i in range(4)]
    for n in names:
        _img(root / "images" / n, 16, 16)
    (root / "Flickr_8k.devImages.txt").write_text("\n".join(names) + "\n")
    (root / "Flickr8k.token.txt").write_text("".join(f"{n}#{k}\ta dog number {i} runs .\n" for i, n in enumerate(names) for k in range(5)))
    out = tmp_path / "r.json"
    assert _eval(tiny_weights, "--dataset", "flickr8k", "--data-root", root, "--split", "dev", "--out", out) == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 4 and r["num_captions"] == 20
    assert r["t2i_r5"] == 100.0  # 4 images: every caption's image is in its top 5
    assert all(0 <= r[f"{d}_r{k}"] <= 100 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert _eval(tiny_weights, "--dataset", "flickr8k", "--data-root", root, "--split", "test") == 2  # held out


def test_eval_missing_dataset_is_one_line(tiny_weights, tmp_path, capsys):
    rc = _eval(tiny_weights, "--dataset", "cityscapes", "--data-root", tmp_path)
    err = capsys.readouterr().err.strip()
    assert rc != 0
    assert len(err.splitlines()) == 1 and "cityscapes/gtFine/val" in err and "Traceback" not in err
    rc = _eval(tiny_weights, "--dataset", "voc", "--data-root", tmp_path / "nowhere")
    err = capsys.readouterr().err.strip()
    assert rc != 0 and len(err.splitlines()) == 1 and "nowhere" in err


@pytest.mark.needs_data
def test_eval_real_camvid(tiny_weights, tmp_path):
    if not (CAMVID / "valannot").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (shared data absent)")
    out = tmp_path / "r.json"
    assert _eval(tiny_weights, "--dataset", "camvid", "--data-root", CAMVID, "--limit", "2", "--out", out,
                 "--save-predictions", tmp_path / "p") == 0
    r = json.loads(out.read_text())
    assert r["num_images"] == 2 and r["num_pixels"] > 0 and 0 <= r["miou"] <= 1
    assert np.asarray(Image.open(next((tmp_path / "p").glob("*.png")))).shape == (360, 480)


def test_compare_picture_from_saved_predictions(tmp_path):
    from groupseg.eval.compare import main as compare_main

    make_camvid(tmp_path / "camvid")
    for name, value in (("a", 3), ("b", 8)):
        d = tmp_path / name
        d.mkdir()
        for i in range(3):
            _lab(d / f"0016E5_0{i}.png", np.full((8, 12), value))
    out = tmp_path / "cmp.png"
    args = ["--dataset", "camvid", "--data-root", str(tmp_path / "camvid"), "--pred", f"road={tmp_path / 'a'}",
            "--pred", f"car={tmp_path / 'b'}", "--images", "2", "--out", str(out)]
    assert compare_main(args) == 0
    img = Image.open(out)
    assert img.width == 4 * (240 + 4) + 4  # image, truth and two models
    (tmp_path / "b" / "0016E5_02.png").unlink()
    assert compare_main(args) == 2  # a missing prediction is named, not a traceback


@pytest.mark.slow
@pytest.mark.subprocess
def test_eval_splits_images_across_processes(tiny_weights, tmp_path):
    """Two processes (gloo on CPU, as `accelerate launch` sets them up) give the one-process numbers."""
    import os
    import socket
    import subprocess
    import sys

    make_camvid(tmp_path / "camvid", n=5)
    base = [sys.executable, "-m", "groupseg.cli", "eval", "--weights", str(tiny_weights), "--short-side", "64",
            "--templates", "simple", "--device", "cpu", "--dataset", "camvid", "--data-root", str(tmp_path / "camvid")]
    assert subprocess.run(base + ["--out", str(tmp_path / "one.json")], capture_output=True).returncode == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", ACCELERATE_USE_CPU="true")
        procs.append(subprocess.Popen(base + ["--out", str(tmp_path / "two.json")], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
        assert f"process {rank} of 2: {3 - rank} of 5 images" in err.decode()  # really split
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert two["num_pixels"] == one["num_pixels"] and two["miou"] == pytest.approx(one["miou"])
    assert two["per_class_iou"] == one["per_class_iou"]


# ----------------------------------------------------------------------------- protocols and bad options
def test_eval_voc_defaults_to_the_paper_protocol(tiny_weights, tmp_path, capsys):
    make_voc(tmp_path)
    out = tmp_path / "r.json"
    assert _eval(tiny_weights, "--dataset", "voc", "--data-root", tmp_path, "--out", out, "--window", "32",
                 "--protocol", "zero-shot") == 0
    r = json.loads(out.read_text())
    st = r["settings"]
    assert r["protocol"] == "paper" and st["protocol"] == "paper"
    assert st["templates"] == ["a photo of a {}."] and st["top_k"] == 5 and st["stride"] == 224 and st["window"] == 32
    assert st["vocabulary"] == "NVlabs' class names" and r["threshold"] == 0.95
    assert "protocol paper" in capsys.readouterr().out
    assert _eval(tiny_weights, "--dataset", "voc", "--data-root", tmp_path, "--out", out) == 0  # groupseg (see _eval)
    assert json.loads(out.read_text())["settings"]["vocabulary"] == "groupseg's vocabulary"


@pytest.mark.parametrize("args, message", [
    (["--top-k", "21"], "--top-k 21 is larger than the vocabulary (20 classes)"),
    (["--window", "36"], "window 36 is not a multiple of the model's patch size 8"),
    (["--protocol", "paper", "--flip"], "--flip apply to --protocol groupseg"),
])
def test_eval_bad_options_are_one_line(args, message, tiny_weights, tmp_path, capsys):
    make_voc(tmp_path)
    assert _eval(tiny_weights, "--dataset", "voc", "--data-root", tmp_path, *args) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("option", [["--threshold", "1.5"], ["--top-k", "-1"], ["--window", "-5"]])
def test_eval_out_of_range_numbers_are_refused_before_work(option, tmp_path, capsys):
    from groupseg.eval.main import main as eval_main

    with pytest.raises(SystemExit) as e:
        eval_main(["--dataset", "voc", "--data-root", str(tmp_path), *option])
    assert e.value.code == 2 and "out of range" in capsys.readouterr().err


def test_eval_module_runs_on_its_own(tiny_weights, tmp_path, capsys):
    """``python -m groupseg.eval.main`` parses its own options (no call back into the CLI)."""
    from groupseg.eval.main import main as eval_main

    vf = make_folder(tmp_path / "data")
    rc = eval_main(["--dataset", "folder", "--data-root", str(tmp_path / "data"), "--vocab-file", str(vf), "--weights",
                    str(tiny_weights), "--short-side", "32", "--device", "cpu"])
    assert rc == 0 and "protocol groupseg" in capsys.readouterr().out
    assert eval_main(["--dataset", "folder", "--data-root", str(tmp_path / "nowhere"), "--vocab-file", str(vf)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.slow
def test_clusters_k_on_a_real_photo_with_the_shipped_model():
    """The shipped model's last stage puts the astronaut photo in one segment: K clusters come from finer segments."""
    docs = Path(__file__).resolve().parents[1] / "docs"
    seg = Segmenter.from_pretrained(short_side=224)
    res = cluster_segment(seg, docs / "astronaut.jpg", 5, vocab="person,sky,ground,rock,flag,suit,helmet")
    assert len(res.classes) == 5 and res.note == ""
    assert sorted(np.unique(res.label_map).tolist()) == [0, 1, 2, 3, 4]


def test_clusters_say_why_fewer_came_back(seg):
    img = RNG.integers(0, 255, (24, 40, 3), dtype=np.uint8)
    res = cluster_segment(seg, img, 30, vocab="sky,road,car")  # the tiny model has 8 first-stage segments
    assert len(res.classes) < 30 and res.note.startswith(f"{len(res.classes)} of 30 clusters")


def test_all_background_overlay_says_so():
    img = Image.fromarray(np.full((60, 80, 3), 200, np.uint8))
    res = SegmentationResult(np.full((60, 80), 255, np.uint8), ["a", "b"], img)
    ov = np.asarray(res.overlay()).astype(int)
    assert (ov[40:, :] == 120).all()  # the dimmed photo
    assert (ov[2:10, 2:40] < 120).any()  # a legend box in the corner
    assert (np.asarray(res.overlay(legend=False)) == 120).all()
