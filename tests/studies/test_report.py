"""``sparsekern study all``'s report: each study's files copied beside it, every verdict linked to its JSON."""
import json

from sparsekern.analysis.stats import paired_comparison
from sparsekern.studies.common import compare
from sparsekern.studies.report import write_report


def _fake_run(root, name, claims):
    run = root / name / "abc123"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"study": name, "hash": "abc123", "data": "mnist",
                                                 "seeds": [0, 1, 2], "model": "lenet5"}))
    (run / "results.json").write_text(json.dumps({"study": name, "verdict": {"claims": claims}}))
    (run / "summary.md").write_text(f"# {name}\n")
    (run / "plot.png").write_bytes(b"\x89PNG fake")
    return {"dir": str(run), "steps": 300, "data": "mnist-5k", "verdict": {"claims": claims},
            "paper": "The paper says so.", "seconds": 90.0}


def test_report_links_every_claim_and_copies_the_files(tmp_path):
    claims = [compare("norm ratio", [2.0, 2.2, 2.1], [1.0, 1.0, 1.1], "greater", log=True),
              compare("accuracy", [0.9, 0.8, 0.95], [0.85, 0.9, 0.9], "greater", unit=" pt", scale=100.0)]
    results = {"gradient-flow": _fake_run(tmp_path / "runs", "gradient-flow", claims),
               "lottery": _fake_run(tmp_path / "runs", "lottery", [])}
    report = write_report(results, tmp_path / "docs")
    text = report.read_text()
    for name in results:
        for f in ("summary.md", "results.json", "config.json", "plot.png"):
            assert (tmp_path / "docs" / name / f).is_file()
        assert f"]({name}/results.json)" in text and f"![{name}: plot.png]({name}/plot.png)" in text
    assert "| [gradient-flow](#gradient-flow) | lenet5 on mnist-5k, 300 steps, 3 seeds | 1 | 0 | 1 | 1.5 min |" in text
    assert "[`verdict.claims[1]`](gradient-flow/results.json)" in text and "The paper says so." in text
    assert claims[0]["verdict"] == paired_comparison([2.0, 2.2, 2.1], [1.0, 1.0, 1.1], log=True).verdict == "supported"
    assert "no verdict" in text  # the study without claims says so
    # a refreshed report holds only the new run's files
    (tmp_path / "docs" / "lottery" / "stale.png").write_bytes(b"old")
    write_report(results, tmp_path / "docs")
    assert not (tmp_path / "docs" / "lottery" / "stale.png").exists()
