"""Resuming from a checkpoint of model, optimizer and algorithm is bit-identical to never stopping."""
import io
import re

import pytest
import torch
from dst_helpers import tiny_data, tiny_mlp, train_step

import sparsekern

TOTAL, SPLIT = 120, 55


def _build(algorithm, optimizer_name, seed):
    model = tiny_mlp(seed=seed, density=0.3)
    if optimizer_name == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    algo = getattr(sparsekern.dst, algorithm)(model, optimizer, total_steps=TOTAL, delta_t=10,
                                             generator=torch.Generator().manual_seed(seed))
    return model, optimizer, algo


def _run(model, optimizer, algo, batches, start, stop):
    return [train_step(model, optimizer, algo, batches[i % len(batches)])[0] for i in range(start, stop)]


def _state(model, optimizer):
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "optimizer": [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                          for g in optimizer.param_groups for p in g["params"]]}


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("algorithm", ["SET", "RigL", "SNFS"])
def test_resume_is_bit_identical(algorithm, optimizer_name):
    batches = tiny_data()
    model, optimizer, algo = _build(algorithm, optimizer_name, seed=0)
    uninterrupted = _run(model, optimizer, algo, batches, 0, TOTAL)
    expected = _state(model, optimizer)
    assert any(r["mask_distance"] for rec in algo.history for r in rec["layers"].values())

    model, optimizer, algo = _build(algorithm, optimizer_name, seed=0)
    first = _run(model, optimizer, algo, batches, 0, SPLIT)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dst": algo.state_dict()}, buffer)
    del model, optimizer, algo

    # A fresh process would build everything anew, here with another seed: another pattern, other values.
    model, optimizer, algo = _build(algorithm, optimizer_name, seed=1)
    buffer.seek(0)
    checkpoint = torch.load(buffer)
    fresh_nnz = [layer.nnz for layer in algo.layers.values()]
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    if algorithm == "SNFS":  # its redistribution moved nnz between layers: loading resized them
        assert [layer.nnz for layer in algo.layers.values()] != fresh_nnz
    for layer in algo.layers.values():  # the optimizer still holds the (resized) values
        assert any(p is layer.values for g in optimizer.param_groups for p in g["params"])
    algo.load_state_dict(checkpoint["dst"])
    second = _run(model, optimizer, algo, batches, SPLIT, TOTAL)

    assert first + second == uninterrupted
    resumed = _state(model, optimizer)
    assert resumed["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for got, want in zip(resumed["optimizer"], expected["optimizer"]):
        assert got.keys() == want.keys()
        for key in want:
            assert torch.equal(got[key], want[key]) if torch.is_tensor(want[key]) else got[key] == want[key]


def test_algorithm_state_round_trips():
    model, optimizer, algo = _build("SNFS", "sgd", seed=0)
    _run(model, optimizer, algo, tiny_data(), 0, 30)
    state = algo.state_dict()
    _, _, other = _build("SNFS", "sgd", seed=1)
    other.load_state_dict(state)
    assert other.step_count == 30 and other.history == algo.history
    assert torch.equal(other.generator.get_state(), algo.generator.get_state())
    for name in algo.layers:
        assert torch.equal(other.grad_momentum[name], algo.grad_momentum[name])
    _, _, rigl = _build("RigL", "sgd", seed=0)
    with pytest.raises(ValueError, match="algorithm 'snfs', expected 'rigl'"):
        rigl.load_state_dict(state)


def _bad(key, value):
    def make(state):
        state = dict(state)
        state[key] = value(state[key]) if callable(value) else value
        return state
    return make


@pytest.mark.parametrize("corrupt, match", [
    (_bad("step_count", "x"), "step_count must be an int >= 0, got 'x'"),
    (_bad("generator", torch.zeros(3, dtype=torch.uint8)), "generator is not a state of a cpu torch.Generator"),
    (_bad("generator", None), "generator is not a state of a cpu torch.Generator"),
    (_bad("history", None), "history must be a list of dicts, got NoneType"),
    (_bad("grad_momentum", lambda g: {**g, "4": g["4"][:3]}), "grad_momentum of layer '4' must have shape"),
    (_bad("grad_momentum", lambda g: {"0": g["0"]}), "grad_momentum must name the sparse layers ['0', '2', '4']"),
    (lambda s: {k: v for k, v in s.items() if k != "history"}, "state lacks ['history']"),
], ids=["step_count", "generator-size", "generator-none", "history", "momentum-shape", "momentum-layers", "missing"])
def test_a_bad_algorithm_state_loads_nothing(corrupt, match):
    model, optimizer, algo = _build("SNFS", "sgd", seed=0)
    _run(model, optimizer, algo, tiny_data(), 0, 12)
    state = algo.state_dict()
    _, _, other = _build("SNFS", "sgd", seed=1)
    before = other.state_dict()
    with pytest.raises(ValueError, match=re.escape(f"SNFS.load_state_dict: {match}")):
        other.load_state_dict(corrupt(state))
    after = other.state_dict()
    assert after["step_count"] == before["step_count"] == 0 and after["history"] == before["history"]
    assert torch.equal(after["generator"], before["generator"])
    assert all(torch.equal(after["grad_momentum"][n], t) for n, t in before["grad_momentum"].items())
