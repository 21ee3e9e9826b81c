"""GPU check of issue 24: every GPU figure of the project in one command, into one output folder.

On the GPU machine (one H200; torch, transformers, accelerate and timm installed; no network):

    bash benchmarks/gpu_check.sh                         # figures into $OUT (or runs/gpu_check)

Beforehand, on a CPU machine with the data (both land in ignored folders and travel with the checkout):

    python benchmarks/gpu_check.py make-shards           # 200 Flickr8k dev photos, 224 px -> shards/gpu_check (~3.6 MiB)
    pip download webdataset braceexpand --no-deps -d .whl   # pure-Python wheels; the GPU image lacks them

and carry ``shards/gpu_check`` and ``.whl``. Parts, each timed in this one run:

1. train step: transformers' GroupViTModel vs groupseg, same weights and batch, published gvit-s
   config, bf16 autocast, fused AdamW on both; ms/step, samples/s and MFU against a bf16 matmul
   peak measured in the same run (model FLOPs from torch.utils.flop_counter).
2. pretraining: ``groupseg train`` from the shipped weights (LiT: locked text tower, as the shipped
   model was trained) on the Flickr8k shards; loss first vs last, samples/s, data-wait fraction.
3. segmentation: the shipped model, 1,000 words of nouns_large, first call and cached calls.

Writes ``results.json`` and ``summary.txt`` (plus the run's metrics.jsonl and loss curve) to --out.
open_clip is not needed: groupseg uses it only for the CLIP BPE tokenizer of CLIP-style text towers;
the train step feeds token ids directly, and the shipped model's text tower has its own tokenizer.
``--device cpu --tiny`` is the dry run (tests/test_gpu_check.py runs it on shards it writes).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from _machine import NOT_NATIVE_BF16, bf16_native, machine_line, peak_line

ROOT = Path(__file__).resolve().parents[1]
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"
SHARDS = ROOT / "shards" / "gpu_check"


def ensure_namespace() -> None:
    """Make ``groupseg.training`` importable from a checkout that is not pip-installed (the GPU machine)."""
    import groupseg

    try:
        import groupseg.training  # noqa: F401
    except ImportError:  # training/ and eval/ install inside groupseg; from a bare checkout, map them so
        groupseg.__path__.append(str(ROOT))


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


# ----------------------------------------------------------------------------- 1. train step
def tiny_hf_config():
    from transformers import GroupViTConfig

    return GroupViTConfig(
        text_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=64, intermediate_size=128, depths=[2, 1, 1], num_hidden_layers=4,
                           num_group_tokens=[16, 4, 0], num_output_groups=[16, 4, 4], num_attention_heads=2),
        projection_dim=32, projection_intermediate_dim=64,
    )


def prompt_ids(batch: int, seed: int = 0) -> torch.Tensor:
    """CLIP-style token ids of prompt length (5-12 tokens), padded with 0 to 77 (no tokenizer needed)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, 77, dtype=torch.long)
    for i in range(batch):
        n = 5 + i % 8
        ids[i, 0], ids[i, n - 1] = 49406, 49407  # start / end of text
        ids[i, 1 : n - 1] = torch.randint(256, 49000, (n - 2,), generator=g)
    return ids


def train_step_part(args, dev: torch.device, precision: str, peak: float | None) -> dict:
    from train_step import alternate, build_pair, flops, make_optimizer, step_fn

    hf, ours = build_pair(tiny_hf_config() if args.tiny else None)
    hf, ours = hf.to(dev), ours.to(dev)
    px = torch.randn(args.batch, 3, 224, 224, device=dev)
    ids = prompt_ids(args.batch).to(dev)
    bf16 = precision == "bf16"
    fns = {k: step_fn(k, m, make_optimizer(m, "fused"), px, ids, bf16) for k, m in (("transformers", hf), ("groupseg", ours))}
    n_flops = {k: flops(f) for k, f in fns.items()}  # each its own work (transformers runs all 77 tokens)
    med = alternate(fns, args.warmup, args.steps, sync=lambda: sync(dev))
    res: dict = {"precision": precision, "batch": args.batch, "config": "tiny" if args.tiny else "gvit-s 2-stage (published)"}
    for k, t in med.items():
        res[k] = {"ms_per_step": 1e3 * t, "samples_per_s": args.batch / t, "gflop_per_step": n_flops[k] / 1e9,
                  "mfu": n_flops[k] / t / peak if peak else None}
    res["speed_ratio_groupseg_over_transformers"] = res["transformers"]["ms_per_step"] / res["groupseg"]["ms_per_step"]
    return res


# ----------------------------------------------------------------------------- 2. pretraining
def pretrain_config(args, shards: Path, run_dir: Path, precision: str) -> dict:
    from groupseg.pretrained import SHIPPED_DIR

    tars = sorted(p.name for p in shards.glob("train-*.tar"))
    if not tars:
        raise SystemExit(f"error: no train-*.tar in {shards}; make them first: python benchmarks/gpu_check.py make-shards")
    return {
        "init_weights": str(SHIPPED_DIR), "lock_text": True, "train_data": "::".join(str(shards / t) for t in tars),
        "resampled": True, "epoch_samples": args.pretrain_steps * args.pretrain_batch, "epochs": 1,
        "max_steps": args.pretrain_steps, "batch_size": args.pretrain_batch, "lr": 3e-4, "min_lr": 1e-5,
        "warmup_steps": max(1, args.pretrain_steps // 10), "weight_decay": 0.05, "num_prompts": 3,
        "crop_scale": [0.35, 1.0], "precision": precision, "workers": args.workers, "shuffle_buffer": 500,
        "save_every": 10**9, "keep_last": 1, "log_every": args.log_every, "tracker": "none",
        "export_dtype": "fp16", "output_dir": str(run_dir), "seed": 0,
    }


def pretrain_part(args, dev: torch.device, precision: str, out: Path) -> dict:
    import yaml

    run_dir = Path(tempfile.mkdtemp(prefix="gpu_check_pretrain_")) / "run"  # checkpoints stay out of --out
    cfg = pretrain_config(args, Path(args.shards), run_dir, precision)
    cfg_file = run_dir.parent / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    if dev.type == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # accelerate takes the GPU whenever it sees one
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, __file__, "cli", "train", "--config", str(cfg_file)], env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (out / "pretrain_log.txt").write_text(r.stdout[-200_000:] + r.stderr[-200_000:])
    if r.returncode != 0:
        return {"error": f"groupseg train exited {r.returncode}: see pretrain_log.txt", "wall_s": wall}
    recs = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    (out / "pretrain_metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    if (run_dir / "loss_curve.png").exists():
        (out / "pretrain_loss_curve.png").write_bytes((run_dir / "loss_curve.png").read_bytes())
    k = max(1, len(recs) // 4)
    first, last = statistics.mean(x["loss"] for x in recs[:k]), statistics.mean(x["loss"] for x in recs[-k:])
    steady = recs[1:] or recs  # the first window holds worker start-up and warm-up
    return {
        "steps": recs[-1]["step"], "batch": args.pretrain_batch, "precision": precision, "workers": args.workers,
        "loss_first": first, "loss_last": last, "loss_falling": last < first, "log_records": len(recs),
        "samples_per_s": statistics.median(x["samples_per_s"] for x in steady),
        "data_wait_fraction": statistics.median(x["data_wait"] for x in steady), "wall_s": wall,
    }


# ----------------------------------------------------------------------------- 3. segmentation
def segment_part(args, dev: torch.device, precision: str) -> dict:
    from groupseg.prompting import shipped_vocab
    from groupseg.segment import Segmenter

    vocab = shipped_vocab("nouns_large")[: args.words]
    seg = Segmenter.from_pretrained(None, device=dev, templates="simple", text_precision=precision)
    image = ROOT / "docs" / "rocket.jpg"
    t0 = time.perf_counter()
    first = seg.segment(image, vocab)
    t_first = time.perf_counter() - t0
    cached = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        seg.segment(image, vocab)
        sync(dev)
        cached.append(time.perf_counter() - t0)
    return {"words": len(vocab), "image": "docs/rocket.jpg (448 px short side)", "text_precision": precision,
            "first_call_s": t_first, "prompt_encoding_s": first.timing.get("text"),
            "cached_call_s": statistics.median(cached), "repeats": args.repeats}


# ----------------------------------------------------------------------------- report
def summary_lines(res: dict) -> list[str]:
    lines = [res["machine"], *res["peaks"].values()]
    ts = res.get("train_step", {})
    if "groupseg" in ts:
        lines.append(f"train step ({ts['config']}, batch {ts['batch']}, {ts['precision']}):")
        for k in ("transformers", "groupseg"):
            r = ts[k]
            mfu = f"{r['mfu']:.1%} MFU" if r["mfu"] else "MFU not measured"
            lines.append(f"  {k:12s} {r['ms_per_step']:8.1f} ms/step {r['samples_per_s']:8.1f} samples/s "
                         f"{r['gflop_per_step']:7.1f} GFLOP/step  {mfu}")
        lines.append(f"  groupseg / transformers speed: {ts['speed_ratio_groupseg_over_transformers']:.2f}x (floor on GPU: 2x; MFU floor 40 %)")
    elif ts:
        lines.append(f"train step: {ts.get('note', ts)}")
    pt = res.get("pretrain", {})
    if "loss_first" in pt:
        lines.append(f"pretraining ({pt['steps']} steps, batch {pt['batch']}, {pt['precision']}, {pt['workers']} workers): "
                     f"loss {pt['loss_first']:.3f} -> {pt['loss_last']:.3f} ({'falling' if pt['loss_falling'] else 'NOT falling'}), "
                     f"{pt['samples_per_s']:.1f} samples/s, data wait {pt['data_wait_fraction']:.1%}, {pt['wall_s']:.0f} s in all")
    elif pt:
        lines.append(f"pretraining: {pt}")
    sg = res.get("segment", {})
    if sg:
        lines.append(f"segmentation ({sg['words']} words, {sg['image']}, text {sg['text_precision']}): first call "
                     f"{sg['first_call_s']:.2f} s, cached calls {sg['cached_call_s'] * 1e3:.1f} ms (median of {sg['repeats']})")
    lines.append(f"total {res['total_s']:.0f} s")
    return lines


def run(args) -> int:
    ensure_namespace()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device visible; pass --device cpu for the dry run", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    native = bf16_native(dev)
    precision = args.precision if args.precision != "auto" else "bf16" if native else "fp32"
    if precision == "bf16" and not native:
        print(f"error: bf16 on this {dev.type} is emulated ({NOT_NATIVE_BF16}); pass --precision fp32", file=sys.stderr)
        return 2
    res: dict = {"machine": machine_line(dev), "device": str(dev), "argv": sys.argv[1:], "peaks": {}}
    res["peaks"]["fp32"], peak_fp32 = peak_line("fp32", dev)
    res["peaks"]["bf16"], peak_bf16 = peak_line("bf16", dev)  # "not measured (no native bf16)" where emulated
    print("\n".join([res["machine"], *res["peaks"].values()]), flush=True)
    parts = [p for p in ("train_step", "pretrain", "segment") if p not in args.skip]
    for part in parts:
        t0 = time.perf_counter()
        if part == "train_step":
            res[part] = train_step_part(args, dev, precision, peak_bf16 if precision == "bf16" else peak_fp32)
        elif part == "pretrain":
            res[part] = pretrain_part(args, dev, precision, out)
        else:
            res[part] = segment_part(args, dev, precision)
        print(f"{part}: {time.perf_counter() - t0:.0f} s", flush=True)
        res["total_s"] = time.perf_counter() - t_all
        (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")  # after every part: a killed run keeps the rest
    lines = summary_lines(res)
    (out / "summary.txt").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if "error" not in res.get("pretrain", {}) else 1


# ----------------------------------------------------------------------------- make-shards / cli
def make_shards(args) -> int:
    """A small Flickr8k shard set (dev photos, not the shipped model's training photos) for the run."""
    flickr = Path(args.flickr)
    if not (flickr / "Flickr8k.token.txt").is_file():
        print(f"error: Flickr8k not found at {flickr}; pass --flickr DIR", file=sys.stderr)
        return 2
    names = (flickr / "Flickr_8k.devImages.txt").read_text().split()[: args.images]
    keep = set(names)
    lines = [ln for ln in (flickr / "Flickr8k.token.txt").read_text().splitlines() if ln.split("#", 1)[0] in keep]
    out = Path(args.out)
    with tempfile.TemporaryDirectory() as tmp:
        captions = Path(tmp) / "captions.token.txt"
        captions.write_text("\n".join(lines) + "\n")
        cmd = [sys.executable, __file__, "cli", "make-shards", "--images", str(flickr / "images"), "--captions", str(captions),
               "--out", str(out), "--resize", str(args.resize), "--jpeg-quality", str(args.jpeg_quality),
               "--shard-size", str(args.shard_size), "--overwrite", "--no-progress"]
        r = subprocess.run(cmd)
    if r.returncode:
        return r.returncode
    size = sum(p.stat().st_size for p in out.glob("*.tar"))
    print(f"{len(names)} photos -> {out} ({size / 2**20:.1f} MiB in {len(list(out.glob('*.tar')))} shards); "
          f"carry it with the checkout (the tree that travels holds 64 MiB in all)")
    return 0


def cli(argv: list[str]) -> int:
    """``groupseg <argv>`` from this checkout, installed or not."""
    ensure_namespace()
    from groupseg.cli import main as groupseg_main

    return groupseg_main(argv)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure everything into --out")
    r.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    r.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "runs" / "gpu_check"))
    r.add_argument("--shards", default=str(SHARDS), help="folder of train-*.tar shards (make-shards)")
    r.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 where native (GPUs, AVX512-BF16/AMX CPUs), else fp32; MFU is against that precision's peak")
    r.add_argument("--tiny", action="store_true", help="a tiny GroupViT config for the train step (the CPU dry run)")
    r.add_argument("--batch", type=int, default=128, help="train-step batch")
    r.add_argument("--steps", type=int, default=10, help="timed train steps per implementation")
    r.add_argument("--warmup", type=int, default=3)
    r.add_argument("--pretrain-steps", type=int, default=150)
    r.add_argument("--pretrain-batch", type=int, default=128)
    r.add_argument("--workers", type=int, default=min(10, os.cpu_count() or 1), help="data-loading processes")
    r.add_argument("--log-every", type=int, default=10)
    r.add_argument("--words", type=int, default=1000)
    r.add_argument("--repeats", type=int, default=10)
    r.add_argument("--skip", nargs="*", default=[], choices=["train_step", "pretrain", "segment"])
    m = sub.add_parser("make-shards", help="Flickr8k dev photos -> a small shard set (run where the data is)")
    m.add_argument("--flickr", default=str(FLICKR))
    m.add_argument("--images", type=int, default=200)
    m.add_argument("--resize", type=int, default=224, help="short side in pixels")
    m.add_argument("--jpeg-quality", type=int, default=75)
    m.add_argument("--shard-size", type=int, default=100)
    m.add_argument("--out", default=str(SHARDS))
    return p


def main() -> int:
    if sys.argv[1:2] == ["cli"]:
        return cli(sys.argv[2:])
    args = build_parser().parse_args()
    return make_shards(args) if args.cmd == "make-shards" else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
