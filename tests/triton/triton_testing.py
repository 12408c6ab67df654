"""Helpers shared by the Triton kernel tests (tests/triton/).

Without a CUDA GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py
before anything imports triton_kernels), so shapes stay small. With a GPU the same tests run on the
device, and the ``gpu``-marked realistic-shape tests run too; without one those are skipped.
"""
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
if DEVICE.type == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (realistic shapes)")

# The interpreter has no bfloat16 dot (numpy has no bfloat16): bf16 kernels are checked on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])


def tol(dtype):
    """(atol, rtol) against a float64 reference, for fp32-accumulating kernels."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2),
            torch.bfloat16: (8e-2, 5e-2)}[dtype]


def assert_close(actual, expected, dtype):
    atol, rtol = tol(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)
