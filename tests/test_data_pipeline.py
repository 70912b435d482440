"""Identity sampler, shard sampler, tri-modal transforms and the validation split."""
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data.build import build_data, split_validation
from data.datasets import Sample
from data.samplers import RandomIdentitySampler, ShardSampler
from data.transforms import TriModalTrainTransform, pil_triplet_to_tensor


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


@pytest.mark.parametrize("area", [(0.02, 1 / 3), (0.02, 0.4)])
def test_random_erasing_draws_one_box_per_modality(area):
    """DeMo's erasing (timm's RandomErasing): with p 1 each modality gets one rectangle of its own
    covering area[0]..area[1] of the image, filled with N(0, 1) pixels (catches the old fixed 0.4
    maximum, a box shared by the modalities, a constant fill)."""
    h, w = 256, 128
    x = torch.full((3, 3, h, w), 0.5)  # normalises to exactly 0
    transform = TriModalTrainTransform(0.0, 0, 1.0, [0.5] * 3, [0.5] * 3, sync=False, re_area=area)
    random.seed(0)
    torch.manual_seed(0)
    shares, shared_boxes, values = [], 0, []
    for _ in range(200):
        out = transform(x.clone())
        erased = out.ne(0).all(dim=1)  # (3, H, W)
        for m in range(3):
            rows, cols = erased[m].any(1).nonzero(), erased[m].any(0).nonzero()
            box = erased[m, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert box.all()  # one rectangle
            shares.append(erased[m].float().mean().item())
        shared_boxes += int(torch.equal(erased[0], erased[1]))
        values.append(out[0][:, erased[0]].flatten())
    slack = 0.01  # box sides are rounded to whole pixels
    assert area[0] - slack <= min(shares) and max(shares) <= area[1] + slack
    assert max(shares) > area[1] - 0.03  # the top of the range is reached
    assert shared_boxes == 0
    values = torch.cat(values)
    assert abs(values.mean().item()) < 0.02 and values.std().item() == pytest.approx(1.0, abs=0.02)


def test_training_resize_uses_the_configured_interpolation(tiny_cfg):
    """INPUT.TRAIN_INTERPOLATION reaches the training images (DeMo: bicubic); test images stay
    bilinear."""
    data = build_data(tiny_cfg("INPUT.TRAIN_INTERPOLATION", "bicubic"))
    assert data.train_loader.dataset.interpolation == "bicubic"
    assert data.eval_sets["test"].loader.dataset.interpolation == "bilinear"
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (40, 20, 3), dtype=np.uint8))
    bicubic = pil_triplet_to_tensor([img] * 3, (64, 32), "bicubic")
    expected = torch.from_numpy(np.asarray(img.resize((32, 64), Image.BICUBIC)).copy())
    assert torch.allclose(bicubic[0], expected.permute(2, 0, 1).float() / 255)
    assert not torch.allclose(bicubic, pil_triplet_to_tensor([img] * 3, (64, 32), "bilinear"))


def test_validation_split_carves_whole_identities():
    train = [Sample(("a", "b", "c"), pid=p, camid=i % 2) for p in range(6) for i in range(3)]
    new_train, val = split_validation(train, 2, seed=0)
    val_ids = {s.pid for s in val}
    assert len(val_ids) == 2 and len(val) == 6
    assert sorted({s.pid for s in new_train}) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="VAL_IDS"):
        split_validation(train, 6, seed=0)
