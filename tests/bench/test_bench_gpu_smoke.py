"""Smoke test of the GPU benchmark harness (bench/gpu.py): on a CPU it runs its tiny sizes through the
Triton interpreter, so every case builds, every implementation is checked against the dense result,
and the table renders. Not a measurement."""
import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

from sparsekern.bench import gpu  # noqa: E402


def test_tiny_run_checks_every_implementation():
    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"  # on a GPU: the real kernels, tiny
    # The training-step cases run in tests/bench/test_gpu_check.py.
    cases = [c for c in gpu.CASES if not c.startswith("resnet")]
    b = gpu.run(cases=cases, sizes="tiny", device=device)
    assert b.done == cases
    impls = {r.impl for r in b.rows}
    for expected in ("cuBLAS dense", "sparsekern CSR (triton)", "sparsekern BSR (triton)",
                     "cuSPARSE CSR (torch.sparse.mm)", "cuSPARSE CSR (sampled_addmm)", "sparsekern masked (triton)",
                     "cuDNN dense", "torch.topk", "sparsekern topk_select (triton)"):
        assert expected in impls, expected
    assert {r.op for r in b.rows if r.impl.startswith("sparsekern") and r.op} >= {
        "spmm", "sparse_linear", "sddmm", "bsr_linear", "masked_matmul", "sparse_conv2d", "topk_select"}
    ours = [r for r in b.rows if r.impl.startswith("sparsekern")]
    assert ours and all(r.ms is not None and r.ms > 0 for r in ours), \
        [(r.case, r.impl, r.note) for r in ours if not r.ms]
    update = next(r for r in b.rows if r.impl == "RigL update (extra)")
    assert "amortized at delta_t=100" in update.note
    text = gpu.table(b)
    assert "| case | implementation |" in text and "x vs cuBLAS dense" in text


def test_refuses_cpu_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        gpu.run(sizes="tiny", device="cpu")


def test_cli_without_a_gpu_says_so(monkeypatch, capsys):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    from sparsekern.cli import main
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert main(["bench", "--gpu", "--quick"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
