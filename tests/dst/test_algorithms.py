"""The DST skeleton's pieces: schedule, dense gradients, SNFS's redistribution, optimizer remapping, errors."""
import math

import pytest
import torch
from dst_helpers import tiny_data, tiny_mlp, train_step
from torch import nn

import sparsekern
from sparsekern.dst import base as dst_base
from sparsekern.dst.algorithms import _share


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def test_schedule_and_update_steps():
    model = tiny_mlp()
    algo = sparsekern.dst.SET(model, _sgd(model), total_steps=1000, delta_t=100, drop_fraction=0.3,
                              end_fraction=0.75)
    assert algo.end_step == 750
    assert [t for t in range(0, 1001) if algo.is_update_step(t)] == [100, 200, 300, 400, 500, 600, 700]
    assert algo.drop_rate(0) == pytest.approx(0.3)
    assert algo.drop_rate(375) == pytest.approx(0.15)
    assert algo.drop_rate(750) == pytest.approx(0.0)
    assert algo.drop_rate(100) == pytest.approx(0.15 * (1 + math.cos(math.pi * 100 / 750)))
    constant = sparsekern.dst.SET(model, _sgd(model), 1000, schedule="constant")
    linear = sparsekern.dst.SET(model, _sgd(model), 1000, schedule="linear")
    assert constant.drop_rate(500) == 0.3 and linear.drop_rate(375) == pytest.approx(0.15)


def test_rigl_computes_the_dense_gradient_on_update_steps_only(monkeypatch):
    calls = []
    real = dst_base.weight_grad
    monkeypatch.setattr(dst_base, "weight_grad", lambda *args: calls.append(1) or real(*args))
    model = tiny_mlp()
    optimizer = _sgd(model)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=100, delta_t=10)
    batches = tiny_data()
    for step in range(1, 31):
        train_step(model, optimizer, algo, batches[step % len(batches)])
        with torch.no_grad():
            model(batches[0][0])  # an evaluation pass keeps nothing
        captured = sum(len(v) for v in algo._captured.values())
        assert captured == 0  # step() releases what it kept
    assert len(calls) == 3 * len(algo.layers)  # steps 10, 20, 30: one dense product per layer


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "circular"])
def test_dense_gradient_of_a_conv_matches_autograd_despite_an_inplace_relu(padding_mode):
    """(A padding_mode other than zeros: the dense gradient is taken on the padded input the kernels ran on.)"""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, padding_mode=padding_mode)
    model = nn.Sequential(conv, nn.ReLU(inplace=True), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))  # in-place after
    reference = nn.Sequential(*[m for m in model])  # same modules before sparsify
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 0])
    weights = [reference[0].weight.detach().clone(), reference[3].weight.detach().clone()]
    sparsekern.sparsify(model, 0.5, distribution="uniform", init="dense", generator=torch.Generator().manual_seed(0))
    # Autograd's dense gradient of the masked-dense model.
    masks = [model[0].mask(), model[3].mask()]
    w_eff = [(w * m).requires_grad_() for w, m in zip(weights, masks)]
    xp = x if padding_mode == "zeros" else nn.functional.pad(x, (1, 1, 1, 1), mode=padding_mode)
    out = nn.functional.conv2d(xp, w_eff[0], model[0].bias, 2, 1 if padding_mode == "zeros" else 0).relu().flatten(1)
    nn.functional.cross_entropy(out @ w_eff[1].t() + model[3].bias, y).backward()
    optimizer = _sgd(model)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=10, delta_t=1)
    nn.functional.cross_entropy(model(x), y).backward()
    for name, expected in zip(["0", "3"], w_eff):
        torch.testing.assert_close(algo.layer_dense_grad(name), expected.grad.reshape(-1), rtol=1e-5, atol=1e-6)
    optimizer.step()
    assert algo.step() is True


def test_snfs_moves_nnz_between_layers_and_keeps_the_total():
    model = tiny_mlp(seed=4, density=0.2)
    optimizer = _sgd(model)
    algo = sparsekern.dst.SNFS(model, optimizer, total_steps=100, delta_t=10)
    before = {n: layer.nnz for n, layer in algo.layers.items()}
    batches = tiny_data()
    for step in range(50):
        train_step(model, optimizer, algo, batches[step % len(batches)])
    after = {n: layer.nnz for n, layer in algo.layers.items()}
    assert sum(after.values()) == sum(before.values()) and after != before
    fixed = tiny_mlp(seed=4, density=0.2)
    optimizer = _sgd(fixed)
    algo = sparsekern.dst.SNFS(fixed, optimizer, total_steps=100, delta_t=10, redistribute=False)
    for step in range(50):
        train_step(fixed, optimizer, algo, batches[step % len(batches)])
    assert {n: layer.nnz for n, layer in algo.layers.items()} == before


def test_share_is_proportional_capped_and_exact():
    names = ["a", "b", "c"]
    assert _share(10, names, {"a": 1.0, "b": 1.0, "c": 2.0}, {"a": 100, "b": 100, "c": 100}) == {"a": 2, "b": 3, "c": 5}
    capped = _share(10, names, {"a": 0.0, "b": 1.0, "c": 9.0}, {"a": 100, "b": 100, "c": 4})
    assert capped == {"a": 0, "b": 6, "c": 4}
    assert _share(6, names, {n: 0.0 for n in names}, {"a": 1, "b": 2, "c": 3}) == {"a": 1, "b": 2, "c": 3}
    for total in range(0, 40):
        got = _share(total, names, {"a": 0.3, "b": 1e-9, "c": 0.7}, {"a": 13, "b": 20, "c": 7})
        assert sum(got.values()) == total and all(got[n] <= c for n, c in {"a": 13, "b": 20, "c": 7}.items())


def test_remap_optimizer_state_moves_and_zeroes():
    param = nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    optimizer = torch.optim.Adam([param])
    param.grad = torch.tensor([0.1, 0.2, 0.3])
    optimizer.step()
    exp_avg = optimizer.state[param]["exp_avg"].clone()
    source = torch.tensor([2, -1, 0])
    sparsekern.dst.remap_optimizer_state(optimizer, param, source)
    state = optimizer.state[param]
    assert torch.equal(state["exp_avg"], torch.stack([exp_avg[2], torch.tensor(0.0), exp_avg[0]]))
    assert state["exp_avg_sq"][1] == 0 and float(state["step"]) == 1.0
    # nnz changed: a new Parameter takes over the state and the param_groups.
    new = nn.Parameter(torch.zeros(2))
    sparsekern.dst.remap_optimizer_state(optimizer, param, torch.tensor([0, -1]), new_param=new)
    assert optimizer.param_groups[0]["params"][0] is new and param not in optimizer.state
    assert optimizer.state[new]["exp_avg"].shape == (2,) and optimizer.state[new]["exp_avg"][1] == 0
    new.grad = torch.ones(2)
    optimizer.step()


def test_remap_rejects_state_it_cannot_follow():
    param = nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.SGD([param], lr=0.1)
    optimizer.state[param]["odd"] = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="state 'odd'"):
        sparsekern.dst.remap_optimizer_state(optimizer, param, torch.tensor([0, 1, 2]))


def test_bad_input_is_a_clear_error():
    model = tiny_mlp()
    optimizer = _sgd(model)
    with pytest.raises(ValueError, match="algorithm must be one of"):
        sparsekern.dst.create("magic", model, optimizer, 100)
    assert isinstance(sparsekern.dst.create("RigL", model, optimizer, 100), sparsekern.dst.RigL)
    with pytest.raises(ValueError, match="no sparse layers"):
        dense = nn.Sequential(nn.Linear(3, 3))
        sparsekern.dst.RigL(dense, _sgd(dense), 100)
    with pytest.raises(ValueError, match="optimizer does not hold the values of sparse layer '0'"):
        sparsekern.dst.RigL(model, torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1), 100)
    other = tiny_mlp(seed=1)
    with pytest.raises(ValueError, match="optimizer does not hold"):
        sparsekern.dst.SET(model, _sgd(other), 100)
    for kwargs, match in [({"total_steps": 0}, "total_steps"), ({"delta_t": 0}, "delta_t"),
                          ({"drop_fraction": 1.5}, "drop_fraction"), ({"end_fraction": 0.0}, "end_fraction"),
                          ({"schedule": "step"}, "schedule"), ({"grow_init": "random"}, "grow_init")]:
        args = {"total_steps": 100, **kwargs}
        with pytest.raises(ValueError, match=match):
            sparsekern.dst.RigL(model, optimizer, **args)
    with pytest.raises(TypeError, match="optimizer must be"):
        sparsekern.dst.RigL(model, "sgd", 100)
    algo = sparsekern.dst.RigL(model, optimizer, 100, delta_t=1)
    with pytest.raises(RuntimeError, match="no gradient reached sparse layer"):
        algo.step()  # no forward/backward since the last step
    algo.remove_hooks()


def test_a_discarded_algorithm_leaves_no_hooks():
    import copy
    import gc
    model = tiny_mlp()
    algo = sparsekern.dst.RigL(model, _sgd(model), 100)
    assert all(len(m._forward_hooks) == 1 for m in algo.layers.values())
    copy.deepcopy(model)  # the hooks do not drag the algorithm along
    del algo
    gc.collect()
    assert all(len(m._forward_hooks) == 0 for m in model if isinstance(m, sparsekern.nn.SparseLinear))


def test_passes_within_paused_do_not_reach_the_dense_gradient():
    model = tiny_mlp()
    optimizer = _sgd(model)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=100, delta_t=1)
    x, y = tiny_data()[0]
    nn.functional.cross_entropy(model(x), y).backward()
    expected = {name: algo.layer_dense_grad(name).clone() for name in algo.layers}
    with algo.paused():
        nn.functional.cross_entropy(model(x * 2), y).backward()  # a measurement pass
    for name in algo.layers:
        torch.testing.assert_close(algo.layer_dense_grad(name), expected[name])


def test_dense_gradient_in_the_master_dtype_when_input_and_grad_differ():
    # Under autocast a layer's input may be fp32 while its output gradient is bf16.
    conv = sparsekern.nn.SparseConv2d(3, 4, 3, padding=1, density=0.5)
    lin = sparsekern.nn.SparseLinear(6, 5, density=0.5)
    x, gy = torch.randn(2, 3, 5, 5), torch.randn(2, 4, 5, 5)
    got = dst_base.weight_grad(conv, x, gy.bfloat16())
    want = torch.nn.grad.conv2d_weight(x, conv.weight_shape, gy.bfloat16().float(), 1, 1)
    assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-4)
    xl, gl = torch.randn(7, 6).bfloat16(), torch.randn(7, 5)
    got = dst_base.weight_grad(lin, xl, gl)
    assert got.dtype == torch.float32 and torch.allclose(got, gl.t() @ xl.float(), atol=1e-4)


@pytest.mark.parametrize("algorithm", ["RigL", "SNFS"])
def test_dense_gradients_under_bf16_autocast_with_fused_activations(algorithm):
    """Under autocast a fused GELU layer's input and output gradient are bf16 while its weight is float32: the dense
    gradient recomputes the product as the forward ran it (bf16) and matches autograd of the masked dense model."""
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3))
    model = sparsekern.sparsify(plain, 0.5, "uniform", init="dense", fuse_activations=True, inplace=False,
                                generator=torch.Generator().manual_seed(0))
    assert model[2].activation == "gelu"  # its input is bf16 under autocast (layer 0's output)
    x, y = torch.randn(5, 6), torch.tensor([0, 1, 2, 0, 1])
    twin = nn.Sequential(model[0].to_dense(), model[2].to_dense(), model[4].to_dense())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(twin(x), y).backward()
    optimizer = _sgd(model)
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, total_steps=10, delta_t=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    for name, dense in zip(["0", "2", "4"], twin):
        want = dense[0].weight.grad if isinstance(dense, nn.Sequential) else dense.weight.grad
        torch.testing.assert_close(algo.layer_dense_grad(name), want.reshape(-1), rtol=0.05, atol=0.02)
    optimizer.step()
    assert algo.step() is True


def test_a_run_too_short_for_any_update_warns():
    import warnings
    model = tiny_mlp()
    with pytest.warns(UserWarning, match="no mask update falls within the run"):
        sparsekern.dst.RigL(model, _sgd(model), 100)  # updates every 100 steps, to step 75
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sparsekern.dst.RigL(model, _sgd(model), 100, delta_t=10)
        sparsekern.dst.Static(model, _sgd(model), 100)  # never updates, by design
