"""Multi-process training (torchrun, DDP over gloo on the CPU) and the device choice of ``sparsekern train``.

Two tests launch real torchrun runs of 2 processes (a few seconds each): the CLI end to end, and a worker
(tests/ddp_shard_worker.py) that checks the helpers' sharding and all-reduced evaluation across processes.
The rest checks the helpers in this process.
"""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import sparsekern
from sparsekern import distributed
from sparsekern.cli import main
from sparsekern.data import load_data, make_loaders, make_synthetic
from sparsekern.models import build_model
from sparsekern.train import fit, load_checkpoint

WORLD = 2
LAUNCH_TIMEOUT_S = 300  # two processes importing torch and training a few steps take ~10 s on 2 cores
needs_dist = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _torchrun(args, cwd):
    """``python -m torch.distributed.run --standalone`` (a free port) with ``WORLD`` CPU processes."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", SPARSEKERN_AUTOTUNE="0",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[1]), env.get("PYTHONPATH", "")]))
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--standalone", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _report(run) -> str:
    return f"exit {run.returncode}\n--- stdout\n{run.stdout[-4000:]}\n--- stderr\n{run.stderr[-8000:]}"


# -- end to end: torchrun on the command line --------------------------------------------------------
TRAIN_ARGS = ["train", "--model", "mlp", "--data", "synthetic", "--method", "rigl", "--density", "0.2", "--epochs",
              "1", "--batch-size", "32", "--delta-t", "4", "--checkpoint-every", "5", "--seed", "1", "--no-progress"]


def _sparse_mlp(seed: int) -> nn.Module:
    """The model ``sparsekern train`` builds from TRAIN_ARGS, before training."""
    splits = load_data("synthetic")
    model = build_model("mlp", splits.num_classes, splits.in_channels, splits.image_size, seed, he_init=False)
    return sparsekern.sparsify(model, 0.2, "erk", init="sparse", generator=torch.Generator().manual_seed(seed))


@needs_dist
def test_torchrun_cli_trains_one_model_on_two_ranks(tmp_path):
    run = _torchrun(["-m", "sparsekern", *TRAIN_ARGS, "--device", "cpu", "--out", str(tmp_path)], cwd=tmp_path)
    assert run.returncode == 0, _report(run)
    # rank 0 alone writes and prints
    assert len(list(tmp_path.rglob("log.json"))) == 1 and len(list(tmp_path.rglob("summary.json"))) == 1
    assert len(list(tmp_path.rglob("checkpoint.pt"))) == 1
    assert run.stdout.count("test accuracy") == 1, _report(run)
    run_dir = next(tmp_path.rglob("summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    log = json.loads((run_dir / "log.json").read_text())
    assert (summary["world_size"], summary["device"]) == (WORLD, "cpu")

    # Each rank trained on its half of the 512 synthetic training images: 8 steps of 32 per epoch, not 16.
    n_train = len(load_data("synthetic").train)
    assert log["epochs"][0]["step"] == math.ceil(math.ceil(n_train / WORLD) / 32)
    assert log["epochs"][0]["pattern_updates"] > 0

    # Both ranks ended with bit-identical patterns and values, and the checkpoint is that model.
    digests = summary["rank_model_digests"]
    assert len(digests) == WORLD and len(set(digests)) == 1, digests
    checkpoint = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert distributed.state_digest(checkpoint["model"]) == digests[0]
    assert not any(k.startswith("module.") for k in checkpoint["model"])

    # The 2-rank checkpoint (model, optimizer, DST state) loads into a single-process model; RigL moved weights.
    model = _sparse_mlp(seed=1)
    initial = {n: m.mask().clone() for n, m in model.named_modules() if isinstance(m, sparsekern.nn.SparseLinear)}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    algo = sparsekern.dst.RigL(model, optimizer, total_steps=20, delta_t=4)
    assert load_checkpoint(run_dir / "checkpoint.pt", model, optimizer, algo) == log["epochs"][0]["step"]
    assert distributed.state_digest(model.state_dict()) == digests[0]
    assert any(not torch.equal(m.mask(), initial[n]) for n, m in model.named_modules() if n in initial)
    assert algo.step_count == log["epochs"][0]["step"]
    x, _ = load_data("synthetic").test[list(range(8))]
    assert model(x).shape == (8, load_data("synthetic").num_classes)


@needs_dist
def test_torchrun_run_resumed_from_a_mid_epoch_checkpoint_is_the_run_never_stopped(tmp_path):
    """Two ranks with batch norm (each rank's own running statistics until the epoch's average) and RigL: a run
    stopped at its first checkpoint (step 5 of 8 in epoch 1) and resumed with --resume under torchrun ends with
    the log, the test numbers and, on both ranks, the model of the run never stopped."""
    args = ["train", "--model", "resnet20", "--image-size", "8", "--data", "synthetic", "--method", "rigl",
            "--density", "0.2", "--epochs", "2", "--batch-size", "32", "--delta-t", "3", "--checkpoint-every", "5",
            "--grad-flow-every", "4", "--seed", "1", "--no-progress", "--deterministic", "--device", "cpu"]
    runs = {}
    for name, launch in (("straight", ["-m", "sparsekern", *args]),
                         ("stopped", [str(Path(__file__).with_name("ddp_resume_worker.py")), "1", *args]),
                         ("resumed", ["-m", "sparsekern", *args, "--resume"])):
        out = tmp_path / ("straight" if name == "straight" else "stopped")
        run = _torchrun([*launch, "--out", str(out)], cwd=tmp_path)
        assert run.returncode == 0, f"{name}: {_report(run)}"
        if name == "stopped":
            assert not list(out.rglob("summary.json")) and len(list(out.rglob("checkpoint.pt"))) == 1
            state = torch.load(next(out.rglob("checkpoint.pt")), weights_only=False)
            assert (state["step"], state["fit"]["epoch_steps"], len(state["fit"]["ranks"])) == (5, 5, WORLD)
            buffers = [r["buffers"]["bn1.running_mean"] for r in state["fit"]["ranks"]]
            assert not torch.equal(*buffers)  # each rank's own statistics, restored to each
            continue
        run_dir = next(out.rglob("summary.json")).parent
        log = json.loads((run_dir / "log.json").read_text())
        log["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in log["epochs"]]
        runs[name] = (log, json.loads((run_dir / "summary.json").read_text()))
    (log_a, summary_a), (log_b, summary_b) = runs["straight"], runs["resumed"]
    assert summary_b["resumed_from"] == {"step": 5, "epochs_done": 0}
    assert log_b == log_a and summary_b["test"] == summary_a["test"]
    assert summary_b["rank_model_digests"] == summary_a["rank_model_digests"]


@needs_dist
def test_torchrun_ranks_get_disjoint_shards_and_evaluate_the_whole_split(tmp_path):
    out = tmp_path / "shards.json"
    run = _torchrun([str(Path(__file__).with_name("ddp_shard_worker.py")), str(out)], cwd=tmp_path)
    assert run.returncode == 0, _report(run)
    result = json.loads(out.read_text())
    ranks = sorted(result["ranks"], key=lambda r: r["rank"])
    assert [r["rank"] for r in ranks] == list(range(WORLD)) and all(r["world_size"] == WORLD for r in ranks)
    n_train, per_rank = 51, math.ceil(51 / WORLD)
    for epoch in range(2):
        shards = [r["epochs"][epoch] for r in ranks]
        assert all(len(s) == per_rank for s in shards)  # equal lengths: every rank runs the same steps
        assert set().union(*shards) == set(range(n_train))  # together: the whole training split
        assert len(set(shards[0]) & set(shards[1])) == WORLD * per_rank - n_train  # only the padding repeats
    assert ranks[0]["epochs"][0] != ranks[0]["epochs"][1]  # set_epoch: a new order each epoch
    # every rank reports the whole validation split's numbers, not its shard's
    for r in ranks:
        assert r["evaluation"] == pytest.approx(result["whole"], rel=1e-6)


# -- one process: the CLI as before, and --device ------------------------------------------------------
def test_single_process_cpu_run_is_unchanged(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main([*TRAIN_ARGS, "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    run_dir = next(tmp_path.rglob("summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["world_size"], summary["device"]) == (1, "cpu") and "rank_model_digests" not in summary
    log = json.loads((run_dir / "log.json").read_text())
    assert log["epochs"][0]["step"] == math.ceil(len(load_data("synthetic").train) / 32)
    # the same seed, the same run: --device cpu and the default (auto, no CUDA here) give the same model
    if not torch.cuda.is_available():
        first = torch.load(run_dir / "checkpoint.pt", weights_only=False)["model"]
        assert main([*TRAIN_ARGS, "--out", str(tmp_path / "auto")]) == 0
        second = torch.load(next((tmp_path / "auto").rglob("checkpoint.pt")), weights_only=False)["model"]
        assert distributed.state_digest(first) == distributed.state_digest(second)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_train_on_cuda_keeps_model_optimizer_and_dst_on_the_gpu(tmp_path, capsys, monkeypatch):
    """`make gpu-check` runs it (its gpu-marked group): a sparse conv net trained by the CLI on the GPU, RigL
    updates included, and its checkpoint read back on the CPU."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["train", "--model", "resnet20", "--data", "synthetic", "--method", "rigl", "--density", "0.2",
            "--epochs", "1", "--batch-size", "64", "--delta-t", "2", "--checkpoint-every", "4", "--no-progress"]
    assert main([*argv, "--device", "cuda", "--out", str(tmp_path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    run_dir = next(tmp_path.rglob("summary.json")).parent
    summary = json.loads((run_dir / "summary.json").read_text())
    log = json.loads((run_dir / "log.json").read_text())
    assert summary["device"] == f"cuda:{torch.cuda.current_device()}" and summary["world_size"] == 1
    assert log["epochs"][0]["pattern_updates"] > 0 and math.isfinite(summary["test"]["loss"])
    state = torch.load(run_dir / "checkpoint.pt", weights_only=False)
    assert all(t.is_cuda for t in state["model"].values() if isinstance(t, torch.Tensor) and t.numel())
    model = build_model("resnet20", 4, 1, 8, 0, he_init=False)
    sparsekern.sparsify(model, 0.2, "erk", init="sparse", generator=torch.Generator().manual_seed(0))
    model.load_state_dict(torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"])
    x, _ = load_data("synthetic").test[list(range(8))]
    assert torch.isfinite(model(x)).all()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_device_cuda_without_cuda_is_a_usage_error(device, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "synthetic", "--device", device, "--out", str(tmp_path)])  # no scikit-learn needed
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--device" in err and "CUDA is not available" in err, err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("argv, phrase", [
    (["--device", "gpu"], "must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["--device", "cuda:-1"], "must be auto, cpu, cuda or cuda:N"),
])
def test_bad_device_is_a_usage_error(argv, phrase, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *argv, "--out", str(tmp_path)])
    assert info.value.code == 2 and phrase in capsys.readouterr().err


def test_snfs_under_torchrun_is_a_usage_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; rejected before joining any group
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "synthetic", "--method", "snfs", "--device", "cpu", "--out", str(tmp_path)])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--method" in err and "snfs" in err and "DDP" in err
    assert not any(tmp_path.iterdir())


# -- the helpers ---------------------------------------------------------------------------------------
def test_outside_a_process_group_every_helper_is_the_single_process_identity(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert distributed.launched_world_size() == 1
    assert (distributed.rank(), distributed.world_size(), distributed.is_main_process()) == (0, 1, True)
    assert distributed.all_reduce_sums([1.5, 2]) == [1.5, 2.0]
    assert distributed.gather_objects({"a": 1}) == [{"a": 1}]
    model = nn.Linear(2, 2)
    assert distributed.unwrap(model) is model
    context = distributed.setup("cpu")
    assert (context.rank, context.world_size, context.distributed, context.is_main) == (0, 1, False, True)
    assert not dist.is_initialized()


def test_world_size_and_device_parsing(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert distributed.launched_world_size() == 4
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE must be an int >= 1, got 'two'"):
        distributed.launched_world_size()
    assert [distributed.parse_device(d) for d in ("auto", "CPU", "cuda", "cuda:01")] == [
        "auto", "cpu", "cuda", "cuda:1"]
    for bad in ("gpu", "cuda:", "cuda:x", "mps"):
        with pytest.raises(ValueError, match="must be auto, cpu, cuda or cuda:N"):
            distributed.parse_device(bad)
    assert distributed.resolve_device("cpu", local_rank=1, distributed=True) == torch.device("cpu")
    if not torch.cuda.is_available():
        assert distributed.resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="CUDA is not available"):
            distributed.resolve_device("cuda", local_rank=1, distributed=True)


@pytest.mark.parametrize("length", [0, 1, 7, 10])
@pytest.mark.parametrize("replicas", [1, 2, 3])
def test_shard_sampler_splits_an_evaluation_set_exactly(length, replicas):
    shards = [list(distributed.ShardSampler(length, replicas, r)) for r in range(replicas)]
    assert sorted(i for s in shards for i in s) == list(range(length))  # disjoint, no padding, complete
    assert [len(distributed.ShardSampler(length, replicas, r)) for r in range(replicas)] == [len(s) for s in shards]
    with pytest.raises(ValueError, match="rank must lie in"):
        distributed.ShardSampler(length, replicas, replicas)


def _indices(loader):
    return [int(i) for batch in loader.sampler for i in batch]


def test_sharded_loaders_cover_each_split_and_follow_the_epoch():
    splits = make_synthetic(n_train=64, n_val=21, n_test=10)
    per_rank = [splits.loaders(8, seed=5, num_replicas=WORLD, rank=r) for r in range(WORLD)]
    for split, dataset in enumerate((splits.train, splits.val, splits.test)):
        shards = [_indices(loaders[split]) for loaders in per_rank]
        assert sorted(i for s in shards for i in s) == list(range(len(dataset))), split  # disjoint, complete
    train = [loaders[0] for loaders in per_rank]
    epoch0 = [_indices(t) for t in train]
    assert epoch0 == [_indices(t) for t in train]  # the same epoch: the same order
    for t in train:
        distributed.set_epoch(t, 1)
    epoch1 = [_indices(t) for t in train]
    assert epoch1 != epoch0 and sorted(epoch1[0] + epoch1[1]) == list(range(64))
    # the batches a sharded loader yields are those examples
    x, y = next(iter(train[1]))
    assert torch.equal(y, splits.train.labels[epoch1[1][:8]]) and x.device.type == "cpu"
    # one process: the loader as it always was (its order is the seeded RandomSampler's)
    single = make_loaders(splits.train, 8, shuffle=True, seed=5)
    expected = torch.randperm(64, generator=torch.Generator().manual_seed(5)).tolist()
    assert _indices(single) == expected
    with pytest.raises(ValueError, match="rank must be an int in \\[0, 2\\), got 2"):
        make_loaders(splits.train, 8, shuffle=True, num_replicas=2, rank=2)


def test_fit_on_a_rank_other_than_0_writes_and_prints_nothing(tmp_path, capsys, monkeypatch):
    import sparsekern.train as train_module
    monkeypatch.setattr(train_module, "is_main_process", lambda: False)
    splits = make_synthetic(n_train=64, n_val=16, n_test=16)
    train, val, _ = splits.loaders(16, seed=0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    log = fit(model, train, val, 2, optimizer, log_path=tmp_path / "log.json", progress=True,
              checkpoint_every=2, checkpoint_path=tmp_path / "checkpoint.pt")
    assert len(log["epochs"]) == 2  # it trained
    assert not any(tmp_path.iterdir())
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


def test_state_digest_tells_models_apart():
    torch.manual_seed(0)
    model = sparsekern.sparsify(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), 0.5)
    state = model.state_dict()
    same = {k: v.clone() for k, v in state.items()}
    assert distributed.state_digest(state) == distributed.state_digest(same)
    values = next(k for k in same if k.endswith("values"))
    same[values] = same[values].clone()
    same[values][0] = torch.nextafter(same[values][0], torch.tensor(math.inf))  # one ulp
    assert distributed.state_digest(state) != distributed.state_digest(same)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_fit_train_numbers_leave_out_the_samplers_padding(rank):
    """51 examples on 3 ranks: 17 each, no padding; on 2 ranks (below) 26 each, rank 1's last one a repeat. With the
    learning rate 0 the epoch's train loss and accuracy are those of the rank's own examples exactly."""
    splits = make_synthetic(n_train=51, n_val=8, n_test=8)
    torch.manual_seed(0)
    for replicas in (2, 3):
        if rank >= replicas:
            continue
        loader = make_loaders(splits.train, 8, shuffle=True, seed=3, num_replicas=replicas, rank=rank)
        own = len(range(rank, 51, replicas))
        assert distributed.own_examples(loader) == (None if 51 % replicas == 0 else own)
        model = nn.Sequential(nn.Flatten(), nn.Linear(splits.train.images[0].numel(), 4))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        distributed.set_epoch(loader, 0)
        indices = [i for batch in loader.sampler for i in batch][:own]  # the sampler's order, padding dropped
        x, y = splits.train[indices]
        with torch.no_grad():
            out = model(x)
        record = fit(model, loader, None, 1, optimizer, progress=False)["epochs"][0]
        assert record["train_loss"] == pytest.approx(float(nn.functional.cross_entropy(out, y)), rel=1e-6)
        assert record["train_accuracy"] == pytest.approx(float((out.argmax(1) == y).float().mean()))
