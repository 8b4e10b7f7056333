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
