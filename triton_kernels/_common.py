"""What every Triton kernel file shares: interpreter detection, autotune that degrades to one
config under the interpreter, and the launch wrapper that lets torch.compile trace kernels.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) kernels run on CPU tensors
through Triton's numpy interpreter; that is how CI tests them without a GPU.

A load/store mask never combines a block with a scalar comparison (``ok & (count != 0)``): the
interpreter broadcasts that scalar as an integer array, which Triton >= 3.9 rejects ("mask has
unsupported dtype"). Compare the block against a scalar bound instead (``offs < tl.where(...)``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LIB = "sparsekern_triton"  # namespace of the triton_op definitions; signatures mirror sparsekern::<op>

# Floating dtypes the kernels take (fp32 accumulation for the 16-bit ones). The interpreter's
# bfloat16 tl.dot returns garbage (Triton 3.6, numpy has no bfloat16): CPU tests skip bf16 dots.
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fix_interpreter_index() -> None:
    """Triton 3.6's interpreter turns a scalar loaded from memory into a Python int (a loop bound:
    ``range(row_start, row_end)``) with int() of a 1-element numpy array, which numpy >= 2.3 refuses;
    use .item() instead. Idempotent; applied only under the interpreter."""
    from triton.runtime import interpreter
    if getattr(interpreter, "_sparsekern_index_fix", False):
        return
    patch_tensor = interpreter._patch_lang_tensor

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

    interpreter._patch_lang_tensor = patched
    interpreter._sparsekern_index_fix = True


if INTERPRET:
    _fix_interpreter_index()


def precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 follows torch's matmul setting (TF32 only when allowed)."""
    if dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest":
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


@triton.jit
def grouped_tile(pid, num_a, num_b, GROUP: tl.constexpr):
    """(pid_a, pid_b) of program ``pid`` over a num_a x num_b tile grid in grouped order: GROUP tiles
    along a sweep all of b together, so the operand they share stays in L2."""
    per_group = GROUP * num_b
    first_a = (pid // per_group) * GROUP
    group = tl.minimum(num_a - first_a, GROUP)
    return first_a + (pid % per_group) % group, (pid % per_group) // group


def autotune(configs, key, **kwargs):
    """``triton.autotune``, except that the interpreter (no GPU driver to time with) gets the first config."""
    if INTERPRET:
        configs = configs[:1]
    return triton.autotune(configs=configs, key=key, **kwargs)


def launch(kernel):
    """``kernel[grid](...)`` through ``wrap_triton`` so that a triton_op stays traceable by torch.compile.
    The interpreter's kernels launch as they are: torch >= 2.12 does so itself, and torch 2.11's
    wrap_triton rejects an interpreted ``triton.jit`` function."""
    return kernel if INTERPRET else wrap_triton(kernel)


def tl_dtype(dtype: torch.dtype):
    import triton.language as tl
    return {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16,
            torch.float64: tl.float64}[dtype]
