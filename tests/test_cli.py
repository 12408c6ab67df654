"""The command line: parsing of every subcommand, and the demo and a study end to end (quick)."""
import json

import pytest

from sparsekern.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_parser_reads_every_subcommand():
    parser = build_parser()
    args = parser.parse_args(["study", "dst", "--quick", "--seeds", "0", "1", "--densities", "0.1", "0.02",
                              "--model", "lenet5", "--data", "mnist", "--data-dir", "/data", "--out", "r"])
    assert (args.study, args.quick, args.seeds, args.densities, args.model, args.data, args.data_dir, args.out) == (
        "dst", True, [0, 1], [0.1, 0.02], ["lenet5"], "mnist", "/data", "r")
    args = parser.parse_args(["train", "--model", "resnet20", "--data", "cifar10", "--data-dir", "P", "--density",
                              "0.1", "--method", "snfs", "--epochs", "3"])
    assert (args.model, args.data, args.density, args.method, args.epochs) == ("resnet20", "cifar10", 0.1, "snfs", 3)
    assert parser.parse_args(["demo", "--quick"]).quick
    assert parser.parse_args(["study", "dst"]).grad_flow_data is None
    assert parser.parse_args(["study", "dst", "--grad-flow-data", "train"]).grad_flow_data == "train"
    assert parser.parse_args(["bench", "--quick"]).command == "bench"
    for bad in (["study", "pruning"], ["train", "--method", "magnitude"], ["study", "dst", "--data", "imagenet"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)


def test_demo_quick_prints_the_table_and_writes_the_plot(tmp_path, capsys):
    assert main(["demo", "--quick", "--out", str(tmp_path), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "dense" in printed and "RigL 90% sparse" in printed and "ms / step" in printed
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"]
    dense, sparse = rows
    assert sparse["weights"] == pytest.approx(0.1 * dense["weights"], rel=0.01)
    assert min(dense["test_accuracy"], sparse["test_accuracy"]) > 0.5
    assert (tmp_path / "demo" / "demo.png").stat().st_size > 1000


def test_study_command_maps_options_onto_the_config(tmp_path, capsys):
    assert main(["study", "lottery", "--quick", "--densities", "0.25", "--model", "mlp", "--steps", "20",
                 "--seeds", "3", "--grad-flow-data", "train", "--out", str(tmp_path), "--no-progress"]) == 0
    assert "Lottery tickets" in capsys.readouterr().out
    config = json.loads(next((tmp_path / "lottery").glob("*/config.json")).read_text())
    assert (config["rounds"], config["steps"], config["seeds"], config["model"], config["grad_flow_data"]) == (
        2, 20, [3], "mlp", "train")


def test_train_command_trains_and_logs(tmp_path, capsys):
    assert main(["train", "--model", "mlp", "--data", "synthetic", "--density", "0.2", "--method", "set",
                 "--epochs", "2", "--delta-t", "4", "--out", str(tmp_path), "--no-progress"]) == 0
    summary = json.loads(next((tmp_path / "train").glob("*/summary.json")).read_text())
    assert summary["test"]["accuracy"] > 0.5 and "test accuracy" in capsys.readouterr().out


def test_train_command_with_no_epochs_evaluates_the_initial_model(tmp_path):
    assert main(["train", "--model", "mlp", "--data", "synthetic", "--epochs", "0", "--out", str(tmp_path),
                 "--no-progress"]) == 0
    summary = json.loads(next((tmp_path / "train").glob("*/summary.json")).read_text())
    assert summary["final_epoch"] is None and 0.0 <= summary["test"]["accuracy"] <= 1.0


def test_train_command_runs_fast_modules_unless_told(tmp_path, monkeypatch):
    """Every method trains with sparsekern.fast_modules (a ResNet's batch norms), `--plain-modules` without: the same
    gradient flow at step 0 to float rounding. (Not the test numbers at the end: a few steps of RigL on 8x8 images
    turn a last-bit difference into 1e-3 of the test loss, 4.04224 against 4.04239 once on the CI host.)"""
    import sparsekern.nn as sk_nn

    made_fast = []
    real = sk_nn.fast_modules
    monkeypatch.setattr(sk_nn, "fast_modules", lambda model: made_fast.append(real(model)) or made_fast[-1])
    logs = []
    for extra in ([], ["--plain-modules"]):
        out = tmp_path / ("plain" if extra else "fast")
        assert main(["train", "--model", "resnet20", "--data", "synthetic", "--image-size", "8", "--epochs", "1",
                     "--density", "0.2", "--method", "rigl", "--delta-t", "2", "--grad-flow-every", "100",
                     "--out", str(out), "--no-progress", *extra]) == 0
        logs.append(json.loads(next((out / "train").glob("*/log.json")).read_text()))
    assert len(made_fast) == 1 and len(made_fast[0]) > 10  # the batch norms of the first run only
    fast, plain = (log["grad_flow"][0] for log in logs)
    assert fast["step"] == plain["step"] == 0
    for key in ("loss", "active", "dense"):  # our batch norm sums in its own order: 3e-6 apart at most
        assert fast[key] == pytest.approx(plain[key], rel=1e-4), key


def test_train_command_default_delta_t_updates_a_short_run(tmp_path):
    """A run too short for updates every 100 steps (synthetic data, 2 epochs) gets about ten of them by default."""
    assert main(["train", "--model", "mlp", "--data", "synthetic", "--density", "0.2", "--method", "rigl",
                 "--epochs", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    run = next((tmp_path / "train").glob("*"))
    summary, log = (json.loads((run / f).read_text()) for f in ("summary.json", "log.json"))
    assert summary["delta_t"] < 100 and sum(e["pattern_updates"] for e in log["epochs"]) >= 5, summary


class _Stopped(Exception):
    pass


RESUME_ARGS = ["train", "--model", "resnet20", "--data", "synthetic", "--image-size", "8", "--epochs", "2",
               "--density", "0.2", "--method", "rigl", "--delta-t", "2", "--grad-flow-every", "3",
               "--checkpoint-every", "3", "--no-progress", "--deterministic"]


def _run_files(out):
    run = next((out / "train").glob("*"))
    log = json.loads((run / "log.json").read_text())
    log["epochs"] = [{k: v for k, v in e.items() if k != "seconds"} for e in log["epochs"]]
    return run, log, json.loads((run / "summary.json").read_text())


def test_train_command_resumes_a_stopped_run_bit_for_bit(tmp_path, monkeypatch, deterministic):
    """A run stopped after its first checkpoint (step 3 of 4 in epoch 1) and resumed with --resume ends with the
    model, log and test numbers of the run never stopped."""
    import torch

    import sparsekern.train as train_module

    assert main([*RESUME_ARGS, "--out", str(tmp_path / "straight")]) == 0
    real = train_module.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real(*args, **kwargs)
        raise _Stopped

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    with pytest.raises(_Stopped):
        main([*RESUME_ARGS, "--out", str(tmp_path / "stopped")])
    monkeypatch.undo()
    # --checkpoint-every, --no-progress and --device may differ from the run's own
    other_checkpoints = [a if a != "3" or RESUME_ARGS[i - 1] != "--checkpoint-every" else "5"
                         for i, a in enumerate(RESUME_ARGS)]
    assert main([*other_checkpoints, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    (run_a, log_a, summary_a), (run_b, log_b, summary_b) = (_run_files(tmp_path / d) for d in ("straight", "stopped"))
    assert log_b == log_a and summary_b["test"] == summary_a["test"]
    assert summary_a["resumed_from"] is None and summary_b["resumed_from"] == {"step": 3, "epochs_done": 0}
    a, b = (torch.load(run / "checkpoint.pt", weights_only=False)["model"] for run in (run_a, run_b))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_command_resume_needs_the_runs_checkpoint_and_arguments(tmp_path, capsys, deterministic):
    out = str(tmp_path)
    with pytest.raises(SystemExit):
        main([*RESUME_ARGS, "--out", out, "--resume"])
    assert "argument --resume: no checkpoint at" in capsys.readouterr().err
    assert main([*RESUME_ARGS, "--epochs", "1", "--out", out]) == 0  # its run directory has a checkpoint now
    runs = list((tmp_path / "train").glob("*"))
    assert len(runs) == 1 and json.loads((runs[0] / "args.json").read_text())["args"]["epochs"] == 1
    # other arguments name another directory, without a checkpoint: the error says how the runs beside it differ
    for changed, phrase in ((["--epochs", "2"], "--epochs 1 there, 2 here"),
                            (["--epochs", "1", "--lr", "0.1"], "--lr 0.05 there, 0.1 here")):
        with pytest.raises(SystemExit):
            main([*RESUME_ARGS, *changed, "--out", out, "--resume"])
        err = capsys.readouterr().err
        assert "no checkpoint at" in err and f"checkpoints of runs with other arguments: {runs[0].name}" in err
        assert phrase in err, err
    # a checkpoint moved into another run's directory is refused by its own record of the arguments
    other = tmp_path / "train" / (runs[0].name.rsplit("-", 1)[0] + "-00000000")
    other.mkdir()
    (other / "checkpoint.pt").write_bytes((runs[0] / "checkpoint.pt").read_bytes())
    import sparsekern.cli as cli

    with pytest.raises(SystemExit):
        cli._resume_state(build_parser().parse_args([*RESUME_ARGS, "--epochs", "2", "--resume"]),
                          other / "checkpoint.pt", {"args": {"epochs": 2}, "world_size": 1})
    err = capsys.readouterr().err
    assert "is from a run with other arguments" in err and "--epochs 1 there, 2 here" in err, err


def test_train_command_passes_its_schedule_and_warmup(tmp_path, monkeypatch):
    import sparsekern.train as train_module

    made = []
    real = train_module.lr_scheduler
    monkeypatch.setattr(train_module, "lr_scheduler", lambda *a: made.append(a[1:]) or real(*a))
    assert main(["train", "--model", "mlp", "--data", "synthetic", "--epochs", "2", "--lr-schedule", "step",
                 "--warmup", "0.25", "--out", str(tmp_path), "--no-progress"]) == 0
    assert made == [(8, "step", 2)]  # 2 epochs of 4 steps, a quarter of them warming up


def test_train_command_passes_its_mask_update_settings(tmp_path, monkeypatch):
    import sparsekern.dst as dst_module

    made = []
    real = dst_module.create
    monkeypatch.setattr(dst_module, "create", lambda *a, **kw: made.append(kw) or real(*a, **kw))
    base = ["train", "--model", "mlp", "--data", "synthetic", "--epochs", "2", "--method", "rigl", "--no-progress"]
    assert main([*base, "--drop-fraction", "0.5", "--end-fraction", "0.5", "--reinit-when-same",
                 "--out", str(tmp_path / "set")]) == 0
    kw = made[-1]
    assert (kw["drop_fraction"], kw["end_fraction"], kw["reinit_when_same"]) == (0.5, 0.5, True)
    assert kw["delta_t"] == 1  # a tenth of the 4 steps (2 epochs of 4) before end_fraction, at least 1
    # At their defaults (given or not) the new arguments stay out of the run's hash and args.json, so the
    # directories of runs written before they existed keep their names.
    for given in ([], ["--drop-fraction", "0.3", "--end-fraction", "0.75"]):
        assert main([*base, *given, "--out", str(tmp_path / "default")]) == 0
        assert (made[-1]["drop_fraction"], made[-1]["end_fraction"], made[-1]["reinit_when_same"]) == (
            0.3, 0.75, False)
    (run,) = (tmp_path / "default" / "train").glob("*")
    args = json.loads((run / "args.json").read_text())["args"]
    assert not {"drop_fraction", "end_fraction", "reinit_when_same"} & set(args)
