"""The built-in `synthetic` dataset: deterministic, balanced, cheap, and non-trivial."""
import numpy as np
import pytest
from PIL import Image

from common import SyntheticShapes, UsageError


def pixels(dataset, index):
    return np.asarray(dataset[index][0])


def test_same_index_renders_identical_pixels_every_time():
    dataset = SyntheticShapes("train", num_images=20)
    again = SyntheticShapes("train", num_images=20)
    for index in (0, 7, 19):
        np.testing.assert_array_equal(pixels(dataset, index), pixels(dataset, index))
        np.testing.assert_array_equal(pixels(dataset, index), pixels(again, index))


def test_different_seeds_and_splits_give_different_images():
    seed0, seed1 = SyntheticShapes("train", 10, seed=0), SyntheticShapes("train", 10, seed=1)
    val = SyntheticShapes("val", 10, seed=0)
    for index in range(10):
        assert not np.array_equal(pixels(seed0, index), pixels(seed1, index))
        assert not np.array_equal(pixels(seed0, index), pixels(val, index))
        assert seed0[index][1] == seed1[index][1] == val[index][1]  # same class, different picture


def test_sizes_types_and_default_lengths():
    assert (len(SyntheticShapes("train")), len(SyntheticShapes("val"))) == (5000, 1000)
    for image_size in (16, 32):
        image, label = SyntheticShapes("val", num_images=3, image_size=image_size)[2]
        assert isinstance(image, Image.Image) and image.mode == "RGB"
        assert image.size == (image_size, image_size)
        assert isinstance(label, int) and label == 2


def test_labels_balanced_and_targets_match_items():
    dataset = SyntheticShapes("train", num_images=50, num_classes=5)
    assert dataset.classes == ["circle", "square", "triangle", "cross", "ring"]
    assert np.bincount(dataset.targets).tolist() == [10] * 5
    assert [dataset[i][1] for i in range(len(dataset))] == dataset.targets


def box_mean3(image):
    """3x3 box average (edge-padded): cuts the pixel noise std by 3 so the shape can be thresholded."""
    padded = np.pad(image.astype(np.float64), ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = image.shape[:2]
    return sum(padded[dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9


def test_colour_and_brightness_carry_no_image_identity():
    # light shape on a dark background, both near grey with the same levels in every image: two
    # crops of one image cannot be matched by colour (the failure mode of random per-image colours)
    dataset = SyntheticShapes("train", num_images=400, image_size=32)
    backgrounds, foregrounds = [], []
    for index in range(400):
        if dataset.classes[dataset.targets[index]] not in ("circle", "square", "hexagon", "half_disk"):
            continue  # thin shapes are mostly edge pixels after the box average: their level is blurred
        image = pixels(dataset, index).astype(np.float64)
        channel_means = image.reshape(-1, 3).mean(0)
        assert channel_means.max() - channel_means.min() < 15  # near grey: tint <= 0.02 (5 levels)
        smooth = box_mean3(image).mean(2)
        backgrounds.append(np.median(smooth[smooth < 128]))
        foregrounds.append(np.median(smooth[smooth >= 128]))
    backgrounds, foregrounds = np.array(backgrounds), np.array(foregrounds)
    assert backgrounds.max() < 95 and foregrounds.min() > 165  # 0.22-0.28 and 0.75-0.85 of 255
    assert backgrounds.std() < 10 and foregrounds.std() < 12  # vs ~74 for uniform random levels


def test_shape_is_large_and_near_the_centre():
    # crops of 20-100 % of the area must still show most of the shape: a filled circle covers
    # pi (0.85 s)^2 / 4 = 0.14-0.36 of the image for scale s in 0.5-0.8, centred within 0.3
    dataset = SyntheticShapes("train", num_images=400, image_size=32)
    y, x = np.meshgrid((np.arange(32) + 0.5) / 16 - 1, (np.arange(32) + 0.5) / 16 - 1, indexing="ij")
    for index in range(0, 400, 10):  # class 0 = circle
        shape = box_mean3(pixels(dataset, index)).mean(2) > 150
        assert 0.1 < shape.mean() < 0.42
        assert np.hypot(x[shape].mean(), y[shape].mean()) < 0.5


def test_bad_arguments_raise_usage_error():
    with pytest.raises(UsageError, match="split"):
        SyntheticShapes("test")
    with pytest.raises(UsageError, match="num_classes"):
        SyntheticShapes(num_classes=11)
    with pytest.raises(IndexError):
        SyntheticShapes("val", num_images=3)[3]
