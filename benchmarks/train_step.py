"""Train-step speed: groupseg vs transformers' GroupViTModel, same weights, same batch, one run.

    python benchmarks/train_step.py                       # published gvit-s 2-stage, batch 8, 224 px
    python benchmarks/train_step.py --batch 4 --steps 5 --threads 2
    python benchmarks/train_step.py --compile             # also groupseg under torch.compile (inductor)

Forward + contrastive loss + backward + AdamW step, alternating the two implementations after a
warm-up, in fp32 and under bf16 autocast. Both sides step the same optimizer: fused AdamW, the default
of transformers' Trainer (``adamw_torch_fused`` on torch >= 2.8) and of groupseg's trainer
(``--optimizer plain`` for torch's per-tensor AdamW loop on both). Prints ms/step, samples/s, the ratio, model FLOPs per
step (torch.utils.flop_counter) and the achieved fraction of a matmul peak measured in the same
run. Peak memory: each implementation and precision in a fresh subprocess (`--memory-only` runs just
that part): the process's peak resident set (Linux VmHWM, reset through /proc/self/clear_refs once
the models are built) over a warm-up step and two timed steps, minus its resident set before them.
The output starts with the machine (CPU model, avx2 / avx512f / avx512_bf16 / amx_bf16) and every
figure line names the CPU kind; on CPUs without native bf16 the bf16 rows say "not measured (no
native bf16)" (emulated bf16 takes minutes a step, and no default picks it there).
"""
from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F

from _machine import NOT_NATIVE_BF16, bf16_native, cpu_tag, machine_line, peak_line


def build_pair(config=None):
    """(transformers GroupViTModel, groupseg GroupViT) with the same weights, in train mode.

    ``config``: a transformers ``GroupViTConfig`` (default: the published gvit-s 2-stage one).
    """
    from transformers import GroupViTConfig, GroupViTModel

    import groupseg

    torch.manual_seed(0)
    hf = GroupViTModel(config or GroupViTConfig())
    d = tempfile.mkdtemp()
    hf.save_pretrained(d)
    ours = groupseg.load_model(d)
    return hf.train(), ours.train()


def clip_loss(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(len(img), device=img.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def step_fn(kind, model, opt, px, ids, bf16, fused_attn=None):
    """One train step on ``px``'s device; ``fused_attn``: groupseg's attention path (None: the library's default)."""
    from groupseg.layers.attention import set_fused_attn

    def run():
        if kind == "groupseg":
            set_fused_attn(model, fused_attn)  # the same modules serve several rows: set the path each step
        with torch.autocast(px.device.type, dtype=torch.bfloat16, enabled=bf16):
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


def _status_kib(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def make_optimizer(model: torch.nn.Module, kind: str) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-5, fused=kind == "fused")


def optimizer_step_times(steps: int) -> None:
    """AdamW step alone over the gvit-s parameters (random gradients): per-tensor loop, foreach, fused."""
    from transformers import GroupViTConfig, GroupViTModel

    params = list(GroupViTModel(GroupViTConfig()).parameters())
    for p in params:
        p.grad = torch.randn_like(p)
    opts = {"per-tensor loop (torch's CPU default)": torch.optim.AdamW(params, lr=1e-5),
            "foreach": torch.optim.AdamW(params, lr=1e-5, foreach=True),
            "fused": torch.optim.AdamW(params, lr=1e-5, fused=True)}
    for o in opts.values():
        o.step()
    times = {k: [] for k in opts}
    for _ in range(steps):  # alternating
        for k, o in opts.items():
            t0 = time.perf_counter()
            o.step()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    base = next(iter(med.values()))
    print(f"AdamW step over {sum(p.numel() for p in params) / 1e6:.1f} M parameters, {steps} steps each, alternating:")
    for k, t in med.items():
        print(f"  {k:40s} {1000 * t:6.0f} ms   {base / t:.2f}x the per-tensor loop's speed")


def memory_child(kind: str, bf16: bool, batch: int, threads: int, optimizer: str) -> None:
    """Print the peak resident set added by three train steps of one implementation (MiB)."""
    torch.set_num_threads(threads)
    from groupseg.tokenizer import tokenize

    hf, ours = build_pair()
    model = hf if kind == "transformers" else ours
    del hf, ours
    gc.collect()
    px = torch.randn(batch, 3, 224, 224)
    ids = tokenize([f"a photo of a thing number {i}" for i in range(batch)])
    opt = make_optimizer(model, optimizer)
    fn = step_fn(kind, model, opt, px, ids, bf16)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS counter
    before = _status_kib("VmRSS")
    for _ in range(3):
        fn()
    print(f"{(_status_kib('VmHWM') - before) / 1024:.0f} {_status_kib('VmHWM') / 1024:.0f}")


def peak_memory(batch: int, threads: int, optimizer: str) -> None:
    print(f"\npeak memory of a train step (batch {batch}; fresh process each; MiB above the resident set before the steps, "
          "and the process's peak resident set over those steps):")
    for bf16 in (False, True):
        if bf16 and not bf16_native():
            print(f"  [bf16 autocast] {NOT_NATIVE_BF16}")
            continue
        res = {}
        for kind in ("transformers", "groupseg"):
            cmd = [sys.executable, __file__, "--memory-child", kind, "--batch", str(batch), "--threads", str(threads),
                   "--optimizer", optimizer]
            out = subprocess.run(cmd + (["--bf16"] if bf16 else []), capture_output=True, text=True, check=True).stdout
            res[kind] = [float(v) for v in out.split()[-2:]]
        label = "bf16 autocast" if bf16 else "fp32"
        for kind, (added, total) in res.items():
            print(f"  [{label}] {kind:12s} +{added:6.0f} MiB  (peak resident {total:6.0f} MiB)")
        print(f"  [{label}] groupseg/transformers added memory: {res['groupseg'][0] / res['transformers'][0]:.2f} {cpu_tag()}")


def alternate(fns: dict, warmup: int, steps: int, sync=lambda: None) -> dict[str, float]:
    """Median seconds per call of each function, calls alternating so drifts in machine load hit all."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(steps):
        for k, f in fns.items():
            sync()
            t0 = time.perf_counter()
            f()
            sync()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def one_precision(args, hf, ours, compiled, px, ids, bf16: bool) -> None:
    """Time and print one precision: transformers, groupseg, groupseg with the other attention path (and compiled)."""
    from groupseg.layers.attention import default_fused_attn

    dtype = torch.bfloat16 if bf16 else torch.float32
    label = "bf16 autocast" if bf16 else "fp32"
    peak_text, peak = peak_line("bf16" if bf16 else "fp32")
    if peak is None:  # emulated bf16: a step takes minutes, and no default ever picks it here
        print(f"\n[{label}] {NOT_NATIVE_BF16} {cpu_tag()}")
        return
    # groupseg as the library runs it, and with the other attention path at this precision (before/after)
    matmul = not default_fused_attn(torch.device("cpu"), dtype)
    alt = ("groupseg-sdpa", True) if matmul else ("groupseg-matmul", False)
    impls = [("transformers", hf, None), ("groupseg", ours, None), (alt[0], ours, alt[1])]
    fns = {kind: step_fn(kind.split("-")[0], model, make_optimizer(model, args.optimizer), px, ids, bf16, fused)
           for kind, model, fused in impls}
    n_flops = {k: flops(f) for k, f in fns.items()}  # each counts its own work (transformers pads text to 77)
    if args.compile:  # same parameters, its own optimizer; the first two calls compile forward and backward
        fns["groupseg-compiled"] = step_fn("groupseg", compiled, make_optimizer(ours, args.optimizer), px, ids, bf16)
        t0 = time.perf_counter()
        fns["groupseg-compiled"]()
        print(f"torch.compile of groupseg's train step ({'bf16' if bf16 else 'fp32'}): {time.perf_counter() - t0:.0f} s")
        n_flops["groupseg-compiled"] = n_flops["groupseg"]  # the same model work
    med = alternate(fns, args.warmup, args.steps)
    print(f"\n[{label}] {peak_text} {cpu_tag()}")
    for k, t in med.items():
        print(f"  {k:12s} {1000 * t:8.0f} ms/step  {args.batch / t:6.1f} samples/s  {n_flops[k] / 1e9:5.0f} GFLOP/step  "
              f"{n_flops[k] / t / peak:5.1%} of peak {cpu_tag()}")
    print(f"  ratio groupseg/transformers speed: {med['transformers'] / med['groupseg']:.2f}x {cpu_tag()} "
          f"(groupseg attention: {'plain matmuls' if matmul else 'scaled_dot_product_attention'})")
    print(f"  ratio {alt[0]}/transformers speed: {med['transformers'] / med[alt[0]]:.2f}x; "
          f"matmul attention vs SDPA: {(med['groupseg-sdpa'] / med['groupseg']) if matmul else (med['groupseg'] / med['groupseg-matmul']):.2f}x")
    if args.compile:
        print(f"  ratio groupseg-compiled/transformers speed: {med['transformers'] / med['groupseg-compiled']:.2f}x; "
              f"compiled vs eager groupseg: {med['groupseg'] / med['groupseg-compiled']:.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=6, help="timed steps per implementation and precision")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--optimizer", choices=["fused", "plain"], default="fused", help="AdamW for both implementations")
    p.add_argument("--memory-only", action="store_true", help="only the peak-memory part")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory part")
    p.add_argument("--compile", action="store_true",
                   help="also time groupseg under torch.compile (inductor; compile time printed, not in the step time)")
    p.add_argument("--optimizer-only", action="store_true", help="only the AdamW step: per-tensor loop vs foreach vs fused")
    p.add_argument("--memory-child", choices=["transformers", "groupseg"], help=argparse.SUPPRESS)
    p.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        return memory_child(args.memory_child, args.bf16, args.batch, args.threads, args.optimizer)
    if args.optimizer_only:
        torch.set_num_threads(args.threads)
        print(machine_line())
        return optimizer_step_times(max(args.steps, 10))
    if args.memory_only:
        print(machine_line())
        return peak_memory(args.batch, args.threads, args.optimizer)
    torch.set_num_threads(args.threads)
    from groupseg.tokenizer import tokenize

    hf, ours = build_pair()
    compiled = torch.compile(ours) if args.compile else None
    px = torch.randn(args.batch, 3, 224, 224)
    ids = tokenize([f"a photo of a thing number {i}" for i in range(args.batch)])
    print(machine_line() + f"; {args.optimizer} AdamW on both sides")
    for bf16 in (False, True):
        one_precision(args, hf, ours, compiled, px, ids, bf16)
    if not args.no_memory:
        peak_memory(args.batch, args.threads, args.optimizer)
    print("\nCUDA rows: not measured (no GPU in this run)")


if __name__ == "__main__":
    main()
