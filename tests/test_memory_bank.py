"""The MSF memory bank: FIFO of the last M target embeddings (any M), with labels and dataset indices."""
import pytest
import torch
import torch.nn.functional as F

import common


def random_batch(n, d, seed):
    gen = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(n, d, generator=gen), dim=1), torch.randint(0, 10, (n,), generator=gen),
            torch.randint(0, 10_000, (n,), generator=gen))


def test_initial_state():
    bank = common.MemoryBank(13, 8, seed=3)
    torch.testing.assert_close(bank.embeddings.double().norm(dim=1), torch.ones(13, dtype=torch.float64))
    assert torch.all(bank.labels == -1) and torch.all(bank.indices == -1) and bank.ptr.item() == 0
    assert torch.equal(bank.embeddings, common.MemoryBank(13, 8, seed=3).embeddings)  # deterministic by seed
    assert not torch.equal(bank.embeddings, common.MemoryBank(13, 8, seed=4).embeddings)


@pytest.mark.parametrize("size,batch", [(10, 4), (7, 3), (5, 5), (6, 1), (4, 9), (5, 7)])
def test_fifo_against_python_queue(size, batch):
    """Reading the bank from the pointer (oldest first) gives the newest `size` rows ever written,
    counting the initial random rows as written first; M need not be a multiple of the batch and a
    batch larger than M keeps only its last M rows."""
    d = 4
    bank = common.MemoryBank(size, d, seed=0)
    stream = [(row.double(), -1, -1) for row in bank.embeddings]  # the plain-Python reference queue
    for step in range(5):
        emb, labels, indices = random_batch(batch, d, seed=step)
        old_ptr = bank.ptr.item()
        slots = bank.enqueue(emb, labels, indices)
        stream += [(emb[i].double(), labels[i].item(), indices[i].item()) for i in range(batch)]
        expected = stream[-size:]
        order = (bank.ptr.item() + torch.arange(size)) % size  # oldest .. newest
        torch.testing.assert_close(bank.embeddings[order].double(), torch.stack([e for e, _, _ in expected]))
        assert bank.labels[order].tolist() == [label for _, label, _ in expected]
        assert bank.indices[order].tolist() == [index for _, _, index in expected]
        if batch <= size:  # exact slots: written at the pointer, wrapping around to the front
            assert slots.tolist() == [(old_ptr + i) % size for i in range(batch)]
            assert bank.ptr.item() == (old_ptr + batch) % size
        # the newest row sits just before the pointer
        newest = (bank.ptr.item() - 1) % size
        assert torch.equal(bank.embeddings[newest], emb[-1]) and bank.indices[newest] == indices[-1]


def test_wrap_around_slots_exactly():
    bank = common.MemoryBank(10, 4)
    for _ in range(2):
        bank.enqueue(*random_batch(4, 4, 0))
    emb, labels, indices = random_batch(4, 4, 1)
    assert bank.enqueue(emb, labels, indices).tolist() == [8, 9, 0, 1]
    assert bank.ptr.item() == 2
    assert torch.equal(bank.embeddings[[8, 9, 0, 1]], emb)
    assert torch.equal(bank.labels[[8, 9, 0, 1]], labels) and torch.equal(bank.indices[[8, 9, 0, 1]], indices)


def test_missing_labels_and_indices_are_minus_one():
    bank = common.MemoryBank(6, 4)
    bank.enqueue(*random_batch(6, 4, 0))
    emb, _, _ = random_batch(2, 4, 1)
    slots = bank.enqueue(emb)
    assert torch.all(bank.labels[slots] == -1) and torch.all(bank.indices[slots] == -1)
    assert torch.all(bank.labels[2:] >= 0)


def test_state_dict_round_trip():
    bank = common.MemoryBank(11, 4, seed=0)
    for step in range(3):
        bank.enqueue(*random_batch(4, 4, step))
    state = bank.state_dict()
    assert set(state) == {"embeddings", "labels", "indices", "ptr"}
    restored = common.MemoryBank(11, 4, seed=99)
    restored.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(bank, name)), name
    batch = random_batch(5, 4, 7)
    assert torch.equal(bank.enqueue(*batch), restored.enqueue(*batch))
    assert torch.equal(bank.embeddings, restored.embeddings) and torch.equal(bank.ptr, restored.ptr)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_storage(dtype):
    bank = common.MemoryBank(9, 16, dtype=dtype)
    assert bank.embeddings.dtype == dtype and bank.embeddings.nbytes == 9 * 16 * 2
    emb, labels, indices = random_batch(4, 16, 0)
    slots = bank.enqueue(emb, labels, indices)
    assert torch.equal(bank.embeddings[slots], emb.to(dtype))  # rounded once, to the nearest half
    tolerance = 1e-3 if dtype == torch.float16 else 8e-3
    torch.testing.assert_close(bank.embeddings[slots].double(), emb.double(), atol=tolerance, rtol=0)
    restored = common.MemoryBank(9, 16, dtype=dtype)
    restored.load_state_dict(bank.state_dict())
    assert restored.embeddings.dtype == dtype and torch.equal(restored.embeddings, bank.embeddings)


@pytest.mark.parametrize("size", [7, 12, 40])
def test_enqueue_with_keep_equals_enqueue_of_the_kept_rows(size):
    """keep= (used for the semi-supervised labeled cache) writes exactly what enqueueing the kept rows
    would, without a host sync, over many batches with the pointer wrapping around."""
    generator = torch.Generator().manual_seed(size)
    masked, reference = common.MemoryBank(size, 4, seed=1), common.MemoryBank(size, 4, seed=1)
    for step in range(12):
        batch = torch.randn(6, 4, generator=generator)
        labels, indices = torch.randint(0, 5, (6,), generator=generator), torch.arange(6) + 6 * step
        keep = torch.rand(6, generator=generator) < 0.5
        masked.enqueue(batch, labels, indices, keep=keep)
        reference.enqueue(batch[keep], labels[keep], indices[keep])
        for name in ("embeddings", "labels", "indices", "ptr"):
            assert torch.equal(getattr(masked, name), getattr(reference, name)), (step, name)
