"""The thin training loop: it trains, steps the DST algorithm, and writes its JSON log."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsekern
from sparsekern.train import evaluate, fit


def _loaders():
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(12, 3, generator=g)
    x = torch.randn(512, 12, generator=g)
    data = TensorDataset(x, (x @ teacher).argmax(1))
    train = DataLoader(data, batch_size=32, shuffle=True, generator=torch.Generator().manual_seed(1))
    return train, DataLoader(data, batch_size=128)


def test_fit_trains_a_sparse_model_with_rigl_and_logs(tmp_path):
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(12, 64), nn.ReLU(), nn.Linear(64, 3)), 0.5,
                                generator=torch.Generator().manual_seed(0))
    train, val = _loaders()
    epochs = 6
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=epochs * len(train), delta_t=10)
    before = evaluate(model, val)
    log = fit(model, train, val, epochs, optimizer, scheduler=scheduler, dst=algo, log_every=5, grad_flow_every=16,
              log_path=tmp_path / "run" / "log.json", progress=False)
    assert json.loads((tmp_path / "run" / "log.json").read_text()) == json.loads(json.dumps(log))
    assert len(log["epochs"]) == epochs and log["epochs"][-1]["step"] == epochs * len(train)
    assert log["epochs"][-1]["val_accuracy"] > max(0.9, before["accuracy"])
    assert log["epochs"][-1]["val_loss"] < before["loss"]
    changed = [rec for rec in algo.history if any(r["mask_distance"] for r in rec["layers"].values())]
    assert sum(e["pattern_updates"] for e in log["epochs"]) == len(changed) > 0
    assert len(log["steps"]) == epochs * len(train) // 5
    assert [g["step"] for g in log["grad_flow"]] == list(range(0, epochs * len(train), 16))
    assert set(log["grad_flow"][0]["dense_per_param"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    assert log["grad_flow"][0]["dense"] > log["grad_flow"][0]["active"] > 0
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 2)


def test_fit_rejects_bad_arguments():
    model = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, [], None, -1, optimizer)
    with pytest.raises(ValueError, match="scheduler_interval"):
        fit(model, [], None, 1, optimizer, scheduler_interval="batch")
