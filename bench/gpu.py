"""GPU kernel benchmark: sparsekern's Triton and CUDA C++ kernels against cuBLAS (dense
``torch.matmul``/cuDNN), cuSPARSE (``torch.sparse.mm`` on CSR) and torch's BSR matmul, in one run.

``sparsekern bench --gpu`` (or ``python -m sparsekern.bench.gpu``). Times are medians of CUDA-event
timings after warmup; TFLOP/s count the useful multiply-adds (2 * N * nnz for a sparse product,
2 * N * m * k for a dense one), so a sparse kernel's TFLOP/s compare with the dense ones directly
as efficiency. Every implementation is checked once against the dense result first; a wrong one
is reported, not timed. fp32 rows run with TF32 off (cuBLAS true fp32), as the targets ask.

Without a GPU, ``--sizes tiny`` runs the same harness on CPU tensors under TRITON_INTERPRET=1
with wall-clock timing: a smoke test of the code, not a measurement.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import sparsekern
from sparsekern import BlockSparseMatrix, SparseMatrix, ops
from sparsekern.nn import random_block_mask, random_mask
from sparsekern.ops import dispatch

DENSITIES = (0.5, 0.2, 0.1, 0.05)
BLOCKS = (16, 32, 64)
# ResNet-50 convolutions (Cin, Cout, k, stride, H) at batch 64, 224x224 input: one per stage.
RESNET50_CONVS = ((64, 64, 3, 1, 56), (256, 64, 1, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14),
                  (512, 512, 3, 1, 7), (1024, 256, 1, 1, 14))


@dataclass(frozen=True)
class Sizes:
    tokens: int
    features: int
    conv_batch: int
    conv_scale: int  # divides channels and spatial sizes (tiny runs)
    topk_n: int
    warmup: int
    reps: int


SIZES = {"full": Sizes(8192, 4096, 64, 1, 25_000_000, 10, 50),
         "tiny": Sizes(48, 64, 2, 16, 5000, 1, 3)}


@dataclass
class Row:
    case: str
    impl: str
    dtype: str
    ms: Optional[float]
    flops: float = 0.0  # useful flops per call
    baseline: Optional[str] = None  # the impl (same case, same dtype) the speedup is against
    note: str = ""

    @property
    def tflops(self) -> str:
        return f"{self.flops / (self.ms * 1e-3) / 1e12:.3g}" if self.ms and self.flops else "—"


@dataclass
class Bench:
    device: torch.device
    sizes: Sizes
    rows: List[Row] = field(default_factory=list)

    @property
    def low(self) -> torch.dtype:
        """The tensor-core dtype: bf16 (the interpreter's bf16 dot is broken, so fp16 in CPU smoke runs)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float16

    def time(self, fn: Callable[[], object]) -> float:
        """Median ms of ``fn`` (CUDA events on a GPU, wall clock on the CPU smoke path)."""
        for _ in range(self.sizes.warmup):
            fn()
        times = []
        for _ in range(self.sizes.reps):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def add(self, case: str, impl: str, dtype: torch.dtype, fn: Callable[[], torch.Tensor],
            expected: Optional[torch.Tensor], flops: float, baseline: Optional[str] = None) -> None:
        """Check ``fn()`` against ``expected`` once (exactly for indices), then time it."""
        name = str(dtype).replace("torch.", "")
        try:
            out = fn()
            if expected is not None:
                tol = 1e-2 if dtype == torch.float32 else 6e-2
                if out.shape != expected.shape or (not expected.is_floating_point() and not torch.equal(out, expected)):
                    self.rows.append(Row(case, impl, name, None, note="wrong (differs from the baseline), not timed"))
                    return
                err = (out.float() - expected.float()).abs().max().item() / max(expected.float().abs().max().item(), 1e-6)
                if not err <= tol:
                    self.rows.append(Row(case, impl, name, None, note=f"wrong (max rel err {err:.2g}), not timed"))
                    return
            self.rows.append(Row(case, impl, name, self.time(fn), flops, baseline))
        except Exception as exc:  # a missing backend or an unsupported dtype is a cell, not a crash
            self.rows.append(Row(case, impl, name, None, note=f"{type(exc).__name__}: {str(exc)[:90]}"))

    def ratio(self, row: Row) -> str:
        if row.ms is None or row.baseline is None:
            return "—"
        base = next((r for r in self.rows if r.case == row.case and r.impl == row.baseline and r.dtype == row.dtype
                     and r.ms), None)
        return f"{base.ms / row.ms:.2f}x vs {row.baseline}" if base else "—"


def _backends(op: str, device: torch.device) -> List[str]:
    """The GPU backends of ``op`` present here (the CPU smoke run exercises the Triton ones)."""
    if device.type == "cpu":
        return ["triton"]
    return [b for b in dispatch.available(op, device.type) if b != "reference"] or ["reference"]


def _with_backend(op: str, name: str, fn: Callable) -> Callable:
    def run():
        dispatch.set_backend(name, op=op)
        try:
            return fn()
        finally:
            dispatch.set_backend(None, op=op)
    return run


# -- cases ----------------------------------------------------------------------------------
def linear_cases(b: Bench, densities: Sequence[float], blocks: Sequence[int]) -> None:
    s, dev = b.sizes, b.device
    n, m = s.tokens, s.features
    g = torch.Generator().manual_seed(0)
    for density in densities:
        # Unstructured CSR, fp32: vs cuBLAS fp32 and cuSPARSE.
        mask = random_mask((m, m), density, g).to(dev)
        w = torch.randn(m, m, device=dev) * mask
        x = torch.randn(n, m, device=dev)
        case = f"linear {m}x{m} N={n} d={density}"
        dense_flops, sparse_flops = 2.0 * n * m * m, 2.0 * n * int(mask.sum())
        expected = x @ w.t()
        b.add(case, "cuBLAS dense", torch.float32, lambda: x @ w.t(), None, dense_flops)
        W = SparseMatrix.from_dense(w, mask)
        for backend in _backends("sparse_linear", dev):
            b.add(case, f"sparsekern CSR ({backend})", torch.float32,
                  _with_backend("sparse_linear", backend, lambda: ops.sparse_linear(x, W)), expected, sparse_flops,
                  "cuBLAS dense")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            w_csr = w.to_sparse_csr()
        b.add(case, "cuSPARSE CSR (torch.sparse.mm)", torch.float32, lambda: torch.sparse.mm(w_csr, x.t()).t(),
              expected, sparse_flops, "cuBLAS dense")
        # Block-sparse, bf16 (tensor cores): vs dense bf16 and torch's BSR.
        xh = x.to(b.low)
        for block in blocks:
            bmask = random_block_mask((m, m), density, block, g).to(dev)
            wh = (torch.randn(m, m, device=dev) * bmask).to(b.low)
            case_b = f"linear {m}x{m} N={n} d={density} block={block}"
            expected_b = xh @ wh.t()
            flops_b = 2.0 * n * int(bmask.sum())
            b.add(case_b, "cuBLAS dense", b.low, lambda: xh @ wh.t(), None, dense_flops)
            Wb = BlockSparseMatrix.from_dense(wh, block, bmask)
            b.add(case_b, "sparsekern BSR (triton)", b.low,
                  _with_backend("bsr_linear", "triton", lambda: ops.bsr_linear(xh, Wb)), expected_b, flops_b,
                  "cuBLAS dense")
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    w_bsr = wh.to_sparse_bsr((block, block))
                b.add(case_b, "torch BSR", b.low, lambda: (w_bsr @ xh.t()).t(), expected_b, flops_b,
                      "cuBLAS dense")
            except Exception as exc:
                b.rows.append(Row(case_b, "torch BSR", str(b.low).replace("torch.", ""), None, note=f"{type(exc).__name__}: {exc}"[:100]))
            # The BSR target compares against torch BSR too.
            for r in b.rows:
                if r.case == case_b and r.impl == "sparsekern BSR (triton)":
                    r.note = _vs(b, case_b, "sparsekern BSR (triton)", "torch BSR")
    # Fused masked matmul at density 1 must not lose more than 10 % to dense.
    full = torch.ones(m, m, dtype=torch.bool, device=dev)
    for dtype in (torch.float32, b.low):
        w = torch.randn(m, m, device=dev, dtype=dtype)
        x = torch.randn(n, m, device=dev, dtype=dtype)
        case = f"masked_matmul {m}x{m} N={n} d=1"
        b.add(case, "cuBLAS dense", dtype, lambda: x @ w.t(), None, 2.0 * n * m * m)
        for backend in _backends("masked_matmul", dev):
            b.add(case, f"sparsekern masked ({backend})", dtype,
                  _with_backend("masked_matmul", backend, lambda: ops.masked_matmul(x, w, full)), x @ w.t(),
                  2.0 * n * m * m, "cuBLAS dense")


def _vs(b: Bench, case: str, ours: str, peer: str) -> str:
    o = next((r for r in b.rows if r.case == case and r.impl == ours and r.ms), None)
    p = next((r for r in b.rows if r.case == case and r.impl == peer and r.ms), None)
    return f"{p.ms / o.ms:.2f}x vs {peer}" if o and p else ""


def conv_cases(b: Bench, density: float = 0.1, block: int = 32) -> None:
    s, dev = b.sizes, b.device
    g = torch.Generator().manual_seed(1)
    for cin, cout, k, stride, h in RESNET50_CONVS:
        cin, cout, h = max(cin // s.conv_scale, 4), max(cout // s.conv_scale, 4), max(h // s.conv_scale, 4)
        pad = k // 2
        x = torch.randn(s.conv_batch, cin, h, h, device=dev)
        mask = random_mask((cout, cin, k, k), density, g).to(dev)
        w = torch.randn(cout, cin, k, k, device=dev) * mask
        case = f"conv {cin}->{cout} {k}x{k} s{stride} {h}x{h} N={s.conv_batch} d={density}"
        ho = (h + 2 * pad - k) // stride + 1
        dense_flops = 2.0 * s.conv_batch * ho * ho * cout * cin * k * k
        expected = F.conv2d(x, w, None, stride, pad)
        b.add(case, "cuDNN dense", torch.float32, lambda: F.conv2d(x, w, None, stride, pad), None, dense_flops)
        W = SparseMatrix.from_dense(w, mask)
        for backend in _backends("sparse_conv2d", dev):
            b.add(case, f"sparsekern CSR ({backend})", torch.float32,
                  _with_backend("sparse_conv2d", backend, lambda: ops.sparse_conv2d(x, W, None, stride, pad)),
                  expected, dense_flops * density, "cuDNN dense")
        if cout % block == 0 and (cin * k * k) % block == 0:
            bmask = random_block_mask((cout, cin, k, k), density, block, g).to(dev)
            xh = x.to(b.low)
            wh = (torch.randn(cout, cin, k, k, device=dev) * bmask).to(b.low)
            case_b = case + f" block={block}"
            b.add(case_b, "cuDNN dense", b.low, lambda: F.conv2d(xh, wh, None, stride, pad), None,
                  dense_flops)
            Wb = BlockSparseMatrix.from_dense(wh, block, bmask)
            b.add(case_b, "sparsekern BSR (triton, im2col)", b.low,
                  _with_backend("bsr_linear", "triton", lambda: ops.bsr_conv2d(xh, Wb, None, stride, pad)),
                  F.conv2d(xh, wh, None, stride, pad), dense_flops * float(bmask.float().mean()), "cuDNN dense")


def topk_cases(b: Bench, fraction: float = 0.01) -> None:
    n, dev = b.sizes.topk_n, b.device
    scores = torch.randn(n, device=dev)
    k = int(fraction * n)
    case = f"topk n={n:.2g} k={fraction:.0%}"
    b.add(case, "torch.topk", torch.float32, lambda: torch.topk(scores, k, sorted=False).indices, None, 0.0)
    expected = torch.sort(torch.topk(scores, k).indices).values  # ascending, as topk_select returns them
    for backend in _backends("topk_select", dev):
        b.add(case, f"sparsekern topk_select ({backend})", torch.float32,
              _with_backend("topk_select", backend, lambda: ops.topk_select(scores, k)), expected, 0.0, "torch.topk")


def dst_case(b: Bench, density: float = 0.1, delta_t: int = 100) -> None:
    """A RigL update of a sparse ResNet-50 against one training step of it."""
    from sparsekern.dst import RigL
    from sparsekern.models import resnet50
    dev, s = b.device, b.sizes
    img = 224 if s.conv_scale == 1 else 32
    model = sparsekern.sparsify(resnet50(num_classes=100).to(dev), density, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(s.conv_batch, 3, img, img, device=dev)
    y = torch.randint(0, 100, (s.conv_batch,), device=dev)
    rigl = RigL(model, opt, total_steps=10 ** 6, delta_t=1, drop_fraction=0.3, end_fraction=1.0)

    def train_step(update: bool):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if update:
            rigl.step()
    case = f"DST RigL update, ResNet-50 d={density} N={s.conv_batch} {img}x{img}"
    try:
        with rigl.paused():
            step_ms = b.time(lambda: train_step(False))
        update_ms = b.time(lambda: train_step(True)) - step_ms
        b.rows.append(Row(case, "training step (sparse)", "float32", step_ms))
        b.rows.append(Row(case, "RigL update (extra)", "float32", update_ms,
                          note=f"{update_ms / step_ms:.1%} of a step; {update_ms / step_ms / delta_t:.2%} amortized "
                               f"at delta_t={delta_t}"))
    except Exception as exc:
        b.rows.append(Row(case, "RigL", "float32", None, note=f"{type(exc).__name__}: {str(exc)[:90]}"))


# -- report ---------------------------------------------------------------------------------
def table(b: Bench) -> str:
    lines = ["| case | implementation | dtype | median ms | TFLOP/s | speedup | notes |",
             "|---|---|---|---:|---:|---|---|"]
    for r in b.rows:
        ms = f"{r.ms:.3f}" if r.ms is not None else "—"
        lines.append(f"| {r.case} | {r.impl} | {r.dtype} | {ms} | {r.tflops} | {b.ratio(r)} | {r.note} |")
    return "\n".join(lines)


def fastest_backends(b: Bench) -> str:
    """Which backend won each op where several ran: the data the per-op CUDA default should follow."""
    wins: Dict[str, Dict[str, int]] = {}
    for r in b.rows:
        if r.ms is None or "(" not in r.impl or not r.impl.startswith("sparsekern"):
            continue
        rivals = [o for o in b.rows if o.case == r.case and o.dtype == r.dtype and o.ms and
                  o.impl.startswith(r.impl.split("(")[0]) and o is not r]
        if rivals and all(r.ms <= o.ms for o in rivals):
            kind = r.impl.split("(")[0].strip()
            backend = r.impl.split("(")[1].rstrip(")").split(",")[0]
            wins.setdefault(kind, {}).setdefault(backend, 0)
            wins[kind][backend] += 1
    return "; ".join(f"{k}: " + ", ".join(f"{bk} fastest in {n}" for bk, n in v.items()) for k, v in wins.items())


def header(b: Bench, argv: Sequence[str]) -> str:
    dev = torch.cuda.get_device_name(b.device) if b.device.type == "cuda" else f"CPU ({platform.processor()}, " \
        "TRITON_INTERPRET smoke run, not a measurement)"
    import importlib
    try:
        tv = importlib.import_module("triton").__version__
    except ImportError:
        tv = "not installed"
    return (f"Command: `{' '.join(shlex.quote(a) for a in argv)}`  \n"
            f"Date: {datetime.date.today()}; device: {dev}; torch {torch.__version__} (CUDA {torch.version.cuda}); "
            f"triton {tv}; CUDA C++ kernels built: {dispatch.cuda_kernels_built()}; "
            f"fp32 with TF32 off; medians of {b.sizes.reps} CUDA-event timings after {b.sizes.warmup} warmups.")


def run(cases: Sequence[str] = ("linear", "conv", "topk", "dst"), sizes: str = "full", quick: bool = False,
        device: Optional[str] = None) -> Bench:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sparsekern bench --gpu needs a CUDA GPU (or, for a smoke run of the harness, "
                           "TRITON_INTERPRET=1 set before import and --sizes tiny)")
    if dev.type == "cpu" and sizes != "tiny":
        raise RuntimeError("sparsekern bench --gpu on the CPU (interpreter) runs only --sizes tiny")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b = Bench(dev, SIZES[sizes])
    densities = (0.1,) if quick else DENSITIES
    blocks = (32,) if quick else BLOCKS
    if dev.type == "cpu":
        densities, blocks = (0.5,), (16,)
    with torch.no_grad():
        if "linear" in cases:
            linear_cases(b, densities, blocks)
        if "conv" in cases:
            conv_cases(b, block=16 if dev.type == "cpu" else 32)
        if "topk" in cases:
            topk_cases(b)
    if "dst" in cases:
        dst_case(b)
    return b


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekern bench --gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=["linear", "conv", "topk", "dst"],
                        choices=("linear", "conv", "topk", "dst"))
    parser.add_argument("--sizes", choices=tuple(SIZES), default="full")
    parser.add_argument("--quick", action="store_true", help="density 0.1 and block 32 only")
    parser.add_argument("--output", default=None, help="also write the markdown to this file")
    args = parser.parse_args(argv)
    try:
        b = run(args.cases, args.sizes, args.quick)
    except RuntimeError as exc:
        print(f"sparsekern bench --gpu: {exc}", file=sys.stderr)
        return 2
    text = header(b, ["sparsekern", "bench", "--gpu", *(argv if argv is not None else sys.argv[1:])]) + "\n\n" + \
        table(b) + "\n\nFastest backend per kernel family: " + (fastest_backends(b) or "one backend only") + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
