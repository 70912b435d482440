"""Shared set-up of the command-line tools (detectron2's ``default_setup`` habits) and loading a
trained model for evaluation and analysis."""
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch
import yaml

from config import cfg_from_args, flatten_config
from config.defaults import get_cfg_defaults
from utils import checkpoint as ckpt
from utils.checkpoint import extract_model_state, load_checkpoint_file, load_model_weights
from utils.dist import (barrier, get_rank, get_world_size, init_distributed, is_main_process,
                        launched_by_torchrun, local_rank)
from utils.logger import get_logger, setup_logger
from utils.manifest import manifest_lines, run_manifest
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


# What an earlier training run leaves in OUTPUT_DIR (besides its epoch checkpoints).
RUN_MARKERS = ("config.yaml", "log.txt", "summary.json", ckpt.LAST_POINTER, "model_best.pth", "tb")

# Keys that may differ when a run is resumed: they change neither the model nor the data (a
# longer schedule is the user's explicit choice). Any other difference refuses to resume.
RESUMABLE_CHANGES = ("SOLVER.MAX_EPOCHS", "SOLVER.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD",
                     "SOLVER.LOG_PERIOD", "SOLVER.KEEP_LAST", "DATALOADER.NUM_WORKERS",
                     "DATALOADER.CACHE",
                     "MODEL.DEVICE", "TEST.IMS_PER_BATCH", "OUTPUT_DIR")


class RunFinished(Exception):
    """``--resume`` of a run that already reached SOLVER.MAX_EPOCHS: nothing to do."""

    def __init__(self, message: str, summary: Dict):
        super().__init__(message)
        self.summary = summary


class RunFolderError(ValueError):
    """OUTPUT_DIR cannot take this run (it holds another run, differs, or cannot be written)."""


def run_files(output_dir: str) -> List[str]:
    """The names of what an earlier run left in ``output_dir`` ([] when none)."""
    if not os.path.isdir(output_dir):
        return []
    names = set(os.listdir(output_dir))
    return ([n for n in RUN_MARKERS if n in names] +
            sorted(n for n in names if ckpt.EPOCH_PATTERN.search(n)))


def config_changes(old: Dict, new: Dict) -> Dict[str, tuple]:
    """{key: (old value, new value)} of two nested config dicts, for keys whose values differ."""
    a, b = flatten_config(old), flatten_config(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _finished_summary(cfg) -> Optional[Dict]:
    """summary.json of a run of OUTPUT_DIR that reached SOLVER.MAX_EPOCHS, else None."""
    try:
        with open(os.path.join(cfg.OUTPUT_DIR, "summary.json")) as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return None
    last = (summary.get("last") or {}).get("epoch", 0) if isinstance(summary, dict) else 0
    newest = ckpt.epoch_checkpoints(cfg.OUTPUT_DIR)
    done = last >= cfg.SOLVER.MAX_EPOCHS and (not newest or newest[0][0] <= last)
    return summary if done else None


def check_output_dir(cfg, resume: bool, overwrite: bool) -> str:
    """What a training run may do with OUTPUT_DIR, without changing anything: "new" (empty or
    absent), "move" (an earlier run to move aside: --overwrite) or "resume". Raises
    RunFolderError when the folder holds another run and neither flag says what to do with it, or
    when --resume would continue it under a different config; RunFinished when --resume finds the
    run finished."""
    out = cfg.OUTPUT_DIR
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunFolderError(f"OUTPUT_DIR {out!r} is a file, not a folder: choose another OUTPUT_DIR")
    found = run_files(out)
    if resume and overwrite:
        raise RunFolderError("--resume and --overwrite contradict each other: give one of them")
    if not found:
        return "new"
    if overwrite:
        return "move"
    if not resume:
        listed = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise RunFolderError(
            f"OUTPUT_DIR {out!r} already holds a run ({listed}): continue it with --resume, set "
            f"another OUTPUT_DIR, or add --overwrite to move it aside to {out}.old-<time> "
            "(nothing is deleted)")
    saved = os.path.join(out, "config.yaml")
    if os.path.isfile(saved):
        with open(saved) as f:
            old = yaml.safe_load(f) or {}
        changes = {k: v for k, v in config_changes(old, yaml.safe_load(cfg.dump())).items()
                   if k not in RESUMABLE_CHANGES}
        if changes:
            listed = "; ".join(f"{k}: {a!r} in the run, {b!r} now" for k, (a, b) in
                               list(changes.items())[:6])
            more = f" (and {len(changes) - 6} more)" if len(changes) > 6 else ""
            raise RunFolderError(
                f"--resume: the config differs from the run's {saved} in {listed}{more}. Resume "
                f"with the run's own config (--config_file {saved}), or start a new run in "
                "another OUTPUT_DIR")
    summary = _finished_summary(cfg)
    if summary is not None:
        raise RunFinished(f"the run in {out} is finished (epoch {summary['last']['epoch']} of "
                          f"{cfg.SOLVER.MAX_EPOCHS}): nothing to do, nothing changed. To train "
                          "longer, resume with a larger SOLVER.MAX_EPOCHS", summary)
    return "resume"


def prepare_output_dir(cfg, decision: str) -> None:
    """Carry out :func:`check_output_dir`'s decision (rank 0): move an earlier run aside, create
    the folder, and check that it can be written."""
    out = cfg.OUTPUT_DIR
    if is_main_process():
        if decision == "move":
            aside = f"{out.rstrip(os.sep)}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            os.rename(out, aside)
            print(f"--overwrite: the earlier run in {out} was moved to {aside}", flush=True)
        try:
            os.makedirs(out, exist_ok=True)
            probe = os.path.join(out, ".write_test")
            with open(probe, "w"):
                pass
            os.remove(probe)
        except OSError as exc:
            raise RunFolderError(f"OUTPUT_DIR {out!r} cannot be written ({exc.strerror or exc}): "
                                 "choose another OUTPUT_DIR") from exc
    barrier()


def nondefault_keys(cfg) -> Dict[str, tuple]:
    """{key: (default, value)} of the keys ``cfg`` sets away from the defaults."""
    return config_changes(yaml.safe_load(get_cfg_defaults().dump()), yaml.safe_load(cfg.dump()))


def write_config(cfg, logger) -> str:
    """Write OUTPUT_DIR/config.yaml (rank 0) once the run is known to start; on a resumed run,
    log the keys that changed (only :data:`RESUMABLE_CHANGES` can)."""
    path = os.path.join(cfg.OUTPUT_DIR, "config.yaml")
    if is_main_process():
        if os.path.isfile(path):
            with open(path) as f:
                changes = config_changes(yaml.safe_load(f) or {}, yaml.safe_load(cfg.dump()))
            for key, (old, new) in changes.items():
                logger.info("resumed with %s %r (the run had %r)", key, new, old)
        ckpt.atomic_write_text(cfg.dump(), path)
        logger.info("full config saved to %s", path)
    return path


def default_setup(args, training: bool = True, log_name: str = "log.txt"):
    """Config from args, device, process group, output folder, logger, seeding.

    Training (``training``) checks OUTPUT_DIR first (:func:`check_output_dir`): a folder holding
    another run is refused unless ``--resume`` or ``--overwrite`` says what to do with it, and a
    finished run is left untouched (:class:`RunFinished`). The log starts with the command and
    the run manifest (``utils.manifest``: code, libraries, device, world size, determinism, loader
    workers, config hash), then the config file and the keys that differ from the defaults;
    train_net.py writes config.yaml once the run starts (:func:`write_config`). Returns
    (cfg, device, logger).
    """
    cfg = cfg_from_args(args)
    decision = check_output_dir(cfg, args.resume, args.overwrite) if training else "new"
    device = select_device(cfg)
    if launched_by_torchrun():
        init_distributed(device)
    rank = get_rank()
    if training:
        prepare_output_dir(cfg, decision)
    else:
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    logger = setup_logger(cfg.OUTPUT_DIR, rank, filename=log_name)
    logger.info("command: %s", " ".join(sys.argv))
    for line in manifest_lines(run_manifest(cfg, device, world_size=get_world_size())):
        logger.info("%s", line)  # the run manifest (summary.json gets it with the data's)
    if launched_by_torchrun():
        logger.info("distributed: %d processes, backend %s", get_world_size(),
                    torch.distributed.get_backend())
    changed = nondefault_keys(cfg)
    logger.info("config%s; differs from the defaults in: %s",
                f" file {args.config_file}" if args.config_file else "",
                ", ".join(f"{k}={v!r}" for k, (_, v) in changed.items()) or "nothing")
    seed_everything(cfg.SOLVER.SEED + rank)
    set_deterministic(cfg.SOLVER.DETERMINISTIC)
    return cfg, device, logger


def require_weight(cfg) -> None:
    """TEST.WEIGHT names an existing file (checked before any data is read)."""
    if not cfg.TEST.WEIGHT:
        raise ValueError("TEST.WEIGHT is empty: name the checkpoint to evaluate, e.g. "
                         "TEST.WEIGHT output/quickstart/model_best.pth")
    if os.path.isdir(cfg.TEST.WEIGHT):
        raise ValueError(f"TEST.WEIGHT {cfg.TEST.WEIGHT} is a folder: name a checkpoint in it, e.g. "
                         f"{os.path.join(cfg.TEST.WEIGHT, 'model_best.pth')}")
    if not os.path.isfile(cfg.TEST.WEIGHT):
        raise FileNotFoundError(f"TEST.WEIGHT {cfg.TEST.WEIGHT}: no such file")


def evaluation_config(cfg):
    """``cfg`` for building a model whose weights come from TEST.WEIGHT: no pretrained backbone
    file is read (it need not exist where the evaluation runs)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.PRETRAIN_PATH = ""
    cfg.freeze()
    return cfg


def load_weights(cfg, model) -> None:
    """Load ``TEST.WEIGHT`` (a training checkpoint, model_best.pth, or a DeMo checkpoint: its
    names mapped by ``modeling.demo_checkpoint``) into ``model``."""
    from modeling.demo_checkpoint import convert_demo_state, is_demo_state

    require_weight(cfg)
    state = extract_model_state(load_checkpoint_file(cfg.TEST.WEIGHT))
    if is_demo_state(state):
        get_logger().info("%s is a DeMo checkpoint: its parameter names are mapped onto this model's",
                          cfg.TEST.WEIGHT)
        state = convert_demo_state(state, model.state_dict(), f"TEST.WEIGHT {cfg.TEST.WEIGHT}")
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
    model = build_model(evaluation_config(cfg), data.num_classes, data.num_cams).to(device)
    load_weights(cfg, model)
    return device, data, model.eval(), logger
