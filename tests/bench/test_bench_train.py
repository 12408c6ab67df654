"""Smoke test of the training-step bench: tiny models, reference backend, one thread."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_train_tiny(tmp_path):
    output = tmp_path / "train.md"
    env = {**os.environ, "SPARSEKERN_BACKEND": "reference"}
    proc = subprocess.run([sys.executable, "-m", "bench.train", "--sizes", "tiny", "--threads", "1",
                           "--output", str(output)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in output.read_text().splitlines() if line.startswith("| ")][2:]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == "90%" and float(cells[2]) > 0 and float(cells[3]) > 0 and cells[6].endswith("%")


def test_the_timed_sparse_step_keeps_nothing_for_rigl():
    """The sparse step is one between updates: RigL taps no gradient and keeps no (x, grad) pair in it, though it sits
    just before an update; the update step captures them and updates."""
    from sparsekern.bench.train import DELTA_T, cases, steps
    fns, algo = steps(cases("tiny")[0])
    assert algo.step_count == DELTA_T - 1 and algo._wants_dense_grad()
    fns["sparse"]()
    assert not any(algo._captured.values())
    fns["update"]()
    assert len(algo.history) == 1 and not any(algo._captured.values())


def test_cli_passes_sizes_to_the_training_step_bench(monkeypatch):
    from sparsekern.bench import train as bench_train
    from sparsekern.cli import main
    seen = {}
    monkeypatch.setattr(bench_train, "main", lambda **kwargs: seen.update(kwargs) or 0)
    assert main(["bench", "--train", "--sizes", "tiny", "--threads", "1", "--default-malloc"]) == 0
    assert seen == {"quick": False, "output": None, "threads": 1, "sizes": "tiny"}
