"""Augmentations: the batched device ops equal torchvision's, the parameters follow MoCo v2's
distributions, the two-stage pipeline equals the per-image one, parameters depend only on
(seed, epoch, index), and images of every PIL mode load as RGB."""
import io
import itertools

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image
from scipy import stats
from torch.utils.data import default_collate
from torchvision import transforms

import common


def random_images(batch, size=24, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def smooth_pil_image(seed=0, size=(80, 60)):
    """Natural-image-like (smooth) RGB picture, so resampling and blur differences stay small."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    return coarse.resize(size, Image.BICUBIC)


# ---------------------------------------------------------------- (a) device ops = torchvision ops

@pytest.mark.parametrize("op,reference,low,high", [
    (common.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
    (common.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
    (common.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
    (common.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_batched_colour_ops_equal_torchvision(op, reference, low, high):
    images = random_images(6)
    images[0] = 0.5  # a grey image: hue undefined, contrast and saturation blend with itself
    factors = torch.linspace(low, high, 6)
    got = op(images, factors)
    for i in range(6):
        expected = reference(images[i], float(factors[i]))
        assert (got[i] - expected).abs().max() < 0.5 / 255
    # and on uint8 PIL images, torchvision's PIL ops round after each step: within a few levels
    pil = TF.to_pil_image(images[1])
    expected = TF.to_tensor(reference(pil, float(factors[1])))
    got = op(TF.to_tensor(pil)[None], factors[1:2])[0]
    assert (got - expected).abs().mean() < 1.5 / 255


def test_grey_and_blur_equal_torchvision():
    images = random_images(4, size=30)
    grey = common.grey_of(images)
    for i in range(4):
        expected = TF.rgb_to_grayscale(images[i], num_output_channels=1)
        assert (grey[i] - expected).abs().max() < 1e-6
    sigma = torch.tensor([0.1, 0.7, 1.3, 2.0])
    for kernel_size in (3, 23):
        blurred = common.gaussian_blur(images, sigma, kernel_size)
        for i in range(4):
            expected = TF.gaussian_blur(images[i], [kernel_size, kernel_size], [float(sigma[i])] * 2)
            assert (blurred[i] - expected).abs().max() < 1e-5
    assert common.blur_kernel_size(224) == 23 and common.blur_kernel_size(16) == 3


def test_hue_rotation_against_float64_colorsys():
    import colorsys
    images = random_images(2, size=5).double()
    shifts = torch.tensor([0.07, -0.31])
    got = common.adjust_hue(images, shifts)
    for i, y, x in itertools.product(range(2), range(5), range(5)):
        h, s, v = colorsys.rgb_to_hsv(*images[i, :, y, x].tolist())
        expected = colorsys.hsv_to_rgb((h + float(shifts[i])) % 1.0, s, v)
        assert np.allclose(got[i, :, y, x].numpy(), expected, atol=1e-9)


# ---------------------------------------------------------------- (b) parameter distributions

def draw_many(count, image):
    draws = []
    for seed in range(count):
        torch.default_generator.manual_seed(seed)
        draws.append(common.draw_view_params(image, (0.2, 1.0), strong=True))
    return draws


def test_parameter_distributions_match_moco_v2():
    image = Image.new("RGB", (50, 40))
    draws = draw_many(4000, image)
    count = len(draws)
    jittered = [d for d in draws if d["jitter"]]
    for name, k, p in (("jitter", None, 0.8), ("grayscale", None, 0.2), ("flip", None, 0.5)):
        hits = sum(d[name] for d in draws)
        assert stats.binomtest(hits, count, p).pvalue > 1e-3, (name, hits / count)
    blurred = [d["sigma"] for d in draws if d["sigma"] > 0]
    assert stats.binomtest(len(blurred), count, 0.5).pvalue > 1e-3
    assert stats.kstest(blurred, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    for op, (low, high) in enumerate(common.JITTER_RANGES):
        factors = [d["factors"][op] for d in jittered]
        assert stats.kstest(factors, stats.uniform(low, high - low).cdf).pvalue > 1e-3, op
    # op order: all 24 permutations equally likely
    orders = [d["order"] for d in jittered]
    counts = [orders.count(p) for p in itertools.permutations(range(4))]
    assert stats.chisquare(counts).pvalue > 1e-3
    # not jittered / not blurred: neutral parameters
    assert all(d["factors"] == (1.0, 1.0, 1.0, 0.0) for d in draws if not d["jitter"])


def test_parameters_are_torchvision_draws_in_torchvision_order():
    # the old pipeline (torchvision's Compose) and ours see the same generator: same crop, colours
    image = smooth_pil_image(1, (64, 48))
    old = transforms.Compose([
        transforms.RandomResizedCrop(16, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([transforms.GaussianBlur(3, sigma=(0.1, 2.0))], p=0.5),
        transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)])
    new = common.strong_augmentation(16)
    compared = 0
    for seed in range(40):
        torch.default_generator.manual_seed(seed)
        params = common.draw_view_params(image, (0.2, 1.0), strong=True)
        after = torch.rand(1)
        torch.default_generator.manual_seed(seed)
        expected = old(image)
        assert torch.rand(1) == after  # same number of draws
        if params["sigma"] > 0:
            continue  # blur: PIL's (ours, MoCo v2's) differs from torchvision's 3-tap kernel
        torch.default_generator.manual_seed(seed)
        got = new(image)
        # resize from the box reads real neighbours at the crop's edge instead of clamping
        inner = (slice(None), slice(2, -2), slice(2, -2))
        assert (got - expected)[inner].abs().max() < 1e-5
        compared += 1
    assert compared > 10


# ---------------------------------------------------------------- (c) two-stage = per-image

def reference_view(pixels, params, kernel_size):
    """One view of the device half, image by image, with torchvision's tensor ops in float64."""
    image = pixels.permute(2, 0, 1).double() / 255
    if params[common.PARAM_JITTER]:
        adjust = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in params[common.PARAM_ORDER].long().tolist():
            image = adjust[op](image, float(params[common.PARAM_FACTORS][op]))
    if params[common.PARAM_GRAYSCALE]:
        image = TF.rgb_to_grayscale(image, num_output_channels=3)
    if params[common.PARAM_SIGMA] > 0:
        image = TF.gaussian_blur(image, [kernel_size] * 2, [float(params[common.PARAM_SIGMA])] * 2)
    return TF.normalize(image, common.IMAGENET_MEAN, common.IMAGENET_STD)


@pytest.mark.parametrize("strong", [False, True])
def test_two_stage_equals_per_image_path(strong):
    image = smooth_pil_image(2, (160, 120))
    make = common.strong_augmentation if strong else common.weak_augmentation
    per_image, two_stage = make(64), make(64, on_device=True)
    expected, payloads = [], []
    for seed in range(24):
        torch.default_generator.manual_seed(seed)
        expected.append(per_image(image))
        torch.default_generator.manual_seed(seed)
        payloads.append(two_stage(image))
    batch = default_collate(payloads)
    assert batch["pixels"].dtype == torch.uint8 and batch["pixels"].shape == (24, 64, 64, 3)
    got = common.prepare_views([batch], torch.device("cpu"), channels_last=True)[0]
    assert got.is_contiguous(memory_format=torch.channels_last) and got.dtype == torch.float32
    std = torch.tensor(common.IMAGENET_STD).view(3, 1, 1) * 255
    for i in range(24):
        params = batch["params"][i]
        # the batched device ops = torchvision's ops image by image, in float64
        reference = reference_view(batch["pixels"][i], params, common.blur_kernel_size(64))
        assert ((got[i] - reference) * std).abs().max() < 1e-3
        levels = ((got[i] - expected[i]) * std).abs()  # vs the per-image PIL path, in uint8 levels
        # the two-stage crop (torch's uint8 resize of the crop alone) rounds after each pass and
        # clamps at the crop's edge, where PIL's resize with box= reads the pixels just outside
        inner = levels[:, 2:-2, 2:-2]
        if not (params[common.PARAM_JITTER] or params[common.PARAM_GRAYSCALE] or params[common.PARAM_SIGMA]):
            # no colour op: the same crop, to a rounding step inside and a few levels at the border
            assert inner.max() < 1.001 and levels.max() < 3.001 and levels.mean() < 0.1
        elif not (params[common.PARAM_JITTER] or params[common.PARAM_SIGMA]):
            # grayscale: PIL rounds the luma (and weighs red 0.299, not 0.2989)
            assert inner.max() < 2.001
        else:
            # PIL rounds after each op, takes the hue through 8-bit HSV and blurs with its box
            # approximation; the device works in float with the exact (7-tap at 64 px) kernel
            assert levels.mean() < 3 and levels.max() < 24, (i, levels.mean(), levels.max())
    assert strong == any(batch["params"][:, common.PARAM_JITTER] > 0)


def antialiased_bilinear_weights(in_size, out_size):
    """(out, in) float64 resampling matrix of antialiased bilinear (PIL's and torch's): a triangle
    filter widened by the downscale factor, centred on each output pixel, clamped to the input."""
    scale = in_size / out_size
    centres = (np.arange(out_size)[:, None] + 0.5) * scale
    taps = np.clip(1 - np.abs(np.arange(in_size)[None] + 0.5 - centres) / max(scale, 1.0), 0, None)
    return taps / taps.sum(axis=1, keepdims=True)


def test_resized_crop_pixels_against_float64_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        height, width = rng.integers(20, 90, 2)
        pixels = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
        left, top = int(rng.integers(0, width // 3)), int(rng.integers(0, height // 3))
        box = (left, top, int(rng.integers(2 * width // 3, width + 1)),
               int(rng.integers(2 * height // 3, height + 1)))
        size = int(rng.integers(8, 40))  # both down- and upscaling
        got = common.resized_crop_pixels(torch.from_numpy(pixels), box, size)
        assert got.dtype == torch.uint8 and got.shape == (size, size, 3) and got.is_contiguous()
        crop = pixels[box[1]:box[3], box[0]:box[2]].astype(np.float64)
        rows = antialiased_bilinear_weights(crop.shape[0], size)
        columns = antialiased_bilinear_weights(crop.shape[1], size)
        expected = np.einsum("yh,hwc,xw->yxc", rows, crop, columns)
        error = np.abs(got.numpy() - expected)
        assert error.max() <= 1 + 1e-9 and error.mean() < 0.35  # 8-bit rounding after each pass


def test_two_stage_views_share_one_conversion_and_flip_exactly():
    image = smooth_pil_image(4, (60, 50))
    view = common.strong_augmentation(16, on_device=True)
    for seed in range(30):
        torch.default_generator.manual_seed(seed)
        got = view(image)
        torch.default_generator.manual_seed(seed)
        params = common.draw_view_params(image, (0.2, 1.0), strong=True)  # the same draws
        crop = common.resized_crop_pixels(torch.from_numpy(np.array(image)), params["box"], 16)
        assert torch.equal(got["pixels"], crop.flip(1) if params["flip"] else crop)
        assert got["params"][common.PARAM_SIGMA] == params["sigma"]
    # MultiViewTransform hands the two-stage views the image's pixels, converted once
    views = common.two_view_transform("weak/strong", 16, on_device=True)
    torch.default_generator.manual_seed(7)
    from_pil = views(image)
    torch.default_generator.manual_seed(7)
    from_pixels = views(torch.from_numpy(np.array(image)))
    for a, b in zip(from_pil, from_pixels):
        assert torch.equal(a["pixels"], b["pixels"]) and torch.equal(a["params"], b["params"])


def test_prepare_views_passes_per_image_batches_and_casts():
    views = [random_images(2), random_images(2, seed=1)]
    got = common.prepare_views(views, torch.device("cpu"), channels_last=False, dtype=torch.bfloat16)
    assert [v.dtype for v in got] == [torch.bfloat16] * 2
    assert torch.equal(got[1], views[1].bfloat16())


def test_two_view_transform_and_multi_crop_on_device():
    image = smooth_pil_image(3, (64, 64))
    views = common.two_view_transform("weak/strong", 16, on_device=True).view_transforms
    crops = common.MultiViewTransform(views + [common.strong_augmentation(8, (0.05, 0.2), on_device=True)])
    torch.default_generator.manual_seed(0)
    out = crops(image)
    assert [v["pixels"].shape for v in out] == [(16, 16, 3), (16, 16, 3), (8, 8, 3)]
    batch = default_collate([out, out])
    prepared = common.prepare_views(batch, torch.device("cpu"), channels_last=False)
    assert [tuple(v.shape) for v in prepared] == [(2, 3, 16, 16), (2, 3, 16, 16), (2, 3, 8, 8)]
    with pytest.raises(common.UsageError, match="augmentation"):
        common.two_view_transform("weak/medium", 16)


def test_resolve_on_device():
    assert common.resolve_on_device("auto", torch.device("cuda")) is True
    assert common.resolve_on_device("auto", torch.device("cpu")) is False
    assert common.resolve_on_device("device", torch.device("cpu")) is True
    assert common.resolve_on_device("loader", torch.device("cuda")) is False
    with pytest.raises(common.UsageError, match="augment-on"):
        common.resolve_on_device("gpu", torch.device("cpu"))


# ---------------------------------------------------------------- (d) worker-count independence

class FixedImages(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, index):
        return smooth_pil_image(index, (40, 30)), index


@pytest.mark.parametrize("workers", [0, 2])
def test_params_depend_only_on_seed_epoch_index(workers):
    dataset = common.IndexedDataset(FixedImages(), common.two_view_transform("strong/strong", 8, on_device=True))
    sampler = common.ResumableSampler(12, 4, seed=5, rank=0, world_size=1)
    sampler.set_epoch(3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=sampler, num_workers=workers)
    for views, _, indices in loader:
        for row, index in enumerate(indices.tolist()):
            expected = dataset[(index, common.sample_seed(5, 3, index))][0]
            for view, want in zip(views, expected):
                assert torch.equal(view["params"][row], want["params"])
                assert torch.equal(view["pixels"][row], want["pixels"])


# ---------------------------------------------------------------- (e) every PIL mode loads as RGB

def saved(tmp_path, image, name, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def ramp16():
    return (np.arange(16 * 16).reshape(16, 16) * 256).astype(np.uint16)  # 0 .. 65280


@pytest.mark.parametrize("mode", ["I;16", "I;16B"])
def test_16_bit_images_scaled_by_their_range(tmp_path, mode):
    data = ramp16()
    image = Image.frombytes(mode, (16, 16), data.astype("<u2" if mode == "I;16" else ">u2").tobytes())
    path = saved(tmp_path, image, "a.tif" if mode == "I;16B" else "a.png")
    assert Image.open(path).mode == mode
    rgb = np.asarray(common.load_rgb_image(path))
    assert rgb.shape == (16, 16, 3)
    assert np.abs(rgb[..., 0].astype(float) - data / 257).max() <= 0.5 + 1e-9
    assert (rgb[..., 0] == rgb[..., 2]).all() and (rgb == 255).mean() < 0.01  # not clipped to white


def test_32_bit_and_float_images_scaled_by_their_range(tmp_path):
    data = ramp16().astype(np.int32)
    rgb = np.asarray(common.load_rgb_image(saved(tmp_path, Image.fromarray(data, "I"), "i.tif")))
    assert np.abs(rgb[..., 1].astype(float) - data / 257).max() <= 0.5 + 1e-9
    unit = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    rgb = np.asarray(common.load_rgb_image(saved(tmp_path, Image.fromarray(unit, "F"), "unit.tif")))
    assert np.abs(rgb[..., 0] - unit * 255).max() <= 0.5 + 1e-4
    wide = np.linspace(-3, 500.0, 64, dtype=np.float32).reshape(8, 8)  # no natural range: min..max
    rgb = np.asarray(common.load_rgb_image(saved(tmp_path, Image.fromarray(wide, "F"), "wide.tif")))
    assert rgb.min() == 0 and rgb.max() == 255
    assert np.abs(rgb[..., 0] - (wide + 3) / 503 * 255).max() <= 0.5 + 1e-3


def test_palette_with_transparency_cmyk_la_rgba(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0
    rgb = np.asarray(common.load_rgb_image(saved(tmp_path, palette, "p.png", transparency=0)))
    assert tuple(rgb[0, 0]) == (255, 255, 255) and tuple(rgb[1, 1]) == (200, 100, 50)
    opaque = Image.new("P", (2, 2), 1)
    opaque.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    assert tuple(np.asarray(common.load_rgb_image(saved(tmp_path, opaque, "q.png")))[0, 0]) == (200, 100, 50)
    cmyk = Image.new("CMYK", (4, 4), (0, 255, 255, 0))  # pure red
    assert tuple(np.asarray(common.load_rgb_image(saved(tmp_path, cmyk, "c.tif")))[0, 0]) == (255, 0, 0)
    la = Image.new("LA", (4, 4), (100, 0))  # fully transparent grey -> the white background
    la.putpixel((0, 0), (100, 255))
    rgb = np.asarray(common.load_rgb_image(saved(tmp_path, la, "la.png")))
    assert tuple(rgb[0, 0]) == (100, 100, 100) and tuple(rgb[1, 1]) == (255, 255, 255)
    rgba = Image.new("RGBA", (4, 4), (0, 0, 200, 128))  # half transparent blue over white
    rgb = np.asarray(common.load_rgb_image(saved(tmp_path, rgba, "rgba.png")))
    assert np.abs(rgb[0, 0].astype(int) - [127, 127, 227]).max() <= 1
    for mode in ("1", "L", "RGB", "YCbCr"):
        image = Image.new(mode, (3, 3))
        assert common.load_rgb_image(saved(tmp_path, image, f"{mode}.tif" if mode != "YCbCr" else "y.jpg")).mode == "RGB"


def test_unreadable_file_is_one_line_usage_error(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8 not really a jpeg\n\nsecond line")
    with pytest.raises(common.UsageError) as error:
        common.load_rgb_image(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
