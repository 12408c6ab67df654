"""Raw conv ops with geometry numbers whose products overflow int64: a clear error naming the argument,
never a crash (each call runs in a subprocess, so a segfault fails the test instead of the run)."""
import subprocess
import sys

import pytest

from sk_testing import has_cpu_kernel

BIG = (2**64 + 2) // 3  # fits int64; times 3 does not

CALLS = {
    "sparse_conv2d": ("torch.ops.sparsekern.sparse_conv2d(torch.randn(1, 1, 8, 8), v, rp, ci, [4, 1], None, "
                      "{s}, {p}, {d})"),
    "sparse_conv2d_backward_input": ("torch.ops.sparsekern.sparse_conv2d_backward_input(torch.randn(1, 1, 5, 8), "
                                     "v, rp, ci, [1, 1, 8, 8], [4, 1], {s}, {p}, {d})"),
    "sparse_conv2d_backward_weight": ("torch.ops.sparsekern.sparse_conv2d_backward_weight(torch.randn(1, 1, 5, 8), "
                                      "torch.randn(1, 1, 8, 8), rp, ci, [4, 1], {s}, {p}, {d})"),
}
GEOMETRIES = {
    "dilation": ("[1, 1]", "[0, 0]", f"[{BIG}, 1]", "kernel_size"),
    "padding": ("[1, 1]", f"[{BIG}, 0]", "[1, 1]", "padding"),
    "stride": (f"[{BIG}, 1]", "[0, 0]", "[1, 1]", "stride"),
}


@pytest.mark.parametrize("op", list(CALLS))
@pytest.mark.parametrize("what", list(GEOMETRIES))
def test_overflowing_geometry_raises(op, what):
    if not has_cpu_kernel(op):
        pytest.skip(f"no CPU kernel for sparsekern::{op}")
    s, p, d, named = GEOMETRIES[what]
    code = ("import torch, sparsekern\n"
            "v, rp, ci = torch.randn(4), torch.tensor([0, 4]), torch.arange(4, dtype=torch.int32)\n"
            "try:\n"
            f"    {CALLS[op].format(s=s, p=p, d=d)}\n"
            "except RuntimeError as e:\n"
            "    print('RAISED', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"crashed (exit {done.returncode}): {done.stderr[-2000:]}"
    assert "RAISED" in done.stdout and op in done.stdout and named in done.stdout, done.stdout[-2000:]
