"""Triton topk_select (triton_kernels/topk_select.py) against sparsekern.reference.topk_select: exact equality.

On CPU the kernels run under TRITON_INTERPRET=1 with 1024 scores per tile and at most 64 spans
(programs); `few_programs` lowers that so that small inputs still give spans of several tiles, with
ties at the threshold spread over several spans.
"""
import math

import pytest
import torch
from triton_testing import DEVICE, needs_gpu

import sparsekern.triton_kernels.topk_select as topk_mod
from sparsekern import reference

ops = torch.ops.sparsekern_triton
# No tl.dot: every float dtype runs under the interpreter.
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@pytest.fixture
def few_programs(monkeypatch):
    monkeypatch.setattr(topk_mod, "_MAX_PROGRAMS_CPU", 2)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def scores_of(kind, n, dtype, seed=0):
    g = gen(seed)
    if kind == "randn":
        x = torch.randn(n, generator=g, dtype=torch.float64)
    elif kind == "ties":  # five distinct values: thousands of ties at the threshold
        x = torch.randint(-2, 3, (n,), generator=g).double()
    elif kind == "specials":  # +-0, +-inf, subnormals (fp32), huge, mixed with normal values
        specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-40, -1e-40, 3e38, -3e38, 1.0, -1.0, 0.5],
                                dtype=torch.float64)
        x = torch.where(torch.rand(n, generator=g) < 0.6, specials[torch.randint(0, 11, (n,), generator=g)],
                        torch.randn(n, generator=g, dtype=torch.float64))
    elif kind == "negative":
        x = -torch.rand(n, generator=g, dtype=torch.float64) * 100 - 1
    return x.to(dtype).to(DEVICE)


def check(scores, k, largest=True, candidates=None):
    got = ops.topk_select(scores, k, largest, candidates)
    expected = reference.topk_select(scores, k, largest, candidates)
    assert got.dtype == torch.int64
    assert torch.equal(got, expected), (got, expected)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_random(dtype, largest):
    x = scores_of("randn", 2500, dtype)
    for k in (1, 777, 2499):
        check(x, k, largest)


@pytest.mark.parametrize("kind", ["ties", "specials", "negative"])
@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_value_kinds(kind, largest):
    x = scores_of(kind, 3000, torch.float32, seed=1)
    for k in (5, 1500):
        check(x, k, largest)


def test_signed_zeros_tie():
    """-0.0 and +0.0 are equal: the lower index wins whichever sign it carries."""
    x = torch.tensor([-0.0, 0.0, -0.0, 0.0, 1.0, -1.0], device=DEVICE)
    for k in (1, 3, 5):
        for largest in (True, False):
            check(x, k, largest)
    assert ops.topk_select(x, 2, True).tolist() == [0, 4]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_ties_and_specials(dtype):
    x = scores_of("specials", 2100, dtype, seed=2)
    for largest in (True, False):
        check(x, 1000, largest)
    check(scores_of("ties", 2100, dtype, seed=3), 700)


def test_spans_of_several_tiles(few_programs):
    """2 programs over 5 tiles: the ties taken at the threshold straddle spans and tiles."""
    x = scores_of("ties", 5000, torch.float32, seed=4)
    for k in (1, 900, 2600, 4999):
        check(x, k, True)
    cand = torch.rand(5000, generator=gen(5)) < 0.5
    check(x, 1200, False, cand.to(DEVICE))


@pytest.mark.parametrize("largest", [True, False], ids=["largest", "smallest"])
def test_candidates(largest):
    x = scores_of("specials", 2300, torch.float32, seed=6)
    cand = (torch.rand(2300, generator=gen(7)) < 0.3).to(DEVICE)
    n_cand = int(cand.sum())
    for k in (0, 1, n_cand // 2, n_cand):
        check(x, k, largest, cand)


def test_candidates_exclude_nan_and_k_above_count():
    x = scores_of("randn", 1500, torch.float32, seed=8)
    cand = (torch.rand(1500, generator=gen(9)) < 0.2).to(DEVICE)
    x[~cand] = math.nan  # not candidates: ignored
    check(x, 100, True, cand)
    # k >= the number of candidates: all of them
    assert torch.equal(ops.topk_select(x, 1500, True, cand), torch.nonzero(cand).flatten())
    assert ops.topk_select(x, 5, True, torch.zeros_like(cand)).numel() == 0


def test_k_zero_and_all():
    x = scores_of("randn", 1200, torch.float32)
    assert ops.topk_select(x, 0).shape == (0,)
    assert torch.equal(ops.topk_select(x, 1200, False), torch.arange(1200, device=DEVICE))
    check(x, 1199, False)
    assert ops.topk_select(x[:0], 0).shape == (0,)


def test_strided_inputs():
    x = scores_of("ties", 4000, torch.float32, seed=10)[::2]
    cand = (torch.rand(4000, generator=gen(11)) < 0.5).to(DEVICE)[1::2]
    check(x, 600, True, cand)
    check(x, 600, False)


@pytest.mark.parametrize("k", [0, 3, 1500, 2000])
def test_nan_raises(k):
    x = scores_of("randn", 2000, torch.float32, seed=12)
    x[1234] = math.nan
    with pytest.raises(ValueError, match="scores"):
        ops.topk_select(x, k)
    cand = torch.ones(2000, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="scores"):
        ops.topk_select(x, min(k, 1999), False, cand)


# ---- realistic shapes (GPU only) ----

@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_gpu_large(dtype):
    n = 25_000_000 if dtype == torch.float32 else 3_000_000
    x = scores_of("randn", n, dtype, seed=13)
    x[::7] = 0.5  # ties at many thresholds
    for k in (1, n // 10, n // 2):
        check(x, k, True)
    cand = torch.rand(n, device=DEVICE) < 0.3
    check(x.abs(), n // 20, False, cand)
