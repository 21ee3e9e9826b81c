"""Train-step speed: groupseg vs transformers' GroupViTModel, same weights, same batch, one run.

    python benchmarks/train_step.py                       # published gvit-s 2-stage, batch 8, 224 px
    python benchmarks/train_step.py --batch 4 --steps 5 --threads 2

Forward + contrastive loss + backward + AdamW step, alternating the two implementations after a
warm-up, in fp32 and under bf16 autocast. Prints ms/step, samples/s, the ratio, model FLOPs per
step (torch.utils.flop_counter) and the achieved fraction of a matmul peak measured in the same
run. Peak memory is not measured by this script yet (it says so).
"""
from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def build_pair(args):
    from transformers import GroupViTConfig, GroupViTModel

    import groupseg

    torch.manual_seed(0)
    hf = GroupViTModel(GroupViTConfig())  # the published gvit-s 2-stage configuration
    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    ours = groupseg.load_model(d)
    return hf.train(), ours.train()


def clip_loss(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def step_fn(kind, model, opt, px, ids, bf16, matmul_attention=True):
    from groupseg.layers import attention

    def run():
        attention.CPU_BF16_MATMUL_ATTENTION = matmul_attention
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            if kind == "transformers":
                out = model(input_ids=ids, pixel_values=px)
                img, txt, scale = out.image_embeds, out.text_embeds, model.logit_scale.exp()
            else:
                out = model(px, ids)
                img, txt, scale = out["image_embeds"], out["text_embeds"], out["logit_scale"]
        loss = clip_loss(img.float(), txt.float(), scale)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation and precision")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from groupseg.tokenizer import tokenize

    hf, ours = build_pair(args)
    px = torch.randn(args.batch, 3, 224, 224)
    ids = tokenize([f"a photo of a thing number {i}" for i in range(args.batch)])
    print(f"machine: {platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}")
    for bf16 in (False, True):
        dtype = torch.bfloat16 if bf16 else torch.float32
        peak = matmul_peak(dtype)
        fns = {}
        impls = [("transformers", hf, True), ("groupseg", ours, True)]
        if bf16:  # before/after of the plain-matmul bf16 attention, in the same run
            impls.append(("groupseg-sdpa", ours, False))
        for kind, model, mm in impls:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
            fns[kind] = step_fn(kind.split("-")[0], model, opt, px, ids, bf16, mm)
        n_flops = {k: flops(f) for k, f in fns.items()}  # each counts its own work (transformers pads text to 77)
        times = {k: [] for k in fns}
        for _ in range(args.warmup):
            for f in fns.values():
                f()
        for _ in range(args.steps):  # alternate so drifts in machine load hit both
            for k, f in fns.items():
                t0 = time.perf_counter()
                f()
                times[k].append(time.perf_counter() - t0)
        label = "bf16 autocast" if bf16 else "fp32"
        print(f"\n[{label}] matmul peak {peak / 1e9:.0f} GFLOP/s (2048^3, same run)")
        med = {k: statistics.median(v) for k, v in times.items()}
        for k, t in med.items():
            print(f"  {k:12s} {1000 * t:8.0f} ms/step  {args.batch / t:6.1f} samples/s  {n_flops[k] / 1e9:5.0f} GFLOP/step  "
                  f"{n_flops[k] / t / peak:5.1%} of peak")
        print(f"  ratio groupseg/transformers speed: {med['transformers'] / med['groupseg']:.2f}x")
        if "groupseg-sdpa" in med:
            print(f"  ratio groupseg-sdpa/transformers speed: {med['transformers'] / med['groupseg-sdpa']:.2f}x; "
                  f"matmul attention vs SDPA: {med['groupseg-sdpa'] / med['groupseg']:.2f}x")
    print("\npeak memory: not measured by this script yet; CUDA rows: not measured (no GPU in this run)")


if __name__ == "__main__":
    main()
