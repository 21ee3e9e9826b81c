"""The GPU check (benchmarks/gpu_check.sh) end to end on the CPU: a tiny dry run on shards this test writes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def _write_shards(tmp_path: Path) -> Path:
    from groupseg.cli import main as cli_main

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    lines = []
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(images / f"p{i}.jpg")
        lines += [f"p{i}.jpg#0\ta dog runs on the grass number {i} .", f"p{i}.jpg#1\ttwo children play near a red car ."]
    (tmp_path / "captions.token.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "shards"
    rc = cli_main(["make-shards", "--images", str(images), "--captions", str(tmp_path / "captions.token.txt"),
                   "--out", str(out), "--shard-size", "6", "--no-progress", "--workers", "1"])
    assert rc in (0, None) and len(list(out.glob("train-*.tar"))) == 2
    return out


@pytest.mark.slow
@pytest.mark.subprocess
def test_gpu_check_dry_run_writes_every_figure(tmp_path):
    pytest.importorskip("webdataset")
    pytest.importorskip("accelerate")
    shards = _write_shards(tmp_path)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    cmd = ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--precision", "fp32",
           "--shards", str(shards), "--batch", "2", "--steps", "1", "--warmup", "1", "--pretrain-steps", "4",
           "--pretrain-batch", "4", "--workers", "1", "--log-every", "1", "--words", "20", "--repeats", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert "avx2=" in res["machine"] and "fp32" in res["peaks"]
    ts = res["train_step"]
    for side in ("transformers", "groupseg"):
        assert ts[side]["ms_per_step"] > 0 and 0 < ts[side]["mfu"] < 1
    pt = res["pretrain"]
    assert pt["steps"] == 4 and pt["log_records"] == 4 and 0 <= pt["data_wait_fraction"] <= 1 and pt["samples_per_s"] > 0
    assert len((out / "pretrain_metrics.jsonl").read_text().splitlines()) == 4
    sg = res["segment"]
    assert sg["words"] == 20 and sg["cached_call_s"] > 0
    summary = (out / "summary.txt").read_text()
    assert "train step" in summary and "pretraining" in summary and "segmentation" in summary
    assert sorted(p.name for p in out.iterdir()) <= sorted(
        ["results.json", "summary.txt", "pretrain_metrics.jsonl", "pretrain_loss_curve.png", "pretrain_log.txt"])
