"""Analysis figures: norm maps and PCA images of planted token features, the max/median plot."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from dsr.analysis.figures import norm_grid, pca_rgb, plot_max_median_ratio, save_norm_maps, save_pca_images


def test_norm_grid_places_tokens_row_major_after_the_prefix():
    x = torch.ones(1, 1 + 9 + 2, 4)
    x[0, 0] = 100.0  # CLS
    x[0, 1 + 5] = 3.0  # patch 5 -> row 1, col 2 of the 3x3 grid
    grid = norm_grid(x, num_prefix_tokens=1, num_suffix_tokens=2)
    expected = torch.full((3, 3), 2.0)  # ||(1, 1, 1, 1)|| = 2
    expected[1, 2] = 6.0
    assert torch.allclose(grid[0], expected)
    with pytest.raises(ValueError, match="num_prefix_tokens"):
        norm_grid(x)  # 12 tokens are no square grid


def test_save_norm_maps_writes_one_png_per_layer_of_the_requested_size(tmp_path):
    layers = [torch.randn(2, 16, 8) for _ in range(3)]
    paths = save_norm_maps(layers, tmp_path / "maps", size=(300, 200), dpi=100)
    assert [p.name for p in paths] == ["norm_layer00.png", "norm_layer01.png", "norm_layer02.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.size == (300, 200)


def test_pca_rgb_separates_three_planted_directions(tmp_path):
    g = torch.Generator().manual_seed(0)
    directions = torch.linalg.qr(torch.randn(24, 3, generator=g))[0].T  # 3 orthonormal directions in 24-d
    # Four interleaved groups over 2 images of 4x4 patches: one per direction (distinct lengths, so the components
    # are well defined) and a background at the origin; four points span the 3 centred dimensions PCA keeps.
    labels = torch.arange(2 * 16) % 4
    planted = torch.cat([directions * torch.tensor([[6.0], [4.0], [2.0]]), torch.zeros(1, 24)])
    features = planted[labels] + 0.05 * torch.randn(2 * 16, 24, generator=g)
    rgb = pca_rgb(features.reshape(2, 16, 24))
    assert rgb.shape == (2, 3, 4, 4)
    assert torch.allclose(rgb.amin(dim=(0, 2, 3)), torch.zeros(3))  # min-max scaled per component
    assert torch.allclose(rgb.amax(dim=(0, 2, 3)), torch.ones(3))

    colours = rgb.permute(0, 2, 3, 1).reshape(-1, 3)
    means = torch.stack([colours[labels == k].mean(dim=0) for k in range(4)])
    spread = max((colours[labels == k] - means[k]).norm(dim=-1).max() for k in range(4))
    gap = torch.cdist(means, means)[~torch.eye(4, dtype=torch.bool)].min()
    assert spread < 0.05 and gap > 0.5  # each group one colour, the colours far apart

    paths = save_pca_images(features.reshape(2, 16, 24), tmp_path, scale=8)
    with Image.open(paths[1]) as image:
        assert image.size == (32, 32)
        pixel = torch.tensor(image.getpixel((0, 0)), dtype=torch.float32) / 255  # patch 0 of image 1
    assert torch.allclose(pixel, rgb[1, :, 0, 0], atol=1 / 255)


def test_plot_max_median_ratio_writes_a_png(tmp_path):
    path = plot_max_median_ratio(
        {"none": [1.5, 12.0, 30.0], "TTR": [1.5, 1.8, 2.0]}, tmp_path / "ratio.png", size=(500, 300), title="tiny"
    )
    with Image.open(path) as image:
        assert image.size == (500, 300)
