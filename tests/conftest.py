"""Fixtures of the shared parametrization (defined in sk_testing.py) and the backend fixture.

Every op test compares the backend under test (``backend``: each CPU backend that is actually
available) against ``sparsekern.reference.<op>`` called directly, never against itself.
Without the compiled extension run with ``SPARSEKERN_BACKEND=reference``; the ``cpp`` cases are
then reported as skips with a reason, never as passes.
"""
import os
from typing import Tuple

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter. The variable
# must be set before any kernel is defined, i.e. before sparsekern (and its triton_kernels) import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Modules run their `csr` kernels in the tests (deterministic coverage of the sparse ops); the per-layer
# measured choice has its own tests (tests/nn/test_kernel_choice.py), which turn it on.
os.environ.setdefault("SPARSEKERN_AUTOTUNE", "0")

import sparsekern  # noqa: E402

from sk_testing import (
    CONV_CASES,
    CPU_BACKENDS,
    DTYPES,
    LAYOUTS,
    MKN,
    SPARSITIES,
    _conv_id,
    _dtype_id,
    _kernels_needed,
    _mkn_id,
    _sparsity_id,
    has_cpu_kernel,
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "kernels(*ops): the sparsekern kernels a test needs on the cpp backend "
                   "(default: the test module's OP)")


@pytest.fixture(params=MKN, ids=_mkn_id)
def mkn(request) -> Tuple[int, int, int]:
    return request.param


@pytest.fixture(params=SPARSITIES, ids=_sparsity_id)
def sparsity(request) -> Tuple[float, bool]:
    return request.param


@pytest.fixture(params=DTYPES, ids=_dtype_id)
def dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture(params=LAYOUTS)
def layout(request) -> str:
    return request.param


@pytest.fixture(params=CONV_CASES, ids=_conv_id)
def conv_case(request):
    return request.param


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    """Each CPU backend that is available for the kernels this test needs; the others skip with a reason."""
    name = request.param
    if name == "cpp":
        if not sparsekern.ops.HAS_EXTENSION:
            pytest.skip("cpp backend unavailable: sparsekern._C is not built (sparsekern.ops.HAS_EXTENSION is False)")
        missing = [op for op in _kernels_needed(request) if not has_cpu_kernel(op)]
        if missing:
            pytest.skip("cpp backend: no CPU kernel registered yet for "
                        + ", ".join(f"sparsekern::{op}" for op in missing))
    with sparsekern.backend(name):
        yield name


@pytest.fixture(autouse=True)
def _restore_backend_state():
    """No test may leak a set_backend() override into the next."""
    with sparsekern.backend(None):  # restores on exit whatever set_backend() did inside
        yield


@pytest.fixture
def one_thread():
    """torch at one thread for the test (training runs that compare results or launch processes of their own)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def deterministic():
    """``torch.use_deterministic_algorithms(True)`` for one test: every kernel choice by rule, none measured (a
    measured choice, and the dense kernel's timed product orientation, can differ between two runs)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)
