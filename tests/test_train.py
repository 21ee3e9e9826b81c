"""Training runs end to end: config errors, checkpoints, and bitwise-exact resume after SIGKILL."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from groupseg.training.checkpoint import latest_checkpoint, list_checkpoints
from groupseg.training.config import load_config, parse_overrides
from groupseg.training.main import Trainer

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["dog", "cat", "car", "tree", "boat", "child", "ball", "horse"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    from groupseg.training.shards import make_shards

    d = tmp_path_factory.mktemp("data")
    (d / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = []
    for i in range(40):
        arr = rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)
        Image.fromarray(arr).save(d / "img" / f"im{i:03d}.jpg")
        a, b = WORDS[i % 8], WORDS[(i * 3 + 1) % 8]
        lines += [f"im{i:03d}.jpg#0\ta {a} next to a {b} .", f"im{i:03d}.jpg#1\ttwo {a}s in the park ."]
    (d / "captions.token.txt").write_text("\n".join(lines) + "\n")
    make_shards(d / "img", d / "captions.token.txt", d / "shards", shard_size=10, progress=False)
    return d / "shards"


def _cfg(shards: Path, out: Path, **kw) -> dict:
    cfg = dict(
        model="groupvit-tiny-test", train_data=str(shards / "train-{000000..000003}.tar"), batch_size=4, epochs=2,
        max_steps=8, lr=1e-3, warmup_steps=2, workers=0, shuffle_buffer=20, precision="fp32", save_every=1,
        log_every=1, tracker="none", output_dir=str(out), num_prompts=2, seed=3,
    )
    cfg.update(kw)
    return cfg


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


def test_short_run_learns_and_exports(shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, {k: str(v) for k, v in _cfg(shards, out, max_steps=20, save_every=5, keep_last=2).items()})
    model = Trainer(cfg).fit()
    assert [p.name for p in list_checkpoints(out)] == ["ckpt-00000015", "ckpt-00000020"]  # keep_last
    recs = [yaml.safe_load(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, 21))
    first, last = np.mean([r["loss"] for r in recs[:3]]), np.mean([r["loss"] for r in recs[-3:]])
    assert last < first  # it learns something on 40 images
    assert (out / "loss_curve.png").stat().st_size > 1000 and (out / "config.yaml").exists()
    import groupseg

    again = groupseg.load_model(out / "model")
    assert torch.equal(again.state_dict()["logit_scale"], model.state_dict()["logit_scale"])


def test_sigkill_and_resume_is_bitwise_exact(shards, tmp_path):
    ref = tmp_path / "ref"
    Trainer(load_config(None, _cfg(shards, ref))).fit()

    run = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, run)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "groupseg.training.main", "--config", str(cfg_file)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_after = random.Random().randint(1, 6)  # a random checkpoint step to die after
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        last = latest_checkpoint(run)
        if last is not None and int(last.name.split("-")[1]) >= kill_after:
            time.sleep(random.random() * 0.3)  # die mid-step, maybe mid-checkpoint
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert latest_checkpoint(run) is not None, "the run died before its first checkpoint"
    Trainer(load_config(None, _cfg(shards, run, resume="auto"))).fit()
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed weights differ in {diff[:3]} (killed after step >= {kill_after})"


def test_config_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'batchsize'"):
        load_config(None, {"batchsize": "3"})
    with pytest.raises(ValueError, match="config key 'precision': bad value 'fp64'"):
        load_config(None, {"precision": "fp64"})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    assert parse_overrides(["--batch-size", "8", "--lr=0.1", "--lock-text"]) == {"batch_size": "8", "lr": "0.1", "lock_text": "true"}
    with pytest.raises(ValueError, match="no training data"):
        Trainer(load_config(None, _cfg(shards, tmp_path / "x", train_data="")))
    with pytest.raises(FileNotFoundError, match="shard pattern .*none-.*not found"):
        Trainer(load_config(None, _cfg(shards, tmp_path / "x", train_data=str(tmp_path / "none-{000..003}.tar"))))


def test_shipped_configs_load_by_name():
    from groupseg.training.config import list_configs

    assert "tiny-cpu" in list_configs() and "flickr8k-default" in list_configs()
    by_name = load_config("tiny-cpu")
    by_path = load_config(str(ROOT / "training" / "configs" / "tiny-cpu.yaml"))
    assert by_name == by_path and by_name != load_config(None)
    with pytest.raises(FileNotFoundError, match="config file not found: tiny-gpu .*tiny-cpu"):
        load_config("tiny-gpu")


def test_resume_from_other_architecture_is_an_error(shards, tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, _cfg(shards, out, max_steps=1))).fit()
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        Trainer(load_config(None, _cfg(shards, out, max_steps=1))).fit()
    other = _cfg(shards, out, resume="auto", model_overrides={"embed_dim": 8})
    with pytest.raises(ValueError, match="different architecture"):
        Trainer(load_config(None, other)).fit()


def test_cli_train_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "groupseg.cli", "train", "--config", str(tmp_path / "missing.yaml")],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "config file not found" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "groupseg.cli", "train", "--batchsize", "3"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "unknown config key 'batchsize'" in r.stderr


def test_segment_loss_terms_are_wired_into_training(shards, tmp_path):
    out = tmp_path / "run"
    cfg = load_config(None, _cfg(shards, out, max_steps=3, group_label_weight=0.5, group_usage_weight=0.25))
    model = Trainer(cfg).fit()
    recs = [yaml.safe_load(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    for r in recs:
        total = r["clip_loss"] + r["multi_label_loss"] + 0.5 * r["group_label_loss"] + 0.25 * r["group_usage_loss"]
        assert abs(r["loss"] - total) < 1e-4
    # the maps the usage term reads: one per grouping stage, each a distribution over its groups
    px = torch.randn(2, 3, model.cfg.vision.image_size, model.cfg.vision.image_size)
    o = model.eval()(px, torch.zeros(2, 5, dtype=torch.long), return_groups=True)
    stages = [s for s in model.cfg.vision.stages if s.num_output_groups]
    assert len(o["groupings"]) == len(stages)
    for m, st in zip(o["groupings"], stages):
        assert m.shape[:2] == (2, st.num_output_groups)
        assert torch.allclose(m.sum(1), torch.ones(()), atol=1e-5)
    assert o["group_embeds"].shape == (2, stages[-1].num_output_groups, model.cfg.embed_dim)


def test_bf16_autocast_run_tracks_fp32(shards, tmp_path):
    """precision auto picks bf16 on CPUs that have it: a short bf16 run's losses must match fp32's
    within noise, the noise being how far two fp32 runs with different seeds are apart."""
    from accelerate.state import AcceleratorState

    def losses(prec, seed):
        out = tmp_path / f"{prec}-{seed}"
        AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process in real runs
        try:
            Trainer(load_config(None, _cfg(shards, out, max_steps=12, precision=prec, seed=seed))).fit()
        finally:
            AcceleratorState._reset_state(reset_partial_state=True)
        return np.array([yaml.safe_load(ln)["loss"] for ln in (out / "metrics.jsonl").read_text().splitlines()])

    fp32, bf16, other_seed = losses("fp32", 3), losses("bf16", 3), losses("fp32", 4)
    assert len(fp32) == len(bf16) == 12
    assert not np.array_equal(bf16, fp32)  # it really ran in bf16
    noise = abs(fp32.mean() - other_seed.mean())
    assert abs(bf16.mean() - fp32.mean()) <= 2 * noise + 0.05 * fp32.mean()
    assert bf16[-4:].mean() < bf16[:4].mean()  # and it learns
