"""Loader throughput, one process: images/s and ms per image of each augmentation pipeline on real
JPEGs of ImageNet's typical size (500x375, quality 90), two views (weak target, strong query) at
224 px. Run directly: `python tests/bench_loader.py [--images 64] [--rounds 5]`.

Rows: the upstream-style MoCo v2 pipeline (torchvision ops, PIL blur); ours per-image (the loader
does everything); ours two-stage, worker side (decode, uint8 pixels once per image, parameter draws,
crop with torch's uint8 resize, flip, collate), the same with PIL's resize (box=) as the crop, and
the device side (batched colour ops, blur, normalization) on the CPU, and on the GPU when there is
one.
Rounds alternate the pipelines and each row keeps its best round, so a loaded machine slows all
rows alike. Also measures JPEG decode alone, and PIL's reduced-scale JPEG decode (draft mode).
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image, ImageFilter
from torch.utils.data import default_collate
from torchvision import transforms

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


class PILGaussianBlur:
    """MoCo v2's blur: PIL's GaussianBlur with sigma uniform in [0.1, 2]."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=float(torch.empty(1).uniform_(0.1, 2.0))))


def upstream_transform(image_size):
    normalize = [transforms.ToTensor(), transforms.Normalize(common.IMAGENET_MEAN, common.IMAGENET_STD)]
    weak = transforms.Compose([transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
                               transforms.RandomHorizontalFlip(), *normalize])
    strong = transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2), transforms.RandomApply([PILGaussianBlur()], p=0.5),
        transforms.RandomHorizontalFlip(), *normalize])
    return common.MultiViewTransform([weak, strong])


def write_jpegs(folder, count, seed=0):
    """Natural-image-like JPEGs: smooth colour fields plus fine texture (pure noise would make JPEG
    decode unrealistically slow, flat colour unrealistically fast)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(count):
        coarse = Image.fromarray(rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)).resize((500, 375),
                                                                                          Image.BICUBIC)
        pixels = np.asarray(coarse).astype(np.int16) + rng.integers(-20, 21, (375, 500, 1))
        path = os.path.join(folder, f"{i:04d}.jpg")
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


class JpegFiles(torch.utils.data.Dataset):
    def __init__(self, paths):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return common.load_rgb_image(self.paths[index]), 0


class PILCropView(common.ViewAugmentation):
    """A two-stage worker view cropped by PIL's resize with box= (the alternative to
    resized_crop_pixels): same draws, same payload."""

    def __call__(self, image):
        params = common.draw_view_params(image, self.scale, self.strong)
        view = image.resize((self.image_size, self.image_size), Image.BILINEAR, box=params["box"])
        if params["flip"]:
            view = view.transpose(Image.FLIP_LEFT_RIGHT)
        return common.view_payload(view, params)


def run_upstream(paths, transform, batch_size):
    """Decode + transform + collate, in batches, as a loader worker (unseeded, as upstream)."""
    for start in range(0, len(paths), batch_size):
        images = []
        for path in paths[start:start + batch_size]:
            with open(path, "rb") as f:
                images.append(transform(Image.open(f).convert("RGB")))
        default_collate(images)


def run_ours(dataset, batch_size):
    """IndexedDataset items (decode, per-sample seeded transform) + collate: a worker's whole job."""
    for start in range(0, len(dataset), batch_size):
        default_collate([dataset[(index, common.sample_seed(0, 0, index))]
                         for index in range(start, min(start + batch_size, len(dataset)))])


def run_decode(paths):
    for path in paths:
        common.load_rgb_image(path)


def run_draft(paths, scale):
    for path in paths:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.draft("RGB", (image.width // scale, image.height // scale))
            image.convert("RGB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one core, as a loader worker (and a fair CPU device row)
    with tempfile.TemporaryDirectory() as folder:
        paths = write_jpegs(folder, args.images)
        upstream = upstream_transform(224)
        files = JpegFiles(paths)
        per_image = common.IndexedDataset(files, common.two_view_transform("weak/strong", 224))
        two_stage = common.IndexedDataset(
            files, common.two_view_transform("weak/strong", 224, on_device=True))
        pil_crop = common.IndexedDataset(files, common.MultiViewTransform(
            [PILCropView(224), PILCropView(224, strong=True)]))
        starts = range(0, len(paths), args.batch_size)
        batches = [default_collate([two_stage[(index, index)] for index in
                                    range(start, min(start + args.batch_size, len(paths)))])[0]
                   for start in starts]

        def device_side(device):
            def run():
                for views in batches:
                    common.prepare_views(views, device, channels_last=True)
                if device.type == "cuda":
                    torch.cuda.synchronize()
            return run

        rows = {
            "upstream-style MoCo v2 (PIL blur)": lambda: run_upstream(paths, upstream, args.batch_size),
            "ours per-image (CPU path)": lambda: run_ours(per_image, args.batch_size),
            "ours two-stage, worker side": lambda: run_ours(two_stage, args.batch_size),
            "two-stage worker, PIL resize crop": lambda: run_ours(pil_crop, args.batch_size),
            "ours two-stage, device side on CPU": device_side(torch.device("cpu")),
            "JPEG decode alone": lambda: run_decode(paths),
            "JPEG decode, draft 1/2 scale": lambda: run_draft(paths, 2),
        }
        if torch.cuda.is_available():
            device_side(torch.device("cuda"))()  # warm-up: kernels, allocator
            rows["ours two-stage, device side on GPU"] = device_side(torch.device("cuda"))
        best = {name: float("inf") for name in rows}
        for _ in range(args.rounds):
            for name, run in rows.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], (time.perf_counter() - start) / len(paths))
    reference = best["upstream-style MoCo v2 (PIL blur)"]
    print(f"{len(paths)} JPEGs 500x375 q90, 2 views (weak/strong) at 224 px, 1 thread, best of "
          f"{args.rounds} rounds")
    print(f"{'pipeline':40s} {'img/s':>8s} {'ms/img':>8s} {'x upstream':>11s}")
    for name, seconds in best.items():
        print(f"{name:40s} {1 / seconds:8.1f} {seconds * 1e3:8.2f} {reference / seconds:11.2f}")


if __name__ == "__main__":
    main()
