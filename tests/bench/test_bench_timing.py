"""bench.timing.measure_interleaved: side-by-side rounds, rotated order, the budget's stopping rules."""
import time

from sparsekern.bench.timing import Budget, measure_interleaved


def test_every_closure_runs_once_per_round_in_rotated_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    out = measure_interleaved(fns, Budget(0.0, 10.0, threshold=float("inf")), min_rounds=6)
    assert {t.runs for t in out.values()} == {6}
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_medians_follow_the_closures_and_max_run_time_stops():
    fns = {"short": lambda: time.sleep(0.002), "long": lambda: time.sleep(0.006)}
    # threshold 0: never settled by spread, so only max_run_time (about 0.1 s of "long") ends it
    out = measure_interleaved(fns, Budget(0.05, 0.1, threshold=0.0))
    assert out["short"].runs == out["long"].runs >= 5
    assert out["long"].runs <= 0.1 / 0.006 + 2
    assert 2.0 < out["long"].median / out["short"].median < 4.0
    assert out["short"].ok and out["short"].iqr >= 0


def test_min_run_time_keeps_rounds_going():
    out = measure_interleaved({"a": lambda: time.sleep(0.001)}, Budget(0.03, 1.0))
    assert out["a"].runs >= 0.03 / 0.0015


def test_lead_calls_each_closure_untimed_just_before_its_timed_call():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    out = measure_interleaved(fns, Budget(0.0, 10.0, threshold=float("inf")), min_rounds=4, lead=2)
    assert {t.runs for t in out.values()} == {4}
    # every closure runs three times in a row (two untimed, one timed): no timed call follows another closure
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
