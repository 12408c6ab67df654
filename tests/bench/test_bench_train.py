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
