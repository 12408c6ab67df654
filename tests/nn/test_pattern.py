"""SparsePattern: the CSR, its cached transpose and block view in one object, changed only by replace."""
import pytest
import torch

from sparsekern.nn import SparseConv2d, SparseLinear, SparsePattern
from sparsekern.sparse_matrix import transpose_pattern

from sk_testing import gen


def _check_derived(pattern):
    """Every derived buffer equals what the CSR gives when rebuilt from scratch."""
    want = transpose_pattern(pattern.row_ptr, pattern.col_idx, pattern.k)
    for got, expected in zip(pattern.transpose(), want):
        assert torch.equal(got, expected)
    positions = pattern.positions()
    assert torch.equal(positions, pattern.mask().reshape(-1).nonzero().squeeze(1))
    if pattern.block is not None:
        rebuilt = SparsePattern.from_mask(pattern.shape, pattern.mask(), pattern.block)
        for name in ("b_row_ptr", "b_col_idx", "b_order", "b_t_row_ptr", "b_t_col_idx", "b_t_perm"):
            assert torch.equal(getattr(pattern, name), getattr(rebuilt, name)), name


@pytest.mark.parametrize("layer", [SparseLinear(12, 7, density=0.4, generator=gen(1)),
                                   SparseConv2d(3, 4, 3, density=0.4, generator=gen(2)),
                                   SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(3))],
                         ids=["linear", "conv", "bsr"])
def test_replace_rebuilds_everything_derived_and_remaps_values(layer):
    pattern = layer.pattern
    assert pattern.row_ptr.dtype == torch.int64 and pattern.col_idx.dtype == torch.int32
    _check_derived(pattern)
    old_positions, old_values = pattern.positions().clone(), layer.values.detach().clone()
    new_mask = layer.mask().clone().reshape(layer.weight_shape[0], -1)
    if layer.format == "bsr":  # move the first kept block to the first free block
        b = layer.block
        blocks = new_mask.reshape(new_mask.shape[0] // b, b, -1, b).any(3).any(1)
        first, free = blocks.reshape(-1).nonzero()[0], (~blocks).reshape(-1).nonzero()[0]
        blocks.view(-1)[first], blocks.view(-1)[free] = False, True
        new_mask = blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)
    else:
        new_mask.view(-1)[old_positions[0]] = False
        new_mask.view(-1)[(~new_mask).reshape(-1).nonzero()[-1]] = True
    positions = new_mask.reshape(-1).nonzero().squeeze(1)
    at = torch.searchsorted(old_positions, positions).clamp(max=old_positions.numel() - 1)
    source = torch.where(old_positions[at] == positions, at, torch.full_like(at, -1))
    values = layer.values
    layer.replace_pattern(positions, source)
    assert layer.values is values and torch.equal(layer.pattern.positions(), positions)
    _check_derived(layer.pattern)
    want = torch.where(source >= 0, old_values[source.clamp(min=0)], torch.zeros(()))
    assert torch.equal(layer.values.detach(), want)


def test_bad_replace_arguments_change_nothing():
    layer = SparseLinear(12, 7, density=0.4, generator=gen(4))
    positions = layer.pattern.positions().clone()
    before = layer.values.detach().clone()
    for source, match in ((positions.float(), "source must be a 1-D integer tensor"),
                          (torch.zeros(3, dtype=torch.long), r"source must have one entry per position"),
                          (torch.full_like(positions, layer.nnz), r"source must lie in \[-1, \d+\)"),
                          (torch.full_like(positions, -2), r"source must lie in \[-1, \d+\)")):
        with pytest.raises(ValueError, match=match):
            layer.replace_pattern(positions, source)
    with pytest.raises(ValueError, match="positions must be strictly ascending"):
        layer.replace_pattern(positions.flip(0), torch.arange(positions.numel()))
    assert torch.equal(layer.values.detach(), before) and torch.equal(layer.pattern.positions(), positions)


def test_pattern_moves_with_the_module_and_is_never_saved():
    layer = SparseLinear(12, 7, density=0.4, generator=gen(5))
    layer.pattern.positions()  # cached on the CPU
    moved = layer.to("meta")
    assert {t.device.type for t in moved.pattern.buffers()} == {"meta"}
    assert moved.pattern.positions().device.type == "meta" and moved.values.device.type == "meta"
    assert set(layer.pattern.state_dict()) == set()  # all derived or written by the layer itself


def test_from_csr_validates_once():
    row_ptr, col_idx = torch.tensor([0, 2, 3], dtype=torch.int32), torch.tensor([0, 2, 1], dtype=torch.int32)
    pattern = SparsePattern.from_csr("test", (2, 3), row_ptr, col_idx)
    assert pattern.row_ptr.dtype == torch.int64 and torch.equal(pattern.positions(), torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match=r"test: col_idx must lie in \[0, 3\), got values in \[0, 3\]"):
        SparsePattern.from_csr("test", (2, 3), row_ptr, torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match="test: row_ptr must be int32 or int64, got torch.float32"):
        SparsePattern.from_csr("test", (2, 3), row_ptr.float(), col_idx)
    with pytest.raises(ValueError, match=r"test: format='bsr' needs a mask made of whole 2x2 blocks"):
        SparsePattern.from_csr("test", (2, 4), torch.tensor([0, 1, 2]), torch.tensor([0, 1]), block=2)
