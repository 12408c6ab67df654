"""The one training loop and its two drivers: ``fit`` trains, steps the DST algorithm and writes its JSON log;
``Trainer`` runs a seeded step range with snapshots and gradient flow; checkpoints resume a run exactly."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import sparsekern
from sparsekern.data import make_synthetic
from sparsekern.train import GradFlowProbe, Trainer, evaluate, fit, load_checkpoint, save_checkpoint, train_steps


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
    assert log["epochs"][-1]["val_accuracy"] > max(0.9, before.accuracy)
    assert log["epochs"][-1]["val_loss"] < before.loss
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


def _mlp(seed=0, density=0.3):
    torch.manual_seed(seed)
    return sparsekern.sparsify(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 4)), density,
                               generator=torch.Generator().manual_seed(seed))


def test_trainer_is_reproducible_and_resumes_on_the_same_batches():
    data = make_synthetic(num_classes=4, image_size=8, n_train=256, seed=0)
    held_out = data.val[list(range(64))]
    trainer = Trainer(data.train, steps=20, batch_size=32, lr=0.05, seed=3, held_out=held_out, grad_flow_every=5,
                      progress=False)
    a, b = _mlp(), _mlp()
    ra = trainer(a, snapshot_step=8)
    rb = trainer(b)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [g["step"] for g in ra.grad_flow] == [0, 5, 10, 15, 20] and ra.snapshot is not None and rb.snapshot is None
    assert ra.grad_flow[-1]["loss"] < ra.grad_flow[0]["loss"]
    # the batch order depends on (seed, step) only, not on the run's length: a rewound run sees the same batches
    assert trainer.batch_indices(8) == Trainer(data.train, 40, 32, seed=3).batch_indices(8)
    with pytest.raises(ValueError, match="lr_schedule"):
        Trainer(data.train, 10, lr_schedule="linear")
    with pytest.raises(ValueError, match="steps must be an int >= 0, got -1"):
        Trainer(data.train, -1)


def test_checkpoint_resumes_the_loop_bit_for_bit(tmp_path):
    data = make_synthetic(num_classes=4, image_size=8, n_train=256, seed=1)
    batches = [data.train[list(range(i * 32, (i + 1) * 32))] for i in range(8)]

    def build():
        model = _mlp(seed=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        return model, opt, sparsekern.dst.RigL(model, opt, total_steps=16, delta_t=3,
                                                generator=torch.Generator().manual_seed(0))

    model, opt, algo = build()
    train_steps(model, opt, batches + batches, dst=algo, progress=False)
    straight = {k: v.clone() for k, v in model.state_dict().items()}
    model, opt, algo = build()
    path = tmp_path / "ck.pt"
    train_steps(model, opt, batches, dst=algo, progress=False, checkpoint_every=8, checkpoint_path=path)
    model, opt, algo = build()
    step = load_checkpoint(path, model, opt, algo)
    assert step == 8
    train_steps(model, opt, batches, start_step=step, dst=algo, progress=False)
    for key, value in straight.items():
        assert torch.equal(model.state_dict()[key], value), key
    with pytest.raises(ValueError, match="checkpoint_path"):
        train_steps(model, opt, batches, checkpoint_every=2)
    save_checkpoint(tmp_path / "bare.pt", model)
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "bare.pt", model, opt)


def test_grad_flow_probe_records_at_chosen_steps():
    data = make_synthetic(num_classes=4, image_size=8, n_train=128, seed=0)
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    probe = GradFlowProbe(every=0, at=(1, 3))
    batches = [data.train[list(range(i * 16, (i + 1) * 16))] for i in range(5)]
    train_steps(model, opt, batches, grad_flow=probe, progress=False)
    assert [r["step"] for r in probe.records] == [1, 3]
    assert probe.records[0]["dense"] >= probe.records[0]["active"] > 0
    with pytest.raises(ValueError, match="every must be an int >= 0"):
        GradFlowProbe(every=-1)


def test_warmup_ramps_the_learning_rate_then_follows_the_schedule():
    data = None  # lr_at needs no data
    plain = Trainer(data, steps=100, lr=0.1, lr_schedule="cosine")
    warm = Trainer(data, steps=100, lr=0.1, lr_schedule="cosine", warmup_steps=10)
    assert warm.lr_at(0) == pytest.approx(plain.lr_at(0) / 10)
    assert warm.lr_at(4) == pytest.approx(plain.lr_at(4) / 2)
    assert all(warm.lr_at(s) < warm.lr_at(s + 1) for s in range(9))
    assert all(warm.lr_at(s) == plain.lr_at(s) for s in range(9, 100))
    with pytest.raises(ValueError, match="warmup_steps"):
        Trainer(data, steps=100, warmup_steps=-1)


# -- resuming fit from its checkpoints ----------------------------------------------------------------
class _Stopped(Exception):
    pass


def _fit_parts(seed: int = 0):
    """A sparse conv net with batch norm (buffers) and dropout (the global RNG), RigL, a per-step cosine
    schedule and seeded loaders: 8 steps an epoch."""
    data = make_synthetic(num_classes=4, image_size=8, n_train=256, seed=1)
    torch.manual_seed(seed)
    model = sparsekern.sparsify(nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                              nn.Dropout(0.2), nn.Flatten(), nn.Linear(8 * 8 * 8, 4)), 0.4,
                                generator=torch.Generator().manual_seed(seed))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 16)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=16, delta_t=3, generator=torch.Generator().manual_seed(0))
    train, val, _ = data.loaders(32, seed=5)
    return model, optimizer, scheduler, algo, train, val


def _fit(parts, path, **kwargs):
    model, optimizer, scheduler, algo, train, val = parts
    return fit(model, train, val, 2, optimizer, scheduler=scheduler, dst=algo, log_every=1, grad_flow_every=3,
               scheduler_interval="step", progress=False, checkpoint_every=5, checkpoint_path=path, **kwargs)


def _stop_after(monkeypatch, saves: int):
    """save_checkpoint raises once it has written ``saves`` checkpoints: the run stops as if killed there."""
    import sparsekern.train as train_module

    real, count = train_module.save_checkpoint, [0]

    def save(*args, **kwargs):
        path = real(*args, **kwargs)
        count[0] += 1
        if count[0] == saves:
            raise _Stopped
        return path

    monkeypatch.setattr(train_module, "save_checkpoint", save)


def _without_seconds(log: dict) -> dict:
    return {**log, "epochs": [{k: v for k, v in e.items() if k != "seconds"} for e in log["epochs"]]}


# Checkpoints come at steps 5 (epoch 1, 5 of 8 steps), 8 (its end), 10 (epoch 2, 2 of 8), 15 and 16 (the end).
@pytest.mark.parametrize("stops", [(1,), (2,), (3,), (5,), (1, 2)], ids=["mid-epoch", "epoch-end", "second-epoch",
                                                                          "finished", "resumed-twice"])
def test_fit_resumed_from_its_checkpoint_is_the_run_that_was_stopped(tmp_path, monkeypatch, deterministic, stops):
    parts = _fit_parts()
    log = _fit(parts, tmp_path / "straight.pt")
    straight = {k: v.clone() for k, v in parts[0].state_dict().items()}
    path = tmp_path / "stopped.pt"
    _stop_after(monkeypatch, stops[0])
    with pytest.raises(_Stopped):
        _fit(_fit_parts(), path)
    for saves in stops[1:]:  # the resumed run stopped again, at its own checkpoints
        _stop_after(monkeypatch, saves)
        with pytest.raises(_Stopped):
            _fit(_fit_parts(), path, resume=path)
    monkeypatch.undo()
    parts = _fit_parts()
    resumed = _fit(parts, path, resume=path)
    assert _without_seconds(resumed) == _without_seconds(log)  # losses, lrs, gradient flow, epochs
    for key, value in straight.items():
        assert torch.equal(parts[0].state_dict()[key], value), key
    final = torch.load(path, weights_only=False)
    assert final["step"] == 16 and final["fit"]["epochs_done"] == 2


def test_fit_resume_checks_everything_before_changing_anything(tmp_path, monkeypatch):
    from sparsekern.train import ResumeError

    path = tmp_path / "ck.pt"
    _stop_after(monkeypatch, 1)
    with pytest.raises(_Stopped):
        _fit(_fit_parts(), path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=False)
    assert state["step"] == 5 and state["fit"]["epoch_steps"] == 5 and len(state["fit"]["ranks"]) == 1

    def refused(match, parts=None, epochs=2, resume=path, **kwargs):
        model, optimizer, scheduler, algo, train, val = parts or _fit_parts(seed=7)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        args = dict(optimizer=optimizer, scheduler=scheduler, dst=algo, progress=False, resume=resume)
        args.update(kwargs)
        with pytest.raises(ResumeError, match=match):
            fit(model, train, val, epochs, **args)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())  # nothing loaded

    refused("holds a scheduler state, but no scheduler was given", scheduler=None)
    refused("holds a dst state, but no dst was given", dst=None)
    model, optimizer, scheduler, algo, _, val = _fit_parts(seed=7)
    wide = make_synthetic(num_classes=4, image_size=8, n_train=256, seed=1).loaders(64, seed=5)[0]
    refused("5 steps into an epoch, but an epoch of this training loader has 4",
            parts=(model, optimizer, scheduler, algo, wide, val))
    two_ranks = {**state, "fit": {**state["fit"], "ranks": state["fit"]["ranks"] * 2}}
    refused("written by a run of 2 process", resume=two_ranks)
    finished = {**state, "fit": {**state["fit"], "epochs_done": 2, "epoch_steps": 0}}
    refused("2 epochs done, more than epochs=1", epochs=1, resume=finished)
    save_checkpoint(tmp_path / "bare.pt", model, optimizer, algo, step=3)
    refused("not written by fit", resume=tmp_path / "bare.pt")
    refused("not a checkpoint written by fit", resume={"step": 3})


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_fit_with_lr_scheduler_runs_the_trainers_schedule(schedule):
    """``lr_scheduler`` gives ``fit`` the schedule ``Trainer`` runs: each logged step's learning rate is the peak times
    ``lr_factor`` of that step, warm-up included."""
    from sparsekern.train import lr_factor, lr_scheduler

    data = make_synthetic(num_classes=4, image_size=8, n_train=256, seed=1)
    train, _, _ = data.loaders(32, seed=2)
    model = _mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    total = 2 * len(train)
    log = fit(model, train, None, 2, optimizer, scheduler=lr_scheduler(optimizer, total, schedule, warmup_steps=3),
              scheduler_interval="step", log_every=1, progress=False)
    expected = [0.1 * lr_factor(i, total, schedule, 3) for i in range(total)]
    assert [s["lr"] for s in log["steps"]] == pytest.approx(expected, rel=1e-12)
    assert expected[0] == pytest.approx(0.1 / 3) and expected[2] == pytest.approx(0.1 * lr_factor(2, total, schedule))
    trainer = Trainer(data.train, total, lr=0.1, lr_schedule=schedule, warmup_steps=3)
    assert [trainer.lr_at(i) for i in range(total)] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="schedule must be one of"):
        lr_scheduler(optimizer, total, "linear")
    with pytest.raises(ValueError, match="warmup_steps must be an int >= 0, got -1"):
        lr_scheduler(optimizer, total, schedule, warmup_steps=-1)


def test_fit_takes_batches_without_a_length():
    """Any re-iterable of (x, y) batches, not only a DataLoader: one without ``len`` trains as well."""
    data = make_synthetic(num_classes=4, image_size=8, n_train=128, seed=1)

    class Batches:
        def __iter__(self):
            return (data.train[list(range(i, i + 32))] for i in range(0, 128, 32))

    model = _mlp()
    log = fit(model, Batches(), None, 2, torch.optim.SGD(model.parameters(), lr=0.05), progress=False)
    assert [e["step"] for e in log["epochs"]] == [4, 8]
