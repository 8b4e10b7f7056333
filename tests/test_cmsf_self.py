"""train_cmsf_self.py: the 2Q constraint, its fallback and padding, CMSF-KM's k-means and constraint,
the loss and the logged rank against float64 brute force, and the script from the command line
(1 and 2 processes, exact resume)."""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

import common
import train_cmsf_self as cmsf
from conftest import run_script


def unit(*shape, generator):
    return F.normalize(torch.randn(*shape, generator=generator, dtype=torch.float64), dim=-1)


def search_args(k, k_prime, constraint="2q"):
    return argparse.Namespace(topk=k, topk_prime=k_prime, constraint=constraint, search_dtype_obj=None)


def top(scores, candidates, n):
    """The n candidates of largest score, as a set (float64 scores, random data: no ties)."""
    return set(sorted(candidates, key=lambda c: -scores[c])[:n])


# ---------------------------------------------------------------- previous-visit store

def test_store_memory_is_at_most_half_of_upstream():
    num_images, dim, bank_size = 1000, 64, 300
    upstream = 2 * num_images * dim * 4  # two N x d float32 tables
    assert cmsf.PreviousVisitStore(num_images, dim).nbytes == upstream // 2
    half_store = cmsf.PreviousVisitStore(num_images, dim, torch.float16)
    half_previous_bank = common.MemoryBank(bank_size, dim, torch.float16)
    assert half_store.nbytes + half_previous_bank.embeddings.nbytes <= upstream // 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_store_lookup_and_record(dtype):
    generator = torch.Generator().manual_seed(0)
    store = cmsf.PreviousVisitStore(10, 8, dtype)
    embeddings, visited = store.lookup(torch.tensor([3, 7]))
    assert not visited.any() and torch.all(embeddings == 0)
    rows = unit(2, 8, generator=generator).float()
    store.record(torch.tensor([7, 2]), rows)
    embeddings, visited = store.lookup(torch.tensor([2, 3, 7]))
    assert visited.tolist() == [True, False, True]
    assert torch.equal(embeddings[[2, 0]], rows.to(dtype).float())


# ---------------------------------------------------------------- 2Q constraint

def test_two_queue_constraint_matches_brute_force():
    generator = torch.Generator().manual_seed(1)
    batch, bank_size, dim = 6, 40, 8
    for k, k_prime in [(3, 6), (5, 5), (4, 2)]:
        memory_bank = common.MemoryBank(bank_size, dim, seed=2)
        memory_bank.embeddings.copy_(unit(bank_size, dim, generator=generator))
        previous_bank = common.MemoryBank(bank_size, dim, seed=3)
        previous_bank.embeddings.copy_(unit(bank_size, dim, generator=generator))
        previous_bank.labels.copy_(torch.where(torch.rand(bank_size, generator=generator) < 0.7, 0, -1))
        target, target_prev = unit(batch, dim, generator=generator), unit(batch, dim, generator=generator)

        candidates, candidates_valid, constrained, constrained_valid = cmsf.two_queue_constraint(
            target.float(), target_prev.float(), memory_bank.embeddings, previous_bank.embeddings,
            previous_bank.labels, k, k_prime)
        assert constrained.shape == (batch, min(k, k_prime)) and constrained_valid.all()
        allowed = (previous_bank.labels == 0).nonzero().squeeze(1).tolist()
        for i in range(batch):
            ref_candidates = top(previous_bank.embeddings.double() @ target_prev[i], allowed, k_prime)
            ref_constrained = top(memory_bank.embeddings.double() @ target[i], ref_candidates, min(k, k_prime))
            assert set(candidates[i].tolist()) == ref_candidates
            assert set(constrained[i].tolist()) == ref_constrained


def test_two_queue_constraint_skips_slots_without_a_previous_visit():
    """With only 2 slots of M' holding a previous visit, C has 2 valid members and no other slot."""
    generator = torch.Generator().manual_seed(4)
    memory_bank, previous_bank = common.MemoryBank(20, 8, seed=0), common.MemoryBank(20, 8, seed=1)
    previous_bank.labels[[4, 11]] = 0
    target = unit(3, 8, generator=generator).float()
    candidates, candidates_valid, constrained, constrained_valid = cmsf.two_queue_constraint(
        target, target, memory_bank.embeddings, previous_bank.embeddings, previous_bank.labels, 5, 5)
    assert candidates_valid.sum(1).tolist() == [2, 2, 2] and constrained_valid.sum(1).tolist() == [2, 2, 2]
    assert all(set(row[valid].tolist()) == {4, 11} for row, valid in zip(constrained, constrained_valid))


def simulate_training(num_images, batch, bank_size, dim, epochs, k, k_prime, seed=0):
    """Run CMSFMemory.enqueue + neighbours over `epochs` shuffled epochs with a random target embedding per
    visit, and check every step against a float64 brute force built from the visit history alone:
    bank = the last M visits; M' = for each of them, the same image's visit before it."""
    generator = torch.Generator().manual_seed(seed)
    memory_bank = common.MemoryBank(bank_size, dim, seed=seed)
    previous_bank = common.MemoryBank(bank_size, dim, seed=seed + 1)
    store = cmsf.PreviousVisitStore(num_images, dim)
    args = search_args(k, k_prime)
    initial_bank = memory_bank.embeddings.double().clone()  # random unit vectors in unwritten slots
    history = []  # one (image, embedding, previous embedding or None) per enqueued visit
    last_visit = {}
    checked_rows = 0
    for epoch in range(epochs):
        order = torch.randperm(num_images, generator=generator)
        for step in range(num_images // batch):
            indices = order[step * batch:(step + 1) * batch]
            target = unit(batch, dim, generator=generator)
            labels = indices % 3
            memory = cmsf.CMSFMemory(args.constraint, memory_bank, store, args.topk, args.topk_prime,
                                     args.search_dtype_obj, previous_bank=previous_bank)
            previous = memory.enqueue(target.float(), labels, indices)
            found = memory.neighbours(target.float(), indices, previous)
            first_entry = len(history)
            for i, image in enumerate(indices.tolist()):
                history.append((image, target[i], last_visit.get(image)))
                last_visit[image] = target[i]
            # visit number e sits in slot e % M; only the last M visits are still in the bank
            bank, previous_of_slot = initial_bank.clone(), {}
            for entry in range(max(0, len(history) - bank_size), len(history)):
                bank[entry % bank_size] = history[entry][1]
                if history[entry][2] is not None:
                    previous_of_slot[entry % bank_size] = history[entry][2]
            for i, image in enumerate(indices.tolist()):
                bank_sims = (bank @ target[i]).tolist()
                unconstrained = top(bank_sims, range(bank_size), k)
                assert set(found["unconstrained"][i].tolist()) == unconstrained
                own_slot = (first_entry + i) % bank_size
                previous = history[first_entry + i][2]
                assert bool(found["constrained_rows"][i]) == (previous is not None)
                if previous is None:  # no previous visit (epoch 1): plain MSF
                    assert epoch == 0
                    assert torch.equal(found["constrained"][i], found["unconstrained"][i])
                    assert found["constrained_valid"][i].all()
                    continue
                assert epoch > 0
                prev_sims = {s: float(p @ previous) for s, p in previous_of_slot.items()}
                candidates = top(prev_sims, list(previous_of_slot), k_prime)
                assert own_slot in candidates  # the image itself is always in C
                valid = found["candidates_valid"][i]
                assert set(found["candidates"][i][valid].tolist()) == candidates
                chosen = top(bank_sims, candidates, min(k, k_prime))
                padding = [s for s in sorted(range(bank_size), key=lambda s: -bank_sims[s])[:k] if s not in chosen]
                expected = chosen | set(padding[:max(0, k - k_prime)])
                valid = found["constrained_valid"][i]
                assert set(found["constrained"][i][valid].tolist()) == expected
                assert int(valid.sum()) == len(expected)
                checked_rows += 1
    return checked_rows


@pytest.mark.parametrize("k, k_prime", [(3, 5), (5, 5), (4, 2)])
def test_enqueue_and_find_neighbours_matches_history_brute_force(k, k_prime):
    """Epoch 1 falls back to MSF; later epochs: C from the previous visits (the image itself always in
    it), constrained neighbours the members of C closest to t, padded with unconstrained ones if k' < k.
    The bank (10 slots, batch 4) wraps around mid-batch and holds some images twice."""
    checked = simulate_training(num_images=12, batch=4, bank_size=10, dim=6, epochs=3, k=k, k_prime=k_prime)
    assert checked == 24


def test_complete_constrained_pads_without_duplicates():
    unconstrained = torch.tensor([[7, 3, 9, 1, 5]])
    constrained, valid = torch.tensor([[3, 8]]), torch.tensor([[True, True]])
    slots, slots_valid = cmsf.complete_constrained(constrained, valid, torch.tensor([True]), unconstrained, 5)
    assert slots.tolist() == [[3, 8, 7, 9, 1]] and slots_valid.all()
    slots, _ = cmsf.complete_constrained(constrained, valid, torch.tensor([False]), unconstrained, 5)
    assert slots.tolist() == unconstrained.tolist()


# ---------------------------------------------------------------- loss and logged rank

def test_cmsf_loss_matches_reference():
    generator = torch.Generator().manual_seed(5)
    crops, batch, bank_size, dim, k = 3, 4, 16, 8, 3
    memory_bank = common.MemoryBank(bank_size, dim, seed=1)
    queries = unit(crops, batch, dim, generator=generator)
    found = {"constrained": torch.randint(0, bank_size, (batch, k), generator=generator),
             "unconstrained": torch.randint(0, bank_size, (batch, k), generator=generator),
             "constrained_valid": torch.tensor([[1, 1, 1], [1, 0, 1], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)}
    loss = cmsf.cmsf_loss(queries.float(), memory_bank, found)
    bank = memory_bank.embeddings.double()
    for i in range(batch):
        per_crop = []
        for q in queries[:, i]:
            constrained = [2 - 2 * q @ bank[s] for s, v in zip(found["constrained"][i], found["constrained_valid"][i]) if v]
            unconstrained = [2 - 2 * q @ bank[s] for s in found["unconstrained"][i]]
            per_crop.append((sum(constrained) / len(constrained) + sum(unconstrained) / k) / 2)
        assert abs(loss[i].item() - sum(per_crop).item() / crops) < 1e-5


def test_neighbour_ranks_match_brute_force():
    generator = torch.Generator().manual_seed(6)
    target, bank = unit(5, 8, generator=generator), unit(30, 8, generator=generator)
    slots = torch.randint(0, 30, (5, 3), generator=generator)
    valid = torch.rand(5, 3, generator=generator) < 0.7
    sims = target @ bank.T
    ranks = [int((sims[i] > sims[i, slots[i, j]]).sum()) for i in range(5) for j in range(3) if valid[i, j]]
    mean_rank = (common.neighbour_ranks(target.float(), bank.float(), slots, chunk_size=7) - 1)[valid].float().mean()
    assert mean_rank.item() == pytest.approx(sum(ranks) / len(ranks))


# ---------------------------------------------------------------- CMSF-KM

def separated_clusters(num_clusters, per_cluster, dim, generator):
    centres = unit(num_clusters, dim, generator=generator)
    truth = torch.arange(num_clusters).repeat_interleave(per_cluster)
    points = F.normalize(centres[truth] + 0.02 * torch.randn(len(truth), dim, generator=generator,
                                                              dtype=torch.float64), dim=1)
    return points, truth


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_spherical_kmeans_finds_well_separated_clusters(seed):
    generator = torch.Generator().manual_seed(10 + seed)
    points, truth = separated_clusters(6, 30, 16, generator)
    assignments, centroids = cmsf.spherical_kmeans(points.float(), 6, iters=20, seed=seed)
    mapping = {int(t): set(assignments[truth == t].tolist()) for t in range(6)}
    assert all(len(ids) == 1 for ids in mapping.values())  # each true cluster is one k-means cluster
    assert len(set.union(*mapping.values())) == 6  # ... and different clusters get different ids
    for t, (cluster,) in mapping.items():  # centroid = normalised float64 mean of its points
        reference = F.normalize(points[truth == t].mean(0), dim=0)
        assert torch.allclose(centroids[cluster].double(), reference, atol=1e-5)


def test_cluster_store_leaves_unvisited_images_unclustered():
    generator = torch.Generator().manual_seed(11)
    points, truth = separated_clusters(3, 10, 8, generator)
    store = cmsf.PreviousVisitStore(40, 8)
    visited = torch.randperm(40, generator=generator)[:30]
    store.record(visited, points.float())
    cluster_of_image = cmsf.cluster_store(store, 3, iters=10, seed=0, epoch=1)
    unvisited = torch.ones(40, dtype=torch.bool)
    unvisited[visited] = False
    assert torch.all(cluster_of_image[unvisited] == -1)
    for t in range(3):
        assert len(set(cluster_of_image[visited[truth == t]].tolist())) == 1
    assert len(set(cluster_of_image[visited].tolist())) == 3


def test_kmeans_constraint_matches_brute_force():
    """Constrained neighbours: top-k of t among the bank entries of the sample's cluster (the bank's
    cluster of a slot is the cluster of the image in it); fewer than k such entries are averaged over,
    not filled; an image without a cluster falls back to MSF."""
    generator = torch.Generator().manual_seed(12)
    num_images, batch, bank_size, dim, k = 30, 5, 20, 8, 4
    memory_bank = common.MemoryBank(bank_size, dim, seed=0)
    store = cmsf.PreviousVisitStore(num_images, dim)
    cluster_of_image = torch.randint(0, 4, (num_images,), generator=generator)
    cluster_of_image[[0, 1]] = -1
    args = search_args(k, 5, constraint="kmeans")
    for step in range(6):
        indices = torch.randperm(num_images, generator=generator)[:batch]
        target = unit(batch, dim, generator=generator)
        memory = cmsf.CMSFMemory(args.constraint, memory_bank, store, args.topk, args.topk_prime,
                                 args.search_dtype_obj, cluster_of_image=cluster_of_image)
        found = memory.neighbours(target.float(), indices, memory.enqueue(target.float(), indices % 3, indices))
        filled = (memory_bank.indices >= 0).nonzero().squeeze(1).tolist()
        for i, image in enumerate(indices.tolist()):
            sims = (memory_bank.embeddings.double() @ target[i]).tolist()
            if cluster_of_image[image] < 0:
                assert not found["constrained_rows"][i]
                assert torch.equal(found["constrained"][i], found["unconstrained"][i])
                continue
            same = [s for s in filled if cluster_of_image[memory_bank.indices[s]] == cluster_of_image[image]]
            valid = found["constrained_valid"][i]
            assert set(found["constrained"][i][valid].tolist()) == top(sims, same, k)
            assert int(valid.sum()) == min(k, len(same))


def test_online_network_batches_same_resolution_crops():
    """The multi-crop forward equals one forward per crop (eval-mode BatchNorm), in crop order."""
    generator = torch.Generator().manual_seed(13)
    encoder = common.build_encoder("resnet10", 16)
    online = cmsf.OnlineNetwork(encoder, common.build_predictor(encoder)).eval()
    crops = [torch.randn(2, 3, 16, 16, generator=generator)] + [torch.randn(2, 3, 8, 8, generator=generator)
                                                               for _ in range(2)]
    with torch.no_grad():
        together = online(crops)
        separately = torch.cat([online[1](online[0](c)) for c in crops])
    assert torch.allclose(together, separately, atol=1e-5)


# ---------------------------------------------------------------- the script

def tiny_args(output_dir, *extra, epochs=2):
    """A tiny run on the synthetic data: 4 iterations per epoch, so epoch 2 is constrained."""
    return ["--dataset", "synthetic", "--synthetic-images", "64", "--arch", "resnet10", "--image-size", "16",
            "--batch-size", "16", "--mem-bank-size", "48", "--workers", "0", "--print-freq", "2",
            "--epochs", str(epochs), "--output-dir", str(output_dir), *map(str, extra)]


def assert_same_state(straight_dir, resumed_dir):
    straight = torch.load(straight_dir / "checkpoint.pth", weights_only=True)
    resumed = torch.load(resumed_dir / "checkpoint.pth", weights_only=True)
    assert straight["epoch"] == resumed["epoch"] == 2 and straight["iteration"] == resumed["iteration"] == 0
    for part in ("online", "target", "memory_bank", "store", "previous_bank"):
        if part not in straight:
            assert part not in resumed
            continue
        for name, value in straight[part].items():
            assert torch.equal(resumed[part][name], value), (part, name)
    assert torch.equal(straight["clusters"]["cluster_of_image"], resumed["clusters"]["cluster_of_image"])
    return straight


def run_straight_and_resumed(tmp_path, extra, nproc):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    result = run_script("train_cmsf_self.py", *tiny_args(straight, *extra), nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    # stop in the middle of epoch 2 (iteration 6 of 8), then resume with the same command
    result = run_script("train_cmsf_self.py", *tiny_args(resumed, *extra, "--stop-after-iters", 6), nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert torch.load(resumed / "checkpoint.pth", weights_only=True)["iteration"] == 2
    result = run_script("train_cmsf_self.py", *tiny_args(resumed, *extra), nproc=nproc)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    checkpoint = assert_same_state(straight, resumed)
    log = [json.loads(line) for line in (straight / "log.jsonl").read_text().splitlines()]
    return checkpoint, log, result.stdout


def test_script_kmeans_one_process_resumes_exactly(tmp_path):
    checkpoint, log, _ = run_straight_and_resumed(
        tmp_path, ["--constraint", "kmeans", "--num-clusters", "6", "--store-dtype", "bfloat16"], nproc=1)
    assert [record["epoch"] for record in log] == [1, 2]
    assert log[0]["msf_fallback"] == 1.0 and log[1]["msf_fallback"] == 0.0
    # epoch 1 is plain MSF: the constrained set is the unconstrained one, ranks 0..k-1
    assert log[0]["purity_constrained"] == log[0]["purity_unconstrained"] and log[0]["constrained_rank"] == 2.0
    assert log[1]["kmeans_clusters_used"] == 6
    assert sorted(checkpoint["clusters"]["cluster_of_image"].unique().tolist()) == list(range(6))
    assert "previous_bank" not in checkpoint


def test_script_two_processes_resumes_exactly(tmp_path):
    """2Q + multi-crop under DDP (gloo): the resumed run restores rank 0's store and banks on both ranks, so matching
    the straight run bit for bit also shows that both ranks held identical copies."""
    checkpoint, log, stdout = run_straight_and_resumed(
        tmp_path, ["--local-crops-number", "2", "--local-crops-size", "8"], nproc=2)
    assert "2 process(es)" in stdout
    assert log[0]["msf_fallback"] == 1.0 and log[1]["msf_fallback"] == 0.0
    assert 0 <= log[1]["purity_constrained"] <= 1 and 0 <= log[1]["purity_unconstrained"] <= 1
    assert log[1]["constrained_rank"] >= 2.0  # constrained neighbours lie further down the plain ordering
    store = checkpoint["store"]["embeddings"]
    assert store.dtype == torch.float16  # the default store precision: half of upstream's memory and less
    assert torch.allclose(store.float().norm(dim=1), torch.ones(64), atol=2e-3)  # all 64 images visited
    assert torch.all(checkpoint["previous_bank"]["labels"] == 0)  # after epoch 2 every slot has a previous visit


@pytest.mark.parametrize("extra, message", [
    (["--local-crops-number", "2"], "--local-crops-size 96 must be between 1 and --image-size (16)"),
    (["--constraint", "kmeans"], "--num-clusters 50000 must be between 1 and the number of training images (64)"),
    (["--topk-prime", "0"], "--topk-prime 0 must be between 1 and --mem-bank-size (48)")])
def test_bad_arguments_are_usage_errors(extra, message):
    """Checked in-process (the CLI turns a UsageError into one line + exit 2, tested with train_msf.py)."""
    args = cmsf.get_args_parser().parse_args(tiny_args("unused", *extra))
    with pytest.raises(common.UsageError) as error:
        cmsf.check_args(args, num_images=64)
    assert message in str(error.value)
