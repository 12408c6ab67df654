"""``sparsekern gpu-check`` without a GPU: the run reports every stage and every target (as not measured),
and the parts that matter on a GPU (a hung benchmark case or test group is stopped and the rest runs,
the targets and the suggested backend order follow the measured rows) are checked with stand-ins."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsekern import gpu_check

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine the check itself is the run (make gpu-check)")
def test_cpu_run_reports_every_stage_and_target(tmp_path):
    pytest.importorskip("triton", reason="the CPU run needs Triton's interpreter")
    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "sparsekern.cli", "gpu-check", "--out", str(out),
                           "--budget-env", "60", "--budget-build", "60", "--budget-tests", "5", "--budget-bench", "120",
                           "--bench-cases", "topk", "resnet-dense", "resnet-bsr"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["env", "build", "tests", "bench", "report"]
    assert {n: s["status"] for n, s in stages.items()} == {
        "env": "ok", "build": "skipped", "tests": "skipped", "bench": "ok", "report": "ok"}
    for name, stage in stages.items():
        assert stage["status"] != "skipped" or stage["reason"], name
    assert "no CUDA" in stages["build"]["reason"] and "no CUDA device" in stages["tests"]["reason"]
    assert stages["env"]["results"]["cuda_available"] is False
    bench = stages["bench"]["results"]
    assert {c: v["status"] for c, v in bench["cases"].items()} == {
        "topk": "ok", "resnet-dense": "ok", "resnet-bsr": "ok"}
    assert "not a measurement" in stages["bench"]["reason"]
    impls = {r["impl"] for r in bench["rows"]}
    assert {"torch.topk", "sparsekern topk_select (triton)", "dense (cuDNN)", "dense channels_last (cuDNN)",
            "sparsekern BSR-32"} <= impls
    assert len(report["targets"]) == len(gpu_check.TARGETS)
    assert all(t["status"] == "not measured" and t["detail"] for t in report["targets"])

    md = (out / "report.md").read_text()
    for target in gpu_check.TARGETS:
        row = next(line for line in md.splitlines() if line.startswith(f"| {target.name} |"))
        assert "| not measured |" in row, row
    for name in stages:
        assert f"| {name} | {stages[name]['status']} |" in md
    assert "_CUDA_ORDER = {" in md and "_CUDA_ORDER = {" in proc.stdout


FAKE_BENCH = textwrap.dedent("""
    import json, os, sys, time
    args = sys.argv[1:]
    path = args[args.index("--json") + 1]
    cases = args[args.index("--cases") + 1:] if "--cases" in args else ["a", "hang", "crash", "b"]
    rows, done = [], []
    def dump(current):
        with open(path + ".tmp", "w") as f:
            json.dump({"header": {"device_type": "cuda", "sizes_name": "full", "cases": cases},
                       # "hang" says it started long ago: the parent stops it at its first look, while the other
                       # cases have the whole case_timeout however slowly a loaded host runs them
                       "current": {"case": current, "started": time.time() - (1000 if current == "hang" else 0)},
                       "done": done, "rows": rows}, f)
        os.replace(path + ".tmp", path)
    for case in cases:
        rows.append({"case": case, "impl": "sparsekern x (triton)", "dtype": "float32", "ms": 1.0, "group": case})
        dump(case)  # after every row, as bench/gpu.py does
        if case == "hang":
            time.sleep(120)
        if case == "crash":
            os._exit(3)
        done.append(case)
    dump("")
""")


def test_bench_stage_stops_a_hung_case_and_runs_the_rest(tmp_path):
    fake = tmp_path / "fake_bench.py"
    fake.write_text(FAKE_BENCH)
    result = gpu_check.run_bench([sys.executable, str(fake)], None, budget=120, case_timeout=30, out=tmp_path,
                                 env=dict(os.environ), log=lambda text: None)
    assert {c: v["status"] for c, v in result["cases"].items()} == {
        "a": "ok", "hang": "timed out", "crash": "failed", "b": "ok"}
    assert "exited with 3" in result["cases"]["crash"]["reason"]
    assert [r["case"] for r in result["rows"]] == ["a", "hang", "crash", "b"]  # a stopped case keeps its rows
    assert result["attempts"] == 3


def test_test_groups_count_results_and_stop_at_the_budget(tmp_path):
    (tmp_path / "test_quick.py").write_text(textwrap.dedent("""
        import pytest
        def test_pass(): pass
        def test_fail(): assert False
        @pytest.mark.skip(reason="not here")
        def test_skip(): pass
    """))
    (tmp_path / "hangs").mkdir()
    (tmp_path / "hangs" / "test_hang.py").write_text("import time\ndef test_a(): pass\ndef test_b(): time.sleep(120)\n")
    table = (("quick", ("test_quick.py",)), ("hangs", ("hangs",)), ("after", ("test_quick.py",)))
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}  # a quicker start
    # 20 s: "quick" (a pytest start, well under a second idle) must leave "hangs" more than 5 s on a loaded host
    results = gpu_check.run_test_groups(["quick", "hangs", "after"], 20, logs, env, tmp_path,
                                        log=lambda text: None, table=table)
    quick, hangs, after = results["quick"], results["hangs"], results["after"]
    assert (quick["status"], quick["passed"], quick["failed"], quick["skipped"]) == ("failed", 1, 1, 1)
    assert quick["failed_tests"] == ["test_quick::test_fail"] and quick["skip_reasons"] == {"not here": 1}
    assert hangs["status"] == "timed out" and hangs["passed"] == 1  # counted from the -v log
    assert after["status"] == "not run" and "budget" in after["reason"]


def _row(case, impl, ms, group, dtype="float32", **meta):
    return {"case": case, "impl": impl, "ms": ms, "group": group, "dtype": dtype, "note": "", **meta}


def test_targets_and_suggested_order_follow_the_rows():
    bsr = dict(density=0.1, block=32)
    rows = [_row("bsr", "cuBLAS dense", 10.0, "bsr", "bfloat16", **bsr),
            _row("bsr", "sparsekern BSR (triton)", 1.0, "bsr", "bfloat16", op="bsr_linear", backend="triton", **bsr),
            _row("bsr", "torch BSR", 1.2, "bsr", "bfloat16", **bsr),
            _row("spmm", "cuBLAS dense", 3.0, "spmm", density=0.1),
            _row("spmm", "sparsekern CSR (triton)", 2.0, "spmm", op="spmm", backend="triton", density=0.1),
            _row("spmm", "sparsekern CSR (cuda)", 1.0, "spmm", op="spmm", backend="cuda", density=0.1),
            _row("spmm", "cuSPARSE CSR (torch.sparse.mm)", 2.5, "spmm", density=0.1),
            _row("rigl", "training step (sparse)", 100.0, "dst"),
            _row("rigl", "RigL update (extra)", 200.0, "dst"),
            _row("step", "sparsekern BSR-32", None, "resnet-bsr", "bf16 autocast")]
    rows[-1]["note"] = "RuntimeError: no autocast"
    results = {t.name: gpu_check.evaluate_target(t, rows, measured=True) for t in gpu_check.TARGETS}
    assert [r["status"] for r in results.values()] == ["met", "missed", "met", "missed", "not measured",
                                                       "not measured", "met"]
    assert results["CSR SpMM at density 0.1 vs cuBLAS fp32"]["measured"] == "3.00x"  # the fastest backend counts
    assert results["RigL update amortized at delta_t = 100, fraction of a step"]["measured"] == "2.00%"
    assert "no autocast" in results["ResNet-50 step at 90 % sparsity (BSR-32) vs dense, bf16 autocast"]["detail"]
    assert not gpu_check.evaluate_target(gpu_check.TARGETS[0], rows, measured=False)["measured"]

    current = {"spmm": ("triton", "cuda"), "gather": ("triton", "cuda")}
    suggested = gpu_check.suggest_cuda_order(rows, current)
    assert suggested == {"spmm": ["cuda", "triton"], "gather": ["triton", "cuda"]}
    text = gpu_check.format_cuda_order(suggested, current, rows)
    assert "'spmm': ('cuda', 'triton'),  # changed" in text and "'gather': ('triton', 'cuda'),  # not measured" in text


def test_a_sparse_resnet_step_is_compared_with_the_faster_dense_layout():
    """bench.gpu's printed speedup and the ResNet target take the same dense row: the faster layout timed."""
    from dataclasses import asdict

    from sparsekern.bench import gpu
    case, dtype = "ResNet-50 N=64 224x224 train step, bf16 autocast", "bf16 autocast"
    rows = [gpu.Row(case, "dense (cuDNN)", dtype, 30.0, baseline="dense (cuDNN)", group="resnet-dense"),
            gpu.Row(case, "dense channels_last (cuDNN)", dtype, 20.0, baseline="dense (cuDNN)", group="resnet-dense"),
            gpu.Row(case, "sparsekern BSR-32", dtype, 10.0, baseline="dense", group="resnet-bsr")]
    nchw, channels_last, sparse = rows
    b = gpu.Bench(torch.device("cpu"), gpu.SIZES["tiny"], rows=rows)
    assert gpu.baseline_row(rows, sparse) is channels_last
    assert b.ratio(sparse) == "2.00x vs dense channels_last (cuDNN)"
    assert b.ratio(channels_last) == "1.50x vs dense (cuDNN)"  # the layouts against each other
    target = next(t for t in gpu_check.TARGETS if t.group == "resnet-bsr")
    assert gpu_check.evaluate_target(target, [asdict(r) for r in rows], measured=True)["measured"] == "2.00x"
    channels_last.ms = None  # it failed: NCHW is the baseline
    assert b.ratio(sparse) == "3.00x vs dense (cuDNN)"
