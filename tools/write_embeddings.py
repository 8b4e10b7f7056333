"""Write the --constraint-embeddings file of train_cmsf_self.py: one embedding per training image.

The cross-modal constraint of CMSF finds the constraint set with an embedding of the same image from
another modality or model. This script computes such embeddings with any backbone we can load (a
training checkpoint of this suite, a weights-only checkpoint_EEEE.pth, backbone_torchvision.pth, a
torchvision ResNet state dict or a released MSF/CMSF checkpoint): the frozen backbone's pooled
features of every training image, Resize + CenterCrop (the evaluation transform), L2-normalised.
The file: torch.save({"paths": [names], "embeddings": N x D tensor}) with names from
common.dataset_relative_paths (path relative to train/ for an ImageFolder, the index as a string for
cifar/stl10/synthetic). Embeddings from another modality (depth, text, ...) go into the same format.

  python tools/write_embeddings.py --weights other_model.pth --arch resnet50 --data /imagenet \
      --output imagenet_other.pth
  python train_cmsf_self.py --data /imagenet --constraint embeddings \
      --constraint-embeddings imagenet_other.pth
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("write_embeddings", description=__doc__.split("\n")[0],
                                add_help=False)
    p.add_argument("--weights", required=True, help="checkpoint or state dict holding the backbone")
    p.add_argument("--arch", default="resnet50", help="torchvision ResNet of the weights")
    p.add_argument("--output", required=True, help="the file to write (torch format)")
    p.add_argument("--data", default=None,
                   help="dataset root (ImageFolder root with train/, or torchvision root)")
    p.add_argument("--dataset", default="imagefolder",
                   choices=["imagefolder", "cifar10", "cifar100", "stl10", "synthetic"])
    p.add_argument("--download", action="store_true", help="download cifar/stl10 if missing")
    p.add_argument("--synthetic-images", type=int, default=5000,
                   help="training images of --dataset synthetic")
    p.add_argument("--image-size", type=int, default=224,
                   help="crop size; <= 64 uses the small-image stem")
    p.add_argument("--dtype", default="float16", choices=["float32", "float16"],
                   help="storage precision of the embeddings (float16 halves the file)")
    p.add_argument("--batch-size", type=int, default=256,
                   help="global batch size of the feature pass")
    p.add_argument("--workers", type=int, default=8, help="data-loading processes per GPU/process")
    p.add_argument("--amp", default=None, choices=["bf16", "fp16", "none"],
                   help="mixed precision (default: bf16 on GPU, none on CPU)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    return p


def main(args):
    output_dir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(output_dir):
        raise common.UsageError(f"--output {args.output}: folder {output_dir} does not exist; "
                                "create it first")
    if args.batch_size < 1:
        raise common.UsageError(f"--batch-size {args.batch_size} must be at least 1")
    device = common.init_distributed(args.device)
    base, _ = common.build_dataset(args.dataset, args.data, "train", args.download, args.image_size,
                                   args.synthetic_images)
    backbone, _ = common.build_backbone(args.arch, args.image_size)
    summary = common.load_backbone_weights(backbone, args.weights)
    if common.is_main_process():
        print(summary, flush=True)
    dataset = common.IndexedDataset(base, common.eval_transform(args.image_size))
    backbone = backbone.to(device)
    features, _ = common.extract_features(backbone, dataset, args.batch_size, args.workers, device,
                                          args.amp, header="embeddings")
    embeddings = F.normalize(features, dim=1).to(getattr(torch, args.dtype)).cpu()
    record = {"paths": common.dataset_relative_paths(base), "embeddings": embeddings}
    if common.is_main_process():
        common.atomic_write(args.output, lambda f: torch.save(record, f))
        print(f"wrote {args.output}: {len(record['paths'])} embeddings of dimension "
              f"{features.shape[1]} ({args.dtype})", flush=True)


if __name__ == "__main__":
    common.run_main(main, get_args_parser())
