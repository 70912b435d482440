"""Print the parameter count and forward FLOPs of a configured model for one tri-modal sample.

    python tools/model_size.py --config_file configs/RGBNT201/DeMo.yml
    python tools/model_size.py --config_file F --num_classes 171 --num_cams 4 [KEY VALUE ...]

The model is built on the meta device (fast, no weights needed). FLOPs are also shown as MACs,
the convention of DeMo's published table.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from config import ConfigArgumentParser, build_cfg  # noqa: E402
from utils.logger import setup_logger  # noqa: E402
from data.datasets import dataset_class  # noqa: E402
from modeling.model_size import build_on_meta, count_flops, count_parameters, module_parameters  # noqa: E402


def main(argv=None) -> dict:
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--num_classes", type=int, default=None,
                        help="training identities (default: the dataset's published count)")
    parser.add_argument("--num_cams", type=int, default=None, help="cameras (default: the dataset's)")
    args = parser.parse_args(argv)
    setup_logger()
    for flag, value, least in (("--num_classes", args.num_classes, 1), ("--num_cams", args.num_cams, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} {value}: must be at least {least} (leave it out for the "
                             "dataset's own count)")
    cfg = build_cfg(args.config_file, args.opts)
    default_classes, default_cams = dataset_class(cfg.DATASETS.NAMES).train_size(cfg)
    num_classes = default_classes if args.num_classes is None else args.num_classes
    num_cams = default_cams if args.num_cams is None else args.num_cams
    model = build_on_meta(cfg, num_classes, num_cams)
    params = count_parameters(model)
    flops = count_flops(model, cfg.INPUT.SIZE_TEST)
    rows = [(name, f"{n / 1e6:.3f} M") for name, n in module_parameters(model).items() if n]
    rows += [("parameters (all)", f"{params['total'] / 1e6:.2f} M"),
             ("parameters (trainable)", f"{params['trainable'] / 1e6:.2f} M"),
             (f"forward FLOPs, 1 sample {cfg.INPUT.SIZE_TEST[0]}x{cfg.INPUT.SIZE_TEST[1]} x3", f"{flops / 1e9:.2f} G"),
             ("forward MACs (DeMo's 'FLOPs')", f"{flops / 2e9:.2f} G")]
    width = max(len(r[0]) for r in rows)
    print(f"{args.config_file}  ({num_classes} ids, {num_cams} cameras)")
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>10}")
    return {"params": params, "flops": flops}


if __name__ == "__main__":
    run_cli(main)
