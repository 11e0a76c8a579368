"""Data: the synthetic shape families, the ADM centre crop and flip, and the ImageNet folder."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dsr.data.imagefolder import imagenet_folder
from dsr.data.synthetic import BACKGROUND, COLOURS, MAX_CLASSES, SHAPES, SyntheticShapes
from dsr.data.transforms import center_crop_arr, eval_transform, train_transform

PALETTE = torch.tensor(list(COLOURS.values()))  # [n_colours, 3]
N_COLOURS = len(COLOURS)


def coverage(image: torch.Tensor, label: int) -> torch.Tensor:
    """Fraction of each pixel covered by the shape, [H, W].

    Read off the channel where the class colour and the background differ most.
    """
    rgb = PALETTE[label % N_COLOURS]
    c = int((rgb - BACKGROUND).abs().argmax())
    return (image[c] - BACKGROUND) / (rgb[c] - BACKGROUND)


def foreground(image: torch.Tensor) -> torch.Tensor:
    """Boolean [H, W]: pixels at least half as far from the background colour as the most distinct one.

    The half-way cut skips antialiased rims, whose blend with the dark background would pull thin shapes
    (rings) toward darker palette neighbours (yellow toward orange).
    """
    distance = (image - BACKGROUND).abs().amax(0)
    return distance > 0.5 * distance.max()


def canonical_mask(image: torch.Tensor, label: int, size: int = 16) -> torch.Tensor:
    """The shape's coverage cropped to its bounding box, resampled to [size, size]: no position or scale."""
    cov = coverage(image, label)
    ys, xs = torch.nonzero(cov > 0.5, as_tuple=True)
    crop = cov[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    return F.interpolate(crop[None, None], size=(size, size), mode="area")[0, 0]


def centroid(cov: torch.Tensor) -> torch.Tensor:
    """(x, y) centre of mass of a coverage map [H, W], as fractions of the image side."""
    grid = (torch.arange(cov.shape[-1]) + 0.5) / cov.shape[-1]
    return torch.stack([(cov.sum(0) * grid).sum(), (cov.sum(1) * grid).sum()]) / cov.sum()


# ---------------------------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_per_index_and_seed():
    a, b = SyntheticShapes(64, 32, 8, seed=3), SyntheticShapes(64, 32, 8, seed=3)
    other = SyntheticShapes(64, 32, 8, seed=4)
    for i in (0, 5, 63):
        x, y = a[i]
        assert torch.equal(x, a[i][0]) and a[i][1] == y
        assert torch.equal(x, b[i][0])
        # a new seed moves and rescales the shape, but keeps the class
        assert other[i][1] == y
        assert (x - other[i][0]).abs().max() > 0.5
    assert torch.equal(a[-1][0], a[63][0])
    with pytest.raises(IndexError):
        a[64]
    with pytest.raises(IndexError):
        a[-65]


def test_synthetic_labels_are_balanced_and_images_in_range():
    ds = SyntheticShapes(num_samples=96, image_size=32, num_classes=12)
    labels = [ds[i][1] for i in range(len(ds))]
    assert labels == [i % 12 for i in range(96)]
    assert np.bincount(labels).tolist() == [8] * 12
    images = torch.stack([ds[i][0] for i in range(len(ds))])
    assert images.dtype == torch.float32 and images.shape == (96, 3, 32, 32)
    assert images.min() >= 0.0 and images.max() <= 1.0
    # the background is one constant grey and covers most of every image (the largest shape is 0.6 x 0.6)
    background = (images == torch.tensor(BACKGROUND, dtype=torch.float32)).all(1).float().mean((1, 2))
    assert background.min() > 0.5


def test_synthetic_plants_the_class_colour():
    ds = SyntheticShapes(num_samples=MAX_CLASSES * 4, image_size=32, num_classes=MAX_CLASSES)
    means = torch.zeros(MAX_CLASSES, 3)
    for k in range(MAX_CLASSES):
        pixels = torch.cat([ds[i][0][:, foreground(ds[i][0])] for i in range(k, len(ds), MAX_CLASSES)], dim=1)
        means[k] = pixels.mean(1)
        # fully covered pixels carry the palette colour exactly
        for i in range(k, len(ds), MAX_CLASSES):
            core = ds[i][0][:, coverage(ds[i][0], k) > 0.999].T  # [n, 3]
            assert len(core) > 0
            torch.testing.assert_close(core, PALETTE[k % N_COLOURS].expand_as(core), atol=1e-5, rtol=0)
    nearest = torch.cdist(means, PALETTE).argmin(1)
    assert nearest.tolist() == [k % N_COLOURS for k in range(MAX_CLASSES)]
    # class 0 is the red family, class 1 the green one, and their colours are far apart
    assert means[0, 0] > 0.7 and means[0, 1] < 0.35
    assert means[1, 1] > 0.7 and means[1, 0] < 0.35
    assert torch.dist(means[0], means[1]) > 0.8


def test_synthetic_shapes_differ_between_shape_families():
    ds = SyntheticShapes(num_samples=MAX_CLASSES * 8, image_size=64, num_classes=MAX_CLASSES)
    templates, spread = [], []
    for s in range(len(SHAPES)):
        masks = torch.stack([canonical_mask(*ds[i]) for i in range(len(ds)) if ds.label(i) // N_COLOURS == s])
        templates.append(masks.mean(0))
        spread.append((masks - masks.mean(0)).abs().mean())
    disk, square, triangle, ring, cross = templates
    # the filled fraction of the bounding box is the shape's: pi/4, 1, 1/2, pi/4 * (1 - 0.55^2), ~1/2
    assert disk.mean() == pytest.approx(np.pi / 4, abs=0.03)
    assert square.mean() > 0.95
    assert triangle.mean() == pytest.approx(0.5, abs=0.05)
    assert ring.mean() == pytest.approx(np.pi / 4 * (1 - 0.55**2), abs=0.05)
    assert ring[7:9, 7:9].max() < 0.05 and disk[7:9, 7:9].min() > 0.95  # the ring's hole
    assert cross[:3, :3].max() < 0.05 and cross[7:9, :].min() > 0.9  # empty corners, full arms
    assert triangle[:3, :3].max() < 0.05 and triangle[-3:, 3:13].min() > 0.9  # apex up, base down
    # same-shape images agree after normalising position and scale; different shapes do not
    for a in range(len(SHAPES)):
        for b in range(a + 1, len(SHAPES)):
            gap = (templates[a] - templates[b]).abs().mean()
            assert gap > 3 * max(spread[a], spread[b]), (SHAPES[a], SHAPES[b])


@pytest.mark.parametrize("image_size", [16, 32, 64])
def test_synthetic_any_resolution_same_geometry(image_size):
    ref, ds = SyntheticShapes(40, 64, MAX_CLASSES), SyntheticShapes(40, image_size, MAX_CLASSES)
    for i in range(0, 40, 3):
        image, label = ds[i]
        assert image.shape == (3, image_size, image_size) and 0 <= image.min() and image.max() <= 1
        # antialiasing keeps the covered area resolution-independent; the centroid stays put too
        cov, cov_ref = coverage(image, label), coverage(ref[i][0], label)
        assert cov.mean().item() == pytest.approx(cov_ref.mean().item(), abs=0.01)
        torch.testing.assert_close(centroid(cov), centroid(cov_ref), atol=0.01, rtol=0)


def test_synthetic_class_names_and_limits():
    ds = SyntheticShapes(num_classes=10)
    assert len(ds.class_names) == 10 and len(set(ds.class_names)) == 10
    assert ds.class_names[:2] == ["red disk", "green disk"]
    assert ds.class_names[N_COLOURS] == "red square"
    assert len(SyntheticShapes(num_classes=MAX_CLASSES).class_names) == MAX_CLASSES
    with pytest.raises(ValueError, match=str(MAX_CLASSES)):
        SyntheticShapes(num_classes=MAX_CLASSES + 1)


def gradient_image(width: int, height: int) -> Image.Image:
    """RGB test card with structure everywhere: x ramp in R, y ramp in G, a checkerboard in B."""
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    yy, xx = np.mgrid[:height, :width]
    checker = ((xx // 7 + yy // 5) % 2) * 255
    return Image.fromarray(np.stack([x, y, checker], -1).astype(np.uint8))


@pytest.mark.parametrize(
    "size, halved, resized, offset",
    [
        # 1200x800: one halving (800 >= 512, then 400 < 512), scale 256/400 -> 384x256, crop x from 64
        ((1200, 800), [(600, 400)], (384, 256), (64, 0)),
        # 1030x700: halve to 515x350, scale 256/350 -> 376.7 -> 377 wide, crop x from (377 - 256) // 2 = 60
        ((1030, 700), [(515, 350)], (377, 256), (60, 0)),
        # 600x400: already small, straight to bicubic
        ((600, 400), [], (384, 256), (64, 0)),
        # 2100x2100: three halvings (2100 -> 1050 -> 525 -> 262, odd sides round down), then up to 256
        ((2100, 2100), [(1050, 1050), (525, 525), (262, 262)], (256, 256), (0, 0)),
    ],
)
def test_center_crop_arr_matches_explicit_steps(size, halved, resized, offset):
    image = gradient_image(*size)
    expected = image
    for step in halved:
        expected = expected.resize(step, Image.BOX)
    expected = np.asarray(expected.resize(resized, Image.BICUBIC))
    x0, y0 = offset
    expected = expected[y0 : y0 + 256, x0 : x0 + 256]

    out = center_crop_arr(image, 256)
    assert out.size == (256, 256)
    np.testing.assert_array_equal(np.asarray(out), expected)


def test_center_crop_arr_keeps_the_centre_of_a_tall_image():
    arr = np.full((600, 200, 3), 128, np.uint8)
    arr[:100] = (0, 0, 255)  # blue bands at the top and bottom must be cut away
    arr[-100:] = (0, 0, 255)
    arr[280:320] = (255, 0, 0)  # red stripe through the centre must survive
    out = np.asarray(center_crop_arr(Image.fromarray(arr), 64)).astype(int)
    assert out.shape == (64, 64, 3)
    # 200x600 -> halved to 100x300 -> bicubic 64x192 -> rows 64..128: the stripe lands on rows 29..34
    assert (out[30:34, :, 0] > 230).all() and (out[30:34, :, 1:] < 25).all()
    assert (out[:20, :] == 128).all() and (out[-20:, :] == 128).all()
    assert out[..., 2].max() < 150  # no trace of the blue bands (only mild bicubic ringing at the stripe)


def test_train_transform_flips_randomly_and_eval_is_deterministic():
    arr = np.zeros((48, 64, 3), np.uint8)
    arr[:, :32, 0] = 255  # left half red, right half blue
    arr[:, 32:, 2] = 255
    arr[10:20, 5:15] = 255  # an off-centre white patch breaks the remaining symmetry
    image = Image.fromarray(arr)

    ev = eval_transform(32)
    plain = ev(image)
    assert torch.equal(plain, ev(image))
    assert plain.dtype == torch.float32 and plain.shape == (3, 32, 32)
    assert plain.min() >= 0 and plain.max() <= 1
    reference = np.asarray(center_crop_arr(image, 32), dtype=np.float32).transpose(2, 0, 1) / 255.0
    torch.testing.assert_close(plain, torch.from_numpy(reference))

    tr = train_transform(32, flip=True)
    torch.manual_seed(0)
    flipped = 0
    for _ in range(40):
        out = tr(image)
        assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
        if torch.equal(out, plain.flip(-1)):
            flipped += 1
        else:
            assert torch.equal(out, plain)
    assert 5 < flipped < 35
    assert all(torch.equal(train_transform(32, flip=False)(image), plain) for _ in range(5))


def test_transform_accepts_grey_images_and_pickles():
    grey = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40) % 251)
    out = eval_transform(16)(grey)
    assert out.shape == (3, 16, 16)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    # loader workers started with "spawn" receive the transform by pickling
    clone = pickle.loads(pickle.dumps(train_transform(16)))
    assert any(torch.equal(clone(grey), candidate) for candidate in (out, out.flip(-1)))
    assert torch.equal(pickle.loads(pickle.dumps(eval_transform(16)))(grey), out)


# ---------------------------------------------------------------------------------------------- imagefolder


def test_imagenet_folder_reads_a_class_tree(tmp_path):
    colours = {"n02_dog": (200, 30, 30), "n01_cat": (30, 30, 200)}  # sorted names: n01_cat = 0, n02_dog = 1
    sizes = [(40, 30), (64, 64), (30, 50)]
    for name, colour in colours.items():
        (tmp_path / name).mkdir()
        for j, size in enumerate(sizes):
            Image.new("RGB", size, colour).save(tmp_path / name / f"{j}.png")

    ds = imagenet_folder(str(tmp_path), image_size=16, flip=True)
    assert len(ds) == 6
    assert ds.classes == ["n01_cat", "n02_dog"]
    assert [label for _, label in ds.samples] == [0, 0, 0, 1, 1, 1]
    for i in range(len(ds)):
        image, label = ds[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        expected = torch.tensor(colours[ds.classes[label]], dtype=torch.float32) / 255
        torch.testing.assert_close(image, expected[:, None, None].expand(3, 16, 16), atol=1 / 255, rtol=0)


def test_imagenet_folder_missing_root_is_a_clear_error(tmp_path):
    missing = tmp_path / "no-such-dir"
    with pytest.raises(FileNotFoundError) as err:
        imagenet_folder(str(missing))
    assert "data.dataset.root" in str(err.value) and str(missing) in str(err.value)
    assert "data=synthetic" in str(err.value)
    with pytest.raises(FileNotFoundError, match="data.dataset.root"):
        imagenet_folder(None)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="class sub-folders"):
        imagenet_folder(str(tmp_path / "empty"))
    (tmp_path / "no_images" / "n01").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="data.dataset.root"):
        imagenet_folder(str(tmp_path / "no_images"))


def _odd_images(root):
    """One class folder of images in every unusual form, two files that do not decode, and a non-image file."""
    folder = root / "n01_odd"
    folder.mkdir(parents=True)
    red = (200, 30, 30)
    Image.new("RGB", (20, 24), red).save(folder / "a_rgb.png")
    Image.new("L", (20, 20), 90).save(folder / "b_grey.png")
    Image.new("LA", (20, 20), (90, 255)).save(folder / "c_grey_alpha.png")
    Image.new("RGB", (20, 20), red).convert("CMYK").save(folder / "d_cmyk.jpg", quality=100)
    palette = Image.new("P", (20, 20), 1)
    palette.putpalette([0, 0, 0, *red] + [0] * 762)
    palette.save(folder / "e_palette.png", transparency=0)
    Image.fromarray(np.full((20, 20), 90 * 257, dtype=np.uint16)).save(folder / "f_16bit.png")  # mode I;16
    Image.new("RGB", (1, 1), red).save(folder / "g_one_pixel.png")
    good = folder / "h_good.jpg"
    Image.new("RGB", (64, 64), red).save(good, quality=100)
    (folder / "i_truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 3])
    (folder / "j_not_an_image.jpg").write_text("a text file under an image's name\n")
    (folder / "k_readme.txt").write_text("not an image extension: never listed\n")
    Image.new("RGB", (20, 20), (30, 30, 200)).save(folder / "l_last.png")
    return folder


def test_imagenet_folder_converts_unusual_images_and_steps_over_unreadable_ones(tmp_path, caplog):
    from torch.utils.data import DataLoader

    _odd_images(tmp_path)
    ds = imagenet_folder(str(tmp_path), image_size=16, flip=False)
    names = [os.path.basename(p) for p, _ in ds.samples]
    assert len(ds) == 11 and "k_readme.txt" not in names
    red, grey, blue = (torch.tensor(c, dtype=torch.float32)[:, None, None] / 255 for c in ((200, 30, 30), (90,) * 3,
                                                                                           (30, 30, 200)))  # fmt: skip
    expected = {"a_rgb.png": red, "b_grey.png": grey, "c_grey_alpha.png": grey, "d_cmyk.jpg": red,
                "e_palette.png": red, "f_16bit.png": grey, "g_one_pixel.png": red, "h_good.jpg": red,
                "i_truncated.jpg": blue, "j_not_an_image.jpg": blue, "l_last.png": blue}  # fmt: skip
    with caplog.at_level("WARNING", logger="dsr.data.imagefolder"):
        for i, name in enumerate(names):
            image, label = ds[i]
            assert image.shape == (3, 16, 16) and label == 0
            # Each unreadable file is replaced by the next readable one (l_last.png); JPEG quality moves a few levels.
            torch.testing.assert_close(image, expected[name].expand(3, 16, 16), atol=6 / 255, rtol=0, msg=name)
        ds[names.index("i_truncated.jpg")]  # drawn again: counted again, logged once
    assert ds.skipped == 5  # failed decodes: i (then j, then l), j, and i again (then j)
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2 and any("i_truncated.jpg" in w for w in warned)
    assert any("j_not_an_image.jpg" in w for w in warned)
    # Loader workers share the count.
    fresh = imagenet_folder(str(tmp_path), image_size=16, flip=False)
    batches = list(DataLoader(fresh, batch_size=4, num_workers=2))
    assert sum(len(b[0]) for b in batches) == 11 and fresh.skipped == 3


def test_the_skipped_images_callback_logs_the_count_once_per_epoch():
    from types import SimpleNamespace

    from dsr.lightning.callbacks import SkippedImages

    logged = []
    module = SimpleNamespace(log=lambda name, value, **kwargs: logged.append((name, value, kwargs["reduce_fx"])))
    trainer = SimpleNamespace(datamodule=SimpleNamespace(dataset=SimpleNamespace(skipped=3)), is_global_zero=True,
                              current_epoch=1)  # fmt: skip
    SkippedImages().on_train_epoch_end(trainer, module)
    assert logged == [("data/skipped_images", 3.0, "sum")]
    trainer.datamodule.dataset = object()  # a dataset that does not count: nothing to log
    SkippedImages().on_train_epoch_end(trainer, module)
    assert len(logged) == 1
