"""Rewrite a checkpoint written elsewhere into one this project loads (safely, strictly).

    python tools/convert_checkpoint.py --from legacy --trust IN OUT [--overwrite]
    python tools/convert_checkpoint.py --from demo IN OUT --config_file configs/RGBNT201/DeMo.yml [KEY VALUE ...]

Every checkpoint and weight file is opened with ``weights_only=True`` (``utils.checkpoint.
safe_load``): tensors, containers and plain values only, so nothing stored in a file runs. A file
holding other Python objects is refused, with a message naming this command.

``--from legacy``: a checkpoint written by an earlier version of this project, whose RNG states
hold numpy arrays. Reading it takes Python's full unpickler, which runs any code stored in the
file, so it is read only with ``--trust``: say it for a file you wrote yourself or got from
someone you trust, never for a file from an unknown source. Its checksum is verified, every numpy
RNG state is rewritten as a tensor and plain values, the result is checked to load with
``weights_only=True`` (a file holding any other Python object is not converted) and, if the file
had a checksum, re-checksummed. OUT then works everywhere: TEST.WEIGHT, ``--resume`` (convert
the folder's newest ``checkpoint_epoch<N>.pth`` in place), the Predictor and the tools.

``--from demo``: a checkpoint of DeMo's official code (github.com/924973292/DeMo, a plain state
dict of tensors, read with ``weights_only=True``). Its parameter names are mapped onto those of
the model ``--config_file`` (and KEY VALUE overrides) builds (``modeling/demo_checkpoint.py``),
sized by the file (identities: the classifier's rows, cameras: the camera embedding's); a file
that does not fit the config (e.g. DeMo with HDM into a config without it) is refused with the
unmatched keys. OUT loads strictly as TEST.WEIGHT; test_net.py also converts such a file given
directly as TEST.WEIGHT, and MODEL.PRETRAIN_PATH reads its CLIP backbone.

OUT is written atomically; an existing file, the input included, is replaced only with
``--overwrite``.
"""
import argparse
import io
import os
import sys
from typing import Dict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from utils.checkpoint import (CHECKSUM_KEY, UnsafeFileError, atomic_write_bytes,  # noqa: E402
                              load_checkpoint_file, safe_load, state_checksum, with_checksum)
from utils.seed import get_rng_state  # noqa: E402


def read_demo(path: str, args) -> Dict:
    """A DeMo checkpoint (safe loading) as a checksummed checkpoint {"model": state} of the model
    that ``args.config_file`` / ``args.opts`` build; DemoCheckpointError when it does not fit."""
    from config import build_cfg
    from engine.defaults import evaluation_config
    from modeling.demo_checkpoint import convert_demo_state, is_demo_state, strip_module
    from modeling.model import build_model

    if not args.config_file:
        raise ValueError("--from demo needs --config_file: the config whose model the file is "
                         "converted for (e.g. configs/RGBNT201/DeMo.yml)")
    state = load_checkpoint_file(path)
    if not is_demo_state(state):
        raise ValueError(f"{path} is not a DeMo checkpoint (no BACKBONE.base.conv1.weight)")
    state = strip_module(state)
    classifier = next(state[k] for k in ("classifier.weight", "classifier_r.weight", "classifier_moe.weight")
                      if k in state)
    cams = state["BACKBONE.cv_embed"].shape[0] if "BACKBONE.cv_embed" in state else 0
    cfg = evaluation_config(build_cfg(args.config_file, list(args.opts)))
    model = build_model(cfg, classifier.shape[0], cams)
    return with_checksum({"model": convert_demo_state(state, model.state_dict(), path)})


def read_legacy(path: str, args) -> Dict:  # noqa: ARG001 - SOURCES' interface
    """A checkpoint of an earlier version (full unpickling: only after --trust) with its numpy
    RNG states in the current form (``utils.seed.get_rng_state``) and its checksum renewed."""
    state = torch.load(path, map_location="cpu", weights_only=False)  # the user said --trust
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a checkpoint of this project")
    if CHECKSUM_KEY in state and state_checksum(state) != state[CHECKSUM_KEY]:
        raise ValueError(f"{path} is damaged (checksum mismatch): not converted")
    for rng in [state.get("rng")] + list(state.get("rng_per_rank") or []):
        if isinstance(rng, dict) and "numpy" in rng:
            np.random.set_state(rng["numpy"])  # this process's generator carries it over
            rng["numpy"] = get_rng_state()["numpy"]
    return with_checksum(state) if CHECKSUM_KEY in state else state


# --from NAME -> (reader(path, args) of the input file, whether reading it can run code stored in it)
SOURCES = {"legacy": (read_legacy, True), "demo": (read_demo, False)}


def build_parser() -> argparse.ArgumentParser:
    summary, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(description=summary, epilog=details,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", required=True, choices=sorted(SOURCES),
                        help="what wrote IN: legacy = an earlier version of this project, "
                             "demo = DeMo's official code")
    parser.add_argument("--config_file", default="", metavar="FILE",
                        help="--from demo: the config whose model IN is converted for")
    parser.add_argument("--trust", action="store_true",
                        help="IN comes from a trusted source: reading it may run code stored in it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace OUT if it exists (OUT may then be IN itself)")
    parser.add_argument("input", metavar="IN", help="the checkpoint to convert")
    parser.add_argument("output", metavar="OUT", help="where the converted checkpoint is written")
    parser.add_argument("opts", nargs="*", metavar="KEY VALUE",
                        help="--from demo: config overrides, as for test_net.py")
    return parser


def main(argv=None) -> str:
    args = build_parser().parse_intermixed_args(argv)
    read, runs_code = SOURCES[args.source]
    if not os.path.isfile(args.input):
        raise FileNotFoundError(f"{args.input}: no such file")
    if os.path.exists(args.output) and not args.overwrite:
        same = os.path.samefile(args.input, args.output)
        raise ValueError(f"{args.output} exists{' (it is IN)' if same else ''}: choose "
                              "another OUT, or add --overwrite to replace it")
    if runs_code:  # a file for the full unpickler: only one that safe loading refuses
        try:
            safe_load(args.input)
        except UnsafeFileError:
            pass
        else:
            raise ValueError(f"{args.input} already loads safely: nothing to convert, use it as it is")
    if runs_code and not args.trust:
        raise PermissionError(f"--from {args.source} reads {args.input} with Python's full "
                              "unpickler, which runs any code stored in the file: add --trust "
                              "only if you wrote it yourself or trust where it came from")
    buffer = io.BytesIO()
    torch.save(read(args.input, args), buffer)
    unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(buffer.getvalue()))
    if unsafe:
        raise ValueError(f"{args.input} holds Python objects besides those --from {args.source} "
                         f"converts ({', '.join(unsafe)}): not converted")
    atomic_write_bytes(buffer.getvalue(), args.output)
    print(f"converted {args.input} -> {args.output}: it loads with weights_only=True")
    return args.output


if __name__ == "__main__":
    run_cli(main)
