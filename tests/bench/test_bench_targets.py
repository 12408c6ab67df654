"""The CPU targets command: its verdicts from given results (pure functions), that every target names a case the
benches run, and a smoke run of the whole path at tiny sizes (the report's structure, not the timings)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern import isa as sk_isa
from sparsekern.bench import models as bench_models, ops as bench_ops, targets as bt
from sparsekern.bench.peers import DENSE, SPARSEKERN, SPARSEPROP
from sparsekern.bench.report import UNAVAILABLE, Row
from sparsekern.bench.timing import Timing

ROOT = Path(__file__).resolve().parents[2]


def _t(ms: float) -> Timing:
    return Timing(ms / 1e3, 0.0, 10)


def _layer(name: str, dense_ms: float, sparse_ms: dict, density: float = 0.1) -> bench_models.LayerRow:
    row = bench_models.LayerRow(name, "64x64x3x3", "16x64x28x28", macs=1000, dense=_t(dense_ms))
    for dist, ms in sparse_ms.items():
        row.density[dist], row.sparse[dist], row.kernel[dist] = density, _t(ms), "csr b/b/b"
    return row


def _model(name: str, dense_ms: float, sparse_ms: dict, layers) -> bench_models.ModelResult:
    case = bench_models.Case("resnet50", name, lambda: None, lambda g: None, 10)
    return bench_models.ModelResult(case, _t(dense_ms), None, {d: _t(ms) for d, ms in sparse_ms.items()},
                                    {d: None for d in sparse_ms}, layers)


def test_judge_met_missed_and_the_median_of_runs():
    target = bt.Target("step", bt.R50_112, 2.0, "erk")
    met = bt.judge(target, [bt.Measured(2.5, 3.0, "d", "c")])
    assert met["status"] == "met" and met["value"] == 2.5 and math.isclose(met["margin"], 0.25)
    assert math.isclose(met["of_bound"], (1 - 1 / 2.5) / (1 - 1 / 3.0)) and met["ran"] == "c"
    missed = bt.judge(target, [bt.Measured(1.9, 3.0)])
    assert missed["status"] == "missed" and missed["margin"] < 0
    # Three runs: the median is judged, the range and the runs that met are reported.
    three = bt.judge(target, [bt.Measured(v, 3.0, f"run {v}") for v in (1.8, 2.1, 2.4)])
    assert three["status"] == "met" and three["value"] == 2.1 and three["runs_met"] == 2
    assert "1.80-2.40x over 3 runs, 2 met" in three["measured"] and three["detail"] == "run 2.1"
    none = bt.judge(target, [], "SparseProp: n/a")
    assert none["status"] == "not measured" and none["detail"] == "SparseProp: n/a"


def test_of_bound_is_the_part_of_the_saving_reached():
    assert math.isclose(bench_models.of_bound(2.0, 2.0), 1.0)
    assert math.isclose(bench_models.of_bound(1.0, 4.0), 0.0)
    assert math.isclose(bench_models.of_bound(4.0 / 3.0, 4.0), (1 - 0.75) / 0.75)
    assert bench_models.of_bound(0.5, 2.0) < 0
    assert math.isnan(bench_models.of_bound(2.0, 1.0))


def test_model_targets_take_the_step_ratio_and_the_slowest_layer():
    layers = [_layer("a", 2.0, {"erk": 1.0, "uniform": 0.5}), _layer("b", 1.0, {"erk": 1.1, "uniform": 0.9}),
              _layer("c", 3.0, {"erk": 1.5, "uniform": 1.0})]
    result = _model(bt.R50_112, 400.0, {"erk": 200.0, "uniform": 160.0}, layers)
    targets = [bt.Target("step", bt.R50_112, 1.7, "erk"), bt.Target("step", bt.R50_112, 2.2, "uniform"),
               bt.Target("layers", bt.R50_112, 0.95, "erk"), bt.Target("layers", bt.R50_112, 0.95, "uniform"),
               bt.Target("step", bt.VIT, 2.2, "erk")]
    erk, uniform, layers_erk, layers_uniform, vit = bt.judge_all(targets, {bt.R50_112: [result]}, [])
    assert erk["status"] == "met" and math.isclose(erk["value"], 2.0)
    assert math.isclose(erk["bound"], result.bound("erk"))
    assert uniform["status"] == "met" and math.isclose(uniform["value"], 2.5)
    assert layers_erk["status"] == "missed" and math.isclose(layers_erk["value"], 1.0 / 1.1)
    assert "slowest b" in layers_erk["detail"]
    assert layers_uniform["status"] == "met" and math.isclose(layers_uniform["value"], 1.0 / 0.9)
    assert vit["status"] == "not measured"  # no run of that case


def test_a_step_is_judged_against_the_faster_dense_step():
    layers = [_layer("a", 100.0, {"erk": 30.0, "uniform": 20.0}, density=0.2)]
    result = _model(bt.R50_112, 400.0, {"erk": 200.0, "uniform": 160.0}, layers)
    result.dense_fast = _t(320.0)  # the dense model with the fast modules: faster, so the baseline
    erk, = bt.judge_all([bt.Target("step", bt.R50_112, 1.7, "erk")], {bt.R50_112: [result]}, [])
    assert math.isclose(erk["value"], 1.6) and erk["status"] == "missed"  # 2.0x against plain dense
    assert "(the baseline)" in erk["detail"] and "2.00x against plain dense" in erk["detail"]
    assert math.isclose(erk["bound"], 320.0 / (320.0 - 100.0 * 0.8))  # that step with the layer at its density
    result.dense_fast = _t(450.0)  # slower: the plain dense step stays the baseline
    erk, = bt.judge_all([bt.Target("step", bt.R50_112, 1.7, "erk")], {bt.R50_112: [result]}, [])
    assert math.isclose(erk["value"], 2.0) and "(the baseline)" not in erk["detail"]


def test_the_bound_scales_each_layer_by_its_own_density():
    """Two layers of equal MACs, one of them four times slower per MAC: the FLOP fraction is the mean density, the
    bound weighs each density by its layer's time; layers timed alone that add up to more than the step count as
    the whole step."""
    slow, quick = _layer("slow", 80.0, {"erk": 10.0}, density=0.05), _layer("quick", 20.0, {"erk": 10.0}, density=0.5)
    result = _model(bt.R50_112, 200.0, {"erk": 100.0}, [slow, quick])
    assert math.isclose(result.flop_fraction("erk"), 0.275)
    assert math.isclose(result.bound("erk"), 200.0 / (200.0 - 80.0 * 0.95 - 20.0 * 0.5))
    over = _model(bt.R50_112, 50.0, {"erk": 20.0}, [slow, quick])  # layers alone 100 ms, the step 50
    assert math.isclose(over.bound("erk"), 50.0 / (50.0 - 0.5 * (80.0 * 0.95 + 20.0 * 0.5)))
    assert over.bound("erk") == bench_models.ModelResult.bound(over, "erk", over.dense)


def test_a_layer_timed_again_is_judged_on_the_second_timing_and_says_so():
    again = _layer("b", 1.0, {"erk": 1.02, "uniform": 0.9})
    again.first = {"erk": 0.93, "uniform": 1.05}
    layers = [_layer("a", 2.0, {"erk": 1.0, "uniform": 0.5}), again]
    result = _model(bt.R50_112, 400.0, {"erk": 200.0, "uniform": 160.0}, layers)
    (erk,) = bt.judge_all([bt.Target("layers", bt.R50_112, 0.95, "erk")], {bt.R50_112: [result]}, [])
    assert erk["status"] == "met" and math.isclose(erk["value"], 1.0 / 1.02)
    assert "slowest b" in erk["detail"] and "timed again, the first timing 0.93x" in erk["detail"]
    headers, rows = bench_models.layer_rows(result)
    assert rows[1][headers.index("erk speedup")] == "0.98x (first 0.93x)"
    assert rows[0][headers.index("erk speedup")] == "2.00x"


def _op_rows(dense_ms, ours, peer) -> list:
    return [Row("SparseLinear 4096x4096 b256 d=0.1", "fwd", {DENSE: _t(1.0), SPARSEKERN: _t(0.5)}),
            Row("SparseLinear 4096x4096 b256 d=0.1", "fwd+bwd", {DENSE: _t(dense_ms), SPARSEKERN: ours,
                                                                 SPARSEPROP: peer})]


def test_op_targets_use_the_fwd_bwd_row_and_say_why_a_peer_is_missing():
    to_dense = bt.Target("op", "linear", 4.0, density=0.1)
    to_peer = bt.Target("op", "linear", 1.5, density=0.1, peer=SPARSEPROP)
    timed = {("linear", 0.1): (_op_rows(90.0, _t(20.0), _t(50.0)), True)}
    dense, peer = bt.judge_all([to_dense, to_peer], {}, [timed])
    assert dense["status"] == "met" and math.isclose(dense["value"], 4.5) and math.isclose(dense["bound"], 10.0)
    assert peer["status"] == "met" and math.isclose(peer["value"], 2.5) and math.isnan(peer["of_bound"])
    no_peer = {("linear", 0.1): (_op_rows(90.0, _t(30.0), UNAVAILABLE), True)}
    dense, peer = bt.judge_all([to_dense, to_peer], {}, [no_peer])
    assert dense["status"] == "missed" and math.isclose(dense["value"], 3.0)
    assert peer["status"] == "not measured" and f"{SPARSEPROP}: {UNAVAILABLE}" in peer["detail"]
    # sparsekern's result differed from dense: not judged, whatever its time.
    wrong = {("linear", 0.1): (_op_rows(90.0, _t(1.0), _t(50.0)), False)}
    assert [v["status"] for v in bt.judge_all([to_dense, to_peer], {}, [wrong])] == ["not measured"] * 2


def test_every_target_names_a_case_the_benches_run():
    full = [c.name for c in bench_models.cases("full")]
    tiny = bench_models.cases("tiny")
    for t in bt.TARGETS:
        if t.kind == "op":
            case = bt.op_case_builders("tiny", [t])[t.case, t.density]()
            assert case.name.endswith(f"d={t.density}")
            continue
        assert t.dist in bench_models.DISTRIBUTIONS
        index = bt.model_case_index(t.case, "full")
        assert full[index] == t.case
        assert tiny[bt.model_case_index(t.case, "tiny")].model == bench_models.cases("full")[index].model
    builders = bt.op_case_builders("full", bt.TARGETS)
    assert set(builders) == {("linear", 0.1), ("linear", 0.01), ("conv", 0.1)}
    assert bench_ops.SIZES["full"].conv[0] == (64, 32, 64) and bench_ops.SIZES["full"].linear == (4096, 4096, 256)
    with pytest.raises(ValueError, match="no bench.models case is named 'ResNet-51'"):
        bt.model_case_index("ResNet-51", "full")


@pytest.mark.slow
def test_bench_targets_tiny(tmp_path):
    output = tmp_path / "targets.md"
    env = {**os.environ, "SPARSEKERN_BACKEND": "reference"}
    proc = subprocess.run([sys.executable, "-m", "sparsekern.cli", "bench", "--targets", "--sizes", "tiny",
                           "--threads", "1", "--output", str(output)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = output.read_text()
    for key in ("command:", "date:", "CPU:", "ISA: native", "threads: 1", "torch:", "sparsekern backend: reference",
                "targets met", "## The model runs", "## The op runs"):
        assert key in text, key
    report = json.loads(output.with_suffix(".json").read_text())
    verdicts = report["targets"]
    assert [v["name"] for v in verdicts] == [t.name for t in bt.TARGETS]
    for v in verdicts:
        assert v["status"] in ("met", "missed", "not measured"), v
        if v["status"] != "not measured":
            assert math.isfinite(v["value"]) and v["value"] > 0 and len(v["runs"]) == 1, v
            assert v["ran"] and v["ran"] in text
        assert f"| {v['name']} |" in text


def test_a_process_that_did_not_take_the_isa_proxy_says_so():
    assert bench_models.checked_process_isa("native") == bench_models.process_isa()
    if torch.backends.cpu.get_cpu_capability() == "AVX2" and sk_isa.get() == "avx2":
        pytest.skip("this process runs AVX2 already: the proxy's check passes")
    with pytest.raises(RuntimeError, match="sparsekern bench --isa avx2: this process runs .* did not take"):
        bench_models.checked_process_isa("avx2")


def test_the_reports_paths_never_overwrite_each_other():
    assert bt.report_paths("out/targets.md") == (Path("out/targets.md"), Path("out/targets.json"))
    assert bt.report_paths("targets") == (Path("targets"), Path("targets.json"))
    assert bt.report_paths("r.json") == (Path("r.md"), Path("r.json"))
