"""Outlier metrics against values computed by hand on small token tensors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dsr.analysis.outliers import (
    fraction_above,
    grid_position,
    layer_statistics,
    massive_activation_ratio,
    max_median_ratio,
    patch_tokens,
    relative_fraction_above,
    token_norms,
    topk_norms,
)


def tokens_with_norms(norms: list[list[float]], dim: int = 4) -> torch.Tensor:
    """[B, N, dim] tokens whose norms are exactly `norms` (each norm split as a 3-4-5 triangle plus zeros)."""
    x = torch.zeros(len(norms), len(norms[0]), dim)
    n = torch.tensor(norms)
    x[..., 0], x[..., 1] = 0.6 * n, 0.8 * n
    return x


def test_token_norms_and_prefix_suffix_exclusion():
    # CLS (norm 100) first, one test-time register (norm 50) last; patches in between.
    x = tokens_with_norms([[100.0, 1.0, 2.0, 3.0, 50.0]])
    assert torch.allclose(token_norms(x, 1, 1), torch.tensor([[1.0, 2.0, 3.0]]))
    assert patch_tokens(x, 1, 1).shape == (1, 3, 4)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        patch_tokens(x, 3, 2)


def test_max_median_ratio_by_hand():
    # image 0: odd count, median 3 -> 10 / 3; image 1: even count, median (2 + 4) / 2 = 3 -> 8 / 3.
    x = tokens_with_norms([[1.0, 2.0, 3.0, 10.0, 4.0, 100.0], [2.0, 8.0, 4.0, 1.0, 6.0, 100.0]])
    x0 = x[:1, :5]
    assert max_median_ratio(x0).item() == pytest.approx(10 / 3)
    # the second image with the last token excluded as a suffix: norms [2, 8, 4, 1, 6] -> median 4 -> 2.
    assert max_median_ratio(x, num_suffix_tokens=1).tolist() == pytest.approx([10 / 3, 2.0])
    even = tokens_with_norms([[1.0, 2.0, 4.0, 8.0]])
    assert max_median_ratio(even).item() == pytest.approx(8 / 3)  # median of 2 and 4


def test_fractions_above_thresholds():
    x = tokens_with_norms([[1.0, 2.0, 3.0, 10.0], [5.0, 5.0, 5.0, 5.0]])
    # strict inequality: a norm equal to tau is not an outlier.
    assert fraction_above(x, 3.0).tolist() == pytest.approx([0.25, 1.0])
    assert fraction_above(x, 5.0).tolist() == pytest.approx([0.25, 0.0])
    # image 0 median 2.5: above 3 x 2.5 = 7.5 only the 10; image 1 all equal to its median -> none.
    assert relative_fraction_above(x, 3.0).tolist() == pytest.approx([0.25, 0.0])
    assert relative_fraction_above(x, 1.1).tolist() == pytest.approx([0.5, 0.0])


def test_topk_positions_on_the_patch_grid():
    norms = torch.ones(2, 9)
    norms[0, 7] = 9.0  # row 2, col 1 of a 3x3 grid
    norms[0, 2] = 5.0  # row 0, col 2
    norms[1, 4] = 7.0  # the centre
    x = tokens_with_norms(norms.tolist())
    values, indices = topk_norms(x, 2)
    assert values[0].tolist() == pytest.approx([9.0, 5.0])
    assert indices[0].tolist() == [7, 2]
    assert indices[1, 0].item() == 4
    assert grid_position(7, 9) == (2, 1)
    assert grid_position(2, 9) == (0, 2)
    assert grid_position(3, 8) is None


def test_massive_activation_ratio_by_hand():
    x = torch.tensor([[[1.0, -1.0], [2.0, 1.0], [-300.0, 1.0]]])  # |x| sorted: 1 1 1 1 2 300 -> median 1
    assert massive_activation_ratio(x).item() == pytest.approx(300.0)


def test_layer_statistics_records_serialise_and_match_hand_values():
    # Two layers of one 2x2-grid image with a CLS token in front and a register behind.
    layer0 = tokens_with_norms([[40.0, 1.0, 2.0, 2.0, 1.0, 20.0]])
    layer1 = tokens_with_norms([[40.0, 1.0, 1.0, 12.0, 1.0, 20.0]])
    records = layer_statistics([layer0, layer1], num_prefix_tokens=1, num_suffix_tokens=1, tau=5.0, top_k=2)
    json.loads(json.dumps(records))  # plain JSON types only

    r0, r1 = records
    assert (r0["layer"], r1["layer"]) == (0, 1)
    assert r0["num_patches"] == 4 and r0["num_images"] == 1
    assert r0["max_median_ratio"] == pytest.approx(2.0 / 1.5)
    assert r1["max_median_ratio"] == pytest.approx(12.0)
    assert r1["fraction_above_tau"] == pytest.approx(0.25)
    assert r0["fraction_above_tau"] == 0.0
    assert r1["fraction_above_3x_median"] == pytest.approx(0.25)
    assert r1["excluded_norm_ratio"] == pytest.approx((40 + 20) / 2 / 1.0)
    assert r1["topk_median_ratio"] == pytest.approx(12.0)  # k = max(1, ceil(0.04)) = 1
    top = r1["top_tokens"][0]
    assert (top["index"], top["row"], top["col"]) == (2, 1, 0)
    assert top["norm"] == pytest.approx(12.0)


def test_layer_statistics_aggregates_over_images_by_mean_and_max():
    x = tokens_with_norms([[1.0, 1.0, 1.0, 9.0], [1.0, 1.0, 1.0, 3.0]])
    (record,) = layer_statistics([x])
    assert record["max_median_ratio"] == pytest.approx((9.0 + 3.0) / 2)
    assert record["max_median_ratio_max"] == pytest.approx(9.0)
    assert record["excluded_norm_ratio"] is None
    assert record["top_tokens"][0]["image"] == 0 and record["top_tokens"][1]["image"] == 1
    assert not math.isnan(record["norm_median"])
