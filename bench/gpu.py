"""GPU kernel benchmark: sparsekern's Triton and CUDA C++ kernels against cuBLAS (dense
``torch.matmul``/cuDNN), cuSPARSE (``torch.sparse.mm`` / ``sampled_addmm`` on CSR) and torch's BSR matmul,
plus whole ResNet-50 training steps (dense vs CSR vs BSR under bf16 autocast) and the cost of a RigL update.

``sparsekern bench --gpu`` (or ``python -m sparsekern.bench.gpu``). Times are medians of CUDA-event
timings after warmup; TFLOP/s count the useful multiply-adds (2 * N * nnz for a sparse product,
2 * N * m * k for a dense one), so a sparse kernel's TFLOP/s compare with the dense ones directly
as efficiency. Every implementation is checked once against the dense result first; a wrong one
is reported, not timed. fp32 rows run with TF32 off (cuBLAS true fp32), as the targets ask.

Without a GPU, ``--sizes tiny`` runs the same harness on CPU tensors under TRITON_INTERPRET=1
with wall-clock timing (and ResNet-20 in place of ResNet-50): a smoke test of the code, not a measurement.
``--json FILE`` rewrites FILE after every row, so a run that is stopped keeps what it measured
(``sparsekern gpu-check`` relies on it).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import sparsekern
from sparsekern import BlockSparseMatrix, SparseMatrix, ops
from sparsekern.gpu_check import backend_wins
from sparsekern.nn import random_block_mask, random_mask
from sparsekern.ops import dispatch

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01)
QUICK_DENSITIES = (0.1, 0.01)
BLOCKS = (16, 32, 64)
# ResNet-50 convolutions (Cin, Cout, k, stride, H) at batch 64, 224x224 input: one per stage.
RESNET50_CONVS = ((64, 64, 3, 1, 56), (256, 64, 1, 1, 56), (128, 128, 3, 1, 28), (256, 256, 3, 1, 14),
                  (512, 512, 3, 1, 7), (1024, 256, 1, 1, 14))
MODEL_DENSITY = 0.1  # the training-step cases: 90 % sparsity
DELTA_T = 100  # RigL's update interval the amortized cost is quoted at


@dataclass(frozen=True)
class Sizes:
    tokens: int
    features: int
    conv_batch: int  # also the batch of the training-step cases
    conv_scale: int  # divides channels and spatial sizes (tiny runs)
    topk_n: int
    warmup: int
    reps: int
    model: str  # the network of the training-step cases
    image: int
    step_warmup: int
    step_reps: int


SIZES = {"full": Sizes(8192, 4096, 64, 1, 25_000_000, 10, 50, "resnet50", 224, 3, 10),
         "tiny": Sizes(48, 64, 2, 16, 5000, 0, 1, "resnet20", 32, 0, 1)}


@dataclass
class Row:
    case: str
    impl: str
    dtype: str
    ms: Optional[float]
    flops: float = 0.0  # useful flops per call
    baseline: Optional[str] = None  # an impl prefix: the speedup is against the fastest such row (same case, dtype)
    note: str = ""
    group: str = ""  # the case function that measured it (a name of CASES)
    op: str = ""  # sparsekern rows: the dispatch op, so backends can be ranked per op
    backend: str = ""
    density: Optional[float] = None
    block: Optional[int] = None

    @property
    def tflops(self) -> str:
        return f"{self.flops / (self.ms * 1e-3) / 1e12:.3g}" if self.ms and self.flops else "—"


def baseline_row(rows: Sequence[Row], row: Row) -> Optional[Row]:
    """The fastest timed row of ``row``'s case and dtype whose impl starts with ``row.baseline``: a baseline timed in
    several forms (dense NCHW and channels_last) counts at its best, as gpu_check's targets take their peer."""
    if row.baseline is None:
        return None
    timed = [r for r in rows if r.case == row.case and r.dtype == row.dtype and r.impl.startswith(row.baseline)
             and r.ms]
    return min(timed, key=lambda r: r.ms, default=None)


@dataclass
class Bench:
    device: torch.device
    sizes: Sizes
    rows: List[Row] = field(default_factory=list)
    json_path: Optional[str] = None
    argv: Sequence[str] = ()
    cases: List[str] = field(default_factory=list)  # planned, in order
    group: str = ""  # the case running now
    started: float = 0.0
    done: List[str] = field(default_factory=list)

    @property
    def low(self) -> torch.dtype:
        """The tensor-core dtype: bf16 (the interpreter's bf16 dot is broken, so fp16 in CPU smoke runs)."""
        return torch.bfloat16 if self.device.type == "cuda" else torch.float16

    def time(self, fn: Callable[[], object], warmup: Optional[int] = None, reps: Optional[int] = None) -> float:
        """Median ms of ``fn`` (CUDA events on a GPU, wall clock on the CPU smoke path)."""
        for _ in range(self.sizes.warmup if warmup is None else warmup):
            fn()
        times = []
        for _ in range(self.sizes.reps if reps is None else reps):
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

    def record(self, row: Row) -> None:
        row.group = row.group or self.group
        self.rows.append(row)
        self.dump()

    def add(self, case: str, impl: str, dtype: torch.dtype, fn: Callable[[], torch.Tensor],
            expected: Optional[torch.Tensor], flops: float, baseline: Optional[str] = None, **meta) -> None:
        """Check ``fn()`` against ``expected`` once (exactly for indices), then time it. ``meta``: the
        Row's op, backend, density, block."""
        name = str(dtype).replace("torch.", "")
        try:
            out = fn()
            if expected is not None:
                tol = 1e-2 if dtype == torch.float32 else 6e-2
                if out.shape != expected.shape or (not expected.is_floating_point() and not torch.equal(out, expected)):
                    self.record(Row(case, impl, name, None, note="wrong (differs from the baseline), not timed",
                                    **meta))
                    return
                scale = max(expected.float().abs().max().item(), 1e-6)
                err = (out.float() - expected.float()).abs().max().item() / scale
                if not err <= tol:
                    self.record(Row(case, impl, name, None, note=f"wrong (max rel err {err:.2g}), not timed", **meta))
                    return
            self.record(Row(case, impl, name, self.time(fn), flops, baseline, **meta))
        except Exception as exc:  # a missing backend or an unsupported dtype is a cell, not a crash
            self.record(Row(case, impl, name, None, note=f"{type(exc).__name__}: {str(exc)[:90]}", **meta))

    def ratio(self, row: Row) -> str:
        base = baseline_row(self.rows, row) if row.ms else None
        return f"{base.ms / row.ms:.2f}x vs {base.impl}" if base else "—"

    def dump(self) -> None:
        """Rewrite the JSON file (atomically: a reader never sees half of it)."""
        if not self.json_path:
            return
        data = {"header": header_info(self), "current": {"case": self.group, "started": self.started},
                "done": self.done, "rows": [{**asdict(r), "speedup": self.ratio(r), "tflops": r.tflops}
                                            for r in self.rows]}
        tmp = self.json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, self.json_path)


def _backends(op: str, device: torch.device) -> List[str]:
    """The GPU backends of ``op`` present here (the CPU smoke run exercises the Triton ones)."""
    if device.type == "cpu":
        return ["triton"]
    return [b for b in dispatch.available(op, device.type) if b != "reference"] or ["reference"]


def _with_backend(op: str, name: str, fn: Callable) -> Callable:
    def run():
        with dispatch.backend(name, op=op):
            return fn()
    return run


def _csr(dense: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        return dense.to_sparse_csr()


# -- cases: one function each, registered in CASES ----------------------------------------------
def csr_case(b: Bench, densities: Sequence[float], op: str = "spmm") -> None:
    """CSR SpMM in fp32 vs cuBLAS fp32 and cuSPARSE: ``spmm`` A (m, k) @ B (k, N), or ``sparse_linear``
    x (N, k) @ W^T (the training layer's product)."""
    s, dev = b.sizes, b.device
    n, m = s.tokens, s.features
    g = torch.Generator().manual_seed(0)
    operand = torch.randn(m, n, device=dev) if op == "spmm" else torch.randn(n, m, device=dev)
    for density in densities:
        mask = random_mask((m, m), density, g).to(dev)
        w = torch.randn(m, m, device=dev) * mask
        W, w_csr = SparseMatrix.from_dense(w, mask), _csr(w)
        if op == "spmm":
            case = f"spmm {m}x{m} @ {m}x{n} d={density}"
            dense, ours, peer = (lambda: w @ operand, lambda: ops.spmm(W, operand),
                                 lambda: torch.sparse.mm(w_csr, operand))
        else:
            case = f"linear {m}x{m} N={n} d={density}"
            dense, ours, peer = (lambda: operand @ w.t(), lambda: ops.sparse_linear(operand, W),
                                 lambda: torch.sparse.mm(w_csr, operand.t()).t())
        dense_flops, sparse_flops = 2.0 * n * m * m, 2.0 * n * int(mask.sum())
        expected = dense()
        meta = dict(density=density)
        b.add(case, "cuBLAS dense", torch.float32, dense, None, dense_flops, **meta)
        for backend in _backends(op, dev):
            b.add(case, f"sparsekern CSR ({backend})", torch.float32, _with_backend(op, backend, ours), expected,
                  sparse_flops, "cuBLAS dense", op=op, backend=backend, **meta)
        b.add(case, "cuSPARSE CSR (torch.sparse.mm)", torch.float32, peer, expected, sparse_flops, "cuBLAS dense",
              **meta)
        _note_vs(b, case, "sparsekern CSR", "cuSPARSE CSR (torch.sparse.mm)")


def sddmm_case(b: Bench, densities: Sequence[float]) -> None:
    """SDDMM (X @ Y^T) at a CSR pattern, inner dim N (a weight gradient), fp32: vs cuBLAS computing the
    whole product and cuSPARSE's sampled_addmm."""
    s, dev = b.sizes, b.device
    n, m = s.tokens, s.features
    g = torch.Generator().manual_seed(2)
    X, Y = torch.randn(m, n, device=dev), torch.randn(m, n, device=dev)
    full = X @ Y.t()
    for density in densities:
        mask = random_mask((m, m), density, g).to(dev)
        case = f"sddmm {m}x{m} inner={n} d={density}"
        expected = full[mask]  # row-major: the CSR order
        meta = dict(density=density)
        b.add(case, "cuBLAS dense", torch.float32, lambda: X @ Y.t(), None, 2.0 * n * m * m, **meta)
        pattern = SparseMatrix.from_dense(mask.float(), mask)
        for backend in _backends("sddmm", dev):
            b.add(case, f"sparsekern CSR ({backend})", torch.float32,
                  _with_backend("sddmm", backend, lambda: ops.sddmm(pattern, X, Y)), expected,
                  2.0 * n * int(mask.sum()), "cuBLAS dense", op="sddmm", backend=backend, **meta)
        p_csr = _csr(mask.float())
        b.add(case, "cuSPARSE CSR (sampled_addmm)", torch.float32,
              lambda: torch.sparse.sampled_addmm(p_csr, X, Y.t(), beta=0.0).values(), expected,
              2.0 * n * int(mask.sum()), "cuBLAS dense", **meta)
        _note_vs(b, case, "sparsekern CSR", "cuSPARSE CSR (sampled_addmm)")


def bsr_case(b: Bench, densities: Sequence[float], blocks: Sequence[int]) -> None:
    """Block-sparse linear in bf16 (tensor cores): vs dense bf16 and torch's BSR matmul."""
    s, dev = b.sizes, b.device
    n, m = s.tokens, s.features
    g = torch.Generator().manual_seed(3)
    xh = torch.randn(n, m, device=dev).to(b.low)
    for density in densities:
        for block in blocks:
            bmask = random_block_mask((m, m), density, block, g).to(dev)
            wh = (torch.randn(m, m, device=dev) * bmask).to(b.low)
            case = f"bsr linear {m}x{m} N={n} d={density} block={block}"
            expected = xh @ wh.t()
            flops = 2.0 * n * int(bmask.sum())
            meta = dict(density=density, block=block)
            b.add(case, "cuBLAS dense", b.low, lambda: xh @ wh.t(), None, 2.0 * n * m * m, **meta)
            Wb = BlockSparseMatrix.from_dense(wh, block, bmask)
            b.add(case, "sparsekern BSR (triton)", b.low,
                  _with_backend("bsr_linear", "triton", lambda: ops.bsr_linear(xh, Wb)), expected, flops,
                  "cuBLAS dense", op="bsr_linear", backend="triton", **meta)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)
                    w_bsr = wh.to_sparse_bsr((block, block))
                b.add(case, "torch BSR", b.low, lambda: (w_bsr @ xh.t()).t(), expected, flops, "cuBLAS dense", **meta)
            except Exception as exc:
                b.record(Row(case, "torch BSR", str(b.low).replace("torch.", ""), None,
                             note=f"{type(exc).__name__}: {exc}"[:100], **meta))
            _note_vs(b, case, "sparsekern BSR", "torch BSR")  # the BSR target compares against torch BSR too


def masked_case(b: Bench) -> None:
    """Fused masked matmul at density 1 must not lose more than 10 % to dense."""
    s, dev = b.sizes, b.device
    n, m = s.tokens, s.features
    full = torch.ones(m, m, dtype=torch.bool, device=dev)
    for dtype in (torch.float32, b.low):
        w = torch.randn(m, m, device=dev, dtype=dtype)
        x = torch.randn(n, m, device=dev, dtype=dtype)
        case = f"masked_matmul {m}x{m} N={n} d=1"
        b.add(case, "cuBLAS dense", dtype, lambda: x @ w.t(), None, 2.0 * n * m * m, density=1.0)
        for backend in _backends("masked_matmul", dev):
            b.add(case, f"sparsekern masked ({backend})", dtype,
                  _with_backend("masked_matmul", backend, lambda: ops.masked_matmul(x, w, full)), x @ w.t(),
                  2.0 * n * m * m, "cuBLAS dense", op="masked_matmul", backend=backend, density=1.0)


def _note_vs(b: Bench, case: str, ours: str, peer: str) -> None:
    """Add ``peer``'s time / ours to the notes of our rows of ``case``."""
    p = next((r for r in b.rows if r.case == case and r.impl == peer and r.ms), None)
    for r in b.rows:
        if r.case == case and r.impl.startswith(ours) and r.ms and p:
            r.note = f"{p.ms / r.ms:.2f}x vs {peer}"
    b.dump()


def conv_case(b: Bench, density: float = 0.1, block: int = 32) -> None:
    """ResNet-50's convolutions, one per stage: CSR fp32 vs cuDNN fp32, BSR bf16 vs cuDNN bf16."""
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
        b.add(case, "cuDNN dense", torch.float32, lambda: F.conv2d(x, w, None, stride, pad), None, dense_flops,
              density=density)
        W = SparseMatrix.from_dense(w, mask)
        for backend in _backends("sparse_conv2d", dev):
            b.add(case, f"sparsekern CSR ({backend})", torch.float32,
                  _with_backend("sparse_conv2d", backend, lambda: ops.sparse_conv2d(x, W, None, stride, pad)),
                  expected, dense_flops * density, "cuDNN dense", op="sparse_conv2d", backend=backend,
                  density=density)
        if cout % block == 0 and (cin * k * k) % block == 0:
            bmask = random_block_mask((cout, cin, k, k), density, block, g).to(dev)
            xh = x.to(b.low)
            wh = (torch.randn(cout, cin, k, k, device=dev) * bmask).to(b.low)
            case_b = case + f" block={block}"
            meta = dict(density=density, block=block)
            b.add(case_b, "cuDNN dense", b.low, lambda: F.conv2d(xh, wh, None, stride, pad), None,
                  dense_flops, **meta)
            Wb = BlockSparseMatrix.from_dense(wh, block, bmask)
            b.add(case_b, "sparsekern BSR (triton, im2col)", b.low,
                  _with_backend("bsr_linear", "triton", lambda: ops.bsr_conv2d(xh, Wb, None, stride, pad)),
                  F.conv2d(xh, wh, None, stride, pad), dense_flops * float(bmask.float().mean()), "cuDNN dense",
                  **meta)


def topk_case(b: Bench, fraction: float = 0.01) -> None:
    n, dev = b.sizes.topk_n, b.device
    scores = torch.randn(n, device=dev)
    k = int(fraction * n)
    case = f"topk n={n:.2g} k={fraction:.0%}"
    b.add(case, "torch.topk", torch.float32, lambda: torch.topk(scores, k, sorted=False).indices, None, 0.0)
    expected = torch.sort(torch.topk(scores, k).indices).values  # ascending, as topk_select returns them
    for backend in _backends("topk_select", dev):
        b.add(case, f"sparsekern topk_select ({backend})", torch.float32,
              _with_backend("topk_select", backend, lambda: ops.topk_select(scores, k)), expected, 0.0, "torch.topk",
              op="topk_select", backend=backend)


def _model(b: Bench, fmt: str, block: int = 32):
    """The training-step network (``fmt``: dense, csr or bsr at MODEL_DENSITY), an SGD optimizer, a batch."""
    from sparsekern.models import get_model
    s, dev = b.sizes, b.device
    torch.manual_seed(0)
    model = get_model(s.model, num_classes=1000, image_size=s.image).to(dev)
    if fmt != "dense":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "layers not multiples of the block stay CSR"
            sparsekern.sparsify(model, MODEL_DENSITY, format=fmt, block=block,
                                generator=torch.Generator().manual_seed(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(s.conv_batch, 3, s.image, s.image, device=dev)
    y = torch.randint(0, 1000, (s.conv_batch,), device=dev)
    return model, opt, x, y


def _train_step(model, opt, x, y, autocast: bool, after: Optional[Callable[[], object]] = None) -> Callable:
    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if after is not None:
            after()
    return step


def _model_label(b: Bench) -> str:
    name = {"resnet50": "ResNet-50", "resnet20": "ResNet-20"}.get(b.sizes.model, b.sizes.model)
    return f"{name} N={b.sizes.conv_batch} {b.sizes.image}x{b.sizes.image}"


def model_step_case(b: Bench, fmt: str, block: int = 32) -> None:
    """One training step (forward, backward, SGD) under bf16 autocast: dense (NCHW and channels_last)
    or sparse at MODEL_DENSITY, CSR or BSR. The notes say which dtype the layers ran in (or the error)."""
    case = f"{_model_label(b)} train step, bf16 autocast"
    impl = {"dense": "dense (cuDNN)", "csr": "sparsekern CSR", "bsr": f"sparsekern BSR-{block}"}[fmt]
    meta = dict(op="", density=None if fmt == "dense" else MODEL_DENSITY, block=block if fmt == "bsr" else None)
    ran_in: Dict[str, str] = {}

    def hook(module, inputs, output):
        ran_in.setdefault(type(module).__name__, str(output.dtype).replace("torch.", ""))
    layouts = (("", torch.contiguous_format), (" channels_last", torch.channels_last)) if fmt == "dense" else \
        (("", torch.contiguous_format),)
    for suffix, layout in layouts:
        label = impl.replace(" (", suffix + " (") if suffix else impl
        try:
            model, opt, x, y = _model(b, fmt, block)
            model, x = model.to(memory_format=layout), x.contiguous(memory_format=layout)
            for m in model.modules():
                if type(m).__name__ in ("Conv2d", "Linear", "SparseConv2d", "SparseLinear"):
                    m.register_forward_hook(hook)
            step = _train_step(model, opt, x, y, autocast=True)
            ms = b.time(step, b.sizes.step_warmup, b.sizes.step_reps)
            ran = ", ".join(f"{k} {v}" for k, v in sorted(ran_in.items()))
            # Sparse steps against the faster dense layout; channels_last dense against NCHW.
            b.record(Row(case, label, "bf16 autocast", ms, baseline="dense (cuDNN)" if fmt == "dense" else "dense",
                         note=f"ran in: {ran}", **meta))
        except Exception as exc:
            b.record(Row(case, label, "bf16 autocast", None, note=f"{type(exc).__name__}: {str(exc)[:120]}", **meta))
        finally:
            ran_in.clear()
            model = opt = None
            _free(b)


def dst_case(b: Bench, delta_t: int = DELTA_T) -> None:
    """A RigL update of the sparse (CSR) training-step network against one training step of it, under
    bf16 autocast as in model_step_case (in fp32 where that fails: the note says why)."""
    from sparsekern.dst import RigL
    case = f"DST RigL update, {_model_label(b)} d={MODEL_DENSITY}"
    meta = dict(density=MODEL_DENSITY)
    why = ""
    for autocast in (True, False):
        model = opt = rigl = None
        try:
            model, opt, x, y = _model(b, "csr")
            rigl = RigL(model, opt, total_steps=10 ** 6, delta_t=1, drop_fraction=0.3, end_fraction=1.0)
            with rigl.paused():
                step_ms = b.time(_train_step(model, opt, x, y, autocast), b.sizes.step_warmup, b.sizes.step_reps)
            update_ms = b.time(_train_step(model, opt, x, y, autocast, rigl.step), b.sizes.step_warmup,
                               b.sizes.step_reps) - step_ms
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:90]}"
            if autocast:
                why = f"fp32: under bf16 autocast {error}"
                continue
            b.record(Row(case, "RigL", "float32", None, note=error, **meta))
            return
        finally:
            model = opt = rigl = None
            _free(b)
        dtype = "bf16 autocast" if autocast else "float32"
        b.record(Row(case, "training step (sparse)", dtype, step_ms, note=why, **meta))
        b.record(Row(case, "RigL update (extra)", dtype, update_ms,
                     note=f"{update_ms / step_ms:.1%} of a step; {update_ms / step_ms / delta_t:.2%} amortized "
                          f"at delta_t={delta_t}", **meta))
        return


def _free(b: Bench) -> None:
    gc.collect()
    if b.device.type == "cuda":
        torch.cuda.empty_cache()


# name -> function(bench, densities, blocks): the order of a full run, the targets' cases first.
CASES: Dict[str, Callable[[Bench, Sequence[float], Sequence[int]], None]] = {
    "spmm": lambda b, d, bl: csr_case(b, d, "spmm"),
    "bsr": lambda b, d, bl: bsr_case(b, d, bl),
    "topk": lambda b, d, bl: topk_case(b),
    "resnet-dense": lambda b, d, bl: model_step_case(b, "dense"),
    "resnet-bsr": lambda b, d, bl: model_step_case(b, "bsr"),
    "dst": lambda b, d, bl: dst_case(b),
    "sddmm": lambda b, d, bl: sddmm_case(b, d),
    "masked": lambda b, d, bl: masked_case(b),
    "resnet-csr": lambda b, d, bl: model_step_case(b, "csr"),
    "linear": lambda b, d, bl: csr_case(b, d, "sparse_linear"),
    "conv": lambda b, d, bl: conv_case(b, block=16 if b.device.type == "cpu" else 32),
}


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
    wins = backend_wins([asdict(r) for r in b.rows])
    return "; ".join(f"{op}: " + ", ".join(f"{bk} fastest in {w['wins']}" for bk, w in v.items() if w["wins"])
                     for op, v in wins.items())


def header_info(b: Bench) -> dict:
    import importlib
    try:
        tv = importlib.import_module("triton").__version__
    except ImportError:
        tv = "not installed"
    cuda = b.device.type == "cuda"
    return {"command": " ".join(shlex.quote(a) for a in b.argv), "date": str(datetime.date.today()),
            "device_type": b.device.type,
            "device": torch.cuda.get_device_name(b.device) if cuda else
            f"CPU ({platform.processor() or platform.machine()}), TRITON_INTERPRET smoke run, not a measurement",
            "capability": ".".join(map(str, torch.cuda.get_device_capability(b.device))) if cuda else None,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": tv,
            "cuda_kernels_built": dispatch.cuda_kernels_built(), "cases": b.cases,
            "sizes_name": next((k for k, v in SIZES.items() if v == b.sizes), None), "sizes": asdict(b.sizes),
            "cuda_order": {op: list(order) for op, order in dispatch.CUDA_ORDER.items()}}


def header(b: Bench, argv: Sequence[str]) -> str:
    h = header_info(b)
    return (f"Command: `{' '.join(shlex.quote(a) for a in argv)}`  \n"
            f"Date: {h['date']}; device: {h['device']}; torch {h['torch']} (CUDA {h['cuda']}); "
            f"triton {h['triton']}; CUDA C++ kernels built: {h['cuda_kernels_built']}; "
            f"fp32 with TF32 off; medians of {b.sizes.reps} CUDA-event timings after {b.sizes.warmup} warmups "
            f"({b.sizes.step_reps} after {b.sizes.step_warmup} for training steps).")


def run(cases: Sequence[str] = tuple(CASES), sizes: str = "full", quick: bool = False,
        device: Optional[str] = None, densities: Optional[Sequence[float]] = None,
        blocks: Optional[Sequence[int]] = None, json_path: Optional[str] = None, argv: Sequence[str] = ()) -> Bench:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("sparsekern bench --gpu needs a CUDA GPU (or, for a smoke run of the harness, "
                           "TRITON_INTERPRET=1 set before import and --sizes tiny)")
    if dev.type == "cpu" and sizes != "tiny":
        raise RuntimeError("sparsekern bench --gpu on the CPU (interpreter) runs only --sizes tiny")
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise RuntimeError(f"cases must be among {tuple(CASES)}, got {unknown}")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b = Bench(dev, SIZES[sizes], json_path=json_path, argv=argv)
    densities = tuple(densities or (QUICK_DENSITIES if quick else DENSITIES))
    blocks = tuple(blocks or ((32,) if quick else BLOCKS))
    if dev.type == "cpu":  # tiny matrices: dense enough to hold nonzeros, blocks that fit
        densities, blocks = (0.5,), (16,)
    b.cases = [c for c in CASES if c in cases]
    for name in b.cases:
        b.group, b.started = name, time.time()
        b.dump()
        # The training-step cases need autograd; the op cases time forward kernels only.
        with torch.no_grad() if not name.startswith(("resnet", "dst")) else torch.enable_grad():
            CASES[name](b, densities, blocks)
        _free(b)
        b.done.append(name)
    b.group = ""
    b.dump()
    return b


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="sparsekern bench --gpu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=tuple(CASES))
    parser.add_argument("--sizes", choices=tuple(SIZES), default="full")
    parser.add_argument("--quick", action="store_true", help=f"densities {QUICK_DENSITIES} and block 32 only")
    parser.add_argument("--densities", type=float, nargs="+", default=None, help=f"default: {DENSITIES}")
    parser.add_argument("--blocks", type=int, nargs="+", default=None, help=f"BSR block sizes (default: {BLOCKS})")
    parser.add_argument("--device", default=None, help="cuda (default when present) or cpu (interpreter smoke run)")
    parser.add_argument("--output", default=None, help="also write the markdown to this file")
    parser.add_argument("--json", default=None, help="write the rows as JSON to this file, after every row")
    args = parser.parse_args(argv)
    full_argv = ["sparsekern", "bench", "--gpu", *(argv if argv is not None else sys.argv[1:])]
    try:
        b = run(args.cases, args.sizes, args.quick, args.device, args.densities, args.blocks, args.json, full_argv)
    except RuntimeError as exc:
        print(f"sparsekern bench --gpu: {exc}", file=sys.stderr)
        return 2
    text = header(b, full_argv) + "\n\n" + table(b) + "\n\nFastest backend per op: " + \
        (fastest_backends(b) or "one backend only") + "\n"
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
