"""The gradient noise scale's two-batch-size estimates (rules.noise_scale_terms)
against the closed form of a least-squares problem."""

import numpy as np
import pytest
from keras import ops

from keras_sam import rules


def test_estimates_match_the_closed_form_of_least_squares():
    # Per-example loss 0.5 (x.w - y)^2 with x ~ N(0, I_d), y = x.w* + eps,
    # eps ~ N(0, s^2), at w = w* + delta: the per-example gradient
    # g = x (x.delta - eps) has mean G = delta and covariance
    # Sigma = (|delta|^2 + s^2) I + delta delta^T (Gaussian fourth moments), so
    # |G|^2 = |delta|^2 and tr(Sigma) = d (|delta|^2 + s^2) + |delta|^2.
    rng = np.random.default_rng(0)
    d, s, half, batches = 5, 0.5, 16, 40_000
    delta = rng.normal(size=d)
    delta /= np.linalg.norm(delta)
    x = rng.normal(size=(batches, 2 * half, d))
    eps = s * rng.normal(size=(batches, 2 * half))
    g = x * (x @ delta - eps)[..., None]  # per-example gradients
    # As SAM's sub-batches: the two halves of each batch and the whole batch.
    small = np.mean([np.sum(g[:, k * half : (k + 1) * half].mean(1) ** 2, -1) for k in (0, 1)], 0)
    large = np.sum(g.mean(1) ** 2, -1)
    squared, trace = rules.noise_scale_terms(
        ops.convert_to_tensor(small.mean()), ops.convert_to_tensor(large.mean()), half, 2 * half
    )
    assert float(ops.convert_to_numpy(squared)) == pytest.approx(1.0, rel=0.05)
    assert float(ops.convert_to_numpy(trace)) == pytest.approx(d * (1 + s * s) + 1, rel=0.05)
    # Each batch's estimate is unbiased: their mean is the estimate of the means.
    per_batch = [
        [float(ops.convert_to_numpy(t)) for t in rules.noise_scale_terms(a, b, half, 2 * half)]
        for a, b in zip(small[:200], large[:200])
    ]
    np.testing.assert_allclose(
        np.mean(per_batch, 0),
        [
            float(ops.convert_to_numpy(t))
            for t in rules.noise_scale_terms(small[:200].mean(), large[:200].mean(), half, 2 * half)
        ],
        rtol=1e-9,
    )


@pytest.mark.parametrize("sizes", [(0, 8), (8, 8), (16, 8), (-1, 4)])
def test_batch_sizes_must_be_increasing_and_positive(sizes):
    with pytest.raises(ValueError, match="small_batch"):
        rules.noise_scale_terms(1.0, 1.0, *sizes)
