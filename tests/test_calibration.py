"""Calibration: temperature scaling, ECE (+ bootstrap CI), Brier score and the reliability diagram."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from scipy import special
from sklearn.metrics import brier_score_loss, log_loss

from harness.evaluation import calibration


def _synthetic(n: int, *, k: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits z and labels drawn from softmax(z): softmax(z) is perfectly calibrated for them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0, 1.5, (n, k))
    p = special.softmax(z, axis=1)
    # Inverse-CDF sampling of one label per row.
    y = (rng.random((n, 1)) > np.cumsum(p, axis=1)).sum(axis=1)
    return z, np.minimum(y, k - 1)


def test_fit_temperature_recovers_the_overconfidence_factor():
    z, y = _synthetic(5000)
    overconfident = special.softmax(3 * z, axis=1)  # softmax(3z) is softmax(z) at T = 1/3: T = 3 undoes it
    assert calibration.fit_temperature(overconfident, y) == pytest.approx(3.0, rel=0.15)


def test_fit_temperature_of_calibrated_predictions_is_about_one():
    z, y = _synthetic(5000, seed=1)
    assert calibration.fit_temperature(special.softmax(z, axis=1), y) == pytest.approx(1.0, rel=0.15)


def test_apply_temperature_one_is_identity():
    z, _ = _synthetic(50)
    p = special.softmax(z, axis=1)
    np.testing.assert_allclose(calibration.apply_temperature(p, 1.0), p, atol=1e-12)


def test_apply_temperature_rows_sum_to_one_and_keep_the_argmax():
    z, _ = _synthetic(50)
    p = special.softmax(z, axis=1)
    scaled = calibration.apply_temperature(p, 2.5)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)
    np.testing.assert_array_equal(scaled.argmax(axis=1), p.argmax(axis=1))


def test_apply_temperature_rejects_non_positive_temperature():
    with pytest.raises(ValueError):
        calibration.apply_temperature(np.array([[0.5, 0.5]]), 0.0)


def test_temperature_fitted_on_one_half_lowers_nll_on_the_other():
    z, y = _synthetic(4000, seed=2)
    over = special.softmax(3 * z, axis=1)
    t = calibration.fit_temperature(over[:2000], y[:2000])
    held_p, held_y = over[2000:], y[2000:]
    before = log_loss(held_y, held_p, labels=[0, 1, 2])
    after = log_loss(held_y, calibration.apply_temperature(held_p, t), labels=[0, 1, 2])
    assert after < before


def test_ece_of_calibrated_predictions_is_small():
    z, y = _synthetic(5000, seed=3)
    assert calibration.ece(special.softmax(z, axis=1), y) < 0.03


def test_ece_of_overconfident_predictions_is_large():
    z, y = _synthetic(5000, seed=3)
    assert calibration.ece(special.softmax(3 * z, axis=1), y) > 0.1


def test_ece_matches_a_hand_computed_two_bin_example():
    # 10 images at confidence 0.9 with 8 right: gap |0.8 - 0.9| = 0.1 on half the images;
    # 10 images at confidence 0.6 with 6 right: gap 0. ECE = 0.5 * 0.1 + 0.5 * 0 = 0.05.
    proba = np.array([[0.9, 0.1]] * 10 + [[0.6, 0.4]] * 10)
    y = np.array([0] * 8 + [1] * 2 + [0] * 6 + [1] * 4)
    assert calibration.ece(proba, y, bins=10) == pytest.approx(0.05)


def test_ece_ci_contains_ece_of_an_overconfident_model():
    z, y = _synthetic(500, seed=4)
    out = calibration.ece_ci(special.softmax(3 * z, axis=1), y, n_resamples=500)
    assert out["ece_ci_low"] <= out["ece"] <= out["ece_ci_high"]


def test_ece_ci_is_nan_with_fewer_than_two_images():
    out = calibration.ece_ci(np.array([[0.7, 0.3]]), np.array([0]))
    assert out["ece"] == pytest.approx(0.3)
    assert np.isnan(out["ece_ci_low"]) and np.isnan(out["ece_ci_high"])


def test_brier_of_perfect_one_hot_prediction_is_zero():
    y = np.array([0, 2, 1, 2])
    assert calibration.brier(np.eye(3)[y], y) == 0.0


@pytest.mark.parametrize("k", [2, 3, 4])
def test_brier_of_uniform_prediction_is_k_minus_one_over_k(k):
    y = np.arange(12) % k
    assert calibration.brier(np.full((12, k), 1 / k), y) == pytest.approx((k - 1) / k)


def test_binary_brier_is_twice_sklearns_brier_score_loss():
    p1 = np.array([0.9, 0.2, 0.6, 0.4])
    y = np.array([1, 0, 0, 1])
    proba = np.stack([1 - p1, p1], axis=1)
    assert calibration.brier(proba, y) == pytest.approx(2 * brier_score_loss(y, p1))


def test_calibration_metrics_are_flat_and_prefixed():
    z, y = _synthetic(200, seed=5)
    out = calibration.calibration_metrics(special.softmax(z, axis=1), y, prefix="test.")
    assert set(out) == {"test.ece", "test.ece_ci_low", "test.ece_ci_high", "test.brier"}
    assert all(isinstance(v, float) for v in out.values())


def test_reliability_figure_draws_one_line_per_curve_plus_the_diagonal():
    z, y = _synthetic(300, seed=6)
    curves = {"before": special.softmax(3 * z, axis=1), "after": special.softmax(z, axis=1)}
    fig = calibration.reliability_figure(curves, y, title="calibration")
    try:
        top = fig.axes[0]
        assert len(top.get_lines()) == 1 + len(curves)
        labels = [t.get_text() for t in top.get_legend().get_texts()]
        assert [label.split(" (")[0] for label in labels] == ["perfectly calibrated", "before", "after"]
        assert tuple(fig.get_size_inches()) == (5, 4)
    finally:
        plt.close(fig)


def test_fit_temperature_rejects_labels_out_of_range():
    with pytest.raises(ValueError):
        calibration.fit_temperature(np.array([[0.5, 0.5]]), np.array([2]))


def test_stage_keeps_temperature_one_when_every_out_of_fold_prediction_is_right(tmp_path):
    """No wrong image: the log loss falls without end as T shrinks, so a fit would run to its bound (0 or 1 out)."""
    import types

    import mlflow

    from harness.evaluation.calibration import fit_temperature
    from harness.stages.calibrate import fitted_temperature

    y = np.repeat(np.arange(4), 9)
    p = np.full((36, 4), 0.1)
    p[np.arange(36), y] = 0.7
    assert fit_temperature(p, y) < 0.06  # what the unguarded fit gives: the bound
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'm.db'}")
    with mlflow.start_run() as run:
        t = fitted_temperature(types.SimpleNamespace(mcfg=types.SimpleNamespace(key="m")), p, y)
    assert t == 1.0
    assert (
        "all 36 out-of-fold predictions right"
        in mlflow.get_run(run.info.run_id).data.tags["calibration.temperature.skipped"]
    )
