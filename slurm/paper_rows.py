"""The papers' table rows as data: the command of each row, the evaluations that belong to it and
the papers' numbers for each. `python slurm/submit.py --reproduce ROW` runs a row from here; the
README's tables and the training scripts' docstring rows are tested against it
(tests/test_paper_rows.py).

A row's command is the README's, word for word. Words that stand for the user's data are filled in
by slurm/submit.py --reproduce: $IMNET, $CIFAR and $STL by --data, 10percent.txt and 1percent.txt by
--train-list-10pct and --train-list-1pct. Other file names in a command (noisy.txt, other.pt) are
examples: give the real file after the row name (e.g. --noisy-labels /data/noisy_25.txt).

Paper numbers are top-1 %, keyed by metric: knn_1 / knn_20 (eval_knn.py, majority vote), linear
(eval_linear.py, the final epoch), linear_1pct / linear_10pct (the same on SimCLR's subsets),
semi_10pct / semi_1pct (eval_linear.py --protocol semi), transfer_<dataset> and transfer_mean
(transfer_eval.py). A row without a number for a metric still measures it.
"""
import collections
import difflib

Row = collections.namedtuple("Row", "name table title command evaluations paper")

# What the evaluation stages of a row are called (slurm/submit.py defines each stage's command)
KNN_LINEAR = ("knn", "linear")
SEMI_10PCT = ("semi_10pct", "semi_knn_10pct")
SEMI_1PCT = ("semi_1pct", "semi_knn_1pct")

# The MSF poster's transfer row (ResNet-50, linear transfer protocol); its mean is the poster's
TRANSFER_MSF = {"transfer_food101": 70.7, "transfer_cifar10": 92.0, "transfer_cifar100": 76.1,
                "transfer_sun397": 59.0, "transfer_cars": 60.9, "transfer_aircraft": 53.5,
                "transfer_dtd": 72.1, "transfer_pets": 89.2, "transfer_caltech101": 92.1,
                "transfer_flowers": 92.4, "transfer_mean": 75.8}


def knn_linear(linear, knn_1, knn_20):
    return {"linear": linear, "knn_1": knn_1, "knn_20": knn_20}


SMALL = ("--arch resnet18 --image-size {size} --epochs 800 --lr 0.06 --wd 5e-4 "
         "--mem-bank-size {bank}")

ROWS = [
    # MSF table
    Row("msf-ws-1m", "msf", "MSF w/s (1M)", "python train_msf.py --data $IMNET --amp none",
        KNN_LINEAR + ("linear_1pct", "linear_10pct", "transfer"),
        {**knn_linear(72.4, 62.0, 64.9), "linear_1pct": 55.5, "linear_10pct": 66.5,
         **TRANSFER_MSF}),
    Row("msf-ws-256k", "msf", "MSF w/s (256K)",
        "python train_msf.py --data $IMNET --amp none --mem-bank-size 256000", KNN_LINEAR,
        knn_linear(72.2, 62.1, 65.1)),
    Row("msf-ws-128k", "msf", "MSF w/s (128K)",
        "python train_msf.py --data $IMNET --amp none --mem-bank-size 128000", KNN_LINEAR,
        knn_linear(72.1, 62.0, 65.2)),
    Row("msf-ss", "msf", "MSF (s/s)",
        "python train_msf.py --data $IMNET --amp none --augmentation strong/strong", KNN_LINEAR,
        knn_linear(71.4, 60.6, 64.0)),
    Row("msf-ww", "msf", "MSF w/w",
        "python train_msf.py --data $IMNET --amp none --augmentation weak/weak", KNN_LINEAR,
        knn_linear(66.3, 54.6, 57.4)),
    Row("byol-asym-ss", "msf", "BYOL-asym (s/s, k = 1)",
        "python train_msf.py --data $IMNET --amp none --augmentation strong/strong --topk 1",
        KNN_LINEAR, knn_linear(69.3, 55.0, 59.2)),
    Row("byol-asym-ws", "msf", "BYOL-asym (w/s, k = 1)",
        "python train_msf.py --data $IMNET --amp none --topk 1", KNN_LINEAR,
        knn_linear(69.5, 55.8, 59.1)),
    Row("msf-released", "msf", "released checkpoint (k = 10, 1M)",
        "python train_msf.py --data $IMNET --amp none --topk 10", KNN_LINEAR,
        knn_linear(72.4, 62.5, 65.7)),
    # no training: the evaluations of a randomly initialised backbone
    Row("random-init", "msf", "random init", "python eval_knn.py --data $IMNET", KNN_LINEAR,
        knn_linear(5.1, 1.5, 2.0)),
    # CMSF table
    Row("cmsf-2q", "cmsf", "CMSF self 2Q (128K)",
        "python train_cmsf_self.py --data $IMNET --amp none", KNN_LINEAR,
        knn_linear(73.0, 63.2, 66.4)),
    Row("cmsf-km", "cmsf", "CMSF-KM",
        "python train_cmsf_self.py --data $IMNET --amp none --constraint kmeans", KNN_LINEAR,
        knn_linear(72.9, 63.2, 66.2)),
    Row("cmsf-multicrop", "cmsf", "CMSF self + multi-crop",
        "python train_cmsf_self.py --data $IMNET --amp none --local-crops-number 6", KNN_LINEAR,
        knn_linear(74.4, 62.3, 66.2)),
    Row("cmsf-sup", "cmsf", "CMSF supervised, k = 10",
        "python train_cmsf_sup.py --data $IMNET --amp none", KNN_LINEAR, {}),
    Row("cmsf-sup-topall", "cmsf", "CMSF supervised, top-all",
        "python train_cmsf_sup.py --data $IMNET --amp none --topk 0", KNN_LINEAR, {}),
    # the other noise levels: the same row with --label-noise 0.10 (0.25, 0.50) after its name
    Row("cmsf-sup-noisy", "cmsf", "CMSF noisy labels 5/10/25/50 %",
        "python train_cmsf_sup.py --data $IMNET --amp none --label-noise 0.05", KNN_LINEAR, {}),
    Row("cmsf-sup-noisy-list", "cmsf", "CMSF noisy labels from a list",
        "python train_cmsf_sup.py --data $IMNET --amp none --noisy-labels noisy.txt", KNN_LINEAR,
        {}),
    Row("xent-noisy", "cmsf", "Xent baseline, same noisy labels",
        "python train_cmsf_sup.py --data $IMNET --amp none --loss xent --label-noise 0.25",
        KNN_LINEAR, {}),
    Row("cmsf-cross-modal", "cmsf", "CMSF cross-modal (\"NNs in other modalities\")",
        "python train_cmsf_self.py --data $IMNET --amp none --constraint embeddings "
        "--constraint-embeddings other.pt", KNN_LINEAR, {}),
    # semi-supervised table (the authors' semi protocol on the labeled subset, not a linear probe)
    Row("semi-msf", "semi", "MSF",
        "python train_msf.py --data $IMNET --amp none --mem-bank-size 128000 --topk 10",
        SEMI_10PCT, {"semi_10pct": 67.4}),
    Row("semi-cmsf-labels-only", "semi", "CMSF, labels only (no pseudo-labels)",
        "python train_cmsf_semi.py --data $IMNET --labeled-list 10percent.txt --amp none "
        "--threshold 1.01", SEMI_10PCT, {"semi_10pct": 68.6}),
    Row("semi-cmsf-pseudo", "semi", "CMSF + pseudo-labels, fp32",
        "python train_cmsf_semi.py --data $IMNET --labeled-list 10percent.txt --amp none",
        SEMI_10PCT, {"semi_10pct": 69.9}),
    Row("semi-cmsf-pseudo-bs768", "semi", "CMSF + pseudo-labels, mixed precision, batch 768",
        "python train_cmsf_semi.py --data $IMNET --labeled-list 10percent.txt --batch-size 768 "
        "--amp bf16", SEMI_10PCT, {"semi_10pct": 70.5}),
    Row("semi-cmsf-pseudo-1pct", "semi", "CMSF + pseudo-labels, 1 % labels",
        "python train_cmsf_semi.py --data $IMNET --labeled-list 1percent.txt --amp none",
        SEMI_1PCT, {}),
    # small datasets (no paper numbers: the papers report ImageNet only)
    Row("cifar10-msf", "small", "CIFAR-10, MSF", "python train_msf.py --dataset cifar10 --data "
        "$CIFAR " + SMALL.format(size=32, bank=8192), KNN_LINEAR, {}),
    Row("cifar10-cmsf-2q", "small", "CIFAR-10, CMSF 2Q", "python train_cmsf_self.py --dataset "
        "cifar10 --data $CIFAR " + SMALL.format(size=32, bank=8192), KNN_LINEAR, {}),
    Row("cifar100-msf", "small", "CIFAR-100, MSF", "python train_msf.py --dataset cifar100 --data "
        "$CIFAR " + SMALL.format(size=32, bank=8192), KNN_LINEAR, {}),
    Row("cifar100-cmsf-2q", "small", "CIFAR-100, CMSF 2Q", "python train_cmsf_self.py --dataset "
        "cifar100 --data $CIFAR " + SMALL.format(size=32, bank=8192), KNN_LINEAR, {}),
    Row("stl10-msf", "small", "STL-10, MSF", "python train_msf.py --dataset stl10 --data $STL "
        + SMALL.format(size=96, bank=1024), KNN_LINEAR, {}),
    Row("stl10-cmsf-2q", "small", "STL-10, CMSF 2Q", "python train_cmsf_self.py --dataset stl10 "
        "--data $STL " + SMALL.format(size=96, bank=1024), KNN_LINEAR, {}),
]
ROWS_BY_NAME = {row.name: row for row in ROWS}
assert len(ROWS_BY_NAME) == len(ROWS), "two rows share a name"


def find_row(name):
    """The row called `name`, or None and the closest names (for the error message)."""
    if name in ROWS_BY_NAME:
        return ROWS_BY_NAME[name], []
    return None, difflib.get_close_matches(name, ROWS_BY_NAME, n=3, cutoff=0.4)


def listing():
    """`--reproduce list`: one line per row (name, what it measures, the paper's numbers)."""
    tables = {"msf": "MSF", "cmsf": "CMSF", "semi": "semi-supervised (10 % / 1 % labels)",
              "small": "small datasets"}
    lines = []
    for table, heading in tables.items():
        lines.append(f"{heading}:")
        for row in ROWS:
            if row.table == table:
                numbers = ", ".join(f"{k} {v}" for k, v in row.paper.items()
                                    if not k.startswith("transfer_") or k == "transfer_mean")
                lines.append(f"  {row.name:24s} {row.title}: {', '.join(row.evaluations)}"
                             f" ({numbers or 'no paper numbers'})")
    return "\n".join(lines)
