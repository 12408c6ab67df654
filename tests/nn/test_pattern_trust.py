"""A sparse module's pattern is validated once and then trusted by the CPU CSR ops; an in-place write,
a different tensor or the debug switch (SPARSEKERN_CHECK_PATTERNS=1) brings the per-call check back."""
import os
import subprocess
import sys

import pytest
import torch

import sparsekern
from sparsekern.nn import SparseLinear
from sparsekern.ops import spmm
from sparsekern.sparse_matrix import SparseMatrix

from sk_testing import gen

ops = torch.ops.sparsekern


@pytest.fixture
def check_every_call():
    """Turns the debug switch on for the test, then restores it."""
    before = ops._set_check_patterns(True)
    yield
    ops._set_check_patterns(before)


@pytest.fixture(autouse=True)
def trusted_by_default():
    # The C++ ops trust and check patterns; under another backend (SPARSEKERN_BACKEND=reference) the tests that
    # show a skipped check by a call that does not raise would pass without checking anything.
    before = ops._set_check_patterns(False)
    with sparsekern.backend("cpp"):
        yield
    ops._set_check_patterns(before)


def _layer(seed=0):
    layer = SparseLinear(16, 8, density=0.5, generator=gen(seed))
    layer.kernel = "csr"
    return layer


def _first_row_with_two(pattern):
    counts = pattern.row_ptr[1:] - pattern.row_ptr[:-1]
    return int(pattern.row_ptr[int(torch.nonzero(counts >= 2)[0])])


def _swap_unseen(pattern):
    """Swap a row's first two columns behind the version counter (.data): still in range, no longer
    sorted, which a check rejects."""
    p = _first_row_with_two(pattern)
    data = pattern.col_idx.data
    data[p], data[p + 1] = data[p + 1].clone(), data[p].clone()


def _train_step(layer, x):
    layer.zero_grad()
    x = x.clone().requires_grad_()
    y = layer(x)
    y.square().sum().backward()
    return y.detach(), x.grad, layer.values.grad.clone()


def test_trusted_pattern_gives_the_checked_results():
    layer, x = _layer(1), torch.randn(5, 16, generator=gen(2))
    trusted = _train_step(layer, x)
    ops._set_check_patterns(True)
    checked = _train_step(layer, x)
    ops._set_check_patterns(False)
    dense = x.clone().requires_grad_()
    want = torch.nn.functional.linear(dense, layer.dense_weight().detach(), layer.bias.detach())
    want.square().sum().backward()
    for a, b in zip(trusted, checked):
        assert torch.equal(a, b)
    torch.testing.assert_close(trusted[0], want)
    torch.testing.assert_close(trusted[1], dense.grad)


def test_a_registered_pattern_is_not_checked_again():
    # A write the version counter does not see proves the kernels skipped the check: the call runs.
    layer, x = _layer(3), torch.randn(4, 16, generator=gen(4))
    _swap_unseen(layer.pattern)
    layer(x)


def test_the_debug_switch_checks_every_call(check_every_call):
    layer, x = _layer(3), torch.randn(4, 16, generator=gen(4))
    layer(x)
    _swap_unseen(layer.pattern)
    with pytest.raises(RuntimeError, match="col_idx must be strictly increasing within each row"):
        layer(x)


def test_an_in_place_write_is_checked_again():
    layer, x = _layer(5), torch.randn(4, 16, generator=gen(6))
    layer(x)
    with torch.no_grad():
        layer.pattern.col_idx[_first_row_with_two(layer.pattern)] = 99  # bumps the version counter
    with pytest.raises(RuntimeError, match=r"col_idx entries must lie in \[0, 16\)"):
        layer(x)


def test_a_restored_pattern_is_trusted_again_after_one_check():
    layer, x = _layer(7), torch.randn(4, 16, generator=gen(8))
    p = _first_row_with_two(layer.pattern)
    good = int(layer.pattern.col_idx[p])
    with torch.no_grad():
        layer.pattern.col_idx[p] = good  # same value, new version: checked once, trusted again
    layer(x)
    _swap_unseen(layer.pattern)
    layer(x)  # trusted at the new version: the unseen write is not checked


def test_replace_pattern_registers_the_new_pattern():
    layer, x = _layer(9), torch.randn(4, 16, generator=gen(10))
    positions = layer.pattern.positions()
    new = torch.cat([positions[1:], torch.tensor([16 * 8 - 1])]).unique()
    layer.replace_pattern(new, torch.searchsorted(positions, new).where(torch.isin(new, positions), -1))
    y = layer(x)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.dense_weight().detach(), layer.bias.detach()))
    _swap_unseen(layer.pattern)
    layer(x)  # the replaced pattern is registered too


def test_another_tensor_with_the_same_contents_is_checked():
    layer = _layer(11)
    pattern = layer.pattern
    bad = pattern.col_idx.clone()
    p = _first_row_with_two(pattern)
    bad[p], bad[p + 1] = bad[p + 1].clone(), bad[p].clone()
    W = SparseMatrix(pattern.row_ptr, bad, layer.values.detach(), (8, 16), validate=False)
    with pytest.raises(RuntimeError, match="col_idx must be strictly increasing"):
        spmm(W, torch.randn(16, 3))


def test_a_dead_patterns_address_is_not_trusted():
    for seed in range(200):  # enough registrations to sweep the table several times
        _layer(seed)
    rows, cols = torch.tensor([0, 2, 3]), torch.tensor([1, 0, 2], dtype=torch.int32)
    W = SparseMatrix(rows, cols, torch.ones(3), (2, 4), validate=False)
    with pytest.raises(RuntimeError, match="col_idx must be strictly increasing"):
        spmm(W, torch.randn(4, 3))


def test_the_transpose_is_trusted_with_its_pattern():
    layer, x = _layer(13), torch.randn(4, 16, generator=gen(14))
    t_row_ptr, t_col_idx, _ = layer.pattern.transpose()
    _train_step(layer, x)
    # The transposed pattern is the input gradient's: an unseen write there is not checked either.
    counts = t_row_ptr[1:] - t_row_ptr[:-1]
    q = int(t_row_ptr[int(torch.nonzero(counts >= 2)[0])])
    data = t_col_idx.data
    data[q], data[q + 1] = data[q + 1].clone(), data[q].clone()
    _train_step(layer, x)
    ops._set_check_patterns(True)
    with pytest.raises(RuntimeError, match=r"t_col_idx\[\d+\] must be \d+, the row of nonzero"):
        _train_step(layer, x)


def test_trust_pattern_validates_what_it_registers():
    with pytest.raises(RuntimeError, match=r"_trust_pattern: col_idx entries must lie in \[0, 4\)"):
        ops._trust_pattern(torch.tensor([0, 1]), torch.tensor([4], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="_trust_pattern: row_ptr must be a 1-D int64 tensor"):
        ops._trust_pattern(torch.tensor([0, 1], dtype=torch.int32), torch.tensor([0], dtype=torch.int32), 4)
    with pytest.raises(RuntimeError, match="_trust_pattern: t_row_ptr, t_col_idx and t_perm"):
        ops._trust_pattern(torch.tensor([0, 1]), torch.tensor([0], dtype=torch.int32), 4, torch.tensor([0, 1]))


def test_a_moved_module_registers_its_new_buffers():
    layer, x = _layer(15), torch.randn(4, 16, generator=gen(16))
    layer.to(torch.float64)
    _swap_unseen(layer.pattern)
    layer(x.double())


@pytest.mark.parametrize("value, expected", [("1", True), ("0", False)])
def test_the_environment_sets_the_debug_switch(value, expected):
    code = "import sparsekern, torch; print(torch.ops.sparsekern._check_patterns())"
    env = dict(os.environ, SPARSEKERN_CHECK_PATTERNS=value)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)


def test_a_bad_environment_value_warns_and_keeps_trusting():
    code = "import sparsekern, torch; print(torch.ops.sparsekern._check_patterns())"
    env = dict(os.environ, SPARSEKERN_CHECK_PATTERNS="yes")
    out = subprocess.run([sys.executable, "-W", "always", "-c", code], env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False" and "SPARSEKERN_CHECK_PATTERNS='yes' ignored" in out.stderr


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copied_layer_is_trusted(how):
    """copy.deepcopy and pickling give the pattern new buffers: they are validated and registered as they are
    made, so a copy does not check its pattern on every call (and a bad pattern cannot come in that way)."""
    import copy
    import io

    layer, x = _layer(15), torch.randn(4, 16, generator=gen(16))
    if how == "deepcopy":
        twin = copy.deepcopy(layer)
    else:
        buf = io.BytesIO()
        torch.save(layer, buf)
        buf.seek(0)
        twin = torch.load(buf, weights_only=False)
    assert twin.pattern.col_idx.data_ptr() != layer.pattern.col_idx.data_ptr()
    torch.testing.assert_close(twin(x), layer(x))
    _swap_unseen(twin.pattern)
    twin(x)  # trusted: the unseen write is not checked
    ops._set_check_patterns(True)
    with pytest.raises(RuntimeError, match="col_idx must be strictly increasing within each row"):
        twin(x)
