"""Identity sampler, shard sampler, tri-modal transforms and the validation split."""
from collections import Counter

import pytest
import torch

from data.build import split_validation
from data.datasets import Sample
from data.samplers import RandomIdentitySampler, ShardSampler
from data.transforms import TriModalTrainTransform


def _pids(num_ids=10, per_id=7):
    return [p for p in range(num_ids) for _ in range(per_id)]


def test_identity_batches_are_p_by_k():
    pids = _pids()
    sampler = RandomIdentitySampler(pids, batch_size=12, num_instances=3, seed=0)
    indices = list(sampler)
    assert len(indices) % 12 == 0 and len(indices) > 0
    for start in range(0, len(indices), 12):
        counts = Counter(pids[i] for i in indices[start:start + 12])
        assert len(counts) == 4 and set(counts.values()) == {3}


def test_sampler_is_reproducible_per_epoch():
    a = RandomIdentitySampler(_pids(), 12, 3, seed=5)
    b = RandomIdentitySampler(_pids(), 12, 3, seed=5)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b)
    b.set_epoch(3)
    assert list(a) != list(b)


def test_ranks_split_each_global_batch_into_whole_identities():
    pids = _pids(12, 6)
    single = list(RandomIdentitySampler(pids, 16, 4, seed=1))
    ranks = [list(RandomIdentitySampler(pids, 16, 4, seed=1, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) // 2
    for step in range(len(single) // 16):
        part0, part1 = ranks[0][step * 8:(step + 1) * 8], ranks[1][step * 8:(step + 1) * 8]
        assert part0 + part1 == single[step * 16:(step + 1) * 16]
        assert not {pids[i] for i in part0} & {pids[i] for i in part1}


def test_short_identities_are_sampled_with_replacement():
    pids = [0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    sampler = RandomIdentitySampler(pids, 8, 4, seed=0)
    indices = list(sampler)
    assert len(indices) == 8
    assert set(Counter(pids[i] for i in indices).values()) == {4}


def test_too_few_identities_for_a_batch():
    with pytest.raises(ValueError, match="identities"):
        RandomIdentitySampler(_pids(2, 8), batch_size=16, num_instances=4)


def test_shards_cover_every_sample_once_in_order():
    for n in (0, 1, 7, 10):
        for world in (1, 2, 3):
            joined = [i for r in range(world) for i in ShardSampler(n, r, world)]
            assert joined == list(range(n))


def _aligned_sample():
    torch.manual_seed(0)
    base = torch.rand(3, 16, 8)
    return torch.stack([base, base, base])  # three identical modalities


def test_synchronised_augmentation_keeps_modalities_aligned():
    transform = TriModalTrainTransform(0.5, 2, 0.0, [0.5] * 3, [0.25] * 3, sync=True)
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(_aligned_sample())
        assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])


def test_independent_augmentation_can_misalign():
    transform = TriModalTrainTransform(0.5, 2, 0.0, [0.5] * 3, [0.25] * 3, sync=False)
    differs = 0
    for seed in range(20):
        torch.manual_seed(seed)
        out = transform(_aligned_sample())
        differs += int(not torch.equal(out[0], out[1]))
    assert differs > 0


def test_validation_split_carves_whole_identities():
    train = [Sample(("a", "b", "c"), pid=p, camid=i % 2) for p in range(6) for i in range(3)]
    new_train, val = split_validation(train, 2, seed=0)
    val_ids = {s.pid for s in val}
    assert len(val_ids) == 2 and len(val) == 6
    assert sorted({s.pid for s in new_train}) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="VAL_IDS"):
        split_validation(train, 6, seed=0)
