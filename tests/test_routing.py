"""The routing policy (pure Python) and the small shared pieces: precisions, profiles."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apsq_ov.errors import ConfigError, ProfileError, UnsupportedPrecisionError
from apsq_ov.package import OpRecord
from apsq_ov.precision import Precision, parse_precisions
from apsq_ov.profiles import DeviceProfile, load_profile
from apsq_ov.routing import plan_routes

CPU = load_profile(path="CPU")
ALL = (Precision.FP32, Precision.BF16, Precision.INT8)


def op(i: int, drops: dict[Precision, float], score: float = 0.5, type_: str = "Convolution") -> OpRecord:
    return OpRecord(index=i, name=f"op{i}", type=type_, depth=i, variants=ALL, sensitivity={"score": score},
                    drops=drops)  # fmt: skip


OPS = [
    op(0, {Precision.BF16: 0.0, Precision.INT8: 0.02}),
    op(1, {Precision.BF16: 0.001, Precision.INT8: 0.004}),
    op(2, {Precision.BF16: 0.0, Precision.INT8: 0.0}),
]


def modes(routes):
    return [routes[f"op{i}"].mode for i in range(len(routes))]


def test_max_drop_zero_is_all_fp32():
    assert modes(plan_routes(OPS, CPU, max_drop=0.0)) == [Precision.FP32] * 3


def test_max_drop_one_is_fastest_everywhere_without_range_check():
    routes = plan_routes(OPS, CPU, max_drop=1.0)
    assert modes(routes) == [Precision.INT8] * 3
    assert all(math.isinf(r.range_limit) for r in routes.values())


def test_budget_lowers_the_cheapest_ops_first():
    routes = plan_routes(OPS, CPU, max_drop=0.005)
    assert modes(routes) == [Precision.BF16, Precision.INT8, Precision.INT8]
    assert routes["op1"].range_limit == 1.0  # INT8 under a budget keeps the in-graph range check


def test_forced_precision_and_pins():
    routes = plan_routes(OPS, CPU, precision="bf16", precision_map={"op2": "fp32"})
    assert modes(routes) == [Precision.BF16, Precision.BF16, Precision.FP32]


def test_bad_policies_name_the_culprit():
    with pytest.raises(ConfigError, match=r"max_drop 1.5 is outside \[0, 1\]"):
        plan_routes(OPS, CPU, max_drop=1.5)
    with pytest.raises(ConfigError, match="op 'nope'"):
        plan_routes(OPS, CPU, precision_map={"nope": "int8"})
    with pytest.raises(UnsupportedPrecisionError, match="fp16 is not in this package"):
        plan_routes(OPS, CPU, precision="fp16")
    with pytest.raises(ConfigError, match="not both"):
        plan_routes(OPS, CPU, precision="int8", max_drop=0.1)


drops_st = st.fixed_dictionaries({Precision.BF16: st.floats(0, 0.05), Precision.INT8: st.floats(0, 0.2)})


@given(st.lists(drops_st, min_size=1, max_size=8), st.floats(0, 1), st.floats(0, 1))
def test_more_budget_never_routes_an_op_more_precisely(drops, a, b):
    ops = [op(i, d) for i, d in enumerate(drops)]
    lo, hi = sorted((a, b))
    at_lo, at_hi = plan_routes(ops, CPU, max_drop=lo), plan_routes(ops, CPU, max_drop=hi)
    for o in ops:
        assert at_hi[o.name].mode.rank >= at_lo[o.name].mode.rank
    spent = sum(o.drops[r.mode] for o, r in zip(ops, at_lo.values(), strict=True) if r.mode is not Precision.FP32)
    assert spent <= max(lo, 0.0) + 1e-9 or lo >= 1.0  # the estimated drop stays within the budget


def test_precision_names_and_codes():
    assert Precision.parse("BF16") is Precision.BF16 and Precision.parse("i8") is Precision.INT8
    assert parse_precisions("int8,bf16") == (Precision.FP32, Precision.INT8, Precision.BF16)
    assert all(Precision.from_code(p.code) is p for p in Precision)
    with pytest.raises(UnsupportedPrecisionError, match="unknown precision 'fp64'"):
        Precision.parse("fp64")


def test_shipped_profiles_load_and_rank_int8_fastest_on_cpu():
    assert CPU.faster_than_fp32("Convolution", ALL) == [Precision.INT8, Precision.BF16]
    gpu = load_profile("GPU")
    assert Precision.FP16 in gpu.native_precisions and Precision.BF16 not in gpu.native_precisions


@pytest.mark.parametrize(("ratio", "counts"), [(0.999, False), (0.96, False), (0.94, True)])
def test_a_precision_counts_as_faster_only_beyond_the_noise_margin(ratio, counts):
    """bf16 priced at ``ratio`` x fp32 for every Convolution point: within MIN_GAIN (5%) it is not faster,
    so it is never chosen for speed. The Xeon profile's fp16 (0.999x) is not a default for that reason."""
    data = CPU.to_json()
    rows = data["op_types"]["Convolution"]
    for bf16, fp32 in zip(rows["bf16"], rows["fp32"], strict=True):
        bf16["latency_ms"]["value"] = fp32["latency_ms"]["value"] * ratio
    prof = DeviceProfile.from_json(data)
    assert (Precision.BF16 in prof.faster_than_fp32("Convolution", ALL)) is counts
    xeon = load_profile(path="CPU.xeon-avx512fp16")
    assert xeon.faster_than_fp32("Convolution", xeon.native_precisions) == [Precision.INT8]
    assert xeon.default_precisions == (Precision.FP32, Precision.INT8)


def test_malformed_profile_names_the_file(tmp_path):
    bad = tmp_path / "p.json"
    bad.write_text('{"schema_version": 1, "device": "CPU"}')
    with pytest.raises(ProfileError, match="p.json: schema_version 1, this apsq-ov reads 2"):
        load_profile(path=bad)
    bad.write_text('{"schema_version": 2, "device": {"plugin": "CPU"}}')
    with pytest.raises(ProfileError, match="p.json: field"):
        load_profile(path=bad)
    with pytest.raises(ProfileError, match="no shipped profile for device 'NPU'"):
        load_profile("NPU")
    data = CPU.to_json()
    data["default_precisions"] = ["int8"]
    with pytest.raises(ProfileError, match="default_precisions: must include fp32"):
        DeviceProfile.from_json(data)


def test_quantize_settings_follow_the_profiles_int8_hardware():
    """No overflow fix where 8-bit dot products cannot saturate (VNNI/AMX CPUs, GPUs); 7-bit weights in
    every layer elsewhere (OpenVINO's saturation workaround); full bias correction unless asked for the
    fast one."""
    import dataclasses

    import nncf

    from apsq_ov.calibrate import quantize_settings

    def fix(settings) -> nncf.OverflowFix:
        return settings.kwargs["advanced_parameters"].overflow_fix

    cpu = load_profile(path="CPU")
    assert cpu.int8_hardware == "VNNI"
    s = quantize_settings(cpu)
    assert s.kwargs["fast_bias_correction"] is False and fix(s) == nncf.OverflowFix.DISABLE
    old = quantize_settings(dataclasses.replace(cpu, int8_hardware="INT8 without VNNI (no vnni flag in /proc/cpuinfo)"),
                            "fast")  # fmt: skip
    assert old.kwargs["fast_bias_correction"] is True and fix(old) == nncf.OverflowFix.ENABLE
    assert "7-bit weights in every layer (pre-VNNI INT8)" in old.description
    assert "fast bias correction" in old.description
    assert quantize_settings(load_profile(path="CPU.epyc-avx2")).description == old.description.replace("fast", "full")
    host = quantize_settings(cpu, host_int8_hardware="INT8 without VNNI (no vnni flag in /proc/cpuinfo)")
    assert fix(host) == nncf.OverflowFix.ENABLE  # a VNNI profile, calibrated for a CPU without VNNI
    assert fix(quantize_settings(cpu, host_int8_hardware="AMX")) == nncf.OverflowFix.DISABLE
    for choice, want in [("all", "ENABLE"), ("first-layer", "FIRST_LAYER"), ("none", "DISABLE")]:  # --overflow-fix
        for profile in (cpu, load_profile(path="CPU.epyc-avx2")):
            chosen = quantize_settings(profile, overflow_fix=choice)
            assert fix(chosen) == getattr(nncf.OverflowFix, want) and chosen.overflow_fix == choice
    assert "first-layer overflow fix (VNNI INT8)" in quantize_settings(cpu, overflow_fix="first-layer").description
    assert quantize_settings(load_profile(path="CPU.epyc-avx2")).overflow_fix == "all"
    with pytest.raises(ConfigError, match="overflow fix must be one of"):
        quantize_settings(cpu, overflow_fix="7bit")
    gen11 = load_profile("GPU", "GPU.gen11")  # no INT8 hardware at all, but a GPU: no saturation
    assert fix(quantize_settings(gen11)) == nncf.OverflowFix.DISABLE
