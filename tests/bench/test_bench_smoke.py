"""Smoke test of the bench harness: tiny shapes, reference backend, one thread, a few seconds.

Runs ``python -m bench.ops`` (the source of ``sparsekern.bench.ops``) in a subprocess so
that SPARSEKERN_BACKEND=reference is read at import, as the harness is meant to be run.
"""
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COLUMNS = ["dense ms", "sparsekern ms", "torch.sparse ms", "SparseProp ms"]


def _table(markdown: str):
    lines = [line for line in markdown.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def _ms(cell: str) -> float:
    return float(cell.split()[0])  # "median [IQR]"


def test_bench_tiny_quick(tmp_path):
    output = tmp_path / "bench.md"
    env = {**os.environ, "SPARSEKERN_BACKEND": "reference"}
    proc = subprocess.run([sys.executable, "-m", "bench.ops", "--quick", "--sizes", "tiny", "--threads", "1",
                           "--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr

    text = output.read_text()
    for key in ("command:", "torch:", "threads: 1", "CPU:", "date:", "sparsekern backend: reference"):
        assert key in text
    rows = _table(text)
    kinds = [(r["case"].split()[0], r["pass"]) for r in rows]
    # --quick: linear at 2 densities, conv at 2 shapes x 2 densities (fwd and fwd+bwd each), topk at 2 k's (fwd).
    assert kinds == ([("SparseLinear", "fwd"), ("SparseLinear", "fwd+bwd")] * 2
                     + [("SparseConv2d", "fwd"), ("SparseConv2d", "fwd+bwd")] * 4 + [("topk_select", "fwd")] * 2)

    has_sparseprop = importlib.util.find_spec("sparseprop") is not None
    for row in rows:
        timed = ["dense ms", "sparsekern ms"]
        if row["case"].startswith("SparseLinear"):
            timed.append("torch.sparse ms")
        if not row["case"].startswith("topk"):
            if has_sparseprop:
                timed.append("SparseProp ms")
            else:
                assert row["SparseProp ms"] == "n/a"
        for column in COLUMNS:
            if column in timed:
                t = _ms(row[column])
                assert math.isfinite(t) and t > 0, (row["case"], row["pass"], column, row[column])
            else:
                assert row[column] in ("—", "n/a"), (row["case"], column, row[column])
        assert row["speedup vs dense"].endswith("x")
        assert "differs" not in row["notes"] and "error" not in row["notes"], row["notes"]


def test_run_case_times_implementations_side_by_side(monkeypatch):
    """Each pass's implementations are timed in rounds (a host's drift moves them alike), and a column keeps the
    fastest of its variants, named in the notes."""
    import types

    import torch

    import bench.timing
    from bench.ops import Case, run_case
    from bench.peers import DENSE, SPARSEKERN, Impl
    from bench.timing import Budget

    # A clock that only the closures advance (by their delay): no host's load can reorder the variants.
    clock = [0.0]
    monkeypatch.setattr(bench.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    calls = []
    weight = torch.randn(3, 4, requires_grad=True)

    def impl(column, variant="", delay=0.001):
        def forward(x):
            calls.append(column + variant)
            clock[0] += delay
            return x @ weight.t()
        return Impl(column, forward, [weight], weight_grad=lambda: weight.grad, variant=variant)

    x = torch.randn(2, 4, requires_grad=True)
    case = Case("toy", (x,), [impl(DENSE), impl(SPARSEKERN, "slow", 0.004), impl(SPARSEKERN, "fast")], None)
    calls.clear()
    rows, ok = run_case(case, Budget(0.0, 10.0, threshold=float("inf")))
    assert ok and [r.pass_name for r in rows] == ["fwd"]
    timed = calls[3:]  # after each implementation's check
    assert len(timed) == 3 * 5 * 2  # 5 rounds (min_rounds), each call timed after an untimed one of its own
    # a round holds every implementation: none is timed twice before all were timed once
    rounds = [timed[i:i + 6] for i in range(0, len(timed), 6)]
    assert all(sorted(r) == sorted(["dense", "dense", "sparsekernslow", "sparsekernslow", "sparsekernfast",
                                    "sparsekernfast"]) for r in rounds)
    assert rows[0].times[SPARSEKERN].median == pytest.approx(0.001)
    assert "sparsekern: fastest was fast" in rows[0].notes


@pytest.mark.parametrize("flags", [["--models", "mlp"], ["--train"], ["--targets"], ["--gpu"]])
def test_the_op_bench_module_refuses_the_other_kinds(flags, capsys):
    from bench.ops import _cli
    with pytest.raises(SystemExit) as info:
        _cli(flags)
    assert info.value.code == 2 and f"argument {flags[0]}: python -m sparsekern.bench.ops" in capsys.readouterr().err


@pytest.mark.parametrize("module,flags,refused", [("models", ["--train"], "--models"),
                                                  ("targets", ["--quick"], "--targets")])
def test_the_model_and_target_modules_check_options_as_the_cli(module, flags, refused, capsys):
    import importlib
    cli = importlib.import_module(f"bench.{module}")._cli
    with pytest.raises(SystemExit) as info:
        cli(flags)
    assert info.value.code == 2 and f"argument {refused}:" in capsys.readouterr().err
