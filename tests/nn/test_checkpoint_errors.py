"""Loading a sparse layer's checkpoint is all or nothing: every bad state is reported (also with
strict=False, as torch reports size mismatches) and leaves the layer exactly as it was."""
import io
import re

import pytest
import torch

import sparsekern
from sparsekern.nn import SparseConv2d, SparseLinear

from sk_testing import gen


def _layer(kind="linear", seed=1, **kw):
    if kind == "conv":
        return SparseConv2d(4, 6, 3, padding=1, density=0.4, generator=gen(seed), **kw)
    if kind == "bsr":
        return SparseLinear(16, 8, density=0.5, format="bsr", block=4, generator=gen(seed), **kw)
    return SparseLinear(12, 8, density=0.4, generator=gen(seed), **kw)


def _through_disk(state):
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer)


def _edit(**changes):
    """A state dict of another layer of the same kind, with entries replaced (None: removed)."""
    def make(kind):
        state = _layer(kind, seed=2).state_dict()
        for key, value in changes.items():
            if value is None:
                del state[key]
            else:
                state[key] = value(state) if callable(value) else value
        return state
    return make


def _set(key, index, value):
    def edit(state):
        t = state[key].clone()
        t[index] = value
        return t
    return edit


def _swap_first_two_cols(state):
    """Unsorted columns in the first row with two or more entries."""
    rp, ci = state["row_ptr"].long(), state["col_idx"].clone()
    row = int(((rp[1:] - rp[:-1]) >= 2).nonzero()[0])
    start = int(rp[row])
    ci[start], ci[start + 1] = ci[start + 1].clone(), ci[start].clone()
    return ci


def _duplicate_col(state):
    rp, ci = state["row_ptr"].long(), state["col_idx"].clone()
    row = int(((rp[1:] - rp[:-1]) >= 2).nonzero()[0])
    ci[int(rp[row]) + 1] = ci[int(rp[row])]
    return ci


def _other_geometry(kind):
    """The state of a layer with fewer inputs: its pattern is also a valid pattern of this layer's shape."""
    if kind == "conv":
        return SparseConv2d(3, 6, 3, padding=1, density=0.4, generator=gen(2)).state_dict()
    if kind == "bsr":
        return SparseLinear(12, 8, density=0.5, format="bsr", block=4, generator=gen(2)).state_dict()
    return SparseLinear(10, 8, density=0.4, generator=gen(2)).state_dict()


# (id, state maker (kind -> state dict), substring of the error, loaded through torch.save)
CASES = [
    ("fewer-inputs", _other_geometry, "the checkpoint holds a weight of shape", True),
    ("more-rows", lambda kind: (SparseLinear(12, 10, density=0.4, generator=gen(2)) if kind == "linear" else
                                SparseConv2d(4, 7, 3, padding=1, generator=gen(2)) if kind == "conv" else
                                SparseLinear(16, 12, format="bsr", block=4, generator=gen(2))).state_dict(),
     "the checkpoint holds a weight of shape", False),
    ("row_ptr-length", _edit(row_ptr=lambda s: s["row_ptr"][:-1]), "row_ptr must have m+1", False),
    ("row_ptr-start", _edit(row_ptr=_set("row_ptr", 0, 1)), "row_ptr[0] must be 0", False),
    ("row_ptr-last", _edit(row_ptr=_set("row_ptr", -1, 1)), "row_ptr[-1] = 1 must equal nnz", False),
    ("row_ptr-decreasing", _edit(row_ptr=lambda s: _set("row_ptr", 2, int(s["row_ptr"][1]) - 1)(s)),
     "row_ptr must be non-decreasing", False),
    ("row_ptr-float", _edit(row_ptr=lambda s: s["row_ptr"].float()), "row_ptr must be int32 or int64", False),
    ("col_idx-range", _edit(col_idx=_set("col_idx", 0, 10 ** 6)), "col_idx must lie in", False),
    ("col_idx-negative", _edit(col_idx=_set("col_idx", 0, -1)), "col_idx must lie in", False),
    ("col_idx-unsorted", _edit(col_idx=_swap_first_two_cols), "strictly increasing within each row", False),
    ("col_idx-duplicate", _edit(col_idx=_duplicate_col), "strictly increasing within each row", False),
    ("col_idx-alone", _edit(row_ptr=None), "has col_idx but not row_ptr", False),
    ("row_ptr-alone", _edit(col_idx=None), "has row_ptr but not col_idx", False),
    ("values-size", _edit(values=lambda s: s["values"][:-1]), "size mismatch for values", False),
    ("values-int", _edit(values=lambda s: s["values"].long()), "values must be floating point", False),
    ("values-missing", _edit(values=None), "changes the pattern but has no values", False),
    ("values-not-a-tensor", _edit(values=[1.0, 2.0]), "expected torch.Tensor", False),
    ("bias-size", _edit(bias=torch.zeros(3)), "size mismatch for bias", False),
    ("values-only-of-another-nnz", lambda kind: {"values": torch.randn(3)}, "nnz of the layer's pattern (kept)", False),
]


def _snapshot(layer):
    return {name: t.detach().clone() for name, t in list(layer.named_parameters()) + list(layer.named_buffers())}


@pytest.mark.parametrize("strict", [True, False], ids=["strict", "non-strict"])
@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
@pytest.mark.parametrize("case, make, match, disk", CASES, ids=[c[0] for c in CASES])
def test_bad_checkpoint_is_rejected_and_changes_nothing(case, make, match, disk, kind, strict):
    layer = _layer(kind)
    state = make(kind)
    if disk:
        state = _through_disk(state)
    before, values = _snapshot(layer), layer.values
    with pytest.raises(RuntimeError, match=re.escape(match)):
        layer.load_state_dict(state, strict=strict)
    after = _snapshot(layer)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert layer.values is values and layer.values.shape == before["values"].shape


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_checkpoint_holds_only_values_row_ptr_col_idx(kind):
    state = _layer(kind).state_dict()
    assert set(state) == {"values", "bias", "row_ptr", "col_idx"}
    assert state["row_ptr"].dtype == torch.int32 and state["col_idx"].dtype == torch.int32


@pytest.mark.parametrize("kind", ["linear", "conv", "bsr"])
def test_old_checkpoints_with_the_transpose_and_int64_row_ptr_load(kind):
    src, layer = _layer(kind, seed=3), _layer(kind, seed=4)
    state = src.state_dict()
    state["row_ptr"] = state["row_ptr"].long()
    bogus = torch.zeros(src.nnz, dtype=torch.int64)  # a corrupted saved transpose is never trusted
    state.update(t_row_ptr=torch.zeros(src.weight_shape[1] + 1, dtype=torch.int64), t_col_idx=bogus.int(),
                 t_perm=bogus)
    result = layer.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(layer.mask(), src.mask()) and torch.equal(layer.values, src.values)
    for name in ("t_row_ptr", "t_col_idx", "t_perm"):
        assert torch.equal(getattr(layer.pattern, name), getattr(src.pattern, name))  # rebuilt
    x = torch.randn((2, 4, 5, 5) if kind == "conv" else (3, src.weight_shape[1]), generator=gen(5),
                    requires_grad=True)
    (dx,) = torch.autograd.grad(layer(x).sum(), x)
    (want,) = torch.autograd.grad(src(x).sum(), x)
    torch.testing.assert_close(dx, want)


def test_partial_state_with_strict_false_keeps_the_layer_valid():
    layer = _layer("linear", seed=5)
    values = layer.values.detach() * 2
    result = layer.load_state_dict({"values": values}, strict=False)  # the kept pattern's size: loads
    assert set(result.missing_keys) == {"bias", "row_ptr", "col_idx"}
    assert torch.equal(layer.values.detach(), values)
    other = _layer("linear", seed=6).state_dict()
    result = layer.load_state_dict({k: other[k] for k in ("values", "row_ptr", "col_idx")}, strict=False)
    assert result.missing_keys == ["bias"] and torch.equal(layer.values.detach(), other["values"])
    layer(torch.randn(2, 12))


def test_unexpected_keys_are_reported():
    layer = _layer("linear", seed=7, bias=False)
    state = _layer("linear", seed=7).state_dict()
    result = layer.load_state_dict(state, strict=False)
    assert result.unexpected_keys == ["bias"]
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias"'):
        layer.load_state_dict(state)


def test_reloading_another_nnz_under_an_optimizer_with_momentum_fails_clearly():
    """load_state_dict resizes ``values`` in place (the optimizer keeps its Parameter), but its
    momentum still has the old nnz: the DST run says so before the optimizer trips over it."""
    model = torch.nn.Sequential(_layer("linear", seed=8))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=10, delta_t=5)
    model(torch.randn(4, 12)).sum().backward()
    optimizer.step()
    algo.step()
    other = SparseLinear(12, 8, density=0.7, generator=gen(9))
    model[0].load_state_dict(other.state_dict())
    assert model[0].nnz == other.nnz
    model(torch.randn(4, 12)).sum().backward()
    with pytest.raises(RuntimeError, match=r"sparse layer '0': the optimizer's 'momentum_buffer' has \d+ entries but "
                                           r"the layer has nnz \d+ .* rebuild the optimizer"):
        optimizer.step()
    with pytest.raises(RuntimeError, match="rebuild the optimizer"):
        algo.step()


# -- a whole model: sparsify puts a check of the whole state dict before any layer loads ------------------

def _model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 12),
                                torch.nn.Linear(12, 4))
    return sparsekern.sparsify(model, 0.5, "uniform", dense_layers=["2"])


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("bad", ["last sparse values", "dense weight", "sparse pattern"])
def test_a_bad_entry_anywhere_loads_nothing(bad):
    model, other = _model(), _model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    state = other.state_dict()
    if bad == "last sparse values":
        state["3.values"] = torch.randn(state["3.values"].numel() + 1)
    elif bad == "dense weight":
        state["2.weight"] = torch.randn(12, 15)
    else:
        state["3.col_idx"] = state["3.col_idx"].flip(0)  # unsorted within rows
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match=r"nothing was loaded"):
        model.load_state_dict(state)
    with pytest.raises(RuntimeError, match=r"nothing was loaded"):
        model.load_state_dict(state, strict=False)
    after = _snapshot(model)
    assert all(torch.equal(before[k], after[k]) for k in before), "a layer loaded before the bad entry was found"
    good = other.state_dict()
    model.load_state_dict(good)
    assert all(torch.equal(good[k], v) for k, v in model.state_dict().items())


def test_the_check_runs_for_a_sparsified_model_inside_another():
    inner = _model()
    outer = torch.nn.Sequential(inner, torch.nn.Linear(4, 2))
    state = outer.state_dict()
    state["0.3.values"] = torch.randn(3)
    before = _snapshot(outer)
    with pytest.raises(RuntimeError, match=r"size mismatch for 0\.3\.values"):
        outer.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(outer).items())


def test_check_model_state_reports_without_loading():
    from sparsekern.nn.base import check_model_state
    model = _model()
    state = model.state_dict()
    assert check_model_state(model, state) == []
    state["0.row_ptr"] = state["0.row_ptr"][:-1]
    errors = check_model_state(model, state)
    assert len(errors) == 1 and "row_ptr" in errors[0]


class _TwoLayers(torch.nn.Module):
    """A hand-built model of sparse layers (no sparsify, so no whole-model check)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = SparseLinear(8, 8, density=0.5), SparseLinear(8, 4, density=0.5)


@pytest.mark.parametrize("make", [_TwoLayers, lambda: torch.nn.Sequential(SparseLinear(8, 8, density=0.5),
                                                                          SparseLinear(8, 4, density=0.5))],
                         ids=["hand-built", "sequential"])
def test_a_model_without_the_whole_model_check_says_how_to_load_all_or_nothing(make):
    torch.manual_seed(0)
    model = make()
    first, second = [n for n, m in model.named_children()]
    state = model.state_dict()
    state[f"{second}.col_idx"] = state[f"{second}.col_idx"].clone().fill_(100)
    from sparsekern.nn.base import check_model_state, load_all_or_nothing
    hint = r"(.|\n)*check first with sparsekern\.nn\.base\.check_model_state\(model, state_dict\)"
    with pytest.raises(RuntimeError, match=r"col_idx must lie in \[0, 8\)" + hint):
        model.load_state_dict(state)
    assert check_model_state(model, state)  # what the message points to: it finds the error before any load
    fresh = make()
    fresh.register_load_state_dict_pre_hook(load_all_or_nothing)
    state[f"{first}.values"] = state[f"{first}.values"] * 0 + 7
    before = _snapshot(fresh)
    with pytest.raises(RuntimeError, match="nothing was loaded"):
        fresh.load_state_dict(state)
    assert all(torch.equal(before[k], v) for k, v in _snapshot(fresh).items())
