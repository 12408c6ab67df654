"""topk_select: indices (int64, ascending) of the k best scores among candidates, ties to the lower index.

Every available backend against sparsekern.reference.topk_select, and the reference itself against a
naive Python oracle.
"""
import math

import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import topk_select

from sk_testing import DTYPES, FUZZ, gen, make_input, seed_of, threads

OP = "topk_select"


def naive(scores, k, largest=True, candidates=None):
    """Sort (score, index) pairs in Python; -0.0 == 0.0 there, so ties go to the lower index."""
    s = scores.tolist()
    idx = [i for i in range(len(s)) if candidates is None or bool(candidates[i])]
    idx.sort(key=lambda i: ((-s[i] if largest else s[i]), i))
    return sorted(idx[:k])


def _scores(n, dtype, g, dist, layout):
    x = make_input((n,), dtype, g, layout)
    with torch.no_grad():
        if dist == "ties":  # few distinct values: many ties at the threshold
            x.copy_(torch.randint(-2, 3, (n,), generator=g).to(dtype))
        elif dist == "specials":  # +-0, +-inf, subnormals, huge values mixed with normal ones
            specials = torch.tensor([0.0, -0.0, math.inf, -math.inf, 1e-40, -1e-40, 1e-300, -1e-300,
                                     3e38, -3e38, 1.0, -1.0], dtype=torch.float64).to(dtype)
            pick = torch.randint(0, specials.numel(), (n,), generator=g)
            use = torch.rand(n, generator=g) < 0.6
            x.copy_(torch.where(use, specials[pick], x))
    return x


def _candidates(mode, n, g):
    if mode is None:
        return None
    if mode == "all-False":
        return torch.zeros(n, dtype=torch.bool)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=g)[: int(round(mode * n))]] = True
    return flat


def _check_result(idx, scores, k, candidates):
    assert idx.dtype == torch.int64
    assert idx.shape == (k,)
    if k:
        assert bool((idx[1:] > idx[:-1]).all()), "indices are not strictly ascending"
        assert 0 <= int(idx.min()) and int(idx.max()) < scores.numel()
        if candidates is not None:
            assert bool(candidates[idx].all()), "an index outside the candidates was selected"


@pytest.mark.parametrize("n", [0, 1, 7, 33, 1000])
@pytest.mark.parametrize("cand_mode", [None, 0.5, 0.9, 0.99, 1.0, "all-False"], ids=str)
@pytest.mark.parametrize("dist", ["normal", "ties", "specials"])
@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_forward(backend, n, cand_mode, dist, dtype, layout):
    g = gen(seed_of(OP, n, cand_mode, dist, dtype, layout))
    scores = _scores(n, dtype, g, dist, layout)
    candidates = _candidates(cand_mode, n, g)
    n_cand = n if candidates is None else int(candidates.sum())
    scores_before = scores.clone()
    for largest in (True, False):
        for k in sorted({0, min(1, n_cand), n_cand // 3, n_cand // 2, n_cand}):
            got = topk_select(scores, k, largest, candidates)
            expected = reference.topk_select(scores, k, largest, candidates)
            _check_result(got, scores, k, candidates)
            assert torch.equal(got, expected), f"k={k} largest={largest}"
    assert torch.equal(scores, scores_before), "topk_select modified scores"
    if n <= 33:  # the oracle itself against the naive one
        for largest in (True, False):
            assert reference.topk_select(scores, n_cand // 2, largest, candidates).tolist() == \
                naive(scores, n_cand // 2, largest, candidates)


@pytest.mark.parametrize(
    "scores,k,largest,candidates,expected",
    [
        ([1.0, 1.0, 1.0, 1.0], 2, True, None, [0, 1]),
        ([1.0, 1.0, 1.0, 1.0], 2, False, None, [0, 1]),
        ([3.0, 1.0, 3.0, 2.0, 3.0], 2, True, None, [0, 2]),
        ([3.0, 1.0, 3.0, 2.0, 3.0], 4, True, None, [0, 2, 3, 4]),
        ([2.0, 1.0, 1.0, 2.0, 1.0], 2, False, None, [1, 2]),
        ([-0.0, 0.0, -0.0, 0.0], 2, True, None, [0, 1]),
        ([0.0, -0.0, 0.0, -0.0], 1, False, None, [0]),
        ([1.0, -0.0, 0.0, -1.0], 2, True, None, [0, 1]),
        ([1.0, 0.0, -0.0, -1.0], 2, False, None, [1, 3]),
        ([math.inf, -math.inf, 0.0, math.inf, -math.inf], 2, True, None, [0, 3]),
        ([math.inf, -math.inf, 0.0, math.inf, -math.inf], 3, False, None, [1, 2, 4]),
        ([math.inf, math.inf, math.inf], 3, True, None, [0, 1, 2]),
        ([5.0, 4.0, 3.0, 2.0], 1, True, [False, True, True, True], [1]),
        ([5.0, 4.0, 3.0, 2.0], 1, False, [True, True, False, False], [1]),
        ([math.nan, 1.0, 2.0], 1, True, [False, True, True], [2]),  # NaN outside the candidates is fine
        ([4.0, 3.0], 0, True, [False, False], []),
        ([4.0, 3.0], 0, True, None, []),
        ([], 0, True, None, []),
        ([7.0], 1, False, None, [0]),
    ],
)
def test_exact_cases(backend, scores, k, largest, candidates, expected, dtype):
    s = torch.tensor(scores, dtype=dtype)
    c = None if candidates is None else torch.tensor(candidates, dtype=torch.bool)
    got = topk_select(s, k, largest, c)
    assert got.dtype == torch.int64
    assert got.tolist() == expected
    assert reference.topk_select(s, k, largest, c).tolist() == expected


def test_large_input_two_threads(backend, dtype):
    """Big enough for several parallel blocks in a multi-threaded kernel; ties across block boundaries."""
    g = gen(61)
    n = 200_003
    scores = torch.randint(0, 5, (n,), generator=g).to(dtype)
    scores[::7] = torch.randn(scores[::7].shape, generator=g, dtype=dtype)
    candidates = torch.rand(n, generator=g) < 0.8
    n_cand = int(candidates.sum())
    with threads(2):
        for largest, k, cand in [(True, n // 3, None), (False, n_cand // 2, candidates), (True, n_cand, candidates)]:
            got = topk_select(scores, k, largest, cand)
            assert torch.equal(got, reference.topk_select(scores, k, largest, cand)), f"largest={largest} k={k}"


def test_default_arguments(backend):
    s = torch.tensor([0.5, 2.0, -1.0, 2.0])
    assert topk_select(s, 2).tolist() == [1, 3]  # largest=True, candidates=None


# -- bad input ---------------------------------------------------------------------------

S = torch.tensor([1.0, 3.0, 2.0, 0.0])
TWO = torch.tensor([True, False, True, False])


@pytest.mark.parametrize(
    "args,exc,match",
    [
        ((S.reshape(2, 2), 1), ValueError, r"topk_select: scores must be 1-D, got shape \(2, 2\)"),
        ((torch.tensor(1.0), 1), ValueError, r"topk_select: scores must be 1-D"),
        ((torch.tensor([1, 2, 3]), 1), TypeError,
         r"topk_select: scores must be a floating-point tensor, got torch.int64"),
        ((S, 1.0), TypeError, r"topk_select: k must be an int, got float"),
        ((S, True), TypeError, r"topk_select: k must be an int, got bool"),
        ((S, -1), ValueError, r"topk_select: k must lie in \[0, 4\] \(the number of candidates\), got -1"),
        ((S, 5), ValueError, r"topk_select: k must lie in \[0, 4\] \(the number of candidates\), got 5"),
        ((S, 3, True, TWO), ValueError, r"topk_select: k must lie in \[0, 2\] \(the number of candidates\), got 3"),
        ((S, 1, True, torch.zeros(4, dtype=torch.bool)), ValueError, r"topk_select: k must lie in \[0, 0\]"),
        ((S, 1, True, torch.ones(5, dtype=torch.bool)), ValueError,
         r"topk_select: candidates must have 4 entries like scores, got 5"),
        ((S, 1, True, torch.ones(2, 2, dtype=torch.bool)), ValueError, r"topk_select: candidates must be 1-D"),
        ((S, 1, True, torch.ones(4)), TypeError, r"topk_select: candidates must be a bool tensor, got torch.float32"),
        ((S, 1, True, torch.ones(4, dtype=torch.bool, device="meta")), ValueError,
         r"topk_select: candidates is on meta but scores is on cpu"),
        ((S.tolist(), 1), TypeError, r"topk_select: scores must be a torch.Tensor, got list"),
    ],
    ids=["scores-2d", "scores-0d", "scores-int", "k-float", "k-bool", "k-negative", "k-too-large",
         "k-more-than-candidates", "k-no-candidates", "candidates-size", "candidates-2d", "candidates-float",
         "candidates-device", "scores-list"],
)
def test_bad_input(backend, args, exc, match):
    with pytest.raises(exc, match=match):
        topk_select(*args)


@pytest.mark.parametrize("where", [0, 3, 1999])
def test_nan_scores_raise(backend, where, dtype):
    """NaN among the candidates has no rank: an error naming scores and NaN (the reference raises
    ValueError; a cpp TORCH_CHECK raises RuntimeError)."""
    scores = torch.randn(2000, dtype=dtype, generator=gen(62))
    scores[where] = math.nan
    with pytest.raises((ValueError, RuntimeError), match=r"topk_select: scores contains NaN"):
        topk_select(scores, 5)
    candidates = torch.ones(2000, dtype=torch.bool)
    with pytest.raises((ValueError, RuntimeError), match=r"topk_select: scores contains NaN"):
        topk_select(scores, 0, False, candidates)
    candidates[where] = False  # the NaN is not a candidate: fine
    got = topk_select(scores, 5, False, candidates)
    assert torch.equal(got, reference.topk_select(scores, 5, False, candidates))


def test_bfloat16_on_cpp_is_a_type_error():
    with sparsekern.backend("cpp"):
        with pytest.raises(TypeError, match=r"topk_select: scores has dtype torch.bfloat16, which the cpp backend"):
            topk_select(torch.randn(8, dtype=torch.bfloat16), 2)


def test_float16_on_cpp_is_a_type_error():
    with sparsekern.backend("cpp"):
        with pytest.raises(TypeError, match=r"topk_select: scores has dtype torch.float16"):
            topk_select(torch.randn(8).half(), 2)


# -- property-based fuzz -----------------------------------------------------------------

_VALUES = st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, math.inf, -math.inf, 1e-40, 1e30]) | \
    st.floats(-1e6, 1e6, allow_nan=False, width=32)


@FUZZ
@given(data=st.data(), values=st.lists(_VALUES, max_size=60), dtype=st.sampled_from(DTYPES),
       largest=st.booleans(), use_candidates=st.booleans(), strided=st.booleans())
def test_fuzz(backend, data, values, dtype, largest, use_candidates, strided):
    n = len(values)
    if strided:
        scores = torch.zeros(2 * n, dtype=dtype)[::2]
        scores.copy_(torch.tensor(values, dtype=torch.float64).to(dtype))
    else:
        scores = torch.tensor(values, dtype=torch.float64).to(dtype)
    candidates = None
    if use_candidates:
        candidates = torch.tensor(data.draw(st.lists(st.booleans(), min_size=n, max_size=n)), dtype=torch.bool)
    n_cand = n if candidates is None else int(candidates.sum())
    k = data.draw(st.integers(0, n_cand))
    got = topk_select(scores, k, largest, candidates)
    _check_result(got, scores, k, candidates)
    assert torch.equal(got, reference.topk_select(scores, k, largest, candidates))
    assert got.tolist() == naive(scores, k, largest, candidates)
