"""``apsq-ov bench``: the Pareto bookkeeping on known rows, and the command on a real compiled package."""

from __future__ import annotations

import json

import numpy as np
import openvino as ov
import pytest
from typer.testing import CliRunner

from apsq_ov.bench import (
    closest_lines,
    dominance,
    host_cpu,
    measure,
    package_methods,
    pareto_flags,
    plain_method,
    write_markdown,
)
from apsq_ov.cli import app
from tests.models import CPU_CAPS, conv_chain_data

runner = CliRunner()


def _row(name: str, family: str, q: float, ms: float) -> dict:
    row = {"name": name, "family": family, "accuracy": q, "median_ms": ms}
    return row | ({"escalated": 0.1} if family == "apsq adaptive" else {})  # adaptive points run the cascade


def test_pareto_flags_and_dominance():
    rows = [_row("fp32", "baseline", 0.92, 1.0), _row("int8", "baseline", 0.90, 0.5),
            _row("mix", "apsq static mix", 0.91, 0.8), _row("ac", "NNCF accuracy control", 0.905, 0.7),
            _row("a1", "apsq adaptive", 0.915, 0.6), _row("a2", "apsq adaptive", 0.90, 0.9)]  # fmt: skip
    pareto_flags(rows, "accuracy")
    assert [r["name"] for r in rows if r["pareto"]] == ["fp32", "int8", "a1"]
    d = dominance(rows, "accuracy")
    assert ("a1", "mix") in d["adaptive_dominates"] and ("a1", "ac") in d["adaptive_dominates"]
    assert ("a2", "mix") in d["adaptive_dominated_by"] and not d["holds"]  # a2 is worse and slower than mix
    assert dominance(rows[:5], "accuracy")["holds"]
    assert d["margins"][0] == {"winner": "mix", "loser": "a2", "quality": pytest.approx(0.01), "ms": pytest.approx(0.1)}
    assert d["closest"] == []  # a1 dominates: no miss to report
    rows[5].pop("escalated")  # an auto row that runs a static level is that static mix, not an adaptive point
    assert dominance(rows, "accuracy")["holds"]


def test_dominance_reports_the_nearest_misses():
    """Where no adaptive point dominates a rival, by how much the nearest ones miss: the quality one lacks
    against a rival it is already as fast as, and the time one loses to a rival it is already as good as."""
    rows = [_row("mix", "apsq static mix", 0.91, 0.8), _row("ac", "NNCF accuracy control", 0.905, 0.7),
            _row("a3", "apsq adaptive", 0.908, 0.75), _row("a4", "apsq adaptive", 0.85, 0.65)]  # fmt: skip
    d = dominance(rows, "accuracy")
    assert not d["holds"] and not d["adaptive_dominated_by"] and not d["adaptive_dominates"]
    lacks = {c["lacks"]: c for c in d["closest"]}
    assert lacks["quality"]["adaptive"] == "a3" and lacks["quality"]["rival"] == "mix"  # a4 lacks 0.055 against ac
    assert lacks["quality"]["gap"] == pytest.approx(0.002)
    assert lacks["latency"]["adaptive"] == "a3" and lacks["latency"]["rival"] == "ac"
    assert lacks["latency"]["gap"] == pytest.approx(0.05) and lacks["latency"]["ratio"] == pytest.approx(0.75 / 0.7)
    text = " ".join(closest_lines(d, "accuracy"))
    assert "a3 is no slower than mix but 0.20 pt short in accuracy" in text
    assert "a3 is no worse than ac in accuracy but 0.050 ms (1.07x) slower" in text


def test_bench_cli_json_and_plots(tiny_files, tmp_path):
    data = tmp_path / "test.npz"
    np.savez(data, x=conv_chain_data(30, seed=5))
    png = tmp_path / "p.png"
    result = runner.invoke(app, ["bench", str(tiny_files["package"].path), "--data", str(data), "--shift", "noise",
                                 "--json", "--plot", str(png), "--throughput-seconds", "0.3",
                                 "--compiles", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["shifts"]) == {"clean", "noise"} and doc["samples"] == 30 and doc["compiles"] == 2
    tp = doc["shifts"]["clean"]["throughput"]
    budgets = tiny_files["package"].manifest.budgets  # no router: no cascade, so no in-graph escalation rows
    assert {f"apsq adaptive {d:g}{x}" for d in budgets for x in ("", ", engine")} == set(tp)
    assert all(v > 0 for v in tp.values())
    rows = {r["name"]: r for r in doc["shifts"]["clean"]["rows"]}
    m = tiny_files["package"].manifest
    assert {f"apsq static mix {lv.max_drop:g}" for lv in m.levels} <= set(rows)
    assert rows["apsq static mix 0"]["agreement"] == 1.0  # the reference is the FP32 level itself
    assert rows["apsq forced fp32 (every op behind an If)"]["agreement"] == 1.0
    assert any(r["pareto"] for r in rows.values())
    bound = doc["shifts"]["clean"]["perfect_router"]  # no router: escalations to the FP32 level, no router cost
    assert len(bound["rows"]) == len(m.levels) - 1 and bound["router_ms"] == 0.0
    assert all(r["agreement"] == 1.0 for r in bound["rows"])
    assert doc["shifts"]["noise"]["seen_by_calibration"] and png.is_file() and (tmp_path / "p-noise.png").is_file()
    # BENCHMARKS.md marks throughput measured before queues were fed by copying into their requests.
    md = tmp_path / "BENCHMARKS.md"
    assert doc["shifts"]["clean"]["throughput_feed"] == "copied"
    write_markdown({"models": {"tiny": doc}}, md, tmp_path)
    assert "| async throughput (clean) |" in md.read_text() and "Throughput of an earlier run" not in md.read_text()
    assert "(the package has no escalation cascade): no adaptive point to compare." in md.read_text()
    del doc["shifts"]["clean"]["throughput_feed"]
    write_markdown({"models": {"tiny": doc}}, md, tmp_path)
    assert md.read_text().count("Throughput of an earlier run") == 1
    doc |= {"date": "2026-12-01 04:00 UTC", "cpu": host_cpu()}  # runs of one report can come from two machines
    write_markdown({"models": {"tiny": doc}}, md, tmp_path)
    assert f"Run of 2026-12-01 04:00 UTC on {host_cpu()}." in md.read_text() and host_cpu()
    shown = runner.invoke(app, ["bench", str(tiny_files["package"].path), "--data", str(data), "--limit", "10",
                                "--throughput-seconds", "0.2", "--compiles", "1"])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert "adaptive (0 cascade points of auto) vs the static mixes: does not hold" in shown.output  # no router
    assert "async throughput" in shown.output and "its graph in OpenVINO's queue" in shown.output
    bad = runner.invoke(app, ["bench", str(tiny_files["package"].path), "--data", str(data), "--shift", "fog"])
    assert bad.exit_code == 2 and "fog" in bad.output


class _Counting:
    """A real OpenVINO request that counts its inferences (to see which compiled copy ran a block)."""

    def __init__(self, request: ov.InferRequest) -> None:
        self.request, self.calls = request, 0

    def infer(self, inputs):
        self.calls += 1
        return self.request.infer(inputs)


def test_measure_takes_every_compiled_copy_in_turn(tiny_files):
    x = conv_chain_data(100, seed=6)
    plain = plain_method("FP32", "baseline", ov.Core().read_model(tiny_files["model"]), "f32", compiles=3)
    pkg_methods = package_methods(tiny_files["package"], bf16_reference=False, forced=False, compiles=2)
    assert len(plain.spares) == 2 and all(len(m.spares) == 1 for m in pkg_methods)
    methods = [plain, pkg_methods[0]]
    counters = [[_Counting(r) for r in (m.request, *m.spares)] for m in methods]
    for m, c in zip(methods, counters, strict=True):
        m.request, m.spares = c[0], c[1:]  # type: ignore[assignment]
    measure(methods, x, block=25)  # 4 blocks: copies 0, 1, 2, 0 (plain) and 0, 1, 0, 1 (package)
    assert [c.calls for c in counters[0]] == [5 + 50, 5 + 25, 5 + 25]
    assert [c.calls for c in counters[1]] == [5 + 50, 5 + 50]
    ref = ov.Core().compile_model(tiny_files["model"], "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    expect = np.stack([ref(x[i : i + 1])[0] for i in range(len(x))])
    got = np.stack(plain.outputs)[np.argsort(plain.index)]
    assert np.allclose(got, expect, rtol=1e-5, atol=1e-6)  # every copy computes the same model


def test_throughput_table_groups_budgets_that_run_the_same_body():
    from rich.console import Console

    from apsq_ov.cli import throughput_table

    rates = {"OpenVINO FP32": 200.0,
             "apsq adaptive 0": 210.0, "apsq adaptive 0, engine": 215.0,
             "apsq adaptive 0.001": 210.0, "apsq adaptive 0.001, engine": 215.0,  # same body as 0: one row
             "apsq adaptive 0.05": 480.0, "apsq adaptive 0.05, in-graph escalation": 490.0,
             "apsq adaptive 0.05, engine": 495.0}  # fmt: skip
    console = Console(width=200, record=True)
    console.print(throughput_table(rates))
    lines = [ln for ln in console.export_text().splitlines() if "│" in ln]
    cells = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[2:-1]] for ln in lines}
    assert cells == {"OpenVINO FP32": ["200", "", ""], "apsq adaptive 0 / 0.001": ["210", "", "215"],
                     "apsq adaptive 0.05": ["480", "490", "495"]}  # fmt: skip


def test_a_bf16_row_says_when_the_cpu_runs_it_f32(tiny_files):
    """OpenVINO drops a bf16 hint silently on a CPU without BF16 (an AVX2-only EPYC): the method's name says
    it runs f32 there, and its outputs are FP32's to the bit; where BF16 is exposed, the name is as given."""
    core = ov.Core()
    model = core.read_model(tiny_files["model"])
    bf16 = plain_method("BF16", "baseline", model, "bf16", core=core)
    fp32 = plain_method("FP32", "baseline", model, "f32", core=core)
    x = conv_chain_data(8, seed=2)
    measure([bf16, fp32], x)
    same = all(np.array_equal(a, b) for a, b in zip(bf16.outputs, fp32.outputs, strict=True))
    if "BF16" in CPU_CAPS:
        assert bf16.name == "BF16" and not same
    else:
        assert bf16.name == "BF16 — runs f32: this CPU exposes no BF16" and same
    assert fp32.name == "FP32"


def test_throughput_rows_carry_the_names_the_cpu_earned(tiny_files):
    """The async throughput of the plain rows is keyed by the same names as their latency rows: a bf16 hint the
    CPU drops is named so in both (the throughput pass once looked its rows up under the bare name)."""
    from apsq_ov.bench import throughputs

    model = ov.Core().read_model(tiny_files["model"])
    plain = [("OpenVINO FP32", "baseline", model, "f32"), ("OpenVINO BF16", "baseline", model, "bf16")]
    rates = throughputs(tiny_files["package"], plain, conv_chain_data(8, seed=3), 0.2, rounds=2, compiles=1)
    bf16 = "OpenVINO BF16" + ("" if "BF16" in CPU_CAPS else " — runs f32: this CPU exposes no BF16")
    assert list(rates)[:2] == ["OpenVINO FP32", bf16]
    adaptive = {f"apsq adaptive {d:g}{x}" for d in tiny_files["package"].manifest.budgets for x in ("", ", engine")}
    assert set(rates) == {"OpenVINO FP32", bf16} | adaptive
    assert all(v > 0 for v in rates.values())
