"""A sparse checkpoint holds values (4 bytes in fp32), col_idx (int32) and row_ptr (int32, per row):
at most 8.5 bytes per nonzero, plus the dense parameters and buffers (biases, norms)."""
import io

import pytest
import torch

import sparsekern
from sparsekern.models import resnet18
from sparsekern.nn import SparseWeightMixin

BOUND = 8.5  # bytes per nonzero, fp32


def _saved_bytes(state) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.tell()


@pytest.mark.parametrize("format", ["csr", "bsr"])
def test_sparsified_resnet_checkpoint_within_bound(format):
    model = resnet18(num_classes=100)
    sparsekern.sparsify(model, 0.1, generator=torch.Generator().manual_seed(0), format=format, block=16)
    state = model.state_dict()
    sparse = [m for m in model.modules() if isinstance(m, SparseWeightMixin)]
    nnz = sum(m.nnz for m in sparse)
    sparse_keys = {f"{n}.{k}" for n, m in model.named_modules() if isinstance(m, SparseWeightMixin)
                   for k in ("values", "row_ptr", "col_idx")}
    other = sum(t.numel() * t.element_size() for k, t in state.items() if k not in sparse_keys)
    size = _saved_bytes(state)
    assert size <= BOUND * nnz + other, f"{(size - other) / nnz:.2f} bytes per nonzero"
    assert not any(k.endswith(("t_row_ptr", "t_col_idx", "t_perm", "b_order")) for k in state)
