"""Helpers shared by the Triton kernel tests (tests/triton/).

Without a CUDA GPU the kernels run on CPU tensors under TRITON_INTERPRET=1 (set by tests/conftest.py
before anything imports triton_kernels), so shapes stay small. With a GPU the same tests run on the
device, and the ``gpu``-marked realistic-shape tests run too; without one those are skipped.

Every autotune config: the interpreter keeps only each kernel's first config (triton_kernels/_common.py,
``autotune``), and on a GPU the autotuner only runs its winner afterwards. The ``*_every_config`` tests
therefore run each config themselves, the way triton's ``Autotuner.run`` launches the config it picked:
the @triton.jit function with the config's meta-parameters, ``kernel.fn[grid](*args, **meta,
**config.all_kwargs())``. spmm's and sddmm's tests write the kernel arguments and grid out themselves;
the others go through ``forced_config`` (``run_config``), which takes them from the op's own launcher
(its host-side packing and its grid function included).
"""
import contextlib
import os

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed")
# A launch over the GPU's resources (shared memory) fails with this; the autotuner drops such a config
# (Autotuner._bench), so the *_every_config tests skip it where it happens.
OutOfResources = pytest.importorskip("triton.runtime.errors").OutOfResources

HAS_CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cuda" if HAS_CUDA and not INTERPRET else "cpu")
if DEVICE.type == "cpu" and not INTERPRET:
    pytest.skip("Triton kernels need a CUDA GPU or TRITON_INTERPRET=1", allow_module_level=True)

needs_gpu = pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a CUDA GPU (realistic shapes)")

# The interpreter has no bfloat16 dot (numpy has no bfloat16): bf16 kernels are checked on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])
# The dtypes of the *_every_config tests. A config changes tiles, not dtypes, and the other tests run
# every dtype (with the first config): on a CPU, where the interpreter is slow, fp32 alone.
CONFIG_DTYPES = DTYPES if DEVICE.type == "cuda" else [torch.float32]


def tol(dtype):
    """(atol, rtol) against a float64 reference, for fp32-accumulating kernels."""
    return {torch.float64: (1e-10, 1e-10), torch.float32: (1e-4, 1e-4), torch.float16: (2e-2, 2e-2),
            torch.bfloat16: (8e-2, 5e-2)}[dtype]


def assert_close(actual, expected, dtype):
    atol, rtol = tol(dtype)
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


def run_config(kernel, config, grid, *args, **meta):
    """Launch the autotuned ``kernel`` with one of its configs, as ``Autotuner.run`` launches the config it
    picked: its @triton.jit function with the config's meta-parameters (``grid`` may be a function of them)."""
    return kernel.fn[grid](*args, **meta, **config.all_kwargs())


@contextlib.contextmanager
def forced_config(module, kernel, config):
    """Within the block, the ops of triton_kernels ``module`` launch its autotuned ``kernel`` with ``config``
    (``run_config``, on the arguments and grid function of the op's own launcher); its other kernels are
    launched as usual. Test-only: it replaces ``module.launch`` (triton_kernels/_common.py) for the block.
    Fails if the block never launched ``kernel``, i.e. if the op no longer launches through ``launch``."""
    original = module.launch
    launched = []

    class _Launcher:
        def __getitem__(self, grid):
            def run(*args, **meta):
                launched.append(grid)
                return run_config(kernel, config, grid, *args, **meta)
            return run

    def launch(k):
        return _Launcher() if k is kernel else original(k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "launch", launch)
        yield
    assert launched, f"{module.__name__}'s ops never launched {kernel.base_fn.__name__} through `launch`"
