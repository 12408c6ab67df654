"""Bad ``positions`` for ``update_pattern_``: a ValueError naming the argument, and the module unchanged."""
import pytest
import torch

from sparsekern.nn import SparseConv2d, SparseLinear

from sk_testing import gen


def _snapshot(layer):
    return {name: t.detach().clone() for name, t in list(layer.named_buffers()) + list(layer.named_parameters())}


def _assert_unchanged(layer, before, values):
    assert layer.values is values
    after = _snapshot(layer)
    assert after.keys() == before.keys()
    for name, t in before.items():
        assert torch.equal(after[name], t), name


def _layers():
    return [SparseLinear(8, 4, density=0.5, generator=gen(0)),
            SparseConv2d(2, 3, 3, density=0.5, generator=gen(1)),
            SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(2))]


@pytest.mark.parametrize("layer", _layers(), ids=["linear", "conv", "linear-bsr"])
@pytest.mark.parametrize("case, match", [
    ("descending", "positions must be strictly ascending, got positions\\[0\\] = 5 followed by 3"),
    ("duplicate", "positions must be strictly ascending"),
    ("negative", r"positions must lie in \[0, \d+\)"),
    ("past_end", r"positions must lie in \[0, \d+\)"),
    ("float", "positions must be a 1-D integer tensor, got torch.float32"),
    ("2d", "positions must be a 1-D integer tensor"),
])
def test_bad_positions_raise_before_any_change(layer, case, match):
    numel = layer.values.numel() * 2  # density 0.5
    positions = {
        "descending": torch.tensor([5, 3, 7]),
        "duplicate": torch.tensor([1, 3, 3]),
        "negative": torch.tensor([-1, 3, 7]),
        "past_end": torch.tensor([1, 3, numel]),
        "float": torch.tensor([1.0, 3.0, 7.0]),
        "2d": torch.tensor([[1, 3, 7]]),
    }[case]
    before, values = _snapshot(layer), layer.values
    with pytest.raises(ValueError, match=match):
        layer.update_pattern_(None, torch.zeros(3), positions=positions)
    _assert_unchanged(layer, before, values)


def test_misaligned_bsr_positions_raise_before_any_change():
    layer = SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(3))
    # Columns 1..8 of every row: shifted one column off the 4x4 block grid.
    positions = (torch.arange(8)[:, None] * 16 + torch.arange(1, 9)).reshape(-1)
    before, values = _snapshot(layer), layer.values
    with pytest.raises(ValueError, match="whole 4x4 blocks"):
        layer.update_pattern_(None, torch.zeros(positions.numel()), positions=positions)
    _assert_unchanged(layer, before, values)


def test_valid_positions_still_apply():
    layer = SparseLinear(8, 4, density=0.5, generator=gen(4))
    positions = torch.tensor([0, 9, 18, 27])
    layer.update_pattern_(None, torch.arange(4.0), positions=positions)
    assert torch.equal(layer.mask().reshape(-1).nonzero().squeeze(1), positions)
    assert torch.equal(layer.values.detach(), torch.arange(4.0))
