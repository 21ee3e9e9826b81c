"""Fine-tuning step speed: where the time of one `groupseg finetune` step goes, and levers compared in one run.

    python benchmarks/finetune_step.py                          # CamVid from ../shared/data/camvid
    python benchmarks/finetune_step.py --profile                # + torch.profiler's top operators (fp32)
    python benchmarks/finetune_step.py --data-root DIR --steps 8

Builds the real fine-tuner (`groupseg.training.finetune.Finetuner`, default settings, the shipped
model) and times, separately:
- data: producing one batch (decode, random scale and crop, photometric jitter, targets) in this process;
- step: forward + losses + backward + clip + optimizer step on a fixed batch, for the mix-and-match
  stage (triplets) and the per-pixel stage, in fp32 and, where the CPU has native bf16, under bf16 autocast.
Each variant in ``VARIANTS`` (an earlier formulation kept here only to measure against) is timed
alternately with the library's step in the same run (medians), so the ratio compares like with
like. The output starts with the machine line and a same-run matmul peak.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from _machine import NOT_NATIVE_BF16, bf16_native, print_header

ROOT = Path(__file__).resolve().parents[1]


def _groups_first(group_logits, grouping, size, hard=False):
    """pixel_log_probs before 2026-11-30: every group map upsampled, then summed over groups."""
    import torch.nn.functional as F

    from groupseg.loss.segmentation import patch_groups

    grouping = F.interpolate(patch_groups(grouping, hard), size=size, mode="bilinear", align_corners=False)
    return torch.einsum("bgc,bghw->bchw", group_logits.float().softmax(-1), grouping).clamp_min(1e-8).log()


def _triplet_cube(feats, labels, margin):
    """triplet_loss before 2026-12-02: the semi-hard negatives over the whole (a, p, n) cube at once."""
    import torch.nn.functional as F

    if feats.shape[0] < 2 or labels.unique().numel() < 2:
        return feats.sum() * 0.0
    f = F.normalize(feats.float() - feats.float().mean(0, keepdim=True), dim=-1)
    d = (2.0 - 2.0 * f @ f.T).clamp_min(1e-8).sqrt()
    same = labels[:, None] == labels[None, :]
    pairs = same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    if not pairs.any():
        return feats.sum() * 0.0
    d_an = d.masked_fill(same, float("nan"))[:, None, :]
    semi = torch.where(d_an > d[:, :, None], d_an, float("inf")).amin(-1)
    easiest = d.masked_fill(same, float("-inf")).amax(1, keepdim=True).expand_as(semi)
    return F.relu(d - torch.where(torch.isfinite(semi), semi, easiest) + margin)[pairs].mean()


@contextlib.contextmanager
def patched(module: str, name: str, fn):
    import importlib

    mod = importlib.import_module(module)
    old = getattr(mod, name)
    setattr(mod, name, fn)
    try:
        yield
    finally:
        setattr(mod, name, old)


@contextlib.contextmanager
def attention_path(ft, fused: bool):
    from groupseg.layers.attention import set_fused_attn

    set_fused_attn(ft.head, fused)
    try:
        yield
    finally:
        set_fused_attn(ft.head, None)


# name -> (stage it affects, context manager factory given the fine-tuner)
VARIANTS = {
    "upsample every group map (before 2026-11-30)": (
        "per-pixel", lambda ft: patched("groupseg.training.finetune", "pixel_log_probs", _groups_first)),
    "plain-matmul attention (fp32 default before 2026-11-30)": ("per-pixel", lambda ft: attention_path(ft, False)),
    "SDPA attention (the bf16 default is plain matmuls)": ("per-pixel", lambda ft: attention_path(ft, True)),
    "triplets over the whole (a, p, n) cube (before 2026-12-02)": (
        "mix-and-match", lambda ft: patched("groupseg.training.finetune", "triplet_loss", _triplet_cube)),
}


def build(data_root: str, precision: str):
    from accelerate.state import AcceleratorState

    from groupseg.training.finetune import FinetuneConfig, Finetuner

    AcceleratorState._reset_state(True)  # one Accelerator per precision in this process
    cfg = FinetuneConfig(dataset="camvid", data_root=data_root, out=tempfile.mkdtemp(), precision=precision)
    ft = Finetuner(cfg)
    ft.mix_epochs = 1  # epoch 0: the mix-and-match stage, epoch 1: the per-pixel stage
    opt = ft.build_optimizer()
    ft._train_mode()
    return ft, opt


def one_step(ft, opt, batch, epoch: int) -> None:
    terms = ft.losses(batch, epoch)
    ft.acc.backward(sum(terms.values()))
    ft.acc.clip_grad_norm_(ft.head.parameters(), 5.0)
    opt.step()
    opt.zero_grad(set_to_none=True)


def time_steps(fn, steps: int, warmup: int = 2) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def data_kept_against_decoded(ft, rounds: int) -> None:
    """One batch of crops from photos the training process keeps decoded (every epoch after the
    first) against decoding each photo again (as before 2026-12-02), alternating; the crops are equal."""
    import copy

    kept, fresh = ft.data, copy.copy(ft.data)
    fresh._decoded, fresh._decoded_bytes = {}, 0
    idx = range(ft.cfg.batch_size)
    [kept[i] for i in idx]  # decoded once
    a, b = [], []
    with patched(type(fresh).__module__, "DECODED_CACHE_BYTES", 0):
        for _ in range(rounds):
            for times, data in ((a, kept), (b, fresh)):
                t0 = time.perf_counter()
                [data[i] for i in idx]
                times.append(time.perf_counter() - t0)
    ka, kb = statistics.median(a), statistics.median(b)
    print(f"fp32: data {ka * 1000:,.0f} ms per batch from photos kept decoded against {kb * 1000:,.0f} ms decoding "
          f"each: {kb / ka:.2f}x (medians of {rounds} alternating)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "camvid"))
    p.add_argument("--steps", type=int, default=6, help="timed steps per stage and precision")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the fp32 per-pixel step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if not Path(args.data_root).is_dir():
        raise SystemExit(f"no CamVid at {args.data_root}: give --data-root")
    native = bf16_native()
    print_header(("fp32", "bf16") if native else ("fp32",))
    if not native:
        print(f"matmul peak bf16: {NOT_NATIVE_BF16}")
    for precision in ("fp32", "bf16"):
        if precision == "bf16" and not native:
            print(f"step bf16: {NOT_NATIVE_BF16}")
            continue
        ft, opt = build(args.data_root, precision)
        ft.data.epoch = 0
        n = len(ft.data)
        t_data = time_steps(lambda: [ft.data[i % n] for i in range(ft.cfg.batch_size)], 3, warmup=1)
        loader = iter(ft._loader(0))
        batch = {k: v.to(ft.acc.device) for k, v in next(loader).items()}
        print(f"{precision}: data {statistics.median(t_data) * 1000:,.0f} ms per batch of {ft.cfg.batch_size} "
              f"(one process; the loader's worker overlaps it with the step)")
        if precision == "fp32":
            data_kept_against_decoded(ft, args.steps)
        for epoch, stage in ((0, "mix-and-match"), (1, "per-pixel")):
            t = time_steps(lambda: one_step(ft, opt, batch, epoch), args.steps)
            print(f"{precision}: step {stage}: {statistics.median(t) * 1000:,.0f} ms median of {args.steps} "
                  f"(min {min(t) * 1000:,.0f})")
        for name, (stage, ctx) in VARIANTS.items():
            epoch = 0 if stage == "mix-and-match" else 1
            ours, theirs = [], []
            for _ in range(args.steps):  # alternating, after one warm-up step each
                for times, c in ((ours, contextlib.nullcontext), (theirs, lambda: ctx(ft))):
                    with c():
                        if not times:
                            one_step(ft, opt, batch, epoch)
                        t0 = time.perf_counter()
                        one_step(ft, opt, batch, epoch)
                        times.append(time.perf_counter() - t0)
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"{precision}: {stage} step {a * 1000:,.0f} ms against {b * 1000:,.0f} ms with '{name}': "
                  f"{b / a:.2f}x (medians of {args.steps} alternating)")
        if args.profile and precision == "fp32":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    one_step(ft, opt, batch, 1)
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
