"""Temperature scaling, ECE and Brier score against known answers."""

from __future__ import annotations

import numpy as np
import pytest

from volumes.calibration import brier_score, expected_calibration_error, fit_temperature, softmax


def _sampled(temperature: float, n: int = 20000, k: int = 3, seed: int = 0):
    """Logits whose labels are drawn from softmax(logits / temperature): T is the true temperature."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, (n, k))
    p = softmax(logits, temperature)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits, labels


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_the_temperature_the_labels_were_drawn_with(true_t):
    logits, labels = _sampled(true_t)
    assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)


def test_calibrated_scores_have_a_small_ece_and_overconfident_ones_a_large_one():
    logits, labels = _sampled(2.5)
    raw, scaled = softmax(logits), softmax(logits, fit_temperature(logits, labels))
    assert expected_calibration_error(scaled, labels) < 0.02
    assert expected_calibration_error(raw, labels) > 0.08  # T=1 is over-confident for labels drawn at T=2.5
    assert brier_score(scaled, labels) < brier_score(raw, labels)
    assert (scaled.argmax(1) == raw.argmax(1)).all()  # the ranking, and so accuracy and AUC, do not change


def test_ece_and_brier_by_hand():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # bins of 0.5 width: (0.5, 1] holds all four; accuracy 3/4, mean confidence (0.9+0.8+0.7+0.6)/4 = 0.75
    assert expected_calibration_error(p, y, bins=2) == pytest.approx(0.0)
    # 15 bins: 0.9 (correct), 0.8 (wrong), 0.7 (correct), 0.6 (correct) each alone
    assert expected_calibration_error(p, y, bins=15) == pytest.approx((0.1 + 0.8 + 0.3 + 0.4) / 4)
    assert brier_score(p, y) == pytest.approx((0.02 + 1.28 + 0.18 + 0.32) / 4)


def test_fit_temperature_refuses_mismatched_inputs():
    from volumes.calibration import fit_calibration

    with pytest.raises(ValueError, match="logits"):
        fit_temperature(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match=r"fit_calibration needs logits \[N, K\] and labels \[N\], got \(3, 2\)"):
        fit_calibration(np.zeros((3, 2)), np.zeros(2, dtype=int))
    with pytest.raises(ValueError, match="fit_calibration needs"):
        fit_calibration(np.zeros(4), np.zeros(4, dtype=int))


def test_calibration_metrics_fit_on_validation_and_score_the_test_split():
    from volumes.calibration import calibration_metrics

    logits, labels = _sampled(2.5, n=8000, seed=1)
    p = softmax(logits)  # over-confident: the labels follow T = 2.5
    out = calibration_metrics(p[:4000], labels[:4000], p[4000:], labels[4000:])
    assert out["temperature"] == pytest.approx(2.5, rel=0.08)
    assert out["test_ece_calibrated"] < 0.03 < out["test_ece"]
    assert out["test_brier_calibrated"] < out["test_brier"]
    assert out["test_acc_calibrated"] == pytest.approx(float(np.mean(p[4000:].argmax(1) == labels[4000:])))


def test_calibration_report_scores_the_test_split_before_and_after_the_saved_temperature(tmp_path):
    import json

    from volumes.calibration import CalibrationReport, calibration_path

    checkpoint = tmp_path / "model.pt"
    checkpoint.write_bytes(b"weights")
    calibration_path(checkpoint).write_text(json.dumps({"temperature": 2.0}))
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    report = json.loads(CalibrationReport(checkpoint, tmp_path / "eval").write(probabilities, labels).read_text())
    softened = softmax(np.log(probabilities), 2.0)
    assert report["temperature"] == 2.0 and report["cases"] == 4
    assert report["ece"] == pytest.approx(expected_calibration_error(probabilities, labels))
    assert report["ece_calibrated"] == pytest.approx(expected_calibration_error(softened, labels))
    assert report["brier_calibrated"] == pytest.approx(brier_score(softened, labels))
    assert report["accuracy"] == report["accuracy_calibrated"] == 0.75


def test_a_separable_validation_split_leaves_the_temperature_at_one(caplog):
    """All right on validation: the NLL falls towards T -> 0, so nothing is fitted (the demo's T = 0.05 before)."""
    from volumes.calibration import separable

    logits = np.array([[2.0, -1.0], [-0.5, 1.5], [3.0, 0.0], [0.1, 0.4]])
    labels = np.array([0, 1, 0, 1])
    assert separable(logits, labels)
    assert not separable(logits, np.array([0, 1, 0, 0]))
    assert not separable(np.array([[1.0, 1.0]]), np.array([0]))  # a tie is not a correct answer
    with caplog.at_level("WARNING", logger="volumes.calibration"):
        assert fit_temperature(logits, labels) == 1.0
    assert "classified correctly" in caplog.text
    # one mistake makes the minimum finite again, and above 1 for a confident mistake
    wrong = np.vstack([logits, [[2.5, -0.5]]])
    t = fit_temperature(wrong, np.append(labels, 1))
    assert 1.0 < t < 20.0


def test_fit_temperature_handler_saves_the_choice_and_its_reason(tmp_path):
    import json

    from volumes.calibration import FitTemperature

    handler = FitTemperature(tmp_path / "model.pt")
    # every validation case right: the identity, said so (Platt's smoothed targets used to sharpen these 20x)
    probabilities = np.array([[0.6, 0.4], [0.45, 0.55], [0.7, 0.3]] * 4)
    saved = json.loads(handler.write(probabilities, np.array([0, 1, 0] * 4)).read_text())
    assert saved == {**saved, "method": "none", "separable": True, "temperature": 1.0, "bias": []}
    assert "classified correctly" in saved["reason"]
    assert saved["val_ece_calibrated"] == pytest.approx(saved["val_ece"])
    # over-confident three-class probabilities (labels drawn at T = 2.5): temperature scaling, softer
    logits, labels = _sampled(2.5, n=300, seed=3)
    saved = json.loads(handler.write(softmax(logits), labels).read_text())
    assert saved["method"] == "temperature scaling" and saved["temperature"] == pytest.approx(2.5, rel=0.25)
    assert set(saved["heldout_nll"]) == {"none", "temperature scaling"}
    assert saved["heldout_nll"]["temperature scaling"] < saved["heldout_nll"]["none"]
    assert saved["val_ece_calibrated"] < saved["val_ece"] and "cross-validated NLL" in saved["reason"]


def test_fit_calibration_keeps_the_identity_on_separable_or_tiny_splits():
    from volumes.calibration import fit_calibration

    margins = np.array([-8.0, -7.5, -7.0, -6.0, 0.5, 1.0, 2.0, 4.0] * 3)
    logits = np.stack([np.zeros_like(margins), margins], axis=1)
    chosen = fit_calibration(logits, np.array([0, 0, 0, 0, 1, 1, 1, 1] * 3))
    assert (chosen.method, chosen.temperature, chosen.bias, chosen.separable) == ("none", 1.0, (), True)
    tiny = fit_calibration(np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]), np.array([0, 1, 1]))
    assert tiny.method == "none" and "too few" in tiny.reason


def test_fit_calibration_refuses_a_sharpening_that_cross_validation_does_not_support():
    """Under-confident but right on 19 of 20 with one confident mistake: the held-in NLL alone would sharpen."""
    from volumes.calibration import TEMPERATURE_BOUNDS, fit_calibration, fit_temperature

    margins = np.array([0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.2, 1.3] * 2)
    labels = np.array([1] * 10 + [0] * 10)
    margins[10:] *= -1
    margins[0] = -3.0  # a positive called negative with confidence 0.95
    logits = np.stack([np.zeros_like(margins), margins], axis=1)
    assert fit_temperature(logits, labels) < 1.0  # the held-in fit sharpens...
    chosen = fit_calibration(logits, labels)
    held = chosen.probabilities(logits)
    assert TEMPERATURE_BOUNDS[0] <= chosen.temperature <= TEMPERATURE_BOUNDS[1]
    # ...the choice never makes the held-in calibration worse, and says what it weighed
    assert expected_calibration_error(held, labels) <= expected_calibration_error(softmax(logits), labels) + 1e-12
    assert set(chosen.heldout_nll) == {"none", "temperature scaling", "Platt scaling"} and chosen.reason


@pytest.mark.parametrize("true_t", [0.5, 2.5])
def test_fit_calibration_on_noisy_splits_never_raises_the_test_ece_on_average(true_t):
    """20 seeded 30-case validation splits, 200-case test splits: calibrated ECE at most the raw one, on average."""
    from volumes.calibration import fit_calibration

    differences, fitted = [], 0
    for seed in range(20):
        logits, labels = _sampled(true_t, n=230, k=2, seed=seed)
        chosen = fit_calibration(logits[:30], labels[:30])
        fitted += chosen.method != "none"
        raw = expected_calibration_error(softmax(logits[30:]), labels[30:])
        differences.append(expected_calibration_error(chosen.probabilities(logits[30:]), labels[30:]) - raw)
    assert np.mean(differences) < 0 and max(differences) < 0.01
    assert fitted >= 4  # it does calibrate when the split shows a miscalibration


def _platt_sampled(a: float, b: float, n: int = 20000, seed: int = 0):
    """Two-class logits whose labels are drawn from sigmoid(a (l1 - l0) + b)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, (n, 2))
    p1 = 1.0 / (1.0 + np.exp(-(a * (logits[:, 1] - logits[:, 0]) + b)))
    return logits, (rng.random(n) < p1).astype(int)


def test_platt_scaling_recovers_slope_and_intercept():
    from volumes.calibration import fit_platt

    logits, labels = _platt_sampled(0.5, -1.0)
    fitted = fit_platt(logits, labels)
    assert 1.0 / fitted.temperature == pytest.approx(0.5, rel=0.05)
    assert fitted.bias[0] == 0.0 and fitted.bias[1] == pytest.approx(-1.0, abs=0.08)
    p = fitted.probabilities(logits)
    true = 1.0 / (1.0 + np.exp(-(0.5 * (logits[:, 1] - logits[:, 0]) - 1.0)))
    np.testing.assert_allclose(p[:, 1], true, atol=0.03)
    assert expected_calibration_error(p, labels) < 0.02


def test_platt_scaling_on_a_separable_split_is_finite_and_puts_the_threshold_between_the_classes():
    """Negatives far below 0, positives above it: the 0.5 point moves into the gap, nothing becomes certain."""
    from volumes.calibration import fit_platt

    margins = np.array([-8.0, -7.5, -7.0, -6.0, 0.5, 1.0, 2.0, 4.0])  # l1 - l0
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    logits = np.stack([np.zeros_like(margins), margins], axis=1)
    fitted = fit_platt(logits, labels)
    p1 = fitted.probabilities(logits)[:, 1]
    assert fitted.separable and np.isfinite(fitted.bias[1])
    # Platt's targets for 4 + 4 cases are 5/6 and 1/6: nothing certain, every case still right
    assert p1.max() < 0.99 and p1.min() > 0.01
    assert ((p1 >= 0.5) == labels.astype(bool)).all()
    threshold = -fitted.bias[1] * fitted.temperature  # the margin where p1 = 0.5
    assert -6.0 < threshold < 0.0
    # a positive between the classes that the raw 0.5 threshold (margin 0) calls negative is called positive
    assert fitted.probabilities(np.array([[0.0, threshold / 2]]))[0, 1] > 0.5
    assert np.all(np.diff(p1) > 0)  # the ranking is kept
    # with a mistake in the split the fit is still the smooth Platt fit
    assert not fit_platt(logits, labels[::-1]).separable


def test_fit_platt_refuses_more_than_two_classes():
    from volumes.calibration import fit_platt

    with pytest.raises(ValueError, match="two-class"):
        fit_platt(np.zeros((3, 3)), np.zeros(3, dtype=int))


def test_calibration_report_applies_platt_and_its_threshold(tmp_path):
    import json

    from volumes.calibration import CalibrationReport, calibration_path, load_calibration

    checkpoint = tmp_path / "model.pt"
    calibration_path(checkpoint).write_text(json.dumps({"method": "Platt scaling", "temperature": 2.0,
                                                        "bias": [0.0, 1.0]}))
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4], [0.3, 0.7]])
    labels = np.array([0, 1, 1, 1])
    report = json.loads(CalibrationReport(checkpoint, tmp_path / "eval").write(probabilities, labels).read_text())
    # p1 = sigmoid(log(p1 / p0) / 2 + 1): 0.475, 0.845, 0.689, 0.806
    calibrated = load_calibration(checkpoint).probabilities(np.log(probabilities))
    expected = 1.0 / (1.0 + np.exp(-(np.log(probabilities[:, 1] / probabilities[:, 0]) / 2.0 + 1.0)))
    np.testing.assert_allclose(calibrated[:, 1], expected, atol=1e-9)
    np.testing.assert_allclose(calibrated[:, 1], [0.475, 0.845, 0.689, 0.806], atol=2e-3)
    # the positive at 0.4 is now called positive: the intercept moved the 0.5 threshold
    assert report["accuracy"] == 0.75 and report["accuracy_calibrated"] == 1.0
    assert report["brier_calibrated"] == pytest.approx(brier_score(calibrated, labels))
