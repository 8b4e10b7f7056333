"""Tiny copies of the 10 transfer datasets, written in the exact on-disk layout torchvision reads.

make_transfer_fixtures(root, names) writes, under root, the sub-folder(s) each torchvision class
expects (food-101/, cifar-10-batches-py/, ..., flowers-102/): 3 classes, a few 10-16 px JPEGs (or
CIFAR pickles) per class and split, each class a different colour so a classifier can learn them.
Some images are grayscale or CMYK, as in the real Caltech101 / SUN397.

CIFAR10/100 and Flowers102 verify MD5 checksums of their files even with download=False:
patch_torchvision_checksums(monkeypatch, root) points those class attributes at the fixture files'
checksums (pytest's monkeypatch restores them after the test); that only works in-process, so a
script run as a subprocess should use UNCHECKED_NAMES.
"""
import hashlib
import json
import os
import pickle

import numpy as np
import scipy.io
from PIL import Image

NUM_CLASSES = 3
CLASS_COLOURS = np.array([[220, 40, 40], [40, 200, 60], [50, 60, 230]], dtype=np.float64)
ALL_NAMES = ("food101", "cifar10", "cifar100", "sun397", "cars", "aircraft", "dtd", "pets", "caltech101",
             "flowers")
# torchvision checks no checksum for these: usable by a script run as a subprocess, where
# patch_torchvision_checksums cannot reach
UNCHECKED_NAMES = ("food101", "sun397", "cars", "aircraft", "dtd", "pets", "caltech101")


def _pixels(rng, label, height, width):
    noise = rng.normal(0, 25, size=(height, width, 3))
    return np.clip(CLASS_COLOURS[label] + noise, 0, 255).astype(np.uint8)


def _write_image(path, rng, label, mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    height, width = rng.integers(10, 17, size=2)
    image = Image.fromarray(_pixels(rng, label, height, width))
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format="JPEG", quality=95)


def _mode(index):
    # every 5th image grayscale, every 7th CMYK: the pipeline must convert to RGB
    return "L" if index % 5 == 4 else "CMYK" if index % 7 == 6 else "RGB"


def make_food101(root, rng, train_per_class=8, test_per_class=3):
    base = os.path.join(root, "food-101")
    classes = ["apple_pie", "baby_back_ribs", "beignets"]
    meta = {"train": {}, "test": {}}
    image_id = 1000
    for label, name in enumerate(classes):
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            meta[split][name] = []
            for _ in range(count):
                image_id += 1
                _write_image(os.path.join(base, "images", name, f"{image_id}.jpg"), rng, label, _mode(image_id))
                meta[split][name].append(f"{name}/{image_id}")
    os.makedirs(os.path.join(base, "meta"), exist_ok=True)
    for split in ("train", "test"):
        with open(os.path.join(base, "meta", f"{split}.json"), "w") as f:
            json.dump(meta[split], f)
    with open(os.path.join(base, "meta", "classes.txt"), "w") as f:
        f.write("\n".join(classes) + "\n")


def _cifar_arrays(rng, labels):
    images = np.stack([_pixels(rng, label, 32, 32) for label in labels])  # N, H, W, C
    return images.transpose(0, 3, 1, 2).reshape(len(labels), 3072)  # stored as N x (C*H*W), channel-major


def _pickle(path, record):
    with open(path, "wb") as f:
        pickle.dump(record, f, protocol=2)


def make_cifar10(root, rng, per_batch_per_class=2, test_per_class=3):
    base = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(base, exist_ok=True)
    for batch in range(1, 6):
        labels = [c for c in range(NUM_CLASSES) for _ in range(per_batch_per_class)]
        _pickle(os.path.join(base, f"data_batch_{batch}"),
                {"batch_label": f"training batch {batch} of 5", "labels": labels,
                 "data": _cifar_arrays(rng, labels), "filenames": [f"img_{i}.png" for i in range(len(labels))]})
    labels = [c for c in range(NUM_CLASSES) for _ in range(test_per_class)]
    _pickle(os.path.join(base, "test_batch"),
            {"batch_label": "testing batch 1 of 1", "labels": labels, "data": _cifar_arrays(rng, labels),
             "filenames": [f"test_{i}.png" for i in range(len(labels))]})
    _pickle(os.path.join(base, "batches.meta"),
            {"label_names": ["airplane", "automobile", "bird"], "num_cases_per_batch": 3 * per_batch_per_class,
             "num_vis": 3072})


def make_cifar100(root, rng, train_per_class=8, test_per_class=3):
    base = os.path.join(root, "cifar-100-python")
    os.makedirs(base, exist_ok=True)
    for split, count in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(NUM_CLASSES) for _ in range(count)]
        _pickle(os.path.join(base, split),
                {"filenames": [f"{split}_{i}.png" for i in range(len(labels))], "batch_label": f"{split} batch",
                 "fine_labels": labels, "coarse_labels": [0] * len(labels), "data": _cifar_arrays(rng, labels)})
    _pickle(os.path.join(base, "meta"), {"fine_label_names": ["apple", "aquarium_fish", "baby"],
                                         "coarse_label_names": ["fruit_and_vegetables"]})


def make_sun397(root, rng, per_class=8, train_per_class=4):
    """SUN397/ClassName.txt, the images, and the official partition files Training_01.txt /
    Testing_01.txt (the first train_per_class images of a class train, the rest test)."""
    base = os.path.join(root, "SUN397")
    class_paths = ["/a/abbey", "/b/bakery/shop", "/c/canyon"]  # nested names exist in the real list
    os.makedirs(base, exist_ok=True)
    with open(os.path.join(base, "ClassName.txt"), "w") as f:
        f.write("\n".join(class_paths) + "\n")
    partitions = {"Training_01.txt": [], "Testing_01.txt": []}
    for label, class_path in enumerate(class_paths):
        for i in range(per_class):
            name = f"sun_{label}{i:04d}{'abcdefgh'[i % 8]}.jpg"
            _write_image(os.path.join(base, *class_path.strip("/").split("/"), name), rng, label, _mode(i))
            partition = "Training_01.txt" if i < train_per_class else "Testing_01.txt"
            partitions[partition].append(f"{class_path}/{name}")
    for partition, lines in partitions.items():
        with open(os.path.join(base, partition), "w") as f:
            f.write("\n".join(lines) + "\n")


def _cars_annotations(path, rng, image_folder, first_id, count_per_class):
    records, image_id = [], first_id
    for label in range(NUM_CLASSES):
        for _ in range(count_per_class):
            fname = f"{image_id:05d}.jpg"
            _write_image(os.path.join(image_folder, fname), rng, label)
            # the real files: uint8 boxes and 1-based class, one struct per image
            records.append((np.uint8(1), np.uint8(1), np.uint8(9), np.uint8(9), np.uint8(label + 1), fname))
            image_id += 1
    dtype = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"), ("class", "O"), ("fname", "O")]
    annotations = np.zeros((1, len(records)), dtype=dtype)
    for i, record in enumerate(records):
        annotations[0, i] = record
    scipy.io.savemat(path, {"annotations": annotations})


def make_cars(root, rng, train_per_class=8, test_per_class=3):
    base = os.path.join(root, "stanford_cars")
    os.makedirs(os.path.join(base, "devkit"), exist_ok=True)
    class_names = np.array([["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012"]],
                           dtype=object)
    scipy.io.savemat(os.path.join(base, "devkit", "cars_meta.mat"), {"class_names": class_names})
    _cars_annotations(os.path.join(base, "devkit", "cars_train_annos.mat"), rng,
                      os.path.join(base, "cars_train"), 1, train_per_class)
    _cars_annotations(os.path.join(base, "cars_test_annos_withlabels.mat"), rng,
                      os.path.join(base, "cars_test"), 1, test_per_class)


def make_aircraft(root, rng, counts=(("train", 6), ("val", 2), ("test", 3))):
    data = os.path.join(root, "fgvc-aircraft-2013b", "data")
    variants = ["707-320", "A300B4", "Cessna 172"]  # names with spaces exist in the real list
    os.makedirs(data, exist_ok=True)
    with open(os.path.join(data, "variants.txt"), "w") as f:
        f.write("\n".join(variants) + "\n")
    image_id, lines = 1000000, {}
    for split, count in counts:
        lines[split] = []
        for label, variant in enumerate(variants):
            for _ in range(count):
                image_id += 1
                _write_image(os.path.join(data, "images", f"{image_id:07d}.jpg"), rng, label)
                lines[split].append(f"{image_id:07d} {variant}")
    lines["trainval"] = lines["train"] + lines["val"]
    for split, split_lines in lines.items():
        with open(os.path.join(data, f"images_variant_{split}.txt"), "w") as f:
            f.write("\n".join(split_lines) + "\n")


def make_dtd(root, rng, counts=(("train", 6), ("val", 2), ("test", 3))):
    data = os.path.join(root, "dtd", "dtd")
    classes = ["banded", "blotchy", "braided"]
    os.makedirs(os.path.join(data, "labels"), exist_ok=True)
    index = {c: 0 for c in classes}
    for split, count in counts:
        lines = []
        for label, name in enumerate(classes):
            for _ in range(count):
                index[name] += 1
                fname = f"{name}_{index[name]:04d}.jpg"
                _write_image(os.path.join(data, "images", name, fname), rng, label)
                lines.append(f"{name}/{fname}")
        with open(os.path.join(data, "labels", f"{split}1.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


def make_pets(root, rng, trainval_per_class=8, test_per_class=3):
    base = os.path.join(root, "oxford-iiit-pet")
    breeds = [("Abyssinian", 1), ("american_bulldog", 2), ("american_pit_bull_terrier", 2)]  # (name, species)
    os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
    number = {name: 0 for name, _ in breeds}
    for split, count in (("trainval", trainval_per_class), ("test", test_per_class)):
        lines = []
        for label, (name, species) in enumerate(breeds):
            for _ in range(count):
                number[name] += 1
                image_id = f"{name}_{number[name]}"
                _write_image(os.path.join(base, "images", f"{image_id}.jpg"), rng, label)
                lines.append(f"{image_id} {label + 1} {species} {number[name]}")
        with open(os.path.join(base, "annotations", f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")


CALTECH101_FOLDERS = ("BACKGROUND_Google", "Faces", "accordion", "airplanes")  # sorted: 4 classes


def make_caltech101(root, rng, per_class=40):
    """101_ObjectCategories/<class>/image_XXXX.jpg with BACKGROUND_Google, a class of the protocol (torchvision's
    Caltech101 drops it); its images share Faces' colour, so the two are hard to tell apart."""
    categories = os.path.join(root, "caltech101", "101_ObjectCategories")
    for folder in CALTECH101_FOLDERS:
        label = {"BACKGROUND_Google": 0, "Faces": 0, "accordion": 1, "airplanes": 2}[folder]
        for i in range(1, per_class + 1):  # 30 draws with replacement from 40 leave ~19 for test
            _write_image(os.path.join(categories, folder, f"image_{i:04d}.jpg"), rng, label, _mode(i))


def make_flowers(root, rng, counts=(("trnid", 6), ("valid", 2), ("tstid", 3))):
    base = os.path.join(root, "flowers-102")
    labels, set_ids, image_id = [], {}, 0
    for split, count in counts:
        set_ids[split] = []
        for label in range(NUM_CLASSES):
            for _ in range(count):
                image_id += 1
                _write_image(os.path.join(base, "jpg", f"image_{image_id:05d}.jpg"), rng, label)
                labels.append(label + 1)  # 1-based in imagelabels.mat
                set_ids[split].append(image_id)
    scipy.io.savemat(os.path.join(base, "imagelabels.mat"), {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(os.path.join(base, "setid.mat"),
                     {k: np.array([v], dtype=np.uint16) for k, v in set_ids.items()})


BUILDERS = {"food101": make_food101, "cifar10": make_cifar10, "cifar100": make_cifar100, "sun397": make_sun397,
            "cars": make_cars, "aircraft": make_aircraft, "dtd": make_dtd, "pets": make_pets,
            "caltech101": make_caltech101, "flowers": make_flowers}


def make_transfer_fixtures(root, names=ALL_NAMES, seed=0):
    """Write the tiny datasets `names` (transfer_eval's --datasets names) under root; returns root."""
    rng = np.random.default_rng(seed)
    for name in names:
        BUILDERS[name](str(root), rng)
    return root


def _md5(path):
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


def patch_torchvision_checksums(monkeypatch, root):
    """Make torchvision's CIFAR10/CIFAR100/Flowers102 accept the fixture files under root (they check
    MD5s even with download=False). Only the datasets present under root are patched."""
    import torchvision.datasets as tvd
    for cls in (tvd.CIFAR10, tvd.CIFAR100):
        base = os.path.join(str(root), cls.base_folder)
        if not os.path.isdir(base):
            continue
        monkeypatch.setattr(cls, "train_list", [[f, _md5(os.path.join(base, f))] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, _md5(os.path.join(base, f))] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": _md5(os.path.join(base, cls.meta["filename"]))})
    base = os.path.join(str(root), "flowers-102")
    if os.path.isdir(base):
        file_dict = dict(tvd.Flowers102._file_dict)
        for key in ("label", "setid"):
            filename = file_dict[key][0]
            file_dict[key] = (filename, _md5(os.path.join(base, filename)))
        monkeypatch.setattr(tvd.Flowers102, "_file_dict", file_dict)
