"""training.tta: the eight dihedral views and the mean over them."""

from __future__ import annotations

import numpy as np
import pytest

from training.metrics import clipped_logits
from training.tta import dihedral_view, mean_over_views, views_of


def images(n: int = 3, size: int = 6) -> np.ndarray:
    # Every pixel distinct, so any two different views differ.
    return np.arange(n * size * size * 3, dtype=np.int64).reshape(n, size, size, 3)


def test_the_eight_views_are_the_dihedral_group_each_once():
    x = images()
    views = [dihedral_view(x, k) for k in range(8)]
    assert views[0] is x or np.array_equal(views[0], x)
    expected = []
    for mirrored in (x, x[:, :, ::-1]):
        expected += [np.rot90(mirrored, k, axes=(1, 2)) for k in range(4)]
    as_bytes = lambda vs: sorted(v.tobytes() for v in vs)  # noqa: E731
    assert as_bytes(views) == as_bytes(expected)
    assert len({v.tobytes() for v in views}) == 8
    for view in views:  # pixels moved, never changed
        assert sorted(view[0].reshape(-1, 3).tolist()) == sorted(x[0].reshape(-1, 3).tolist())


def test_views_refuse_non_square_images_and_bad_indices():
    with pytest.raises(ValueError, match="square"):
        dihedral_view(np.zeros((1, 4, 6, 3)), 1)
    with pytest.raises(ValueError, match="0-7"):
        dihedral_view(images(), 8)


def test_the_score_is_the_sigmoid_of_the_mean_logit_over_views():
    x = images()

    def top_left(batch: np.ndarray) -> np.ndarray:  # orientation-dependent on purpose
        return 1.0 / (1.0 + np.exp(-(batch[:, 0, 0, 0] / 100.0 - 1.5)))

    one = mean_over_views(top_left, x, 1)
    assert np.array_equal(one, top_left(x))
    eight = mean_over_views(top_left, x, 8)
    logits = np.mean([clipped_logits(top_left(dihedral_view(x, k))) for k in range(8)], axis=0)
    assert eight == pytest.approx(1.0 / (1.0 + np.exp(-logits)))
    assert not np.allclose(eight, one)
    # A score that does not depend on orientation is unchanged by the mean.
    mean_colour = lambda batch: 1.0 / (1.0 + np.exp(-(batch.mean(axis=(1, 2, 3)) / 100.0 - 1.0)))  # noqa: E731
    assert mean_over_views(mean_colour, x, 8) == pytest.approx(mean_colour(x))
    with pytest.raises(ValueError, match="views"):
        mean_over_views(top_left, x, 4)


def test_a_runs_views_come_from_its_evaluation_and_default_to_one():
    assert views_of({"scores": {"pooling": "lesion", "views": 8}}) == 8
    # Evaluated before views were recorded, not evaluated yet, or a bare model file: one view.
    assert views_of({"scores": {"pooling": "lesion"}}) == 1
    assert views_of({}) == 1
    assert views_of(None) == 1
