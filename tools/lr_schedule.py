"""Print the learning rate and weight decay of every parameter tensor at every epoch, as training
sets them, before spending a GPU day on a schedule.

    python tools/lr_schedule.py --config_file configs/RGBNT201/DeMo.yml > lr.csv
    python tools/lr_schedule.py --config_file F --plot lr.png [KEY VALUE ...]

The model is built on the meta device (random init, no weights or data needed; the identity and
camera counts are the dataset's published ones), then the optimizer and the schedule exactly as
``train_net.py`` builds them (``solver.build``). The CSV goes to stdout in long form, header
``epoch,param,lr,weight_decay``: one row per epoch (1-based, as the training log numbers them) and
per trainable parameter tensor (its ``named_parameters()`` name), the value in effect during that
epoch's iterations. ``--plot`` draws one curve per parameter kind (backbone tower, biases,
everything else) on a log scale.
"""
import argparse
import csv
import math
import os
import sys
from typing import Dict, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from engine.cli import run_cli  # noqa: E402
from utils.outputs import check_output, replacing  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from config import ConfigArgumentParser, build_cfg  # noqa: E402
from solver.build import build_optimizer, build_scheduler, set_epoch_lr  # noqa: E402
from data.datasets import dataset_class  # noqa: E402
from modeling.model_size import build_on_meta  # noqa: E402
from utils.visualization import (BLACK, LIGHT_GRAY, WHITE, categorical_color, get_font,  # noqa: E402
                                 line_height, text_size)

HEADER = ("epoch", "param", "lr", "weight_decay")


def schedule_rows(cfg) -> List[Tuple[int, str, str, float, float]]:
    """(epoch, param name, group kind, lr, weight decay) for every epoch and trainable tensor."""
    num_classes, num_cams = dataset_class(cfg.DATASETS.NAMES).train_size(cfg)
    model = build_on_meta(cfg, num_classes, num_cams)
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer)
    rows = []
    for epoch in range(cfg.SOLVER.MAX_EPOCHS):
        set_epoch_lr(scheduler, epoch, cfg.SOLVER.SCHEDULE_START)
        for group in optimizer.param_groups:
            rows.append((epoch + 1, group["name"], group["kind"], group["lr"], group["weight_decay"]))
    return rows


def write_csv(rows, out) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(HEADER)
    for epoch, name, _, lr, wd in rows:
        writer.writerow((epoch, name, repr(float(lr)), repr(float(wd))))


def plot(curves: Dict[str, Sequence[float]], labels: Dict[str, str], title: str, path: str) -> None:
    """Line chart of ``curves`` (name -> lr per epoch) with a log10 y axis, saved as a PNG."""
    font, small = get_font(13), get_font(11)
    width, height, left, right, top, bottom = 760, 420, 70, 20, 40, 50
    legend_h = line_height(small) * len(curves) + 8
    img = Image.new("RGB", (width, height + legend_h), WHITE)
    draw = ImageDraw.Draw(img)
    values = [v for c in curves.values() for v in c if v > 0]
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    epochs = max(len(c) for c in curves.values())
    x0, x1, y0, y1 = left, width - right, height - bottom, top

    def xy(epoch: int, lr: float):
        x = x0 + (x1 - x0) * (epoch - 1) / max(1, epochs - 1)
        y = y0 - (y0 - y1) * (math.log10(lr) - lo) / (hi - lo)
        return x, y

    draw.text((left, 10), title, fill=BLACK, font=font)
    for decade in range(lo, hi + 1):
        y = xy(1, 10.0 ** decade)[1]
        draw.line([(x0, y), (x1, y)], fill=LIGHT_GRAY)
        label = f"1e{decade}"
        draw.text((x0 - 8 - text_size(label, small)[0], y - line_height(small) / 2), label,
                  fill=BLACK, font=small)
    step = max(1, round(epochs / 10))
    for epoch in [1] + list(range(step, epochs + 1, step)):
        x = xy(epoch, 10.0 ** lo)[0]
        draw.line([(x, y0), (x, y0 + 4)], fill=BLACK)
        draw.text((x - text_size(str(epoch), small)[0] / 2, y0 + 6), str(epoch), fill=BLACK, font=small)
    draw.text(((x0 + x1) / 2 - 20, y0 + 24), "epoch", fill=BLACK, font=small)
    draw.rectangle([x0, y1, x1, y0], outline=BLACK)
    for i, (name, lrs) in enumerate(curves.items()):
        color = categorical_color(i)
        points = [xy(e + 1, lr) for e, lr in enumerate(lrs) if lr > 0]
        draw.line(points, fill=color, width=2)
        y = height + 4 + i * line_height(small)
        draw.rectangle([left, y + 3, left + 10, y + 13], fill=color)
        draw.text((left + 16, y), labels[name], fill=BLACK, font=small)
    with replacing(path, "--plot") as tmp:
        img.save(tmp)


def main(argv=None) -> List[Tuple]:
    parser = ConfigArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config_file", required=True, metavar="FILE")
    parser.add_argument("--plot", default="", metavar="PNG", help="also draw the curves to this PNG")
    args = parser.parse_args(argv)
    cfg = build_cfg(args.config_file, args.opts)
    if args.plot:  # before the work: a file of another kind or the config is never overwritten
        check_output(args.plot, "--plot", (".png",), {"--config_file": args.config_file})
    rows = schedule_rows(cfg)
    write_csv(rows, sys.stdout)
    if args.plot:
        curves: Dict[str, List[float]] = {}  # kind -> lr of its first tensor, per epoch
        examples: Dict[str, List[str]] = {}  # kind -> its tensors
        for epoch, name, kind, lr, _ in rows:
            if epoch == 1:
                examples.setdefault(kind, []).append(name)
            series = curves.setdefault(kind, [])
            if len(series) < epoch:
                series.append(lr)
        labels = {k: f"{k} ({len(v)} tensors, e.g. {v[0]})" for k, v in examples.items()}
        plot(curves, labels, f"learning rate per epoch: {os.path.basename(args.config_file)}", args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_cli(main)
