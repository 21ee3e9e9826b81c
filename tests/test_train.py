"""Training runs end to end: config errors, checkpoints, and bitwise-exact resume after SIGKILL."""
import os
import random
import shutil
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

from groupseg.training.checkpoint import latest_checkpoint, list_checkpoints, read_state, validate_checkpoint
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


@pytest.mark.slow
@pytest.mark.subprocess
def test_sigkill_and_resume_is_bitwise_exact(shards, tmp_path):
    ref = tmp_path / "ref"
    Trainer(load_config(None, _cfg(shards, ref))).fit()

    run = tmp_path / "killed"
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(_cfg(shards, run)))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "groupseg.training.main", "--config", str(cfg_file)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rng = random.Random(21)
    kill_after = rng.randint(1, 5)  # the checkpoint step to die after (of 8 steps, one checkpoint each)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        last = latest_checkpoint(run)
        if last is not None and int(last.name.split("-")[1]) >= kill_after:
            time.sleep(rng.random() * 0.05)  # die mid-step, maybe mid-checkpoint
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended by itself (returncode {proc.returncode}) before the kill"
    last = latest_checkpoint(run)
    assert last is not None, "the run died before its first checkpoint"
    killed_at = read_state(last)["step"]
    assert kill_after <= killed_at < 8, f"the kill landed at step {killed_at}, not mid-run"
    Trainer(load_config(None, _cfg(shards, run, resume="auto"))).fit()
    a, b = _weights(ref), _weights(run)
    assert a.keys() == b.keys()
    diff = [k for k in a if not torch.equal(a[k], b[k])]
    assert not diff, f"resumed weights differ in {diff[:3]} (killed after step {killed_at})"


@pytest.mark.slow
def test_resume_auto_skips_damaged_checkpoints_and_ends_bitwise_equal(shards, tmp_path, caplog):
    import logging

    ref = tmp_path / "ref"
    Trainer(load_config(None, _cfg(shards, ref, keep_last=3))).fit()
    run = tmp_path / "run"
    Trainer(load_config(None, _cfg(shards, run, keep_last=3))).fit()
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000006", "ckpt-00000007", "ckpt-00000008"]
    newest = run / "ckpt-00000008" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a copy cut short
    (run / "ckpt-00000007" / "optimizer.bin").unlink()  # a file lost
    assert "model.safetensors has" in validate_checkpoint(run / "ckpt-00000008")
    assert validate_checkpoint(run / "ckpt-00000007") == "optimizer.bin is missing"
    shutil.rmtree(run / "model")  # the weights must come from the resumed run
    with caplog.at_level(logging.WARNING, logger="groupseg.train"):
        trainer = Trainer(load_config(None, _cfg(shards, run, keep_last=3, resume="auto")))
        trainer.fit()
    skips = [r.getMessage() for r in caplog.records if "skipping checkpoint" in r.getMessage()]
    assert len(skips) == 2 and "ckpt-00000008" in skips[0] and "optimizer.bin is missing" in skips[1]
    assert all(len(m.splitlines()) == 1 for m in skips)
    assert (run / "ckpt-00000008.damaged").is_dir() and (run / "ckpt-00000007.damaged").is_dir()  # kept, not deleted
    a, b = _weights(ref), _weights(run)
    assert not [k for k in a if not torch.equal(a[k], b[k])]
    steps = [yaml.safe_load(ln)["step"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))  # resumed from step 6: steps 7 and 8 logged once each
    assert trainer.summary() == "32 samples read, 0 skipped"  # 8 steps of 4, counted across the resume


def test_validate_checkpoint_reads_safetensors_headers(tmp_path):
    from safetensors.torch import save_file

    d = tmp_path / "ckpt-00000001"
    d.mkdir()
    save_file({"w": torch.zeros(64)}, str(d / "model.safetensors"))
    (d / "trainer_state.json").write_text("{}")  # written before sizes were recorded: the header check remains
    assert validate_checkpoint(d) == ""
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[:-10])
    assert "describes" in validate_checkpoint(d)
    (d / "model.safetensors").write_bytes(data[:5])
    assert "truncated header" in validate_checkpoint(d)
    (d / "trainer_state.json").write_text("{")
    assert validate_checkpoint(d) == "unreadable trainer_state.json"


def test_config_errors(shards, tmp_path):
    with pytest.raises(ValueError, match="unknown config key 'batchsize'"):
        load_config(None, {"batchsize": "3"})
    with pytest.raises(ValueError, match="config key 'precision': bad value 'fp64'"):
        load_config(None, {"precision": "fp64"})
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ValueError, match="config key 'batch_size' must be >= 1, got 0"):
        load_config(None, {"batch_size": "0"})
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


def test_resume_from_other_architecture_is_an_error_and_writes_nothing(shards, tmp_path):
    out = tmp_path / "run"
    Trainer(load_config(None, _cfg(shards, out, max_steps=1))).fit()
    with pytest.raises(ValueError, match="already holds checkpoints.*--resume auto"):
        Trainer(load_config(None, _cfg(shards, out, max_steps=1))).fit()
    other = _cfg(shards, out, resume="auto", model_overrides={"embed_dim": 8})
    with pytest.raises(ValueError, match="different architecture"):
        Trainer(load_config(None, other)).fit()
    new = tmp_path / "new"  # a refused resume leaves the new output folder unwritten (no config.yaml)
    other = _cfg(shards, new, resume=str(latest_checkpoint(out)), model_overrides={"embed_dim": 8})
    with pytest.raises(ValueError, match="different architecture"):
        Trainer(load_config(None, other)).fit()
    assert not new.exists()


def test_train_help_lists_every_config_field_and_flags_override_the_file(capsys):
    import dataclasses

    from groupseg.cli import build_parser, main
    from groupseg.training.config import TrainConfig
    from groupseg.training.main import config_from_args

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(TrainConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "[int, default: 64]" in text and "[one of auto, fp32, bf16, fp16, default: 'auto']" in text
    assert "[float float, default: (0.9, 0.999)]" in text and "--lock-text, --no-lock-text" in text
    argv = ["train", "--config", "tiny-cpu", "--batch-size", "32", "--lock-text", "--betas", "0.8", "0.9", "--eps=1e-6"]
    args, unknown = build_parser("train").parse_known_args(argv)
    args.overrides = unknown
    cfg = config_from_args(args)
    tiny = load_config("tiny-cpu")
    assert (cfg.batch_size, cfg.lock_text, cfg.betas, cfg.eps) == (32, True, (0.8, 0.9), 1e-6)
    assert cfg.model == tiny.model and cfg.epochs == tiny.epochs  # the rest from the file


@pytest.mark.slow
@pytest.mark.subprocess
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


@pytest.mark.slow
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


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings exist on Linux only")
def test_keep_freed_memory_lets_repeated_steps_reuse_their_pages():
    # a fresh process (its allocator untouched by other tests) allocates and frees four 28 MB
    # blocks per "step", as a training step does its activations; once glibc keeps freed memory,
    # later steps reuse the same pages instead of faulting ~28,000 of them in again (without it,
    # glibc maps blocks of that size afresh and the loop faults thousands of pages a step)
    code = """
import torch
from groupseg.training.engine import keep_freed_memory
assert keep_freed_memory()
def faults(): return int(open("/proc/self/stat").read().split()[9])
def step():
    blocks = [torch.empty(7 << 20).fill_(k) for k in range(4)]  # 4 x 28 MB
    del blocks
for _ in range(3): step()
f = faults()
for _ in range(10): step()
print((faults() - f) // 10)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.strip()) < 300  # pages faulted per step, of the ~28,000 it touches
