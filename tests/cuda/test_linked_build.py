"""The linked CUDA extension, checked without a GPU: where sparsekern._C was built against a CUDA build
of torch (the CI job on the newest torch, `make test-newest`), it loads with every symbol resolved at load
time, every op has a CUDA kernel, and it embeds cubins for each default arch plus PTX of the newest one
(so GPUs newer than the list can JIT it). Skipped where the extension was built for the CPU only."""
import glob
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsekern.ops import dispatch

SO = sorted(glob.glob(str(Path(dispatch.__file__).resolve().parents[1] / "_C*.so")))
pytestmark = pytest.mark.skipif(
    not (dispatch.extension_loaded and torch._C._dispatch_has_kernel_for_dispatch_key("sparsekern::spmm", "CUDA")),
    reason="sparsekern._C was built without its CUDA kernels (CPU torch or no nvcc at install time); "
           "`make test-newest` builds and checks them against a CUDA build of torch")
EM_CUDA = 190
ARCHS = (80, 90)  # setup.py's default TORCH_CUDA_ARCH_LIST, "8.0;9.0+PTX"


def _cuda_ops():
    return [op for op in dispatch.OPS if dispatch.REGISTRY[op].schema] + list(dispatch.PARTS)


def test_imports_with_every_symbol_bound():
    code = ("import torch, sparsekern; from sparsekern.ops import dispatch; "
            "assert dispatch.extension_loaded; print('ok')")
    env = dict(os.environ, LD_BIND_NOW="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


@pytest.mark.parametrize("op", _cuda_ops())
def test_every_op_has_cpu_and_cuda_kernels(op):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"sparsekern::{op}", key), f"{op}: no {key} kernel"


def _cubin_archs(blob: bytes):
    """SM versions of the CUDA ELF images embedded in a shared object (e_machine 190; the SM version is
    byte 1 of e_flags)."""
    archs, i = [], blob.find(b"\x7fELF\x02\x01\x01")
    while i >= 0:
        if struct.unpack_from("<H", blob, i + 18)[0] == EM_CUDA:
            archs.append((struct.unpack_from("<I", blob, i + 48)[0] >> 8) & 0xFF)
        i = blob.find(b"\x7fELF\x02\x01\x01", i + 1)
    return archs


def test_cubins_for_each_arch_and_ptx_for_the_newest():
    assert len(SO) == 1, f"expected one sparsekern._C shared object, found {SO}"
    blob = Path(SO[0]).read_bytes()
    archs = _cubin_archs(blob)
    kernel_files = len(glob.glob(str(Path(__file__).resolve().parents[2] / "csrc" / "cuda" / "*.cu")))
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "") in ("", "8.0;9.0+PTX"):
        for arch in ARCHS:
            assert archs.count(arch) >= kernel_files, f"sm_{arch}: {archs.count(arch)} cubins for {kernel_files} .cu"
        assert blob.count(f".target sm_{ARCHS[-1]}".encode()) >= kernel_files, f"no PTX for sm_{ARCHS[-1]}"
    else:
        assert archs, "no CUDA ELF image in the extension"
