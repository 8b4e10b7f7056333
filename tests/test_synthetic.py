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


def test_colour_is_not_a_class_shortcut():
    # mean colour of images of one class varies as much as across classes: fg and bg are random
    dataset = SyntheticShapes("train", num_images=400, num_classes=2)
    means = np.array([pixels(dataset, i).reshape(-1, 3).mean(0) for i in range(400)])
    labels = np.array(dataset.targets)
    assert means[labels == 0].std(0).min() > 40 and means[labels == 1].std(0).min() > 40
    # 200 samples a class: standard error of the difference ~6 grey levels; 25 is ~4 of them
    assert np.abs(means[labels == 0].mean(0) - means[labels == 1].mean(0)).max() < 25


def test_bad_arguments_raise_usage_error():
    with pytest.raises(UsageError, match="split"):
        SyntheticShapes("test")
    with pytest.raises(UsageError, match="num_classes"):
        SyntheticShapes(num_classes=11)
    with pytest.raises(IndexError):
        SyntheticShapes("val", num_images=3)[3]
