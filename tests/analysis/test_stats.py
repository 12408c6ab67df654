"""The statistics of the studies' verdicts, checked against published values (t tables, scipy 1.17)."""
import math

import pytest

from sparsekern.analysis.stats import paired_comparison, sign_flip_p, t_cdf, t_ppf


@pytest.mark.parametrize("p, df, expected", [
    (0.975, 1, 12.706204736174707), (0.975, 4, 2.7764451051977934), (0.975, 9, 2.262157162798205),
    (0.975, 30, 2.0422724563012373), (0.95, 2, 2.9199855803537242), (0.995, 5, 4.032142983555228),
    (0.025, 4, -2.7764451051977934), (0.5, 7, 0.0)])
def test_t_quantile_matches_the_table(p, df, expected):
    assert t_ppf(p, df) == pytest.approx(expected, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("t, df, expected", [
    (1.0, 1, 0.75), (-1.0, 1, 0.25), (2.0, 5, 0.9490302605850708), (0.0, 3, 0.5),
    (-3.1, 9, 0.006361227989100975), (7.5, 2, 0.9913413365603138), (2.0, 1e6, 0.9772497330743404)])
def test_t_cdf_matches_known_values(t, df, expected):
    assert t_cdf(t, df) == pytest.approx(expected, abs=1e-9)


def test_paired_t_test_and_interval_match_a_worked_example():
    a, b = [1.2, 1.5, 1.1, 1.9, 1.4], [1.0, 1.1, 1.2, 1.3, 1.0]
    r = paired_comparison(a, b, "greater")
    # scipy.stats.ttest_rel(a, b): t = 2.53546276418555, p = 0.06429011098598782
    assert r.t == pytest.approx(2.53546276418555, rel=1e-10)
    assert r.p_t == pytest.approx(0.06429011098598782, rel=1e-8)
    assert (r.ci_low, r.ci_high) == (pytest.approx(-0.028513415114930996, abs=1e-10),
                                     pytest.approx(0.6285134151149309, abs=1e-10))
    assert r.mean_diff == pytest.approx(0.3) and r.n == 5
    assert r.p_sign_flip == 4 / 32  # sign patterns of |sum| >= 1.5: the observed, its mirror, and 2 more
    assert r.verdict == "inconclusive"  # the interval crosses 0
    assert "paired t-test p = 0.0643" in r.describe() and "inconclusive" in r.describe()


def test_verdicts_follow_the_interval():
    up = [1.0, 1.1, 0.9, 1.05, 0.95]
    base = [0.0] * 5
    assert paired_comparison(up, base, "greater").verdict == "supported"
    assert paired_comparison(up, base, "less").verdict == "contradicted"
    assert paired_comparison(base, up, "greater").verdict == "contradicted"
    # a ratio of about 1.0 on the log scale: "at most 10 % larger" holds, a 2x one is contradicted
    same = paired_comparison([1.0, 1.01, 0.99, 1.0, 1.0], [1.0] * 5, "not_greater", log=True, margin=math.log(1.1))
    assert same.verdict == "supported" and same.ratio == pytest.approx(1.0, abs=0.01)
    double = paired_comparison([2.0, 2.1, 1.9, 2.0, 2.05], [1.0] * 5, "not_greater", log=True, margin=math.log(1.1))
    assert double.verdict == "contradicted" and double.to_dict()["ratio"] == pytest.approx(2.01, abs=0.01)


def test_sign_flip_test_is_exact():
    assert sign_flip_p([1, 2, 3, 4, 5]) == 2 / 32  # only all-plus and all-minus reach |sum| 15
    assert sign_flip_p([1, 2, 3, 4, 5], "greater") == 1 / 32
    assert sign_flip_p([1, -1]) == 1.0
    assert sign_flip_p([0.5, 0.5, -0.5], "less") == 7 / 8


@pytest.mark.parametrize("call, message", [
    (lambda: t_ppf(1.0, 3), "p must lie in"), (lambda: t_cdf(1.0, 0), "df must be"),
    (lambda: paired_comparison([1.0], [2.0]), "same number"), (lambda: paired_comparison([1, 2], [1]), "same number"),
    (lambda: paired_comparison([1, 2], [1, 2], claim="bigger"), "claim must be"),
    (lambda: paired_comparison([1, 2], [0, 2], log=True), "positive"),
    (lambda: paired_comparison([1, 2], [1, 2], level=95), "level must"),
    (lambda: sign_flip_p([]), "diffs must hold")])
def test_bad_inputs_name_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()
