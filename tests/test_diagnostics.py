"""The CMSF poster's diagnostics (common.purity_at_ks, ordered_purity_at_ks, rank_histogram) against
a float64 recomputation on a random bank."""
import torch
import torch.nn.functional as F

import common

BATCH, BANK_SIZE, DIM, CLASSES = 12, 1500, 16, 4


def random_bank(seed):
    generator = torch.Generator().manual_seed(seed)
    bank = F.normalize(torch.randn(BANK_SIZE, DIM, generator=generator, dtype=torch.float64), dim=1)
    bank_labels = torch.randint(-1, CLASSES, (BANK_SIZE,), generator=generator)  # -1: empty slots
    target = F.normalize(torch.randn(BATCH, DIM, generator=generator, dtype=torch.float64), dim=1)
    labels = torch.randint(0, CLASSES, (BATCH,), generator=generator)
    return bank, bank_labels, target, labels, generator


def test_purity_at_ks_matches_float64():
    bank, bank_labels, target, labels, _ = random_bank(0)
    purities = common.purity_at_ks(target.float(), bank.float(), bank_labels, labels)
    assert list(purities) == [1, 5, 10, 20, 50]
    order = (target @ bank.T).argsort(dim=1, descending=True)  # float64, nearest first
    for k, value in purities.items():
        same = [int(bank_labels[j] == labels[i])
                for i in range(BATCH) for j in order[i, :k].tolist()]
        assert abs(value - sum(same) / len(same)) < 1e-6, k
    # ks beyond the bank are left out; k = bank size is every entry
    small = common.purity_at_ks(target.float(), bank[:8].float(), bank_labels[:8], labels,
                                ks=(1, 8, 20))
    assert list(small) == [1, 8]
    expected = (bank_labels[:8].unsqueeze(0) == labels.unsqueeze(1)).double().mean().item()
    assert abs(small[8] - expected) < 1e-6


def test_ordered_purity_counts_only_valid_entries():
    """The constrained variant: an ordering with invalid trailing entries (fewer members in C)."""
    generator = torch.Generator().manual_seed(1)
    neighbour_labels = torch.randint(0, 3, (BATCH, 10), generator=generator)
    labels = torch.randint(0, 3, (BATCH,), generator=generator)
    members = torch.randint(1, 11, (BATCH,), generator=generator)  # valid entries come first
    valid = torch.arange(10).unsqueeze(0) < members.unsqueeze(1)
    purities = common.ordered_purity_at_ks(neighbour_labels, labels, ks=(1, 5, 10, 20), valid=valid)
    assert list(purities) == [1, 5, 10]
    for k, value in purities.items():
        same = [int(neighbour_labels[i, j] == labels[i]) for i in range(BATCH)
                for j in range(min(k, int(members[i])))]
        assert abs(value - sum(same) / len(same)) < 1e-6, k


def test_rank_histogram_matches_float64():
    """Ranks of chosen bank entries in each target's similarity order (1 = nearest), binned."""
    bank, _, target, _, generator = random_bank(2)
    slots = torch.randint(0, BANK_SIZE, (BATCH, 6), generator=generator)
    order = (target @ bank.T).argsort(dim=1, descending=True)
    slots[:, 0] = order[:, 0]                # rank 1
    slots[:, 1] = order[:, 3]                # rank 4
    slots[:, 2] = order[:, 1200]             # rank 1201
    valid = torch.rand(BATCH, 6, generator=generator) < 0.8
    valid[:, :3] = True
    histogram = common.rank_histogram(target.float(), bank.float(), slots, valid)
    assert list(histogram) == ["1", "2-5", "6-10", "11-20", "21-50", "51-100", "101-1000", ">1000"]
    position = order.argsort(dim=1)  # float64 rank - 1 of every bank entry for every target
    expected = dict.fromkeys(histogram, 0)
    for i in range(BATCH):
        for j in range(6):
            if valid[i, j]:
                rank = int(position[i, slots[i, j]]) + 1
                name = next(n for n, (low, high) in zip(histogram, common.RANK_BINS)
                            if rank >= low and (high is None or rank <= high))
                expected[name] += 1
    assert histogram == expected
    assert histogram["1"] >= BATCH and histogram["2-5"] >= BATCH and histogram[">1000"] >= BATCH
    assert sum(histogram.values()) == int(valid.sum())


def test_label_constrained_diagnostics_match_float64():
    """neighbour_diagnostics with a label constraint (the supervised / semi scripts' call): purity at
    k of the k nearest SAME-LABEL entries, where they rank in the plain ordering, and the constraint
    size, all against a float64 brute force on a random bank. The true labels differ from the
    constraint labels (noisy labels), as in train_cmsf_sup.py."""
    bank, true_bank_labels, target, true_labels, generator = random_bank(3)
    train_bank_labels = torch.where(torch.rand(BANK_SIZE, generator=generator) < 0.2,
                                    torch.randint(0, CLASSES, (BANK_SIZE,), generator=generator),
                                    true_bank_labels)  # noisy copy; -1 stays empty
    train_labels = true_labels.clone()
    train_labels[0] = -1  # an unknown label (semi): the whole bank is its constraint set
    out = common.neighbour_diagnostics(target.float(), true_labels, bank.float(), true_bank_labels,
                                       query_labels=train_labels, key_labels=train_bank_labels, rows=BATCH)
    sims = target @ bank.T  # float64
    plain_rank = {}
    for i in range(BATCH):
        order = sims[i].argsort(descending=True).tolist()
        plain_rank[i] = {j: r + 1 for r, j in enumerate(order)}  # random data: no ties
    for k in (1, 5, 10, 20, 50):
        same, counted = 0, 0
        for i in range(BATCH):
            allowed = [j for j in sims[i].argsort(descending=True).tolist()
                       if train_labels[i] < 0 or train_bank_labels[j] == train_labels[i]][:k]
            same += sum(int(true_bank_labels[j] == true_labels[i]) for j in allowed)
            counted += len(allowed)
        assert abs(out[f"purity_constrained_at_k/{k}"] - same / counted) < 1e-6, k
    ranks = [plain_rank[i][j] for i in range(BATCH)
             for j in [j for j in sims[i].argsort(descending=True).tolist()
                       if train_labels[i] < 0 or train_bank_labels[j] == train_labels[i]][:50]]
    in_bin = sum(1 for r in ranks if 2 <= r <= 5) / len(ranks)
    assert abs(out["rank_histogram/2-5"] - in_bin) < 1e-6
    sizes = [BANK_SIZE if train_labels[i] < 0 else int((train_bank_labels == train_labels[i]).sum())
             for i in range(BATCH)]
    assert abs(out["constraint_set_size"] / (sum(sizes) / BATCH) - 1) < 1e-6
