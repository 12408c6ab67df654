"""Smoke tests of the three studies in their --quick setting, each checking a property of the paper."""
import dataclasses
import json
import pathlib

import pytest
import torch

from sparsekern.studies import DSTConfig, GradientFlowConfig, LotteryConfig, dst, gradient_flow, lottery
from sparsekern.studies.common import config_hash


def _files(result, *plots):
    out = __import__("pathlib").Path(result["dir"])
    config = json.loads((out / "config.json").read_text())
    assert out.name == config["hash"]
    assert json.loads((out / "results.json").read_text())["study"] == config["study"]
    for plot in plots:
        assert (out / plot).stat().st_size > 1000
    summary = (out / "summary.md").read_text()
    assert "Verdict" in summary and "Quick run" in summary
    return summary


def test_gradient_flow_sparse_init_raises_gradient_norm_at_init(tmp_path):
    config = GradientFlowConfig.quick_config(out=str(tmp_path), steps=2, densities=(0.05,), seeds=(0, 1, 2),
                                             progress=False)
    result = gradient_flow.run(config)
    summary = _files(result, "grad_norm_init.png", "grad_norm_training.png", "loss_curve.png")
    for model in config.models:
        cell = {r["init"]: r["grad_norm_init"]["mean"] for r in result["table"]
                if r["model"] == model and r["density"] == 0.05}
        # the paper's Fig. 2: at 95 % sparsity a dense init starves the gradient; per-unit scaling restores it
        assert cell["sparse"] > 3 * cell["dense"], (model, cell)
    # the verdict is a paired test over the 3 seeds: the ratio's whole 95 % interval lies above 1
    at_init = [c for c in result["verdict"]["claims"] if c["quantity"] == "grad_norm_init"]
    assert len(at_init) == 2 and all(c["verdict"] == "supported" and c["ratio_ci"][0] > 1 for c in at_init)
    assert all(c["n"] == 3 and c["a"] and len(c["a"]) == len(c["b"]) == 3 for c in result["verdict"]["claims"])
    assert "paired t-test p =" in summary and "verdict.claims[0]" in summary


def test_dst_moves_the_mask_and_static_does_not(tmp_path):
    config = DSTConfig.quick_config(out=str(tmp_path), steps=30, methods=("static", "rigl"), progress=False)
    result = dst.run(config)
    _files(result, "grad_norm_training.png")
    by_method = {r["method"]: r for r in result["runs"]}
    assert by_method["static"]["mask_changed_fraction"] == 0.0
    assert by_method["rigl"]["mask_changed_fraction"] > 0.05
    assert by_method["rigl"]["pattern_updates"] >= 2
    assert all(r["test_accuracy"] > 0.5 for r in result["runs"])  # 10 classes: chance is 0.1
    assert result["verdict"]["claims"] == []  # one seed: no paired comparison


def test_lottery_ticket_relearns_the_pruning_solution(tmp_path):
    config = LotteryConfig.quick_config(out=str(tmp_path), steps=40, progress=False)
    result = lottery.run(config)
    _files(result, "grad_norm_training.png", "interpolation.png")
    table = result["table"]
    assert table["density"]["mean"] == pytest.approx(0.25, abs=0.01)
    # the ticket starts and ends much closer to the pruning solution than the same mask from scratch
    assert table["ticket"]["distance_start"]["mean"] < 0.5 * table["scratch"]["distance_start"]["mean"]
    assert table["ticket"]["distance_end"]["mean"] < 0.5 * table["scratch"]["distance_end"]["mean"]
    assert result["verdict"]["claims"] == []  # one seed: no paired comparison
    curve = result["per_seed"][0]["solutions"]["ticket"]["interpolation"]
    assert curve["alphas"][0] == 0.0 and curve["alphas"][-1] == 1.0 and len(curve["losses"]) == 11


def test_config_hash_names_the_setting_not_the_output():
    a = LotteryConfig(out="x", progress=True)
    assert config_hash(a) == config_hash(LotteryConfig(out="y", progress=False, fresh=True))
    assert config_hash(a) != config_hash(LotteryConfig(rounds=5))


def test_grad_flow_data_picks_the_batch_and_keeps_earlier_hashes(tmp_path):
    """The gradient-norm batch: validation images by default, training images as the paper's code; the default
    leaves the config hash as it was before the field existed (docs/studies' runs keep their directories)."""
    from sparsekern.studies.common import _hashed_fields, grad_flow_batch, load_splits

    assert "grad_flow_data" not in _hashed_fields(DSTConfig())
    assert config_hash(DSTConfig()) == config_hash(DSTConfig(grad_flow_data="val"))
    assert config_hash(DSTConfig()) != config_hash(DSTConfig(grad_flow_data="train"))
    splits = load_splits("digits", None)
    for data, split in (("val", splits.val), ("train", splits.train)):
        x, y = grad_flow_batch(splits, data)
        n = min(1000, len(split))
        assert torch.equal(x, split[list(range(n))][0]) and torch.equal(y, split[list(range(n))][1])
    with pytest.raises(ValueError, match="data must be one of"):
        grad_flow_batch(splits, "test")
    with pytest.raises(ValueError, match="grad_flow_data must be one of"):
        DSTConfig(grad_flow_data="test")
    config = DSTConfig.quick_config(out=str(tmp_path), steps=4, methods=("static",), grad_flow_data="train",
                                    progress=False)
    result = dst.run(config)
    summary = _files(result)
    assert "the first 1000 training images (as the paper's code)" in summary
    assert "`loss_curve.png` (loss on the training batch vs step)" in summary  # the plots name it too


def test_study_jobs_run_under_deterministic_algorithms_unless_told(tmp_path):
    """A study run twice gives the same numbers: every job under torch's deterministic algorithms (the layers'
    kernels by rule, none timed), the global setting as it was afterwards; deterministic=False (the CLI's
    --measured-kernels) leaves it alone, and names another run directory."""
    from sparsekern.cli import _study_config, build_parser
    from sparsekern.studies.common import Jobs

    seen = []
    assert not torch.are_deterministic_algorithms_enabled()
    Jobs(tmp_path / "a").run("job", lambda: seen.append(torch.are_deterministic_algorithms_enabled()) or {})
    Jobs(tmp_path / "b", deterministic=False).run(
        "job", lambda: seen.append(torch.are_deterministic_algorithms_enabled()) or {})
    assert seen == [True, False] and not torch.are_deterministic_algorithms_enabled()
    assert config_hash(DSTConfig()) == config_hash(DSTConfig(deterministic=True))
    assert config_hash(DSTConfig()) != config_hash(DSTConfig(deterministic=False))
    args = build_parser().parse_args(["study", "dst", "--measured-kernels"])
    assert _study_config(args, "dst")[1].deterministic is False
    assert _study_config(build_parser().parse_args(["study", "dst"]), "dst")[1].deterministic is True


def test_quick_settings_use_digits_and_defaults_the_paper_setting():
    assert GradientFlowConfig.quick_config().data == DSTConfig.quick_config().data == "digits"
    for config in (GradientFlowConfig(), DSTConfig(), LotteryConfig()):
        assert config.data == "mnist" and config.data_dir is None and len(config.seeds) >= 5
    assert set(GradientFlowConfig().models) == {"mlp", "lenet5"}


class _Stopped(Exception):
    pass


def _without_times(results: dict) -> dict:
    """results.json less what differs between two runs of one config: wall time, step times, jobs reused."""
    if isinstance(results, dict):
        return {k: _without_times(v) for k, v in results.items()
                if k not in ("seconds", "jobs_reused", "seconds_per_step")}
    return [_without_times(v) for v in results] if isinstance(results, list) else results


def test_a_stopped_study_goes_on_where_it_stopped(tmp_path, monkeypatch, capsys, deterministic):
    """The DST study stopped in its third job keeps the two it finished (<run dir>/jobs) and, run again, trains only
    the rest: its results are the run never stopped's. Records made by other code, or cut short, are trained again;
    fresh=True trains all."""
    import sparsekern.studies.common as common

    config = DSTConfig.quick_config(out=str(tmp_path / "straight"), steps=12, methods=("static", "set", "rigl"),
                                    progress=False)
    straight = json.loads((pathlib.Path(dst.run(config)["dir"]) / "results.json").read_text())
    stopped = DSTConfig.quick_config(out=str(tmp_path / "stopped"), steps=12, methods=("static", "set", "rigl"),
                                     progress=False)
    real_run, calls = common.Jobs.run, []

    def run_then_stop(self, key, compute):
        calls.append(key)
        if len(calls) == 3:
            raise _Stopped
        return real_run(self, key, compute)

    monkeypatch.setattr(common.Jobs, "run", run_then_stop)
    with pytest.raises(_Stopped):
        dst.run(stopped)
    monkeypatch.undo()
    jobs = pathlib.Path(tmp_path / "stopped" / "dst" / config_hash(stopped) / "jobs")
    assert sorted(p.name for p in jobs.iterdir()) == ["dense-d1.0-s0.json", "static-d0.1-s0.json"]
    capsys.readouterr()
    trained = []
    monkeypatch.setattr(dst, "study_model", lambda *a, **k: trained.append(a[3]) or common.study_model(*a, **k))
    resumed = dst.run(stopped)
    assert trained == [0.1, 0.1]  # set and rigl; the dense and static jobs were read
    assert "2 of 4 jobs read from" in capsys.readouterr().err and resumed["jobs_reused"] == 2
    assert _without_times(json.loads((pathlib.Path(resumed["dir"]) / "results.json").read_text())) == \
        _without_times(straight)

    trained.clear()
    (jobs / "set-d0.1-s0.json").write_text('{"code": "')  # cut short
    monkeypatch.setattr(common, "code_digest", lambda: "other code")
    assert dst.run(stopped)["jobs_reused"] == 0 and trained == [1.0, 0.1, 0.1, 0.1]
    assert "4 records there from other code or cut short were trained again" in capsys.readouterr().err
    trained.clear()
    assert dst.run(dataclasses.replace(stopped, fresh=True))["jobs_reused"] == 0 and len(trained) == 4


def test_dst_study_passes_reinit_when_same_and_keeps_earlier_hashes(tmp_path, monkeypatch):
    """The DST study's algorithms keep a weight dropped and grown back (the paper's code) unless
    reinit_when_same; the default leaves the config hash as it was before the field existed."""
    from sparsekern import dst as dst_module
    from sparsekern.studies.common import _hashed_fields

    assert "reinit_when_same" not in _hashed_fields(DSTConfig())
    assert config_hash(DSTConfig()) == config_hash(DSTConfig(reinit_when_same=False))
    assert config_hash(DSTConfig()) != config_hash(DSTConfig(reinit_when_same=True))
    made = []
    real = dst_module.create
    monkeypatch.setattr(dst_module, "create", lambda *a, **kw: made.append(kw["reinit_when_same"]) or real(*a, **kw))
    for reinit in (False, True):
        config = DSTConfig.quick_config(out=str(tmp_path), steps=4, methods=("rigl",), reinit_when_same=reinit,
                                        dense_baseline=False, progress=False)
        summary = _files(dst.run(config))
        assert made[-1] is reinit
        assert ("restarted at zero" if reinit else "kept as it was (as in the paper's code)") in summary
