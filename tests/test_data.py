"""Shard writing (training/shards.py) and the training data pipeline (training/data.py).

All shards are written by the tests into tmp_path from small synthetic PIL images.
"""
import csv
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("webdataset")
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402

from groupseg.training import data as D  # noqa: E402
from groupseg.training import shards as S  # noqa: E402

FLICKR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "flickr8k"
MEAN, STD = (0.48, 0.46, 0.41), (0.27, 0.26, 0.28)


# ----------------------------------------------------------------------------- helpers


def stand_in_nouns(caption):
    return [w for w in caption.lower().strip(" .").split() if len(w) > 3][:4]


def stand_in_prompts(caption, nouns, templates=("a photo of a {}.",), k=3, rng=None):
    nouns = list(nouns) or ["thing"]
    return [rng.choice(templates).format(nouns[i % len(nouns)]) for i in range(k)]


def pipeline(urls, **kw):
    kw = {"image_size": 32, "mean": MEAN, "std": STD, "batch_size": 4, "noun_fn": stand_in_nouns,
          "prompt_fn": stand_in_prompts, "shuffle": 20, "seed": 0, **kw}
    return D.build_train_pipeline(urls, **kw)


def make_images(folder: Path, n: int = 12) -> dict[str, list[str]]:
    """n small images (JPEG, PNG with alpha, grayscale JPEG), 2-3 captions each."""
    folder.mkdir(parents=True, exist_ok=True)
    caps = {}
    for i in range(n):
        size = (40 + 3 * i, 30 + 2 * i)
        color = ((20 * i) % 256, (50 + 30 * i) % 256, (200 - 10 * i) % 256)
        if i % 4 == 1:
            name = f"img_{i:02d}.png"
            Image.new("RGBA", size, color + (255,)).save(folder / name)
        elif i % 4 == 2:
            name = f"sub dir/img.{i:02d}.jpg"  # a subfolder, a space and a dot in the name
            (folder / "sub dir").mkdir(exist_ok=True)
            Image.new("L", size, color[0]).save(folder / name, quality=95)
        else:
            name = f"img_{i:02d}.jpg"
            Image.new("RGB", size, color).save(folder / name, quality=95)
        caps[name] = [f"A red {i} dog runs on grass number {i} ."] + [f"caption {j} of picture {i}" for j in range(1, 2 + i % 2)]
    return caps


def write_captions(path: Path, caps: dict[str, list[str]], fmt: str) -> Path:
    if fmt in ("csv", "tsv"):
        with open(path, "w", newline="") as f:
            w = csv.writer(f, delimiter="," if fmt == "csv" else "\t")
            w.writerow(["image", "caption"])
            for name, cs in caps.items():
                for c in cs:
                    w.writerow([name, c])
    elif fmt == "jsonl":
        with open(path, "w") as f:
            for name, cs in caps.items():
                for c in cs:
                    f.write(json.dumps({"image": name, "caption": c}) + "\n")
    elif fmt == "coco":
        images = [{"id": 100 + i, "file_name": name} for i, name in enumerate(caps)]
        anns = [{"id": j, "image_id": 100 + i, "caption": c} for i, cs in enumerate(caps.values()) for j, c in enumerate(cs)]
        path.write_text(json.dumps({"images": images, "annotations": anns}, indent=1))
    elif fmt == "flickr":
        path.write_text("".join(f"{name}#{k}\t{c}\n" for name, cs in caps.items() for k, c in enumerate(cs)))
    return path


def read_tars(paths) -> dict[str, dict]:
    """key -> {"jpg": bytes, "txt": str, "json": dict} straight from the tar files."""
    out: dict[str, dict] = {}
    for p in paths:
        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                data = tf.extractfile(m).read()
                out.setdefault(key, {})[ext] = json.loads(data) if ext == "json" else data.decode() if ext == "txt" else data
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Synthetic images + flickr captions -> 24 samples in 6 train shards of 4."""
    root = tmp_path_factory.mktemp("ds")
    caps = make_images(root / "images", 24)
    write_captions(root / "caps.token.txt", caps, "flickr")
    stats = S.make_shards(root / "images", root / "caps.token.txt", root / "shards", shard_size=4, workers=1, progress=False)
    return root, caps, stats


def garbage_tar(path: Path, good_from: Path | None = None) -> None:
    """A shard with a garbage .jpg, a sample with no caption and (optionally) good samples."""
    tw = wds.TarWriter(str(path))
    tw.write({"__key__": "bad_jpeg", "jpg": b"\xff\xd8\xff\xe0 this is not a jpeg" * 20, "txt": "a dog"})
    tw.write({"__key__": "no_caption", "jpg": _jpeg_bytes(), "txt": "   "})
    if good_from is not None:
        for sample in wds.DataPipeline(wds.SimpleShardList([str(good_from)]), wds.tarfile_to_samples()):
            tw.write({k: v for k, v in sample.items() if k in ("__key__", "jpg", "txt", "json")})
    tw.close()


def _jpeg_bytes(size=(20, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, "JPEG")
    return buf.getvalue()


def all_keys(batches) -> list[str]:
    return [k for b in batches for k in b["keys"]]


# ----------------------------------------------------------------------------- make_shards


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "coco", "flickr"])
def test_make_shards_round_trips_every_format(tmp_path, fmt):
    caps = make_images(tmp_path / "images", 8)
    ext = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "coco": "json", "flickr": "token.txt"}[fmt]
    cap_file = write_captions(tmp_path / f"captions.{ext}", caps, fmt)
    stats = S.make_shards(tmp_path / "images", cap_file, tmp_path / "out", shard_size=3, progress=False)
    assert stats["format"] == fmt
    assert stats["images"] == 8 and stats["captions"] == sum(map(len, caps.values()))
    assert stats["shards"] == {"train": 3} and stats["samples"] == {"train": 8}
    assert D.expand_urls(stats["urls"]["train"]) == sorted(str(p) for p in (tmp_path / "out").glob("train-*.tar"))
    samples = read_tars(sorted((tmp_path / "out").glob("*.tar")))
    by_name = {s["json"]["image"]: s for s in samples.values()}
    assert set(by_name) == set(caps)
    for name, s in by_name.items():
        assert s["json"]["captions"] == caps[name] and s["txt"] == caps[name][0]
        im = Image.open(io.BytesIO(s["jpg"]))
        assert im.format == "JPEG" and im.mode == "RGB"
        assert im.size == Image.open(tmp_path / "images" / name).size == (s["json"]["width"], s["json"]["height"])
    assert all("." not in k and "/" not in k for k in samples)


def test_make_shards_copies_good_jpegs_and_resizes_without_upscaling(tmp_path):
    caps = make_images(tmp_path / "images", 8)
    cap_file = write_captions(tmp_path / "c.csv", caps, "csv")
    stats = S.make_shards(tmp_path / "images", cap_file, tmp_path / "a", progress=False)
    assert stats["copied"] == 4 and stats["reencoded"] == 4  # RGB JPEGs copied; PNG and grayscale re-encoded
    stats = S.make_shards(tmp_path / "images", cap_file, tmp_path / "b", resize=35, workers=2, progress=False)
    for s in read_tars((tmp_path / "b").glob("*.tar")).values():
        w, h = Image.open(io.BytesIO(s["jpg"])).size
        w0, h0 = Image.open(tmp_path / "images" / s["json"]["image"]).size
        assert min(w, h) == min(35, min(w0, h0))


def test_make_shards_is_deterministic(tmp_path):
    caps = make_images(tmp_path / "images", 10)
    cap_file = write_captions(tmp_path / "c.jsonl", caps, "jsonl")
    for out in ("a", "b"):
        S.make_shards(tmp_path / "images", cap_file, tmp_path / out, shard_size=4, seed=3, workers=2 if out == "b" else 1, progress=False)
    for p in sorted((tmp_path / "a").glob("*.tar")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_split_is_by_image(tmp_path):
    caps = make_images(tmp_path / "images", 12)
    cap_file = write_captions(tmp_path / "c.csv", caps, "csv")
    stats = S.make_shards(tmp_path / "images", cap_file, tmp_path / "out", val_fraction=0.25, shard_size=5, progress=False)
    assert stats["samples"] == {"train": 9, "val": 3}
    train = read_tars((tmp_path / "out").glob("train-*.tar"))
    val = read_tars((tmp_path / "out").glob("val-*.tar"))
    assert not set(train) & set(val)
    assert {s["json"]["image"] for s in [*train.values(), *val.values()]} == set(caps)
    for s in val.values():  # all captions of a val image are in val
        assert s["json"]["captions"] == caps[s["json"]["image"]]

    split_file = tmp_path / "val.txt"
    split_file.write_text("img_00.jpg\n# comment\nimg_03.jpg\nnot_there.jpg\n")
    stats = S.make_shards(tmp_path / "images", cap_file, tmp_path / "out2", split_file=split_file, pattern="data", progress=False)
    val = read_tars((tmp_path / "out2").glob("data-val-*.tar"))
    assert sorted(s["json"]["image"] for s in val.values()) == ["img_00.jpg", "img_03.jpg"]
    assert stats["samples"] == {"train": 10, "val": 2} and stats["skipped_counts"]["split_file_unmatched"] == 1


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    caps = make_images(tmp_path / "images", 6)
    full = (tmp_path / "images" / "img_00.jpg").read_bytes()
    (tmp_path / "images" / "img_00.jpg").write_bytes(full[: len(full) // 2])  # truncated
    (tmp_path / "images" / "img_04.jpg").write_bytes(b"not an image at all")
    caps["gone.jpg"] = ["a missing picture"]
    cap_file = write_captions(tmp_path / "c.tsv", caps, "tsv")
    with open(cap_file, "a") as f:
        f.write("only_one_column\n")
    S.make_shards(tmp_path / "images", cap_file, tmp_path / "out", workers=2, progress=False)
    stats = json.loads((tmp_path / "out" / "stats.json").read_text())
    assert stats["images"] == 4
    assert stats["skipped_counts"] == {"missing": 1, "unreadable": 2, "bad_rows": 1}
    assert stats["skipped"]["missing"] == ["gone.jpg"]
    assert sorted(u["image"] for u in stats["skipped"]["unreadable"]) == ["img_00.jpg", "img_04.jpg"]
    assert "truncated" in {u["image"]: u["error"] for u in stats["skipped"]["unreadable"]}["img_00.jpg"].lower()
    assert len(read_tars((tmp_path / "out").glob("*.tar"))) == 4


def test_make_shards_user_errors(tmp_path, capsys):
    caps = make_images(tmp_path / "images", 2)
    cap_file = write_captions(tmp_path / "c.csv", caps, "csv")
    with pytest.raises(FileNotFoundError, match="images folder not found"):
        S.make_shards(tmp_path / "nope", cap_file, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="captions file not found"):
        S.make_shards(tmp_path / "images", tmp_path / "nope.csv", tmp_path / "out")
    with pytest.raises(ValueError, match="unknown captions format"):
        S.make_shards(tmp_path / "images", cap_file, tmp_path / "out", format="xml")
    (tmp_path / "other.csv").write_text("image,caption\nx.jpg,a cat\ny.jpg,a dog\n")
    with pytest.raises(ValueError, match="none of the 2 images"):
        S.make_shards(tmp_path / "images", tmp_path / "other.csv", tmp_path / "out")
    (tmp_path / "weird.txt").write_text("hello world\n")
    with pytest.raises(ValueError, match="cannot tell the format"):
        S.make_shards(tmp_path / "images", tmp_path / "weird.txt", tmp_path / "out")
    S.make_shards(tmp_path / "images", cap_file, tmp_path / "out", progress=False)
    with pytest.raises(FileExistsError, match="--overwrite"):
        S.make_shards(tmp_path / "images", cap_file, tmp_path / "out")
    S.make_shards(tmp_path / "images", cap_file, tmp_path / "out", overwrite=True, progress=False)

    import argparse

    parser = S.add_make_shards_args(argparse.ArgumentParser())
    args = parser.parse_args(["--images", str(tmp_path / "nope"), "--captions", str(cap_file), "--out", str(tmp_path / "o")])
    assert S.run_make_shards(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "images folder not found" in err
    args = parser.parse_args(["--images", str(tmp_path / "images"), "--captions", str(cap_file), "--out", str(tmp_path / "o2"),
                              "--shard-size", "1", "--no-progress", "--workers", "1"])
    assert S.run_make_shards(args) == 0 and len(list((tmp_path / "o2").glob("train-*.tar"))) == 2


def test_flickr_parser_orders_by_k_and_reports_bad_lines(tmp_path):
    from groupseg.captions import read_flickr_captions

    f = tmp_path / "x.token.txt"
    f.write_text("b.jpg#1\tsecond of b \nb.jpg#0\tfirst of b\n\na.jpg#0\tonly a\nnot a caption line\n")
    bad = []
    assert read_flickr_captions(f, bad) == {"b.jpg": ["first of b", "second of b"], "a.jpg": ["only a"]}
    assert bad == [(5, "not a caption line")]
    groups, bad_rows, fmt = S.read_captions(f)  # make-shards reads it through the same parser
    assert fmt == "flickr" and groups == {"b.jpg": ["first of b", "second of b"], "a.jpg": ["only a"]}
    assert bad_rows == [{"line": 5, "error": "not IMAGE#K<TAB>caption"}]


# ----------------------------------------------------------------------------- expand_urls


def test_expand_urls(dataset, tmp_path):
    root, _, stats = dataset
    shards = sorted(str(p) for p in (root / "shards").glob("train-*.tar"))
    assert D.expand_urls(stats["urls"]["train"]) == shards
    assert D.expand_urls(str(root / "shards" / "train-*.tar")) == shards
    assert D.expand_urls(str(root / "shards")) == shards
    assert D.expand_urls(f"{shards[0]}::{shards[1]}") == shards[:2]
    assert D.expand_urls("pipe:cat /x/a-{0..2}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar", "pipe:cat /x/a-2.tar"]
    urls, w = D.expand_weighted_urls(f"{root}/shards/train-{{000000..000001}}.tar::{shards[2]}", "1,2")
    assert urls == shards[:3] and w == [1.0, 1.0, 2.0]

    with pytest.raises(ValueError, match="empty"):
        D.expand_urls(" :: ")
    with pytest.raises(FileNotFoundError, match="matches no file") as e:
        D.expand_urls(str(tmp_path / "*.tar"))
    assert str(tmp_path) in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(FileNotFoundError, match="1 of 7 files not found"):
        D.expand_urls(f"{root}/shards/train-{{000000..000006}}.tar")
    with pytest.raises(ValueError, match="2 data weights for 1 sources"):
        D.expand_weighted_urls(shards[0], "1,2")
    with pytest.raises(ValueError, match="bad shard pattern"):
        D.expand_urls(f"{root}/train-{{0..3.tar")


# ----------------------------------------------------------------------------- pipeline


def test_batches_shapes_and_dtypes(dataset):
    root, caps, stats = dataset
    batch = next(iter(pipeline(stats["urls"]["train"], batch_size=5, num_prompts=2)))
    assert batch["pixels"].shape == (5, 3, 32, 32) and batch["pixels"].dtype == torch.float32
    assert batch["text"].shape == (5, 3, 77) and batch["text"].dtype == torch.long
    assert batch["skipped"].dtype == torch.long and int(batch["skipped"]) == 0
    assert len(batch["keys"]) == 5 and len(batch["texts"]) == 5 and len(batch["texts"][0]) == 3
    assert batch["text"][:, :, 0].eq(49406).all()  # start-of-text on the caption and every prompt
    assert torch.isfinite(batch["pixels"]).all() and batch["pixels"].abs().max() < 1 / min(STD) + 1
    names = {k: n for k, n in zip(batch["keys"], batch["captions"])}
    all_caps = {c for cs in caps.values() for c in cs}
    assert set(names.values()) <= all_caps
    batch = next(iter(pipeline(stats["urls"]["train"], num_prompts=0)))
    assert batch["text"].shape == (4, 1, 77)


def test_uint8_pixels_normalised_later_match(dataset):
    root, _, stats = dataset
    a = next(iter(pipeline(stats["urls"]["train"])))
    b = next(iter(pipeline(stats["urls"]["train"], normalize=False)))
    assert b["pixels"].dtype == torch.uint8 and a["keys"] == b["keys"]
    assert torch.equal(D.normalize_pixels(b["pixels"], MEAN, STD), a["pixels"])
    from groupseg.transforms import to_tensor  # inference normalises with the same function

    img = Image.fromarray(b["pixels"][0].permute(1, 2, 0).numpy())
    assert torch.equal(to_tensor(img, (32, 32), MEAN, STD), a["pixels"][0])


def test_default_noun_extractor(dataset):
    root, _, stats = dataset
    batch = next(iter(pipeline(stats["urls"]["train"], noun_fn=None, prompt_fn=None)))
    assert batch["text"].shape == (4, 4, 77)
    assert all(len(t) == 4 for t in batch["texts"])


def test_every_sample_once_per_epoch(dataset):
    root, caps, stats = dataset
    pipe = pipeline(stats["urls"]["train"], batch_size=5)
    epochs = []
    for epoch in range(2):
        pipe.set_epoch(epoch)
        keys = all_keys(pipe)
        assert len(keys) == 24 and len(set(keys)) == 24
        epochs.append(keys)
    assert epochs[0] != epochs[1]  # reshuffled per epoch
    assert sorted(epochs[0]) == sorted(epochs[1])


def test_deterministic_and_resume(dataset, tmp_path):
    root, _, stats = dataset
    shards = D.expand_urls(stats["urls"]["train"])
    garbage_tar(tmp_path / "mixed.tar", good_from=Path(shards[0]))  # corrupt samples in the stream
    urls = [*shards[1:], str(tmp_path / "mixed.tar")]

    def run(pipe):
        pipe.set_epoch(3)
        return list(pipe)

    a, b = run(pipeline(urls, seed=7)), run(pipeline(urls, seed=7))
    assert [x["keys"] for x in a] == [x["keys"] for x in b]
    for x, y in zip(a, b):
        assert torch.equal(x["pixels"], y["pixels"]) and torch.equal(x["text"], y["text"])
    c = run(pipeline(urls, seed=8))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]

    for stop in range(1, len(a)):  # resume after every batch
        pos = D.LoaderPosition()
        for batch in a[:stop]:
            pos.update(batch)
        state = json.loads(json.dumps(pos.state_dict()))  # survives a JSON checkpoint
        pipe = pipeline(urls, seed=7)
        pipe.resume(state)
        rest = list(pipe)
        assert [x["keys"] for x in rest] == [x["keys"] for x in a[stop:]]
        assert torch.equal(rest[0]["pixels"], a[stop]["pixels"])
        assert rest[-1]["position"] == a[-1]["position"]


def test_resume_with_workers(dataset):
    root, _, stats = dataset
    pipe = pipeline(stats["urls"]["train"], batch_size=2)
    pipe.set_epoch(2)
    full = list(D.build_loader(pipe, num_workers=2))
    pos = D.LoaderPosition()
    for batch in full[:5]:
        pos.update(batch)
    pipe = pipeline(stats["urls"]["train"], batch_size=2)
    pipe.resume(pos.state_dict())
    rest = list(D.build_loader(pipe, num_workers=2))
    assert sorted(all_keys(full[:5]) + all_keys(rest)) == sorted(all_keys(full))
    for w in (0, 1):  # each worker's stream continues exactly
        per_worker = [b["keys"] for b in full if b["position"]["worker"] == w]
        done = sum(1 for b in full[:5] if b["position"]["worker"] == w)
        assert [b["keys"] for b in rest if b["position"]["worker"] == w] == per_worker[done:]
    pipe.resume(pos.state_dict())
    with pytest.raises(RuntimeError, match="saved with 2 workers"):
        list(pipe)  # 0 workers here


def test_ranks_and_workers_get_disjoint_samples(dataset):
    root, caps, stats = dataset
    seen = []
    for rank in range(2):
        pipe = pipeline(stats["urls"]["train"], rank=rank, world_size=2, batch_size=2)
        pipe.set_epoch(1)
        batches = list(D.build_loader(pipe, num_workers=2))
        assert {b["position"]["worker"] for b in batches} == {0, 1}
        assert {b["position"]["rank"] for b in batches} == {rank}
        seen.append(all_keys(batches))
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == sorted(all_keys(pipeline(stats["urls"]["train"])))
    assert len(seen[0]) + len(seen[1]) == 24


def test_ranks_from_environment(dataset, monkeypatch):
    root, caps, stats = dataset
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append(all_keys(pipeline(stats["urls"]["train"])))
    assert not set(seen[0]) & set(seen[1]) and len(seen[0]) + len(seen[1]) == 24


def test_corrupt_samples_are_skipped_counted_and_reach_the_main_process(dataset, tmp_path, caplog):
    root, caps, stats = dataset
    shards = D.expand_urls(stats["urls"]["train"])
    garbage_tar(tmp_path / "bad.tar", good_from=Path(shards[0]))
    (tmp_path / "broken.tar").write_bytes(b"this is no tar file" * 100)
    urls = [str(tmp_path / "bad.tar"), *shards[1:], str(tmp_path / "broken.tar")]
    pipe = pipeline(urls, batch_size=3)
    with caplog.at_level("WARNING", logger="groupseg.training.data"):
        batches = list(pipe)
    assert len(all_keys(batches)) == 24
    assert pipe.skips.counts == {"decode": 1, "caption": 1, "read": 1}
    assert sum(int(b["skipped"]) for b in batches) == 3
    assert any("bad_jpeg" in r.getMessage() for r in caplog.records)

    skips = D.SkipCounter()  # with workers the counts travel inside the batches
    for batch in D.build_loader(pipeline(urls, batch_size=3), num_workers=2):
        skips.update(batch)
    assert skips.counts == {"decode": 1, "caption": 1, "read": 1}


def test_everything_broken_raises(tmp_path):
    tw = wds.TarWriter(str(tmp_path / "bad.tar"))
    for i in range(6):
        tw.write({"__key__": f"s{i}", "jpg": b"garbage", "txt": "a dog"})
    tw.close()
    with pytest.raises(RuntimeError, match="5 samples in a row"):
        list(pipeline(str(tmp_path / "bad.tar"), max_consecutive_skips=5))


def test_resampled_epoch_length(dataset):
    root, caps, stats = dataset
    pipe = pipeline(stats["urls"]["train"], resampled=True, epoch_samples=20, batch_size=4)
    pipe.set_epoch(0)
    a = list(pipe)
    assert len(a) == 5 and all(len(b["keys"]) == 4 for b in a)
    pipe.set_epoch(0)
    assert [b["keys"] for b in pipe] == [b["keys"] for b in a]
    with pytest.raises(ValueError, match="epoch_samples"):
        pipeline(stats["urls"]["train"], resampled=True)
    with pytest.raises(ValueError, match="resampled=True"):
        pipeline(f"{stats['urls']['train']}::{stats['urls']['train']}", weights="1,2")


def test_eval_pairs_in_order(dataset):
    root, caps, stats = dataset
    pairs = list(D.build_eval_pairs(stats["urls"]["train"]))
    assert len(pairs) == 24
    on_disk = read_tars(D.expand_urls(stats["urls"]["train"]))
    assert [k for _, _, k in pairs] == list(on_disk)  # shard order, no shuffle
    for img, captions, key in pairs:
        assert img.mode == "RGB" and captions == caps[on_disk[key]["json"]["image"]]


# ----------------------------------------------------------------------------- real data


@pytest.mark.needs_data
def test_flickr8k_real_images(tmp_path):
    token = FLICKR / "Flickr8k.token.txt"
    if not token.is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR} (shared data absent)")
    names = sorted(p.name for p in (FLICKR / "images").glob("*.jpg"))[:20]
    keep = set(names)
    lines = [ln for ln in token.read_text().splitlines() if ln.split("#", 1)[0] in keep]
    sub = tmp_path / "Flickr8k.token.txt"
    sub.write_text("\n".join(lines) + "\n")
    stats = S.make_shards(FLICKR / "images", sub, tmp_path / "out", shard_size=8, val_fraction=0.2, workers=2, progress=False)
    assert stats["format"] == "flickr" and stats["images"] == 20 and stats["captions"] == len(lines) >= 100
    assert stats["samples"] == {"train": 16, "val": 4}
    batches = list(pipeline(stats["urls"]["train"], image_size=64, noun_fn=None, prompt_fn=None))  # real nouns, offline
    assert sum(len(b["keys"]) for b in batches) == 16
    assert batches[0]["pixels"].shape == (4, 3, 64, 64)

