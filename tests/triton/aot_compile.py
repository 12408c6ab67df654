"""Ahead-of-time compile of every Triton kernel in triton_kernels/ for real GPU targets, without a GPU.

    python tests/triton/aot_compile.py [--arch 90 80] [--all-configs] [--jobs N] [--only NAME ...] [--list]

The CPU tests run the kernels through Triton's interpreter (TRITON_INTERPRET=1), which never lowers
them to TTGIR/LLVM/PTX: a type error in a branch, a tl.dot shape or dtype that the tensor-core
lowering refuses, an unsupported layout conversion, or a constexpr combination that only a GPU
launch produces goes unnoticed there. This script runs the real compiler pipeline (through ptxas)
with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` over the kernel x data
dtype x constexpr combination x autotune config variants of the table below, prints one line per
variant (the time is CPU seconds, ptxas included)

    OK  sm90 bsr_linear fp16 B=64 PRECISION=tf32 ... | BLOCK_N=128 w4 s3 | smem=49156 wgmma 0.3s
    ERR sm80 bsr_linear ... | CompilationError: <message>   (+ the source context, once per kernel and message)

and a summary line, and exits 1 if any variant failed. What is compiled:

* Signatures mirror what the JIT launcher specializes: pointers carry the data dtype (``T``) or their
  index dtype, runtime ints are i32, pointers and ints get ``tt.divisibility`` 16, and the strides the
  launchers pass as 1 (contiguous tensors) are ``constexpr 1``, as the JIT makes them.
* Constexprs: each table entry holds the values its launcher passes. ``tile`` axes change tile shapes
  or the dot's precision (the BSR block, the conv group width, PRECISION / DOT_F32); ``paths`` axes
  select code paths (HAS_BIAS, TRANSPOSED, padding / stride, index dtypes, BIG, the stride-1 layouts
  of the forward and backward calls, ...) and are varied one at a time from their first values, with
  the first tile combination and the first config.
* Autotune configs come from the kernel's ``triton.autotune`` object: this process runs without
  TRITON_INTERPRET, so they are the module's full lists (the interpreter keeps the first only).

Default selection (the CI test; about 170 variants, ~95 CPU-seconds):
  - first arch (sm_90): every autotune config once in 16 bits, config i paired with tile combination
    i (every tile value once); the tl.dot kernels alternate fp16 / bf16 between configs, the others
    sweep in fp16 (bf16 gets their first config). fp32 (and fp64 for topk): the first config, every
    tile value once. Path variants: fp16.
  - other archs (sm_80): every kernel and dtype with its first config and first tile combination.
``--all-configs`` (exhaustive, ~1300 variants): every tile combination x every config for every dtype
and arch, path variants for every dtype and arch.

Shared memory: a variant above the target's limit is marked ``over-smem`` (the autotuner drops such a
config at run time); it is an ERR when every config of a tile combination is over (checked when all
were compiled, i.e. with --all-configs) or when a kernel without autotune is.

Every kernel argument must be covered by the table: when a kernel gains, loses or reorders an argument
(or a constexpr the table does not set), an ERR line names the kernel and the arguments to add to or
drop from its entry, and that kernel's variants are skipped. Compiled kernels go to Triton's cache
(TRITON_CACHE_DIR): a rerun with a warm cache is fast; the test uses a fresh one.
"""
from __future__ import annotations

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # before triton / the kernels are imported: real @triton.jit objects

import argparse  # noqa: E402
import itertools  # noqa: E402
import multiprocessing  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from concurrent.futures import ProcessPoolExecutor, as_completed  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Dict, List, Optional, Sequence, Tuple  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from sparsekern.triton_kernels import _common, bsr, gather, masked_matmul, sddmm, sparse_conv2d, spmm, topk_select  # noqa: E402

SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}  # opt-in max per block (bytes)
FLOATS = ("fp16", "bf16", "fp32")
SWEEP_DTYPES = ("fp16", "bf16")  # the dtypes of the default run's sweep over the autotune configs
NBITS = {"fp16": 16, "bf16": 16, "fp32": 32, "fp64": 64}

Axis = Any  # a list of alternatives (each a dict of settings), or a callable(dtype) -> such a list


def ax(name: str, *values) -> List[dict]:
    """An axis over one constexpr (or runtime-argument specialization): [{name: v} for v in values]."""
    return [{name: v} for v in values]


def precision(dt: str) -> List[dict]:
    """PRECISION of tl.dot as _common.precision() picks it: fp32 follows torch's matmul precision
    ("ieee" under "highest", the default, else "tf32"); 16-bit inputs always get "tf32" (ignored)."""
    return ax("PRECISION", "ieee", "tf32") if dt == "fp32" else ax("PRECISION", "tf32")


def index_dtypes(*ptrs: str) -> List[dict]:
    """Index pointer dtypes: SparseMatrix's (row_ptr int64, col_idx int32) first, then all-int32 and
    all-int64 (the raw ops and their tests take either). ``ptrs`` = (row pointer arg, column arg)."""
    row, col = ptrs
    return [{row: "*i64", col: "*i32"}, {row: "*i32", col: "*i32"}, {row: "*i64", col: "*i64"}]


def _resolve(axis: Axis, dt: str) -> List[dict]:
    return list(axis(dt) if callable(axis) else axis)


def _merge(dicts: Sequence[dict]) -> dict:
    out: dict = {}
    for d in dicts:
        out.update(d)
    return out


@dataclass
class Entry:
    """One kernel of the table.

    sig:    every runtime argument in order, "name:type" (``T`` = the data dtype), bare "name" = i32.
    fixed:  constexprs the launcher always passes the same way, and runtime args it passes as 1
            (specialized to constexpr 1 by the JIT).
    tile:   axes crossed with each other and with the autotune configs.
    paths:  axes varied one at a time (first alternative of each = the base), first config only.
            In any axis a runtime argument may be given a type ("i64", "*i32") or the value 1.
    launch: num_warps / num_stages of a kernel without autotune.
    """
    name: str
    kernel: Any
    sig: str
    fixed: Dict[str, Any] = field(default_factory=dict)
    tile: List[Axis] = field(default_factory=list)
    paths: List[Axis] = field(default_factory=list)
    dtypes: Tuple[str, ...] = FLOATS
    launch: Optional[Dict[str, int]] = None

    @property
    def jit(self) -> JITFunction:
        k = self.kernel
        while not isinstance(k, JITFunction):
            k = k.fn
        return k

    @property
    def uses_dot(self) -> bool:
        return "tl.dot(" in self.jit.src

    @property
    def configs(self) -> list:
        if isinstance(self.kernel, Autotuner):
            return list(self.kernel.configs)
        return [triton.Config({}, **(self.launch or {}))]

    def tiles(self, dt: str, diagonal: bool = False) -> List[dict]:
        """Tile combinations (with the base path settings): the product of the tile axes, or with
        ``diagonal`` only as many as the longest axis has values, every value of every axis once
        (combination i takes value i of every axis, cyclically)."""
        axes = [_resolve(a, dt) for a in self.tile] or [[{}]]
        base = _merge(alts[0] for alts in (_resolve(a, dt) for a in self.paths))
        if diagonal:
            n = max(len(a) for a in axes)
            combos = [[a[i % len(a)] for a in axes] for i in range(n)]
        else:
            combos = list(itertools.product(*axes))
        return [{**_merge(c), **base} for c in combos]

    def path_variants(self, dt: str) -> List[dict]:
        """The first tile combination with one path axis at a time set to each of its other values."""
        tile0 = _merge(_resolve(a, dt)[0] for a in self.tile)
        paths = [_resolve(a, dt) for a in self.paths]
        out = []
        for i, alts in enumerate(paths):
            others = _merge(a[0] for j, a in enumerate(paths) if j != i)
            out += [{**tile0, **others, **alt} for alt in alts[1:]]
        return out

    def combos(self, dt: str) -> List[dict]:
        """Every constexpr combination of the table for dtype dt (tile product and path variants)."""
        return self.tiles(dt) + self.path_variants(dt)


C = sparse_conv2d
# Conv geometries (KH, KW, SH, SW, PH, PW, DH, DW): the kernel branches on PH > 0, PW > 0 and, when
# TRANSPOSED, SH > 1 and SW > 1. 3x3/s1/p1 first (the base), then 1x1/s1/p0, 3x3/s2/p1 and an
# asymmetric one (padding and stride on one side only, dilation).
GEOMS = [dict(KH=kh, KW=kw, SH=sh, SW=sw, PH=ph, PW=pw, DH=dh, DW=dw) for kh, kw, sh, sw, ph, pw, dh, dw in
         [(3, 3, 1, 1, 1, 1, 1, 1), (1, 1, 1, 1, 0, 0, 1, 1), (3, 3, 2, 2, 1, 1, 1, 1), (1, 3, 1, 2, 0, 2, 1, 2)]]
FWD, FWD_NO_BIAS, BWD_INPUT = (dict(TRANSPOSED=False, HAS_BIAS=True), dict(TRANSPOSED=False, HAS_BIAS=False),
                               dict(TRANSPOSED=True, HAS_BIAS=False))  # backward_input has no bias
# (mode, geometry) pairs of _conv_kernel that take different branches: forward with PH = PW = 0 and
# PH = 0 < PW; backward_input with SH = SW = 1, SH = SW = 2 and SH = 1 < SW; the forward without bias.
CONV_PATHS = ([{**FWD, **GEOMS[0]}] + [{**FWD, **g} for g in (GEOMS[1], GEOMS[3])]
              + [{**BWD_INPUT, **g} for g in (GEOMS[0], GEOMS[2], GEOMS[3])] + [{**FWD_NO_BIAS, **GEOMS[0]}])
GROUPS = ax("BLOCK_CO", 16, 32, 64, 128)  # _group_size()


def conv_dot(dt: str) -> List[dict]:
    """DOT_F32 / DOT_PREC as the conv launchers set them on a GPU (_dot_f32, precision)."""
    return [{"DOT_F32": dt == "fp32", "DOT_PREC": p["PRECISION"]} for p in precision(dt)]


def topk_levels(dt: str) -> List[int]:
    return list(range(NBITS[dt] // topk_select._RADIX))  # one histogram pass per 8-bit digit


def topk_tile(dt: str, last: bool = True) -> List[dict]:
    """NBITS of the dtype, with the first and the last level (LEVEL == 0 and > 0 take different
    branches; LAST: the last level, for _select_kernel); the levels between are path variants."""
    lv = topk_levels(dt)
    return [dict(NBITS=NBITS[dt], LEVEL=level, **({"LAST": level == lv[-1]} if last else {}))
            for level in sorted({lv[0], lv[-1]})]


def topk_mid(dt: str, last: bool = True) -> List[dict]:
    return [{}] + [dict(LEVEL=level, **({"LAST": False} if last else {})) for level in topk_levels(dt)[1:-1]]


TOPK_CAND = [{"HAS_CAND": False, "cand_ptr": "*T", "stride_c": "i32"},  # no candidates: scores stand in, stride 0
             {"HAS_CAND": True, "cand_ptr": "*u8", "stride_c": 1}]  # bool mask viewed as uint8

TABLE: List[Entry] = [
    Entry("masked_matmul", masked_matmul._masked_matmul_kernel,
          "x_ptr:*T w_ptr:*T mask_ptr:*u8 kidx_ptr:*i32 kcnt_ptr:*i32 y_ptr:*T N M K KB "
          "stride_xn stride_xk stride_wm stride_wk stride_mm stride_mk stride_yn stride_ym",
          fixed=dict(BLOCK_M=masked_matmul.OCC_BLOCK[0], BLOCK_K=masked_matmul.OCC_BLOCK[1], GROUP=8, stride_ym=1),
          tile=[precision],
          # forward: x, weight, mask row-major; dx: weight.t(), mask.t(); masked_sddmm's backward: x = Y.t() / X.t()
          paths=[[dict(stride_xk=1), dict(stride_xn=1)],
                 [dict(stride_wk=1, stride_mk=1), dict(stride_wm=1, stride_mm=1)]]),
    Entry("masked_sddmm", masked_matmul._masked_sddmm_kernel,
          "x_ptr:*T y_ptr:*T mask_ptr:*u8 occ_ptr:*i8 out_ptr:*T M K D KB "
          "stride_xm stride_xd stride_yk stride_yd stride_mm stride_mk stride_om stride_ok",
          fixed=dict(BLOCK_M=masked_matmul.OCC_BLOCK[0], BLOCK_K=masked_matmul.OCC_BLOCK[1], GROUP=8, stride_mk=1,
                     stride_ok=1),
          tile=[precision],
          paths=[[dict(stride_xd=1, stride_yd=1), dict(stride_xm=1, stride_yk=1)]]),  # forward; dW = (grad.t(), x.t())
    Entry("bsr_linear", bsr._bsr_linear_kernel,
          "x_ptr:*T v_ptr:*T row_ptr:*i64 col_ptr:*i32 bias_ptr:*T y_ptr:*T N M K MB "
          "stride_xn stride_xk stride_vp stride_vi stride_vj stride_yn stride_ym",
          fixed=dict(stride_xk=1, stride_ym=1),
          tile=[ax("B", 16, 32, 64), precision],
          paths=[ax("HAS_BIAS", True, False), [dict(stride_vj=1), dict(stride_vi=1)],  # backward: values^T views
                 index_dtypes("row_ptr", "col_ptr")]),
    Entry("bsr_sddmm", bsr._bsr_sddmm_kernel,
          "x_ptr:*T y_ptr:*T rows_ptr:*i32 col_ptr:*i32 out_ptr:*T D stride_xm stride_xd stride_yk stride_yd",
          tile=[ax("B", 16, 32, 64), precision],
          paths=[[dict(stride_xm=1, stride_yk=1), dict(stride_xd=1, stride_yd=1)],  # dW (grad.t(), x.t()); row-major
                 ax("col_ptr", "*i32", "*i64")]),
    Entry("csr_rows(spmm/sparse_linear)", spmm._csr_rows_kernel,
          "values_ptr:*T row_ptr_ptr:*i64 col_idx_ptr:*i32 order_ptr:*i64 b_ptr:*T bias_ptr:*T out_ptr:*T "
          "M N stride_bk stride_bn stride_om stride_on ROW_LEN_BUCKET",
          fixed=dict(stride_bn=1),  # the launcher makes B row-major
          paths=[[dict(HAS_BIAS=False, stride_on=1),  # spmm
                  dict(HAS_BIAS=True, stride_om=1), dict(HAS_BIAS=False, stride_om=1)],  # sparse_linear: y^T
                 index_dtypes("row_ptr_ptr", "col_idx_ptr")]),
    Entry("sddmm", sddmm._sddmm_kernel,
          "row_ptr_ptr:*i64 col_idx_ptr:*i32 x_ptr:*T y_ptr:*T out_ptr:*T M NNZ D n_search "
          "stride_xm stride_xd stride_ym stride_yd",
          fixed=dict(stride_xd=1, stride_yd=1),  # the launcher makes X, Y row-major
          paths=[index_dtypes("row_ptr_ptr", "col_idx_ptr")]),
    Entry("gather", gather._gather_kernel, "src_ptr:*T index_ptr:*i64 out_ptr:*T n stride_src",
          fixed=dict(BLOCK=gather._BLOCK), launch=dict(num_warps=4),
          paths=[ax("stride_src", 1, "i32")]),
    Entry("sparse_conv2d(fwd/bwd_input)", C._conv_kernel,
          "src_ptr:*T w_ptr:*T cols_ptr:*i32 cnt_ptr:*i32 bias_ptr:*T out_ptr:*T P ROWS KC SRC_H SRC_W OUT_H OUT_W "
          "s_n s_c s_h s_w o_n o_c o_h o_w",
          tile=[GROUPS, conv_dot],
          paths=[CONV_PATHS,
                 [dict(s_w=1, o_w=1), dict(s_c=1, o_c=1)],  # NCHW; channels_last
                 [dict(BIG=False), dict(BIG=True, s_n="i64", o_n="i64")]]),
    Entry("sparse_conv2d_wgrad", C._wgrad_kernel,
          "go_ptr:*T x_ptr:*T cols_ptr:*i32 cnt_ptr:*i32 idx_ptr:*i32 part_ptr:*fp32 M ROWS KC NNZ M_PER_SPLIT "
          "H W OH OW g_n g_c g_h g_w x_n x_c x_h x_w",
          tile=[GROUPS, conv_dot],
          paths=[[GEOMS[0], GEOMS[1], GEOMS[3]],  # the branches: PH = PW > 0, PH = PW = 0, PH = 0 < PW
                 [dict(g_w=1, x_w=1), dict(g_c=1, x_c=1)],
                 [dict(BIG=False), dict(BIG=True, g_n="i64", x_n="i64")]]),
    Entry("topk_hist", topk_select._hist_kernel,
          "scores_ptr:*T cand_ptr:*T state_ptr:*i64 hist_ptr:*i32 totals_ptr:*i32 gt_ptr:*i64 n span G "
          "stride_s stride_c",
          fixed=dict(BLOCK=topk_select._BLOCK, stride_s=1),
          tile=[lambda dt: topk_tile(dt, last=False)],
          paths=[lambda dt: topk_mid(dt, last=False), ax("LARGEST", True, False), TOPK_CAND],
          dtypes=FLOATS + ("fp64",), launch=dict(num_warps=topk_select._WARPS)),
    Entry("topk_select", topk_select._select_kernel,
          "state_ptr:*i64 hist_ptr:*i32 totals_ptr:*i32 gt_ptr:*i64 off_ptr:*i64 take_ptr:*i64 cnt_ptr:*i64 G",
          fixed=dict(BLOCK_G=topk_select._BLOCK_G),
          tile=[topk_tile], paths=[topk_mid],
          dtypes=FLOATS + ("fp64",), launch=dict(num_warps=8)),
    Entry("topk_write", topk_select._write_kernel,
          "scores_ptr:*T cand_ptr:*T state_ptr:*i64 off_ptr:*i64 take_ptr:*i64 cnt_ptr:*i64 out_ptr:*i64 n span "
          "stride_s stride_c",
          fixed=dict(BLOCK=topk_select._BLOCK, stride_s=1),
          tile=[lambda dt: [dict(NBITS=NBITS[dt])]],
          paths=[ax("LARGEST", True, False), TOPK_CAND],
          dtypes=FLOATS + ("fp64",), launch=dict(num_warps=topk_select._WARPS)),
]


# ---------------------------------------------------------------------------------------------
# Table checks and variant expansion
# ---------------------------------------------------------------------------------------------

def _parse_sig(sig: str) -> Dict[str, str]:
    out = {}
    for item in sig.split():
        name, _, ty = item.partition(":")
        out[name] = ty or "i32"
    return out


def check_entry(e: Entry) -> List[str]:
    """Problems of entry ``e`` against its kernel's actual parameters (empty list: consistent)."""
    fn = e.jit
    params = {p.name: p for p in fn.params}
    runtime = _parse_sig(e.sig)
    where = f"table entry {e.name!r} ({fn.__name__} in {fn.fn.__module__})"
    problems = []
    sig_order = [n for n in fn.arg_names if not params[n].is_constexpr]
    if list(runtime) != sig_order:
        missing = [n for n in sig_order if n not in runtime]
        extra = [n for n in runtime if n not in sig_order]
        if missing or extra:
            problems.append(f"{where}: runtime arguments out of date: add {missing} / drop {extra} "
                            f"(kernel's runtime args: {' '.join(sig_order)})")
        else:
            problems.append(f"{where}: runtime arguments out of order, kernel has: {' '.join(sig_order)}")
    constexprs = [n for n in fn.arg_names if params[n].is_constexpr]
    for dt in e.dtypes:
        for combo in e.combos(dt):
            for cfg in e.configs:
                given = {**e.fixed, **combo, **cfg.kwargs}
                unknown = [n for n in given if n not in params]
                missing = [n for n in constexprs if n not in given]
                bad_rt = [n for n, v in given.items() if n in runtime and not (v == 1 or isinstance(v, str))]
                if unknown or missing or bad_rt:
                    problems.append(f"{where}, {dt} {combo} {cfg.kwargs}: constexprs the table does not give: "
                                    f"{missing}; names that are not kernel arguments: {unknown}; runtime args set "
                                    f"to something other than 1 or a type: {bad_rt}")
                    return problems
    return problems


@dataclass
class Variant:
    entry: int
    arch: int
    dtype: str
    combo: dict
    cfg_index: int
    all_cfgs: bool  # this (entry, arch, dtype, combo) compiles every autotune config

    @property
    def e(self) -> Entry:
        return TABLE[self.entry]

    def compile_args(self):
        """(signature, constexprs, attrs, options) for triton.compile."""
        e = self.e
        cfg = e.configs[self.cfg_index]
        given = {**e.fixed, **self.combo, **cfg.kwargs}
        runtime = _parse_sig(e.sig)
        types = {n: val for n, val in given.items() if n in runtime and isinstance(val, str)}
        consts = {n: val for n, val in given.items() if n not in types}
        sig, attrs = {}, {}
        for i, name in enumerate(e.jit.arg_names):
            if name in consts:
                sig[name] = "constexpr"
                continue
            ty = types.get(name, runtime[name])
            sig[name] = self.dtype if ty == "T" else ty.replace("*T", "*" + self.dtype)
            if sig[name].startswith("*") or sig[name] in ("i32", "i64"):
                attrs[(i,)] = [["tt.divisibility", 16]]  # 16-byte aligned pointers, sizes multiple of 16
        options = {"num_warps": cfg.num_warps}
        if cfg.num_stages is not None:
            options["num_stages"] = cfg.num_stages
        return sig, consts, attrs, options

    def key(self) -> tuple:
        sig, consts, attrs, options = self.compile_args()
        return (self.entry, self.arch, tuple(sig.items()), tuple(sorted(consts.items())), tuple(options.items()))

    def group(self) -> tuple:
        return (self.entry, self.arch, self.dtype, tuple(self.combo.items()))

    def label(self) -> str:
        cfg = self.e.configs[self.cfg_index]
        kw = " ".join(f"{k}={v}" for k, v in cfg.kwargs.items())
        knobs = f"w{cfg.num_warps}" + (f" s{cfg.num_stages}" if cfg.num_stages is not None else "")
        combo = " ".join(f"{k}={v}" for k, v in self.combo.items())
        return f"sm{self.arch} {self.e.name} {self.dtype} {combo} | {(kw + ' ') if kw else ''}{knobs}"


def expand(archs: Sequence[int], all_configs: bool, only: Sequence[str], skip=()) -> List[Variant]:
    """The variants to compile (see the module docstring), without duplicates: a kernel whose
    signature does not involve the data dtype (topk_select) compiles once per NBITS."""
    out, seen = [], set()
    for ei, e in enumerate(TABLE):
        if ei in skip or (only and not any(o in e.name or o == e.jit.__name__ for o in only)):
            continue
        n_cfg = len(e.configs)
        for ai, arch in enumerate(archs):
            for di, dt in enumerate(e.dtypes):
                if all_configs:  # every tile combination x every config
                    pairs = [(t, ci) for t in e.tiles(dt) for ci in range(n_cfg)]
                elif ai == 0 and dt in SWEEP_DTYPES:
                    # Every config and every tile value once in 16 bits: config i with tile combination i,
                    # the dot kernels alternating fp16 / bf16 (same lowering but for the MMA operand type),
                    # the others in fp16 (bf16 only changes their conversions: its first config covers it).
                    tiles = e.tiles(dt, diagonal=True)
                    n = max(len(tiles), n_cfg)
                    k = SWEEP_DTYPES.index(dt)
                    idx = ([i for i in range(n) if i % len(SWEEP_DTYPES) == k] if e.uses_dot else
                           range(n) if k == 0 else []) or [0]
                    pairs = [(tiles[i % len(tiles)], i % n_cfg) for i in idx]
                elif ai == 0:  # the first config, every tile value once
                    pairs = [(t, 0) for t in e.tiles(dt, diagonal=True)]
                else:  # other archs: the first config and tile combination
                    pairs = [(e.tiles(dt)[0], 0)]
                if all_configs or (ai == 0 and di == 0):  # code paths: first arch and dtype by default
                    pairs += [(c, 0) for c in e.path_variants(dt)]
                for combo, ci in pairs:
                    v = Variant(ei, arch, dt, combo, ci, False)
                    key = v.key()
                    if key not in seen:
                        seen.add(key)
                        out.append(v)
    # Which (entry, arch, dtype, combo) groups compile every config (for the shared-memory check).
    count: Dict[tuple, int] = {}
    for v in out:
        count[v.group()] = count.get(v.group(), 0) + 1
    for v in out:
        v.all_cfgs = len(v.e.configs) > 1 and count[v.group()] == len(v.e.configs)
    return out


def _cpu() -> float:
    """CPU seconds of this process and its finished children (ptxas): a compile's cost, whatever the load."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


Result = Tuple[bool, Optional[int], str, str, float]  # ok, shared memory bytes, OK/ERR line, detail, CPU s


def compile_variant(v: Variant) -> Result:
    """Compile one variant; every failure is reported in the result, never raised."""
    t0 = _cpu()
    try:
        sig, consts, attrs, options = v.compile_args()
        k = triton.compile(ASTSource(v.e.jit, sig, consts, attrs), target=GPUTarget("cuda", v.arch, 32),
                           options=options)
        smem = k.metadata.shared
        ptx = k.asm["ptx"]
        mma = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "no-mma"
        over = " over-smem" if smem > SMEM_LIMIT.get(v.arch, 99 * 1024) else ""
        cpu = _cpu() - t0
        return True, smem, f"OK  {v.label()} | smem={smem}{over} {mma} {cpu:.1f}s", "", cpu
    except Exception as exc:  # noqa: BLE001 - every compile failure is reported, not raised
        msg = str(exc).strip() or type(exc).__name__
        lines = [ln for ln in msg.splitlines() if ln.strip()]
        summary = next((ln for ln in reversed(lines) if ln.strip() and not ln.startswith(" ")), lines[-1] if lines
                       else "")
        detail = "\n".join("    | " + ln for ln in (lines[:40] or traceback.format_exc().splitlines()[-10:]))
        return False, None, f"ERR {v.label()} | {type(exc).__name__}: {summary[:300]}", detail, _cpu() - t0


def _run_one(i: int):
    return i, compile_variant(_VARIANTS[i])


_VARIANTS: List[Variant] = []


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="compute capabilities (default: 90 80)")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config for every dtype and arch")
    ap.add_argument("--jobs", "-j", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--only", nargs="+", default=[], help="table entries whose name contains one of these")
    ap.add_argument("--list", action="store_true", help="print the variants without compiling")
    args = ap.parse_args(argv)

    if _common.INTERPRET or not isinstance(TABLE[0].jit, JITFunction):
        print("ERR setup: the kernels were imported under TRITON_INTERPRET=1 (interpreter functions); "
              "run without it", flush=True)
        return 1
    t_start = time.time()
    errors = 0
    bad = set()
    for ei, e in enumerate(TABLE):
        for p in check_entry(e):
            print(f"ERR {p}", flush=True)
            errors += 1
            bad.add(ei)
    global _VARIANTS
    _VARIANTS = expand(args.arch, args.all_configs, args.only, skip=bad)
    if args.list:
        for v in _VARIANTS:
            print(v.label())
        print(f"{len(_VARIANTS)} variants")
        return 0

    results: Dict[int, Result] = {}
    detailed = set()

    def report(i: int) -> None:
        line, detail = results[i][2:4]
        print(line, flush=True)
        key = (_VARIANTS[i].entry, line.rpartition(" | ")[2])
        if detail and key not in detailed:  # the source context once per kernel and error message
            detailed.add(key)
            print(detail, flush=True)

    # The slowest kernels first (conv, fp32) so that the two workers finish together.
    order = sorted(range(len(_VARIANTS)), key=lambda i: (-(_VARIANTS[i].dtype == "fp32"),
                                                         -("conv" in _VARIANTS[i].e.name), i))
    if args.jobs > 1:
        ctx = multiprocessing.get_context("fork")  # workers inherit the table (and the imported kernels)
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_run_one, i): i for i in order}
            for f in as_completed(futures):
                i = futures[f]
                try:
                    results[i] = f.result()[1]
                except Exception as exc:  # noqa: BLE001 - a worker that died (crash in the compiler)
                    results[i] = (False, None, f"ERR {_VARIANTS[i].label()} | worker failed: "
                                               f"{type(exc).__name__}: {exc}", "", 0.0)
                report(i)
    else:
        for i in order:
            results[i] = compile_variant(_VARIANTS[i])
            report(i)

    # Shared memory: a tile combination whose every autotune config is over the limit cannot launch;
    # nor can an over-limit kernel without autotune.
    groups: Dict[tuple, List[int]] = {}
    for i, v in enumerate(_VARIANTS):
        groups.setdefault(v.group(), []).append(i)
    for (ei, arch, dt, combo), idx in groups.items():
        e = TABLE[ei]
        smems = [results[i][1] for i in idx]
        if any(s is None for s in smems):
            continue
        limit = SMEM_LIMIT.get(arch, 99 * 1024)
        autotuned = isinstance(e.kernel, Autotuner)
        if (_VARIANTS[idx[0]].all_cfgs or not autotuned) and all(s > limit for s in smems):
            print(f"ERR sm{arch} {e.name} {dt} {' '.join(f'{k}={v}' for k, v in combo)} | no "
                  f"{'autotune config' if autotuned else 'launch'} fits in shared memory "
                  f"(min {min(smems)} > {limit} bytes)", flush=True)
            errors += 1

    n_err = errors + sum(not r[0] for r in results.values())
    n_ok = sum(r[0] for r in results.values())
    cpu = sum(r[4] for r in results.values())
    print(f"\n{n_ok} OK, {n_err} ERR, {len(_VARIANTS)} variants (archs {args.arch}, "
          f"{'all configs' if args.all_configs else 'default configs'}) in {time.time() - t_start:.0f}s, "
          f"{cpu:.0f} CPU-s of compiling", flush=True)
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
