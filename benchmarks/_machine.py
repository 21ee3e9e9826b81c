"""What every benchmark prints beside its figures: the machine, and a matrix-multiply peak measured in
the same run for the precision measured (so a figure reads as a fraction of what this machine can do).

    from _machine import machine_line, peak_line, bf16_native

Speed figures from different machines (AVX2-only vs AVX512-BF16 CPUs, GPUs) are not comparable; ratios
measured in one run are. On a CPU without native bf16 (no avx512_bf16, no amx_bf16) bf16 is emulated
and takes minutes a step: such rows print ``NOT_NATIVE_BF16`` instead of a figure.

An AVX2-only CPU can be emulated on a newer one for same-run ratios (not for absolute figures):
``ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/...``
keeps torch's own kernels, oneDNN and MKL to AVX2 (fp32 matmul peak about half, bf16 emulated);
the machine line then says so, and bf16 rows print ``NOT_NATIVE_BF16``.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from groupseg.precision import cpu_flags, cpu_has_bf16, cpu_model  # noqa: E402

NOT_NATIVE_BF16 = "not measured (no native bf16)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def emulated_avx2() -> bool:
    """True when torch's kernels are held to AVX2 on a CPU that has more (see the module docstring)."""
    return torch.backends.cpu.get_cpu_capability() == "AVX2" and cpu_flags()["avx512f"]


def machine_line(device: str | torch.device = "cpu") -> str:
    """One line: CPU model and flags, threads, torch, and the GPU where ``device`` is CUDA."""
    flags = " ".join(f"{k}={'yes' if v else 'no'}" for k, v in cpu_flags().items())
    line = f"machine: {cpu_model()} [{flags}], {torch.get_num_threads()} threads, torch {torch.__version__}"
    if emulated_avx2():
        env = " ".join(f"{k}={os.environ[k]}" for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS") if k in os.environ)
        line += f", EMULATING an AVX2-only CPU ({env}): same-run ratios only"
    if torch.device(device).type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line


def bf16_native(device: str | torch.device = "cpu") -> bool:
    """bf16 runs natively: a CUDA GPU that supports it, or a CPU with AVX512-BF16 / AMX."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16() and not emulated_avx2()


def matmul_peak(precision: str = "fp32", device: str | torch.device = "cpu", n: int | None = None, reps: int = 5) -> float:
    """Median FLOP/s of an n x n x n matrix product in ``precision`` on ``device`` (after one warm-up)."""
    dev = torch.device(device)
    n = n or (8192 if dev.type == "cuda" else 2048)
    a = torch.randn(n, n, device=dev).to(DTYPES[precision])
    b = torch.randn(n, n, device=dev).to(DTYPES[precision])
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a @ b
    sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times)


def peak_line(precision: str, device: str | torch.device = "cpu") -> tuple[str, float | None]:
    """("matmul peak <precision>: N GFLOP/s (n^3, same run) | not measured ...", the peak in FLOP/s or None)."""
    dev = torch.device(device)
    if precision == "bf16" and not bf16_native(dev):
        return f"matmul peak bf16: {NOT_NATIVE_BF16}", None
    peak = matmul_peak(precision, dev)
    n = 8192 if dev.type == "cuda" else 2048
    return f"matmul peak {precision} on {dev.type}: {peak / 1e9:,.0f} GFLOP/s ({n}^3, median of 5, same run)", peak


def print_header(precisions: tuple[str, ...] = ("fp32",), device: str | torch.device = "cpu") -> dict[str, float | None]:
    """Print the machine line and a same-run matmul peak per precision; returns the peaks (None: not measured)."""
    print(machine_line(device))
    peaks = {}
    for p in precisions:
        line, peaks[p] = peak_line(p, device)
        print(line)
    return peaks


def cpu_tag() -> str:
    """A short tag for a figure's line: the CPU kind by its fastest precision flags."""
    f = cpu_flags()
    if emulated_avx2():
        return "[AVX2 CPU, emulated]"
    kind = "AMX" if f["amx_bf16"] else "AVX512-BF16" if f["avx512_bf16"] else "AVX512" if f["avx512f"] else "AVX2" if f["avx2"] else "no AVX2"
    return f"[{kind} CPU]"
