"""Train (and evaluate) a tri-modal ReID model.

    python train_net.py --config_file configs/Synthetic/quickstart.yml [--resume] [KEY VALUE ...]
    torchrun --nproc_per_node=N train_net.py --config_file F        # several GPUs / processes
"""
import sys
from typing import Sequence

from config import default_argument_parser
from data.build import build_data
from engine.defaults import default_setup
from engine.hooks import HookBase
from engine.trainer import Trainer
from modeling.model import build_model
from utils.dist import cleanup, get_rank, get_world_size


def main(argv=None, hooks: Sequence[HookBase] = ()) -> dict:
    """Train as the command line says; ``hooks``: extra trainer hooks (engine/hooks.py)."""
    args = default_argument_parser("Train a tri-modal ReID model").parse_args(argv)
    cfg, device, logger = default_setup(args)
    data = build_data(cfg, get_rank(), get_world_size())
    model = build_model(cfg, data.num_classes, data.num_cams)
    params = sum(p.numel() for p in model.parameters())
    logger.info("model: %.2f M parameters; heads: %s", params / 1e6, ", ".join(model.heads.keys()))
    trainer = Trainer(cfg, model, data, device, hooks)
    if args.resume:
        trainer.resume()
    try:
        return trainer.train()
    finally:
        cleanup()


if __name__ == "__main__":
    main(sys.argv[1:])
