"""Worker- and process-independent randomness of the training input.

Each sample's augmentation is drawn from a seed that is a function of (SOLVER.SEED, epoch,
position of the sample in the epoch's global index list) only (``data.samplers.AugmentKeySampler``),
so the loader's worker count and the number of processes do not change the images a run trains
on. Exact properties (bit-identical weights and images), no statistics.
"""
import os

import pytest
import torch

import train_net
from config import build_cfg
from data.build import build_data
from utils import checkpoint as ckpt
from utils.logger import setup_logger


def _train_one_epoch(tiny_opts, out, *extra):
    opts = list(tiny_opts) + ["OUTPUT_DIR", out, "SOLVER.MAX_EPOCHS", "1", "SOLVER.EVAL_PERIOD", "0",
                              *extra]
    train_net.main(opts)
    return ckpt.load_checkpoint_file(os.path.join(out, "checkpoint_epoch1.pth"))["model"]


@pytest.mark.parametrize("aug_device", ["loader", "model"])
def test_weights_after_an_epoch_do_not_depend_on_the_worker_count(tiny_opts, tmp_path, aug_device):
    """The same config and seed with NUM_WORKERS 0 and 2 give bit-identical weights after an epoch
    (per-image and batched augmentation; flip, crop and erasing all on). Catches: the augmentation
    drawn from each worker's own stream again (the seed not passed to the transform, or not to the
    batched path), or the main process's RNG consumed by the augmentation when NUM_WORKERS is 0
    (other dropout draws)."""
    extra = ["INPUT.AUG_DEVICE", aug_device, "INPUT.RE_PROB", "0.5", "INPUT.FLIP_PROB", "0.5"]
    weights = {workers: _train_one_epoch(tiny_opts, str(tmp_path / f"w{workers}"),
                                         "DATALOADER.NUM_WORKERS", str(workers), *extra)
               for workers in (0, 2)}
    differing = [k for k in weights[0] if not torch.equal(weights[0][k], weights[2][k])]
    assert not differing, differing[:5]


def _epoch_batches(cfg, rank, world_size, epoch=0):
    data = build_data(cfg, rank, world_size)
    data.train_sampler.set_epoch(epoch)
    return list(data.train_loader)


def test_two_ranks_see_exactly_the_images_of_one_process(tiny_opts):
    """Under DDP each rank's part of a global batch holds exactly the augmented images (and
    labels) that one process with the same global batch trains on at that step. Catches: the
    position of a sample counted per rank instead of in the global list (rank 1 would repeat rank
    0's draws), the rank mixed into the augmentation seed, or ranks given other identities."""
    cfg = build_cfg("", list(tiny_opts) + ["INPUT.RE_PROB", "0.5", "INPUT.SYNC_MODALITY_AUG", "False"])
    setup_logger(cfg.OUTPUT_DIR)
    single = _epoch_batches(cfg, 0, 1)
    ranks = [_epoch_batches(cfg, rank, 2) for rank in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 1
    for step, whole in enumerate(single):
        for key in ("images", "pids", "camids", "seed"):
            joined = torch.cat([ranks[0][step][key], ranks[1][step][key]])
            assert torch.equal(joined, whole[key]), (step, key)


def test_a_sample_draws_from_its_own_key_and_leaves_the_callers_streams_alone(tiny_opts):
    """dataset[(index, seed)]: the same key gives the same images, another seed other images, and
    the caller's torch and python RNGs are left where they were (with NUM_WORKERS 0 the main
    process builds the batch between two training steps). Catches: the seed ignored, the global
    RNGs re-seeded without being restored."""
    import random

    cfg = build_cfg("", list(tiny_opts) + ["INPUT.RE_PROB", "1.0"])
    setup_logger(cfg.OUTPUT_DIR)
    dataset = build_data(cfg).train_loader.dataset
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    first = dataset[(0, 1234)]["images"]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state
    assert torch.equal(dataset[(0, 1234)]["images"], first)
    assert not torch.equal(dataset[(0, 1235)]["images"], first)


def test_epochs_draw_other_augmentations_for_the_same_sample(tiny_opts):
    """The key includes the epoch: the same position in two epochs gets other seeds. Catches a
    key without the epoch (every epoch would repeat the first epoch's augmentation of a sample at
    that position)."""
    cfg = build_cfg("", list(tiny_opts))
    setup_logger(cfg.OUTPUT_DIR)
    data = build_data(cfg)
    keys = data.train_loader.sampler
    seeds = []
    for epoch in (0, 1):
        data.train_sampler.set_epoch(epoch)
        seeds.append([seed for _, seed in keys])
    assert len(set(seeds[0])) == len(seeds[0])  # one seed per position
    assert not set(seeds[0]) & set(seeds[1])
