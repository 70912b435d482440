"""Multi-process training and evaluation under ``torchrun --nproc_per_node=2`` on CPU (gloo).

* a 2-process run trains, writes its files once (rank 0), and its evaluation (each rank extracts a
  contiguous shard, gathered in rank order) gives the same mAP as a single-process ``test_net``
  of its checkpoint, with every test sample counted exactly once;
* a 2-process run stopped mid-epoch by one rank alone (as when SIGTERM reaches the ranks at
  different moments) checkpoints once and, resumed under torchrun, ends with exactly the weights
  of the uninterrupted run;
* ``all_gather_tensor`` with uneven and empty shards, and every parameter of every module
  configuration receives a gradient (DDP runs with ``find_unused_parameters=False``).
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import test_net
from config import build_cfg
from data.samplers import ShardSampler
from modeling.model import build_model
from tests.conftest import ROOT, TINY_OPTS

HOOKS = os.path.join(ROOT, "tests", "train_hooks.py")
# BNNeck "after" features make evaluation depend on BatchNorm running statistics, which the ranks
# update from their own batches: the ranks must evaluate with rank 0's.
DDP_OPTS = ["TEST.NECK_FEAT", "after", "SOLVER.MAX_EPOCHS", "2"]


def torchrun(args, env=None, timeout=120):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
           HOOKS] + list(args)
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    proc = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    return proc


def weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def ddp_run(synthetic_root, tmp_path_factory):
    """An uninterrupted 2-process run: (opts, output dir, completed process)."""
    out = str(tmp_path_factory.mktemp("ddp") / "straight")
    opts = TINY_OPTS + ["DATASETS.ROOT_DIR", synthetic_root, "OUTPUT_DIR", out] + DDP_OPTS
    proc = torchrun(opts)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return opts, out, proc


def test_two_process_run_matches_single_process_evaluation(ddp_run, tmp_path):
    opts, out, proc = ddp_run
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["world_size"] == 2
    ddp_metrics = summary["last"]["results"]["test"]

    # Rank 0 alone writes: one log, one TensorBoard folder, checkpoints holding both ranks' RNG.
    assert proc.stdout.count("checkpoint written") == 2, proc.stdout
    assert sorted(os.listdir(out)) == sorted(["checkpoint_epoch1.pth", "checkpoint_epoch2.pth",
                                             "config.yaml", "last_checkpoint", "log.txt",
                                             "model_best.pth", "summary.json", "tb"])
    assert len(os.listdir(os.path.join(out, "tb"))) == 1  # one events file
    assert "epoch 2 iter 1/" in open(os.path.join(out, "log.txt")).read()
    state = torch.load(os.path.join(out, "checkpoint_epoch2.pth"), weights_only=True)
    assert len(state["rng_per_rank"]) == 2

    single = test_net.main(opts[:-4] + ["TEST.NECK_FEAT", "after", "OUTPUT_DIR",
                                        str(tmp_path / "single"),
                                        "TEST.WEIGHT", os.path.join(out, "checkpoint_epoch2.pth")])
    assert abs(single["none"]["mAP"] - ddp_metrics["mAP"]) < 1e-6
    assert abs(single["none"]["R1"] - ddp_metrics["R1"]) < 1e-6
    # every test sample exactly once: the synthetic test split (4 ids x 6) is query and gallery
    assert ddp_metrics["num_query"] == ddp_metrics["num_gallery"] == 24
    assert single["none"]["num_query"] == 24


def test_two_process_stop_on_one_rank_then_resume_is_exact(ddp_run, tmp_path):
    opts, out, _ = ddp_run
    reference = weights(os.path.join(out, "checkpoint_epoch2.pth"))
    resumed_out = str(tmp_path / "resumed")
    run_opts = opts + ["OUTPUT_DIR", resumed_out]

    stopped = torchrun(run_opts, env={"HOOK_STOP_AT": "1:2:2"})  # rank 1 only
    assert stopped.returncode != 0
    assert "stopped by signal at epoch 2 iteration 2" in stopped.stdout + stopped.stderr
    state = torch.load(os.path.join(resumed_out, "checkpoint_epoch1.pth"), weights_only=True)
    assert (state["epoch"], state["iteration"]) == (1, 2)

    resumed = torchrun(["--resume"] + run_opts)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    final = weights(os.path.join(resumed_out, "checkpoint_epoch2.pth"))
    assert final.keys() == reference.keys()
    for key in reference:
        assert torch.equal(final[key], reference[key]), key


# ------------------------------------------------------------------ gathering, unit level
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_all_gather_uneven_and_empty_shards():
    """2 gloo processes; 7 samples shard 4/3, 1 sample 1/0 (an empty shard), 0 samples 0/0."""
    from tests.dist_workers import gather_shards

    world, counts = 2, (7, 1, 0)
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=gather_shards, args=(r, world, port, counts, queue))
             for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in range(world * len(counts))]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for count in counts:
        rows = [r for r in results if r[1] == count]
        assert sorted(r[2] for r in rows) == sorted(len(ShardSampler(count, k, world))
                                                    for k in range(world))
        assert sum(r[2] for r in rows) == count
        for _, _, _, ids, feats in rows:
            assert ids == list(range(count))  # each sample once, original order
            assert feats == [[float(i)] * 3 for i in range(count)]
    assert sorted(r[2] for r in results if r[1] == 7) == [3, 4]
    assert sorted(r[2] for r in results if r[1] == 1) == [0, 1]


# ------------------------------------------------------------------ DDP without unused parameters
MODULE_CONFIGS = {
    "baseline": [],
    "per-modality heads": ["MODEL.DIRECT", "False"],
    "PIFE+HDM+ATMoE": ["MODEL.PIFE.ENABLED", "True", "MODEL.HDM.ENABLED", "True",
                       "MODEL.ATMOE.ENABLED", "True"],
    "HDM": ["MODEL.HDM.ENABLED", "True"],
    "SDTPS learned": ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "mean",
                      "MODEL.SDTPS.SCORE_COMBINE", "learned"],
    "SDTPS+DGAF": ["MODEL.SELECTION.NAME", "sdtps", "MODEL.FUSION.NAME", "dgaf"],
    "DGAF": ["MODEL.FUSION.NAME", "dgaf"],
}


@pytest.mark.parametrize("extra", list(MODULE_CONFIGS.values()), ids=list(MODULE_CONFIGS))
def test_every_parameter_gets_a_gradient(extra):
    """DDP is built with find_unused_parameters=False (no extra graph walk per step), which needs
    every trainable parameter to receive a gradient in every step."""
    import re

    cfg = build_cfg("", TINY_OPTS + extra)
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=4, num_cams=4).train()
    images = torch.randn(8, 3, 3, 64, 32)
    pids = torch.arange(4).repeat_interleave(2)
    out = model({"images": images, "camids": torch.randint(0, 4, (8,)), "pids": pids})
    sum(out["losses"].values()).backward()  # the Trainer's objective
    unused = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not unused
    # Also a non-zero gradient (a parameter cut off by a detach or a zero factor gets zeros).
    # Exempt: a bias added to a whole feature right before a BNNeck head (the ViT's final norm
    # bias feeding the global "ori" feature, HDM's output projection biases feeding "hdm", DGAF's
    # final norm bias feeding "fused"). BN in training mode subtracts the batch mean and the
    # triplet distances ignore a common shift, so their gradient is mathematically zero
    # (measured |grad| sum ~1e-7, rounding noise).
    shift_before_bn = re.compile(r"backbone\.vit\.norm\.bias|hdm\.attn\.\d+\.out_proj\.bias|dgaf\.fuse_norm\.bias")
    zero = [n for n, p in model.named_parameters()
            if p.requires_grad and not shift_before_bn.fullmatch(n) and float(p.grad.abs().sum()) == 0.0]
    assert not zero
