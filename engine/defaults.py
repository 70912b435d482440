"""Shared set-up of the command-line tools (detectron2's ``default_setup`` habits) and loading a
trained model for evaluation and analysis."""
import os
import platform
import sys

import torch

from config import cfg_from_args
from utils.checkpoint import extract_model_state, load_checkpoint_file, load_model_weights
from utils.dist import get_rank, init_distributed, is_main_process, local_rank, launched_by_torchrun
from utils.logger import get_logger, setup_logger
from utils.seed import seed_everything, set_deterministic


def select_device(cfg) -> torch.device:
    """MODEL.DEVICE: "auto" -> CUDA when available (this process's LOCAL_RANK GPU), else CPU."""
    wanted = cfg.MODEL.DEVICE
    if wanted == "auto":
        wanted = "cuda" if torch.cuda.is_available() else "cpu"
    if wanted.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"MODEL.DEVICE {cfg.MODEL.DEVICE!r}: CUDA is not available here; "
                               "use MODEL.DEVICE cpu (or auto)")
        if wanted == "cuda":
            wanted = f"cuda:{local_rank()}"
        torch.cuda.set_device(torch.device(wanted))
    return torch.device(wanted)


def environment_info() -> str:
    cuda = torch.version.cuda if torch.cuda.is_available() else "not available"
    gpus = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return (f"python {platform.python_version()}, torch {torch.__version__}, CUDA {cuda}"
            f"{' (' + gpus + ')' if gpus else ''}, {os.cpu_count()} CPUs, "
            f"{torch.get_num_threads()} torch threads, {platform.platform()}")


def default_setup(args, dump_config: bool = True):
    """Config from args, device, process group, logger, config dump, seeding.

    Returns (cfg, device, logger).
    """
    cfg = cfg_from_args(args)
    device = select_device(cfg)
    if launched_by_torchrun():
        init_distributed(device)
    rank = get_rank()
    os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    logger = setup_logger(cfg.OUTPUT_DIR, rank)
    logger.info("command: %s", " ".join(sys.argv))
    logger.info("environment: %s", environment_info())
    if args.config_file:
        logger.info("config file %s", args.config_file)
    logger.info("running with config:\n%s", cfg.dump())
    if dump_config and is_main_process():
        path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
        with open(path, "w") as f:
            f.write(cfg.dump())
        logger.info("full config saved to %s", path)
    seed_everything(cfg.SOLVER.SEED + rank)
    set_deterministic(cfg.SOLVER.DETERMINISTIC)
    return cfg, device, logger


def require_weight(cfg) -> None:
    if not cfg.TEST.WEIGHT:
        raise ValueError("TEST.WEIGHT is empty: name the checkpoint to evaluate, e.g. "
                         "TEST.WEIGHT output/quickstart/model_best.pth")


def load_weights(cfg, model) -> None:
    """Load ``TEST.WEIGHT`` (a training checkpoint or model_best.pth) into ``model``."""
    require_weight(cfg)
    state = extract_model_state(load_checkpoint_file(cfg.TEST.WEIGHT))
    load_model_weights(model, state, cfg.MODEL.LOAD_STRICT, cfg.TEST.WEIGHT)
    get_logger().info("loaded weights from %s", cfg.TEST.WEIGHT)


def load_trained(cfg):
    """(device, data, model in eval mode with TEST.WEIGHT loaded, logger) for a built config, in
    one process (the analysis tools)."""
    from data.build import build_data
    from modeling.model import build_model

    logger = setup_logger()
    require_weight(cfg)  # before the data is read
    device = select_device(cfg)
    seed_everything(cfg.SOLVER.SEED)
    data = build_data(cfg)
    model = build_model(cfg, data.num_classes, data.num_cams).to(device)
    load_weights(cfg, model)
    return device, data, model.eval(), logger
