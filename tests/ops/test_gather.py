"""gather: out[i] = src[index[i]] (W^T's values through the transpose permutation in backward)."""
import pytest
import torch
from hypothesis import given, strategies as st

import sparsekern
from sparsekern import reference
from sparsekern.ops import gather

from sk_testing import DTYPES, FUZZ, LAYOUTS, gen, make_input, seed_of, threads

OP = "gather"


@pytest.mark.parametrize("n_src,n_out", [(0, 0), (1, 1), (1, 5), (37, 37), (1000, 1000), (70000, 50000)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_reference(backend, n_src, n_out, dtype, layout):
    g = gen(seed_of(n_src, n_out, str(dtype), layout))
    src = make_input((n_src,), dtype, g, layout)
    if n_out == n_src:  # a permutation, as in backward
        index = torch.randperm(n_src, generator=g)
    else:  # repeated indices
        index = torch.randint(0, max(n_src, 1), (n_out,), generator=g)
    out = gather(src, index)
    assert out.dtype == dtype and out.shape == (n_out,)
    assert torch.equal(out, reference.gather(src, index))


# Sources below and above the 1.5 MB from which the kernel prefetches (300K float32: 1.2 MB; 500K: 2 MB; 300K
# float64: 2.4 MB).
@pytest.mark.parametrize("n,dtype", [(300_000, torch.float32), (500_000, torch.float32), (300_000, torch.float64)])
def test_two_threads_large(backend, n, dtype):
    g = gen(7)
    src = torch.randn(n, generator=g, dtype=dtype)
    index = torch.randperm(n, generator=g)
    with threads(2):
        assert torch.equal(gather(src, index), src[index])


@pytest.mark.parametrize("n,dtype", [(300_000, torch.float32), (500_000, torch.float32)])
def test_out_of_range_index_raises_on_large_sources(n, dtype):
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("needs the cpp kernel")
    index = torch.randperm(n, generator=gen(8))
    index[n // 2 + 3] = n
    with threads(2), pytest.raises(ValueError, match=rf"index\[{n // 2 + 3}\] = {n} is out of range"):
        torch.ops.sparsekern.gather(torch.zeros(n, dtype=dtype), index)


def test_gradcheck(backend):
    g = gen(3)
    src = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([3, 3, 0, 8, 1])
    assert torch.autograd.gradcheck(lambda s: gather(s, index), (src,))


@pytest.mark.parametrize("src,index,error,match", [
    (torch.zeros(2, 2), torch.zeros(1, dtype=torch.int64), ValueError, "src must be 1-D"),
    (torch.zeros(4), torch.zeros(1, dtype=torch.int32), TypeError, "index must be int64"),
    (torch.zeros(4, dtype=torch.int64), torch.zeros(1, dtype=torch.int64), TypeError, "src must be a floating"),
    (torch.zeros(4), torch.zeros(4, dtype=torch.int64, device="meta"), ValueError, "index is on meta"),
])
def test_bad_input(backend, src, index, error, match):
    with pytest.raises(error, match=match):
        gather(src, index)


def test_out_of_range_index_raises():
    if not sparsekern.ops.HAS_EXTENSION:
        pytest.skip("needs the cpp kernel")
    with pytest.raises(ValueError, match=r"index\[1\] = 4 is out of range for src of 4 entries"):
        torch.ops.sparsekern.gather(torch.zeros(4), torch.tensor([0, 4, 1]))


@FUZZ
@given(n_src=st.integers(1, 300), n_out=st.integers(0, 300), seed=st.integers(0, 2**16),
       dtype=st.sampled_from(DTYPES))
def test_fuzz(n_src, n_out, seed, dtype):
    g = gen(seed)
    src = torch.randn(n_src, generator=g, dtype=dtype)
    index = torch.randint(0, n_src, (n_out,), generator=g)
    assert torch.equal(gather(src, index), reference.gather(src, index))
