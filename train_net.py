"""Train (and evaluate) a tri-modal ReID model.

    python train_net.py --config_file configs/Synthetic/quickstart.yml [--resume] [KEY VALUE ...]
    torchrun --nproc_per_node=N train_net.py --config_file F        # several GPUs / processes
"""
from typing import Sequence

from config import default_argument_parser
from data.build import build_data
from engine.cli import run_cli
from engine.defaults import RunFinished, default_setup, write_config
from engine.hooks import HookBase
from engine.trainer import Trainer
from modeling.model import build_model
from utils.dist import cleanup, get_rank, get_world_size


def main(argv=None, hooks: Sequence[HookBase] = ()) -> dict:
    """Train as the command line says; ``hooks``: extra trainer hooks (engine/hooks.py)."""
    args = default_argument_parser("Train a tri-modal ReID model").parse_args(argv)
    try:
        cfg, device, logger = default_setup(args)
    except RunFinished as finished:
        print(finished, flush=True)
        return finished.summary
    data = build_data(cfg, get_rank(), get_world_size(), device)
    model = build_model(cfg, data.num_classes, data.num_cams)
    params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2f M parameters; heads: %s; backbone weights: %s", params / 1e6,
                ", ".join(model.heads.keys()),
                cfg.MODEL.PRETRAIN_PATH or "none (no MODEL.PRETRAIN_PATH: random init)")
    trainer = Trainer(cfg, model, data, device, hooks)
    if args.resume:
        trainer.resume()
    write_config(cfg, logger)  # the run starts: its config goes beside its checkpoints
    try:
        return trainer.train()
    finally:
        cleanup()


if __name__ == "__main__":
    run_cli(main)
