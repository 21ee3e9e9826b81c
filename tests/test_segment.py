import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import groupseg
from groupseg.cli import main as cli_main
from groupseg.segment import Segmenter
from groupseg.transforms import ImageError, load_image, sliding_windows


@pytest.fixture
def seg(tiny_weights):
    return Segmenter.from_pretrained(tiny_weights, short_side=64, templates="simple")


@pytest.fixture
def images(tmp_path):
    """Awkward inputs written as files."""
    rng = np.random.default_rng(0)
    d = tmp_path / "imgs"
    d.mkdir()
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(d / "rgb.png")
    Image.fromarray(rgb).save(d / "full.jpg", quality=90)
    data = (d / "full.jpg").read_bytes()
    (d / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (d / "notimage.jpg").write_text("hello")
    Image.fromarray((rng.integers(0, 65535, (30, 50))).astype(np.uint16)).save(d / "deep16.png")
    Image.fromarray(rgb).convert("CMYK").save(d / "cmyk.jpg")
    rgba = np.dstack([rgb, np.full((40, 60), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(rgb[:1, :1]).save(d / "one.png")
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    im.save(d / "exif.jpg", exif=exif)
    return d


def test_bad_images_load_or_fail_clearly(images):
    for name in ("rgb.png", "deep16.png", "cmyk.jpg", "rgba.png", "one.png"):
        im = load_image(images / name)
        assert im.mode == "RGB"
    assert load_image(images / "exif.jpg").size == (40, 60)  # rotated: W and H swap
    with pytest.raises(ImageError, match="truncated.jpg"):
        load_image(images / "truncated.jpg")
    with pytest.raises(ImageError, match="notimage.jpg.*not a readable image"):
        load_image(images / "notimage.jpg")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_image(images / "missing.png")
    a16 = np.asarray(Image.open(images / "deep16.png"))
    assert np.asarray(load_image(a16)).max() > 200  # 16-bit is rescaled, not clipped to white/black
    assert load_image(torch.rand(3, 5, 7)).size == (7, 5)


def test_segment_shapes_and_ranges(seg, images):
    for name in ("rgb.png", "deep16.png", "cmyk.jpg", "rgba.png", "one.png", "exif.jpg"):
        out = seg.segment(images / name, ["sky", "road;street", "car"])
        w, h = load_image(images / name).size
        assert out.label_map.shape == (h, w) and out.label_map.dtype == np.uint8
        assert out.label_map.max() < 3
        assert out.scores.shape == (3, h, w)
        assert torch.allclose(out.scores.sum(0), torch.ones(h, w), atol=1e-4)
        assert np.array_equal(out.scores.argmax(0).numpy(), out.label_map)
        assert out.classes == ["sky", "road", "car"]


def test_threshold_marks_background(seg, images):
    out = seg.segment(images / "rgb.png", ["a", "b", "c", "d"], threshold=0.99)
    assert (out.label_map == 255).all()  # nothing is 99 % sure among 4 random classes
    out = seg.segment(images / "rgb.png", ["a", "b", "c", "d"], threshold=0.0)
    assert (out.label_map < 4).all()


def test_sliding_window_and_large_images(tiny_weights):
    s = Segmenter.from_pretrained(tiny_weights, short_side=32, window=32, templates="simple")
    img = np.random.default_rng(1).integers(0, 255, (300, 1500, 3), dtype=np.uint8)  # very wide
    out = s.segment(img, "a,b")
    assert out.label_map.shape == (300, 1500)
    assert torch.allclose(out.scores.sum(0), torch.ones(300, 1500), atol=1e-4)
    big = np.zeros((3000, 4000, 3), dtype=np.uint8)
    assert s.segment(big, "a,b").label_map.shape == (3000, 4000)
    assert sliding_windows(32, 100, 32, 21) == [(0, 0), (0, 21), (0, 42), (0, 63), (0, 68)]


def test_window_merge_per_region_is_the_per_pixel_average():
    from groupseg.segment import _WindowMerge

    g = torch.Generator().manual_seed(0)
    h, w, win, C = 40, 70, 24, 9
    parts = []
    for y, x in sliding_windows(h, w, win, 16):
        G = int(torch.randint(2, 6, (1,), generator=g))
        parts.append((y, x, torch.rand(G, C, generator=g), torch.randint(0, G, (win, win), generator=g)))
    acc, count = torch.zeros(C, h, w), torch.zeros(h, w)
    for y, x, probs, gidx in parts:  # the definition: each covering window's segment score, averaged per pixel
        acc[:, y : y + win, x : x + win] += probs.T[:, gidx]
        count[y : y + win, x : x + win] += 1
    ref = acc / count
    m = _WindowMerge(parts, h, w)
    assert int(m.region.max()) + 1 == len(m.count) < h * w  # fewer regions than pixels, indices compact
    torch.testing.assert_close(m.scores().T[:, m.region], ref)
    torch.testing.assert_close(m.scores(slice(3, 7)).T[:, m.region], ref[3:7])
    conf, label = m.best(chunk=4)  # class chunks give the same winner
    torch.testing.assert_close(conf[m.region], ref.max(0).values)
    assert torch.equal(label[m.region], ref.argmax(0))


def test_vocabulary_errors(seg, images):
    with pytest.raises(ValueError, match="empty vocabulary"):
        seg.segment(images / "rgb.png", [])
    with pytest.raises(ValueError, match="empty vocabulary"):
        seg.segment(images / "rgb.png", " , ")
    with pytest.raises(ValueError, match="duplicate class 'Car'"):
        seg.segment(images / "rgb.png", "car,road,Car")


def test_text_cache_encodes_each_word_once(seg):
    calls = []
    orig = seg.encode_texts
    seg.encode_texts = lambda texts, **kw: calls.append(len(texts)) or orig(texts, **kw)
    e1 = seg.word_embeddings(["dog", "cat"])
    e2 = seg.word_embeddings(["cat", "dog", "bird"])
    assert calls == [2 * len(seg.templates), 1 * len(seg.templates)]
    assert torch.equal(e1[0], e2[1])


def test_embedding_api(seg, images):
    t = seg.encode_texts(["a dog", "a cat", "a road"])
    i = seg.encode_images([images / "rgb.png", load_image(images / "cmyk.jpg")])
    assert t.shape == (3, 16) and i.shape == (2, 16)
    assert torch.allclose(t.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(i.norm(dim=-1), torch.ones(2), atol=1e-5)


@pytest.mark.needs_data
def test_real_photo(seg, camvid_image):
    out = seg.segment(camvid_image, "sky,building,road,tree,car,pedestrian;person")
    assert out.label_map.shape == (360, 480)
    fr = out.fractions()
    assert abs(sum(fr.values()) - 1) < 1e-6
    ov = out.overlay()
    assert ov.size == (480, 360) and ov.mode == "RGB"


def test_cli_writes_three_files(tiny_weights, images, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GROUPSEG_WEIGHTS", str(tiny_weights))
    out = tmp_path / "out"
    rc = cli_main(["segment", str(images / "rgb.png"), str(images / "cmyk.jpg"), "--vocab", "sky,road,car",
                   "--out", str(out), "--short-side", "64", "--templates", "simple", "--quiet"])
    assert rc == 0
    lab = Image.open(out / "rgb_labels.png")
    assert lab.mode == "L" and lab.size == (60, 40) and np.asarray(lab).max() <= 2
    assert Image.open(out / "rgb_overlay.png").size == (60, 40)
    meta = json.loads((out / "rgb.json").read_text())
    assert meta["classes"] == ["sky", "road", "car"]
    assert abs(sum(meta["fractions"].values()) - 1) < 1e-6 and "total" in meta["timing"]
    assert (out / "cmyk_labels.png").exists()


def test_cli_directory_and_vocab_file(tiny_weights, images, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPSEG_WEIGHTS", str(tiny_weights))
    vf = tmp_path / "words.txt"
    vf.write_text("# my classes\nsky\nperson;pedestrian\n")
    out = tmp_path / "o"
    rc = cli_main(["segment", str(images), "--vocab-file", str(vf), "--out", str(out), "--short-side", "32", "--quiet"])
    assert rc == 1  # two of the files are broken: the rest are written, the run reports failure
    assert (out / "rgb_labels.png").exists() and (out / "exif_overlay.png").exists()
    assert not (out / "truncated_labels.png").exists()


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.parametrize(
    "args, message",
    [
        (["segment", "{imgs}/missing.jpg", "--vocab", "a"], "image not found"),
        (["segment", "{imgs}/truncated.jpg", "--vocab", "a"], "truncated.jpg"),
        (["segment", "{imgs}/rgb.png", "--vocab", ""], "empty vocabulary"),
        (["segment", "{imgs}/rgb.png", "--vocab", "car,car"], "duplicate class"),
        (["segment", "{imgs}/rgb.png", "--vocab-file", "{imgs}/nowords.txt"], "vocabulary file not found"),
        (["segment", "{imgs}/rgb.png"], "no vocabulary"),
        (["segment", "{imgs}/rgb.png", "--vocab", "a", "--weights", "{imgs}/noweights"], "weights not found"),
        (["segment", "{imgs}/rgb.png", "--vocab", "a", "--weights", "runs/ft"], "weights not found: runs/ft (a Hugging Face hub id is written hf-hub:runs/ft)"),
    ],
)
def test_cli_errors_are_one_line(args, message, tiny_weights, images, tmp_path):
    argv = [a.replace("{imgs}", str(images)) for a in args] + ["--out", str(tmp_path / "o"), "--short-side", "32"]
    env = {"GROUPSEG_WEIGHTS": str(tiny_weights), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "groupseg.cli", *argv], capture_output=True, text=True, env=env, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    if "truncated" in message:  # an image that fails inside a batch: its line, then the batch's count, exit 1
        assert r.returncode == 1 and len(lines) == 2 and lines[1] == "groupseg: 1 of 1 images failed", r.stderr
    else:  # an error before any work: one line, exit 2
        assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert message in lines[0] and lines[0].startswith("groupseg: error: "), r.stderr


def test_no_default_weights_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv("GROUPSEG_WEIGHTS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr("groupseg.pretrained.SHIPPED_DIR", tmp_path / "none")
    with pytest.raises(groupseg.CheckpointError, match="no default weights found.*--weights"):
        Segmenter.from_pretrained()


@pytest.mark.subprocess
def test_import_is_light():
    code = "import sys, groupseg; groupseg.load_model; bad = [m for m in ('webdataset', 'accelerate', 'training', 'eval', 'nltk') if m in sys.modules]; print(bad)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_cli_clusters_without_vocabulary(tiny_weights, images, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPSEG_WEIGHTS", str(tiny_weights))
    out = tmp_path / "c"
    rc = cli_main(["segment", str(images / "rgb.png"), "--clusters", "3", "--vocab", "dog,grass,sky,road,car",
                   "--out", str(out), "--short-side", "64", "--templates", "simple", "--quiet"])
    assert rc == 0
    meta = json.loads((out / "rgb.json").read_text())
    assert 1 <= len(meta["classes"]) <= 3
    assert all(c.split(" ")[0] in {"dog", "grass", "sky", "road", "car"} for c in meta["classes"])
    assert np.asarray(Image.open(out / "rgb_labels.png")).max() < len(meta["classes"])


def test_cli_groups_picture(tiny_weights, images, tmp_path, monkeypatch):
    monkeypatch.setenv("GROUPSEG_WEIGHTS", str(tiny_weights))
    rc = cli_main(["groups", str(images / "rgb.png"), "--vocab", "dog,grass", "--out", str(tmp_path / "g"),
                   "--short-side", "64", "--templates", "simple"])
    assert rc == 0
    pic = Image.open(tmp_path / "g" / "rgb_groups.png")
    assert pic.size == (3 * 60 + 2 * 4, 40)  # image + one panel per grouping stage (2 stages)
    from groupseg.groups import stage_partitions

    seg = Segmenter.from_pretrained(tiny_weights, short_side=64, templates="simple")
    _, maps, groups = stage_partitions(seg, images / "rgb.png")
    assert [m.shape for m in maps] == [(40, 60), (40, 60)]
    assert maps[0].max() < 8 and maps[1].max() < 4 and groups.shape == (4, 16)


# ----------------------------------------------------------------------------- the paper's protocol, step by step
from groupseg.classify import background_floor, to_label_map, top_k_filter, with_background  # noqa: E402
from groupseg.transforms import keep_ratio_size, resize_bilinear_argmax  # noqa: E402


def test_background_rule_keeps_the_best_segment_of_an_unsure_crop():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.4, 0.4, 0.2], [0.1, 0.1, 0.8]])
    assert background_floor(probs[:2], 0.95) == pytest.approx(0.5)  # nothing reaches 0.95: the best segment (0.5) stays
    assert background_floor(probs, 0.35) == pytest.approx(0.35)  # a confident crop: the threshold itself
    got = with_background(probs[:2], background_floor(probs[:2], 0.95))
    assert torch.equal(got[:, 0], torch.tensor([0.0, 1.0]))  # segment 0 (0.5) kept, segment 1 (0.4 < 0.5) background
    assert torch.equal(got[:, 1:], probs[:2])
    lm = to_label_map(got.argmax(1) - 1, 3, got.argmax(1) == 0)
    assert lm.tolist() == [0, 255]


def test_top_5_product_by_hand():
    g = torch.tensor([[[3.0, 2.0, 1.0, 0.0, -1.0, 4.0, 0.5]]])  # one segment, 7 classes
    img = torch.tensor([[0.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]])  # image's top 5: classes 1..5
    e = g[0, 0].exp()
    full = e / e.sum()
    kept = torch.zeros(7)
    kept[1:6] = e[1:6] / e[1:6].sum()
    torch.testing.assert_close(top_k_filter(g, img, 5)[0, 0], kept * full)
    assert top_k_filter(g, img, 5)[0, 0, 0] == 0 and top_k_filter(g, img, 5)[0, 0, 6] == 0
    torch.testing.assert_close(top_k_filter(g, img, 7)[0, 0], full * full)  # k >= C: NVlabs still multiplies
    torch.testing.assert_close(top_k_filter(g, img, 0)[0, 0], full)  # 0: no filter


@pytest.mark.parametrize("h, w, window, stride, ys, xs", [
    (448, 597, 448, 224, [0], [0, 149]),  # a VOC photo after the resize: two crops, the second flush right
    (448, 1120, 448, 224, [0], [0, 224, 448, 672]),
    (384, 2048, 448, 224, [0], [0, 224, 448, 672, 896, 1120, 1344, 1568, 1600]),  # short side below the crop
    (448, 448, 448, 224, [0], [0]),
    (300, 200, 448, 224, [0], [0]),  # smaller than a crop: one crop, the whole image
    (896, 448, 448, 224, [0, 224, 448], [0]),
])
def test_slide_placement_as_mmseg(h, w, window, stride, ys, xs):
    corners = sliding_windows(h, w, window, stride)
    assert corners == [(y, x) for y in ys for x in xs]
    # mmseg's grid count: max(n - crop + stride - 1, 0) // stride + 1 per side
    assert len(corners) == (max(h - window + stride - 1, 0) // stride + 1) * (max(w - window + stride - 1, 0) // stride + 1)
    count = torch.zeros(h, w)
    for y, x in corners:
        count[y : y + window, x : x + window] += 1
    assert count.min() >= 1
    if (h, w) == (448, 597):  # overlap counts by hand: 149 | 299 | 149 columns covered 1, 2, 1 times
        assert count[0, :149].eq(1).all() and count[0, 149:448].eq(2).all() and count[0, 448:].eq(1).all()


@pytest.mark.parametrize("h, w, expected", [
    (375, 500, (448, 597)),  # wide (VOC): short side to 448
    (500, 375, (597, 448)),  # tall
    (50, 100, (448, 896)),  # small: scaled up
    (3000, 4000, (448, 597)),  # huge: scaled down
    (400, 4000, (205, 2048)),  # panorama: the long side caps at 2048, the short side ends below 448
    (256, 262, (448, 459)),  # 458.5 rounds half up (mmcv's int(x + 0.5)), not to the even 458
])
def test_keep_ratio_resize_sizes_as_mmcv(h, w, expected):
    assert keep_ratio_size(h, w, (2048, 448)) == expected


def test_banded_bilinear_argmax_is_resize_then_argmax():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 11, 13, generator=g)
    ref = F.interpolate(x[None], size=(37, 29), mode="bilinear", align_corners=False)[0].argmax(0)
    assert torch.equal(resize_bilinear_argmax(x, (37, 29), max_elements=50), ref)  # banded
    assert torch.equal(resize_bilinear_argmax(x, (37, 29)), ref)


def test_paper_protocol_averages_crops_with_background_then_resizes(tiny_weights):
    """Segmenter(protocol='paper') against a dense, per-pixel reference built from the public steps."""
    seg = Segmenter.from_pretrained(tiny_weights, protocol="paper", threshold=0.4, window=32, stride=16, scale=(96, 32))
    assert seg.templates == ["a photo of a {}."] and seg.top_k == 5
    rgb = np.random.default_rng(3).integers(0, 255, (30, 70, 3), dtype=np.uint8)
    vocab = ["sky", "road", "car"]
    out = seg.segment(rgb, vocab)
    labels, text, owner = seg.class_embeddings(vocab)
    h, w = keep_ratio_size(30, 70, (96, 32))
    assert (h, w) == (32, 75)
    from groupseg.transforms import resize_bilinear, to_tensor

    px = to_tensor(resize_bilinear(load_image(rgb), (h, w)), (h, w), seg.cfg.image_mean, seg.cfg.image_std)
    acc, count = torch.zeros(4, h, w), torch.zeros(h, w)
    for y, x in sliding_windows(h, w, 32, 16):
        probs, gidx = seg._window(px[:, y : y + 32, x : x + 32], text, owner, 3, 3)  # top-5 of 3 classes: all 3
        probs = with_background(probs, background_floor(probs, 0.4))
        acc[:, y : y + 32, x : x + 32] += probs.T[:, gidx]
        count[y : y + 32, x : x + 32] += 1
    ch = F.interpolate((acc / count)[None], size=(30, 70), mode="bilinear", align_corners=False)[0].argmax(0)
    expected = np.where(ch.numpy() == 0, 255, ch.numpy() - 1)
    assert count.max() == 3  # crops at x = 0, 16, 32, 43 overlap up to three deep
    assert np.array_equal(out.label_map, expected)
    assert out.scores.shape == (3, 30, 70)


def test_bad_settings_are_one_line_errors(tiny_weights):
    with pytest.raises(ValueError, match="window 36 is not a multiple of the model's patch size 8"):
        Segmenter.from_pretrained(tiny_weights, window=36)
    with pytest.raises(ValueError, match=r"threshold 1.5 is outside \[0, 1\]"):
        Segmenter.from_pretrained(tiny_weights, threshold=1.5)
    seg = Segmenter.from_pretrained(tiny_weights, short_side=32, top_k=4)
    with pytest.raises(ValueError, match=r"top-k 4 is larger than the vocabulary \(3 classes\)"):
        seg.segment(np.zeros((16, 16, 3), np.uint8), "a,b,c")
    with pytest.raises(ValueError, match="PAMR"):
        Segmenter.from_pretrained(tiny_weights, protocol="paper", refine="pamr")


def test_hub_ids_need_the_prefix(tmp_path, monkeypatch):
    from groupseg import factory

    calls = []
    monkeypatch.setattr(factory, "_hub_download", lambda repo_id: calls.append(repo_id) or (_ for _ in ()).throw(
        groupseg.CheckpointError(f"could not download {repo_id!r}")))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(groupseg.CheckpointError, match=r"weights not found: runs/ft \(a Hugging Face hub id is written hf-hub:runs/ft\)"):
        factory.read_weights("runs/ft")
    assert calls == []  # a mistyped local path never reaches the hub
    with pytest.raises(groupseg.CheckpointError, match="could not download 'nvidia/groupvit-gcc-yfcc'"):
        factory.read_weights("hf-hub:nvidia/groupvit-gcc-yfcc")
    assert calls == ["nvidia/groupvit-gcc-yfcc"]
    with pytest.raises(groupseg.CheckpointError, match="expected hf-hub:OWNER/NAME"):
        factory.read_weights("hf-hub:justaname")


def test_pixel_resize_rounds_as_opencv():
    """OpenCV's fixed-point INTER_LINEAR (mmcv's resize), by hand: 95.5 and 116.5 round down, border rows mix with themselves."""
    from groupseg.transforms import resize_bilinear

    img = Image.fromarray(np.tile(np.array([[[85] * 3, [127] * 3]], np.uint8), (2, 1, 1)))  # 2 x 2, columns 85 | 127
    out = np.asarray(resize_bilinear(img, (4, 4)))
    assert out.shape == (4, 4, 3)
    assert out[..., 0].tolist() == [[85, 95, 116, 127]] * 4  # float bilinear rounded would give 96 at column 1
