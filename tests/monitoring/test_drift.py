"""The drift statistics: their values on known cases, the sliding window, the baseline as an
artifact stores it, and the torch counting that training (and serving) use."""
import math

import numpy as np
import pytest
import torch

from kubeseg.errors import DataError
from kubeseg.monitoring import drift
from kubeseg.monitoring.drift import (CONFIDENCE_BINS, DriftThresholds, OutputCounts,
                                      SlidingWindow, TrainingBaseline, confidence_counts,
                                      drift_statistics, jensen_shannon_distance,
                                      low_confidence_fraction, population_stability_index)


def test_jensen_shannon_distance_known_values():
    assert jensen_shannon_distance([1, 1], [2, 2]) == 0.0  # the same shares
    assert jensen_shannon_distance([1, 0], [0, 1]) == pytest.approx(1.0)  # disjoint
    # p = (1/2, 1/2), q = (1, 0): the mixture is (3/4, 1/4)
    kl_p = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)
    kl_q = math.log2(1 / 0.75)
    assert jensen_shannon_distance([1, 1], [1, 0]) == pytest.approx(
        math.sqrt((kl_p + kl_q) / 2))
    # symmetric, and counts are turned into shares first
    assert jensen_shannon_distance([3, 1, 0], [1, 1, 2]) == pytest.approx(
        jensen_shannon_distance([2, 2, 4], [30, 10, 0]))


def test_population_stability_index_known_value_and_empty_classes():
    # (0.6-0.5) ln(0.6/0.5) + (0.4-0.5) ln(0.4/0.5)
    assert population_stability_index([1, 1], [6, 4]) == pytest.approx(
        0.1 * math.log(1.2) - 0.1 * math.log(0.8))
    # an empty class is lifted to the floor instead of giving infinity
    value = population_stability_index([1, 0], [1, 1])
    assert math.isfinite(value) and value > 1


def test_confidence_counts_bin_edges():
    values = np.array([0.0, 0.0499, 0.05, 0.5, 0.9999, 1.0])
    counts = confidence_counts(values)
    assert len(counts) == CONFIDENCE_BINS and counts.sum() == 6
    assert counts[0] == 2 and counts[1] == 1 and counts[10] == 1 and counts[-1] == 2


def test_low_confidence_fraction_takes_the_bins_below_the_edge():
    counts = np.zeros(CONFIDENCE_BINS)
    counts[9] = 1   # [0.45, 0.5): low
    counts[10] = 3  # [0.5, 0.55): not
    assert low_confidence_fraction(counts, below=0.5) == 0.25
    assert math.isnan(low_confidence_fraction(np.zeros(CONFIDENCE_BINS)))
    with pytest.raises(ValueError, match="not a bin edge"):
        low_confidence_fraction(counts, below=0.52)
    with pytest.raises(ValueError, match="20 bins"):
        low_confidence_fraction([1, 2, 3])


def test_sliding_window_keeps_the_last_images():
    window = SlidingWindow(2, num_classes=3)
    conf = np.eye(CONFIDENCE_BINS, dtype=np.int64)
    window.add([1, 0, 0], conf[0])
    assert not window.full and window.totals.images == 1
    window.add([0, 2, 0], conf[1])
    window.add([0, 0, 4], conf[2])
    assert window.full and len(window) == 2 and window.totals.images == 2
    assert window.totals.class_pixels.tolist() == [0, 2, 4]
    assert window.totals.confidence_pixels[:3].tolist() == [0, 1, 1]
    with pytest.raises(ValueError, match="3 class counts"):
        window.add([1, 2], conf[0])
    with pytest.raises(ValueError, match="at least 1 image"):
        SlidingWindow(0, 3)


def _baseline(confidence_low=1, confidence_high=9):
    conf = [0] * CONFIDENCE_BINS
    conf[2], conf[18] = confidence_low, confidence_high
    return TrainingBaseline(class_pixels=(50.0, 30.0, 20.0), train_images=4,
                            confidence_pixels=tuple(conf), predicted_pixels=(5, 3, 2),
                            validation_images=2)


def test_statistics_of_a_window_against_the_baseline():
    baseline = _baseline()
    assert baseline.low_confidence_fraction == pytest.approx(0.1)
    same = OutputCounts.empty(3)
    conf = np.zeros(CONFIDENCE_BINS, dtype=np.int64)
    conf[2], conf[18] = 1, 9
    same.add([5, 3, 2], conf)
    stats = drift_statistics(baseline, same)
    assert stats.class_shift == pytest.approx(0.0, abs=1e-9)
    assert stats.low_confidence_excess == pytest.approx(0.0)
    assert stats.reasons() == []
    night = OutputCounts.empty(3)
    conf[:] = 0
    conf[3], conf[15] = 6, 4  # 60% of the pixels below 0.5 instead of 10%
    night.add([0, 1, 9], conf)
    stats = drift_statistics(baseline, night)
    reasons = stats.reasons(DriftThresholds(class_shift=0.2, low_confidence_excess=0.3))
    assert stats.low_confidence_excess == pytest.approx(0.5)
    assert len(reasons) == 2 and "class shift" in reasons[0] and "0.600" in reasons[1]
    assert stats.images == 1 and stats.pixels == 10
    empty = drift_statistics(baseline, OutputCounts.empty(3))
    assert math.isnan(empty.class_shift) and empty.reasons() == []
    with pytest.raises(ValueError, match="4 classes counted"):
        drift_statistics(baseline, OutputCounts.empty(4))


def test_thresholds_are_checked():
    assert DriftThresholds().problems() == []
    problems = DriftThresholds(class_shift=0, low_confidence_excess=1.5).problems()
    assert len(problems) == 2 and "(0, 1]" in problems[0]


def test_baseline_round_trip_and_old_artifacts():
    baseline = _baseline()
    assert TrainingBaseline.from_dict(baseline.to_dict()) == baseline
    assert TrainingBaseline.from_dict(None) is None  # an artifact written before baselines
    no_validation = TrainingBaseline(class_pixels=(1.0, 2.0))
    again = TrainingBaseline.from_dict(no_validation.to_dict())
    assert again == no_validation and math.isnan(again.low_confidence_fraction)


@pytest.mark.parametrize("change, message", [
    ({"class_pixels": None}, "malformed"),
    ({"class_pixels": [0, 0, 0]}, "positive sum"),
    ({"confidence_pixels": [1, 2]}, "2 bins"),
    ({"predicted_pixels": [1]}, "1 classes"),
    ({"confidence_edges": [0, 0.5, 1]}, "confidence_edges"),
])
def test_a_malformed_baseline_is_named(change, message):
    values = {**_baseline().to_dict(), **change}
    with pytest.raises(DataError, match=message):
        TrainingBaseline.from_dict(values, source="model/kubeseg.json training_baseline")


def test_torch_counts_match_the_numpy_definition():
    from kubeseg.inference import output_counts

    torch.manual_seed(0)
    logits = torch.randn(3, 4, 9, 7) * 3
    classes, confidences = output_counts(logits)
    probs = logits.double().softmax(dim=1).numpy()
    for i in range(3):
        assert classes[i].tolist() == np.bincount(probs[i].argmax(0).ravel(),
                                                  minlength=4).tolist()
        expected = drift.confidence_counts(probs[i].max(0))
        assert np.abs(confidences[i].numpy() - expected).sum() <= 2  # float32 at bin edges
        assert int(confidences[i].sum()) == 63
