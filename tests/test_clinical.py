"""Clinical readouts: threshold for a target sensitivity, operating metrics with exact CIs, decision curves,
failure sets."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import stats

from harness.evaluation import clinical


def _sensitivity(score, positive, t) -> float:
    return float((score[positive] >= t).mean())


def _random_scores(n: int = 200, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    positive = rng.random(n) < 0.3
    # Rounded to 2 decimals so that ties among positives' scores occur and are exercised.
    score = np.round(np.clip(rng.normal(0.35 + 0.3 * positive, 0.2), 0, 1), 2)
    return score, positive


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_meets_the_target_on_its_own_data(target):
    score, positive = _random_scores()
    t = clinical.threshold_for_sensitivity(score, positive, target)
    assert _sensitivity(score, positive, t) >= target


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_for_sensitivity_is_the_largest_such_threshold(target):
    score, positive = _random_scores()
    t = clinical.threshold_for_sensitivity(score, positive, target)
    assert _sensitivity(score, positive, np.nextafter(t, np.inf)) < target


def test_threshold_for_sensitivity_on_a_hand_made_example():
    # Positives score 0.9, 0.8, 0.7, 0.2: 3 of 4 (0.75) are called down to t = 0.7, only 2 above it.
    score = np.array([0.9, 0.8, 0.7, 0.2, 0.75, 0.1])
    positive = np.array([True, True, True, True, False, False])
    assert clinical.threshold_for_sensitivity(score, positive, 0.75) == 0.7


def test_threshold_for_sensitivity_raises_without_positives():
    with pytest.raises(ValueError):
        clinical.threshold_for_sensitivity(np.array([0.2, 0.8]), np.array([False, False]), 0.9)


def test_operating_metrics_counts_on_a_hand_made_example():
    score = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.2, 0.1, 0.05])
    positive = np.array([True, True, True, True, False, False, False, False])
    out = clinical.operating_metrics(score, positive, 0.5)
    # Called (>= 0.5): 0.9, 0.8, 0.6 (positives) and 0.7 (negative) => tp 3, fp 1.
    # Not called: 0.3 (positive) and 0.2, 0.1, 0.05 (negatives) => fn 1, tn 3.
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (3, 1, 3, 1)
    # 4 positives of which 3 called => sensitivity 0.75; 4 negatives of which 3 not called => specificity 0.75;
    # 4 calls of which 3 positive => ppv 0.75; 4 non-calls of which 3 negative => npv 0.75.
    for name in ("sensitivity", "specificity", "ppv", "npv"):
        assert out[name] == 0.75


def test_operating_metrics_cis_are_exact_clopper_pearson():
    score, positive = _random_scores(seed=1)
    out = clinical.operating_metrics(score, positive, 0.5)
    pairs = {
        "sensitivity": (out["tp"], out["tp"] + out["fn"]),
        "specificity": (out["tn"], out["tn"] + out["fp"]),
        "ppv": (out["tp"], out["tp"] + out["fp"]),
        "npv": (out["tn"], out["tn"] + out["fn"]),
    }
    for name, (k, n) in pairs.items():
        ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert (out[f"{name}_ci_low"], out[f"{name}_ci_high"]) == (ci.low, ci.high)


def test_operating_metrics_are_nan_where_the_denominator_is_zero():
    # A threshold above every score calls nothing positive: tp + fp = 0, so PPV is undefined.
    out = clinical.operating_metrics(np.array([0.2, 0.4]), np.array([True, False]), 0.9)
    assert np.isnan(out["ppv"]) and np.isnan(out["ppv_ci_low"]) and np.isnan(out["ppv_ci_high"])
    assert out["sensitivity"] == 0.0


def test_decide_is_the_class_column_at_or_above_the_threshold():
    proba = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1], [0.1, 0.2, 0.7]])
    np.testing.assert_array_equal(clinical.decide(proba, 1, 0.3), [True, True, False])


def test_net_benefit_equals_the_formula_on_a_hand_made_example():
    score = np.array([0.9, 0.8, 0.6, 0.3, 0.2])
    positive = np.array([True, True, False, True, False])
    # pt 0.5: called 0.9, 0.8, 0.6 => TP 2, FP 1 of N 5: 2/5 - 1/5 * 0.5/0.5 = 0.2.
    # pt 0.25: called 0.9, 0.8, 0.6, 0.3 => TP 3, FP 1: 3/5 - 1/5 * 0.25/0.75 = 0.6 - 1/15.
    nb = clinical.net_benefit(score, positive, [0.5, 0.25])
    np.testing.assert_allclose(nb, [0.2, 0.6 - 1 / 15])


def test_net_benefit_of_calling_everyone_positive_equals_treat_all():
    _, positive = _random_scores(seed=2)
    pt = np.linspace(0.05, 0.95, 19)
    np.testing.assert_allclose(
        clinical.net_benefit(np.ones(len(positive)), positive, pt), clinical.treat_all(positive, pt)
    )


def test_treat_all_is_zero_at_threshold_equal_to_prevalence():
    positive = np.array([True] * 3 + [False] * 7)  # prevalence 0.3
    assert clinical.treat_all(positive, 0.3) == pytest.approx(0.0)


def test_net_benefit_rejects_threshold_of_one():
    with pytest.raises(ValueError):
        clinical.net_benefit(np.array([0.5]), np.array([True]), [1.0])


def test_failures_on_a_hand_made_dict():
    correct = {
        "champ": np.array([True, False, False, True, False]),
        "b": np.array([True, True, False, False, False]),
        "c": np.array([False, True, False, True, True]),
    }
    out = clinical.failures(correct, "champ")
    # Image 2 is wrong everywhere; image 1 is wrong only for the champion (b and c right);
    # image 4 is wrong for the champion and b, so it is in neither set.
    np.testing.assert_array_equal(out["all_wrong"], [2])
    np.testing.assert_array_equal(out["only_champion_wrong"], [1])


def test_failures_with_one_model_are_its_wrong_images():
    out = clinical.failures({"only": np.array([True, False, True, False])}, "only")
    np.testing.assert_array_equal(out["all_wrong"], [1, 3])
    np.testing.assert_array_equal(out["only_champion_wrong"], [1, 3])


def test_failures_rejects_an_unknown_champion():
    with pytest.raises(KeyError):
        clinical.failures({"a": np.array([True])}, "b")


def test_decision_curve_figure_draws_each_model_treat_all_and_treat_none():
    score, positive = _random_scores(seed=3)
    curves = {"model a": score, "model b": np.clip(score + 0.1, 0, 1)}
    fig = clinical.decision_curve_figure(curves, positive, class_name="covid")
    try:
        ax = fig.axes[0]
        assert len(ax.get_lines()) == len(curves) + 2
        labels = [t.get_text() for t in ax.get_legend().get_texts()]
        assert labels == ["model a", "model b", "treat all", "treat none"]
        assert ax.get_ylim()[0] == pytest.approx(-0.05)
        assert "covid" in ax.get_title()
    finally:
        plt.close(fig)
