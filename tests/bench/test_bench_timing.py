"""bench.timing.measure_interleaved: side-by-side rounds, rotated order, the budget's stopping rules.

The stopping rules are checked against a fake clock that only the closures advance, so a loaded CI host (a sleep
that overshoots by milliseconds under pytest-xdist) cannot change how many rounds run.
"""
import types

import pytest

import sparsekern.bench.timing as timing
from sparsekern.bench.timing import Budget, measure_interleaved


@pytest.fixture
def clock(monkeypatch):
    """A perf_counter that stands still except when a closure calls ``clock.take(seconds)``."""
    state = types.SimpleNamespace(now=0.0)

    def take(seconds):
        state.now += seconds
    fake = types.SimpleNamespace(now=lambda: state.now, take=take)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(perf_counter=fake.now))
    return fake


def test_every_closure_runs_once_per_round_in_rotated_order():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "abc"}
    out = measure_interleaved(fns, Budget(0.0, 10.0, threshold=float("inf")), min_rounds=6)
    assert {t.runs for t in out.values()} == {6}
    rounds = [calls[i:i + 3] for i in range(0, len(calls), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)


def test_medians_follow_the_closures_and_max_run_time_stops(clock):
    fns = {"short": lambda: clock.take(0.002), "long": lambda: clock.take(0.006)}
    # threshold 0: never settled by spread, so only max_run_time (0.1 s of "long": its 17th call) ends it
    out = measure_interleaved(fns, Budget(0.05, 0.1, threshold=0.0))
    assert out["short"].runs == out["long"].runs == 17
    assert out["long"].median == pytest.approx(0.006) and out["short"].median == pytest.approx(0.002)
    assert out["short"].ok and out["short"].iqr == pytest.approx(0.0, abs=1e-12)


def test_min_run_time_keeps_rounds_going(clock):
    # spread is nil from the first round, so only min_run_time (0.03 s of 1 ms calls) keeps the rounds going
    out = measure_interleaved({"a": lambda: clock.take(0.001)}, Budget(0.03, 1.0))
    assert out["a"].runs in (30, 31)  # 30 unless the float sum of 30 samples lands just under 0.03


def test_a_slow_spell_ends_min_run_time_sooner_but_not_min_rounds(clock):
    # one call that overshoots (a loaded host) counts its real time towards min_run_time, as it must: 0.03 s is
    # reached at the 6th call; the outlier still holds the upper quartile above 5 % of the median there, so the
    # spread rule asks for a 7th, after which the quartiles are all 1 ms
    times = iter([0.001, 0.001, 0.0255] + [0.001] * 100)
    out = measure_interleaved({"a": lambda: clock.take(next(times))}, Budget(0.03, 1.0))
    assert out["a"].runs == 7 and out["a"].median == pytest.approx(0.001)
    out = measure_interleaved({"a": lambda: clock.take(0.5)}, Budget(0.03, 1.0), min_rounds=5)
    assert out["a"].runs == 5  # max_run_time (1 s) is reached at the 2nd call, but not before min_rounds


def test_lead_calls_each_closure_untimed_just_before_its_timed_call():
    calls = []
    fns = {k: (lambda k=k: calls.append(k)) for k in "ab"}
    out = measure_interleaved(fns, Budget(0.0, 10.0, threshold=float("inf")), min_rounds=4, lead=2)
    assert {t.runs for t in out.values()} == {4}
    # every closure runs three times in a row (two untimed, one timed): no timed call follows another closure
    assert calls == ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3 + ["a"] * 3 + ["b"] * 3 + ["b"] * 3 + ["a"] * 3
