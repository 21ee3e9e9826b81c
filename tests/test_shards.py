"""Damaged shards: truncated shards are read up to the damage and what they lost is counted
per shard (against the counts make-shards records), counting never opens a recorded tar, and a
zero-byte shard is a one-line error. Every shard is written by the tests into tmp_path."""
import json
import logging
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("webdataset")
from groupseg.training import data as D  # noqa: E402
from groupseg.training.shards import make_shards  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def nouns(caption):
    return [w for w in caption.split() if len(w) > 3][:2]


def prompts(caption, found, templates=("a photo of a {}.",), k=1, rng=None):
    return [templates[0].format((list(found) or ["thing"])[0])] * k


def shards(root: Path, n: int, size: int) -> dict:
    """n random photos (seeded), one caption each, in train shards of ``size``."""
    (root / "img").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (24 + i % 5, 32, 3), dtype=np.uint8)).save(root / "img" / f"im{i:03d}.jpg")
        lines.append(f"im{i:03d}.jpg#0\ta striped dog number {i} .")
    (root / "c.token.txt").write_text("\n".join(lines) + "\n")
    return make_shards(root / "img", root / "c.token.txt", root / "shards", shard_size=size, progress=False)


def pipeline(urls, **kw):
    kw = {"image_size": 16, "mean": (0.5,) * 3, "std": (0.5,) * 3, "batch_size": 4, "noun_fn": nouns, "prompt_fn": prompts,
          "num_prompts": 1, "shuffle": 10, "seed": 0, **kw}
    return D.build_train_pipeline(urls, **kw)


def cut_mid_member(path: Path, sample: int) -> None:
    """Cut a shard in the middle of the image data of its ``sample``-th sample."""
    with tarfile.open(path) as tf:
        jpgs = [m for m in tf.getmembers() if m.name.endswith(".jpg")]
    m = jpgs[sample]
    path.write_bytes(path.read_bytes()[: m.offset_data + m.size // 2])


@pytest.fixture
def sixty(tmp_path):
    stats = shards(tmp_path, 60, 20)
    return stats, D.expand_urls(stats["urls"]["train"])


def test_make_shards_records_samples_and_bytes_per_shard(sixty):
    stats, urls = sixty
    assert stats["shard_samples"] == {"train-000000.tar": 20, "train-000001.tar": 20, "train-000002.tar": 20}
    assert stats["shard_bytes"] == {Path(u).name: Path(u).stat().st_size for u in urls}


@pytest.mark.parametrize("cut", ["55%", "mid-member"])
def test_truncated_shard_is_reported_with_the_samples_it_lost(sixty, cut, caplog):
    stats, urls = sixty
    third = Path(urls[2])
    with tarfile.open(third) as tf:
        original = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
    if cut == "55%":
        third.write_bytes(third.read_bytes()[: int(third.stat().st_size * 0.55)])
    else:
        cut_mid_member(third, 13)
    assert D.count_samples(urls) == 60  # the recorded counts; no ReadError from the cut tar
    pipe = pipeline(urls, batch_size=3)
    with caplog.at_level(logging.WARNING):
        batches = list(pipe)
    keys = [k for b in batches for k in b["keys"]]
    read_from_third = [k for k in keys if f"{k}.jpg" in original]
    lost = 20 - len(read_from_third)
    assert 0 < lost < 20 and (cut == "55%" or lost == 7)  # the mid-member cut is in sample 13 of 0..19
    assert pipe.skips.counts == {"truncated shard train-000002.tar": lost}
    assert sum(b["skip_reasons"].get("truncated shard train-000002.tar", 0) for b in batches) == lost  # it reaches the trainer
    assert len(keys) == len(set(keys)) == 60 - lost
    msg = next(r.getMessage() for r in caplog.records if "train-000002.tar" in r.getMessage() and "lost" in r.getMessage())
    assert f"{lost} of its 20 samples lost" in msg


def test_truncation_reaches_the_main_process_with_workers_and_drop_last(sixty):
    stats, urls = sixty
    cut_mid_member(Path(urls[0]), 5)
    skips = D.SkipCounter()
    for batch in D.build_loader(pipeline(urls, drop_last=True, shuffle=0), num_workers=2):
        skips.update(batch)
    assert skips.counts == {"truncated shard train-000000.tar": 15}


def test_skip_counts_survive_a_resume_at_every_batch(sixty):
    stats, urls = sixty
    cut_mid_member(Path(urls[1]), 4)
    full = list(pipeline(urls, seed=5))
    total = D.SkipCounter()
    for b in full:
        total.update(b)
    assert total.counts == {"truncated shard train-000001.tar": 16}
    for stop in range(1, len(full)):
        before, pos = D.SkipCounter(), D.LoaderPosition()
        for b in full[:stop]:
            before.update(b)
            pos.update(b)
        pipe = pipeline(urls, seed=5)
        pipe.resume(json.loads(json.dumps(pos.state_dict())))
        for b in pipe:
            before.update(b)
        assert before.counts == total.counts, f"resumed after batch {stop}"


def test_count_samples_reads_the_record_not_the_tars(sixty, monkeypatch):
    stats, urls = sixty

    def no_tar(*a, **k):
        raise AssertionError("count_samples opened a tar that make-shards recorded")

    monkeypatch.setattr(tarfile, "open", no_tar)
    assert D.count_samples(urls) == 60


def test_old_stats_json_and_foreign_shards(sixty, tmp_path):
    stats, urls = sixty
    old = json.loads((Path(urls[0]).parent / "stats.json").read_text())
    del old["shard_samples"], old["shard_bytes"]  # written before per-shard records: counts derived
    (Path(urls[0]).parent / "stats.json").write_text(json.dumps(old))
    assert [D.ShardManifest().lookup(u) for u in urls] == [(20, None)] * 3

    foreign = tmp_path / "foreign"  # shards some other tool wrote: no stats.json
    foreign.mkdir()
    for u in urls:
        shutil.copy(u, foreign)
    cut_mid_member(foreign / "train-000002.tar", 13)
    furls = D.expand_urls(str(foreign))
    assert D.count_samples(furls) in (53, 54)  # read, tolerant of the cut: keys before the damage
    pipe = pipeline(furls)
    keys = [k for b in pipe for k in b["keys"]]
    assert len(keys) == 53 and pipe.skips.counts == {"read": 1}  # damage seen, how much lost unknown


def test_shard_gone_during_the_epoch_is_counted_not_raised(sixty):
    stats, urls = sixty
    pipe = pipeline(urls)
    Path(urls[0]).unlink()  # after the list was expanded
    keys = [k for b in pipe for k in b["keys"]]
    assert len(keys) == 40 and pipe.skips.counts == {"truncated shard train-000000.tar": 20}


def test_zero_byte_shard_is_a_one_line_error(sixty, tmp_path):
    stats, urls = sixty
    Path(urls[1]).write_bytes(b"")
    for call in (lambda: D.expand_urls(stats["urls"]["train"]), lambda: D.count_samples(urls)):
        with pytest.raises(ValueError, match="train-000001.tar is empty") as e:
            call()
        assert "\n" not in str(e.value)


@pytest.mark.slow
@pytest.mark.subprocess
def test_zero_byte_shard_cli_one_line(sixty, tmp_path):
    stats, urls = sixty
    Path(urls[2]).write_bytes(b"")
    r = subprocess.run([sys.executable, "-m", "groupseg.cli", "train", "--model", "groupvit-tiny-test", "--train-data",
                        stats["urls"]["train"], "--output-dir", str(tmp_path / "run"), "--tracker", "none"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.splitlines() if "error" in ln]
    assert len(lines) == 1 and "train-000002.tar is empty (0 bytes)" in lines[0]


@pytest.mark.slow
def test_trainer_skip_counts_survive_a_resume(sixty, tmp_path):
    """A run stopped after the truncated shard was counted and resumed ends with the same skip
    counts (trainer_state.json) as the uninterrupted run: the loss is not counted twice."""
    from groupseg.training.checkpoint import latest_checkpoint, read_state
    from groupseg.training.config import load_config
    from groupseg.training.main import Trainer

    stats, urls = sixty
    cut_mid_member(Path(urls[1]), 4)

    def run(out, **kw):
        cfg = dict(model="groupvit-tiny-test", train_data=stats["urls"]["train"], batch_size=4, epochs=1, lr=1e-3,
                   warmup_steps=1, workers=0, shuffle_buffer=20, precision="fp32", save_every=100, log_every=1,
                   tracker="none", output_dir=str(out), num_prompts=1, seed=3, **kw)
        Trainer(load_config(None, {k: str(v) for k, v in cfg.items()})).fit()
        return read_state(latest_checkpoint(out))

    whole = run(tmp_path / "whole")
    assert whole["skipped"] == {"truncated shard train-000001.tar": 16} and whole["step"] == 11
    stopped = run(tmp_path / "resumed", max_steps=3)
    assert stopped["step"] == 3 and stopped["skipped"] == whole["skipped"]  # counted before the stop
    resumed = run(tmp_path / "resumed", resume="auto")
    assert resumed["step"] == 11 and resumed["skipped"] == whole["skipped"]
