"""``precision="auto"`` picks bf16 on a CPU only where bf16 is native and measured faster than fp32."""
import pytest

from groupseg import precision as P


@pytest.mark.parametrize(
    "flags, seconds, expect",
    [
        ({"avx2": True, "avx512f": False, "avx512_bf16": False, "amx_bf16": False}, None, "fp32"),  # emulated: never probed
        ({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}, {"fp32": 1.0, "bf16": 1.9}, "fp32"),
        ({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}, {"fp32": 1.0, "bf16": 0.9}, "fp32"),
        ({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": False}, {"fp32": 1.0, "bf16": 0.5}, "bf16"),
        ({"avx2": True, "avx512f": True, "avx512_bf16": True, "amx_bf16": True}, {"fp32": 1.0, "bf16": 0.2}, "bf16"),
    ],
)
def test_auto_precision_on_cpu_follows_flags_and_measured_speed(monkeypatch, flags, seconds, expect):
    def probe():
        assert seconds is not None, "a CPU without native bf16 must not be probed"
        return seconds

    monkeypatch.setattr(P, "cpu_flags", lambda: flags)
    monkeypatch.setattr(P, "cpu_matmul_seconds", probe)
    assert P.resolve_precision("auto", "cpu") == expect
    assert P.resolve_precision("fp32", "cpu") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"


def test_matmul_probe_times_both_precisions():
    t = P.cpu_matmul_seconds(n=64, reps=1)
    assert set(t) == {"fp32", "bf16"} and all(0 < v < 10 for v in t.values())
