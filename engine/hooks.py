"""Trainer hooks (detectron2's ``HookBase``): each adds one behaviour around the plain loop.

The trainer calls, on every registered hook in order, ``before_train``, then per epoch
``before_epoch``, per iteration ``before_step`` / ``after_step``, then ``after_epoch``, and
finally ``after_train`` (also when training stops early). A hook reads and writes the trainer's
state through ``self.trainer`` (set by ``Trainer.register_hooks``): ``epoch`` and ``iter``
(0-based), ``num_iters``, ``global_step``, ``step_result`` (the last step's ``loss``,
``losses``, ``scalars``, ``histograms``, ``finite``), ``history`` (evaluations), ``best``,
``writer`` (TensorBoard, rank 0) and ``stop_requested``.

Default hooks, in order (``default_hooks``): :class:`LRScheduler`, :class:`PeriodicWriter`,
then any user hooks, then :class:`EvalHook`, :class:`BestCheckpointer`,
:class:`PeriodicCheckpointer`, :class:`PreemptionCheckpointer`.
"""
import os
import signal
import time
from typing import List

import torch

from engine.evaluator import evaluate, format_metrics
from solver.build import lr_by_kind, set_epoch_lr
from utils import checkpoint as ckpt
from utils.dist import any_rank, broadcast_buffers, is_distributed, is_main_process


class HookBase:
    """Override any of the six methods; ``self.trainer`` is set when the hook is registered."""

    trainer = None

    def before_train(self) -> None:
        pass

    def after_train(self) -> None:
        pass

    def before_epoch(self) -> None:
        pass

    def after_epoch(self) -> None:
        pass

    def before_step(self) -> None:
        pass

    def after_step(self) -> None:
        pass


class LRScheduler(HookBase):
    """Sets the epoch's learning rates before its first iteration; logs one per group kind."""

    def before_epoch(self) -> None:
        t = self.trainer
        set_epoch_lr(t.scheduler, t.epoch, t.cfg.SOLVER.SCHEDULE_START)
        lrs = lr_by_kind(t.optimizer)
        t.logger.info("epoch %d lr: %s", t.epoch + 1,
                      ", ".join(f"{kind} {lr:.6e}" for kind, lr in lrs.items()))
        if t.writer is not None:
            for kind, lr in lrs.items():
                t.writer.add_scalar(f"lr/{kind}", lr, t.epoch + 1)


def _value(x) -> float:
    return float(x.detach().float()) if isinstance(x, torch.Tensor) else float(x)


def _detached(x):
    return x.detach().float() if isinstance(x, torch.Tensor) else float(x)


class PeriodicWriter(HookBase):
    """Console and TensorBoard (rank 0): every ``period`` iterations and at the end of an epoch
    the loss and accuracy line, the losses, scalars and histograms the model returned; after each
    epoch its time, mean loss and accuracy, learning rate and the run's ETA."""

    def __init__(self, period: int):
        self.period = max(1, int(period))
        self._epoch_start = self._train_start = 0.0
        self._epochs_done = 0
        self._sums = [0.0, 0.0, 0.0]  # loss, accuracy, finite steps (device tensors: no sync per step)

    def before_train(self) -> None:
        t = self.trainer
        self._train_start, self._epochs_done = time.time(), 0
        if is_main_process() and t.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            t.writer = SummaryWriter(os.path.join(t.output_dir, "tb"))

    def before_epoch(self) -> None:
        self._epoch_start = time.time()
        self._sums = [0.0, 0.0, 0.0]

    def after_step(self) -> None:
        t = self.trainer
        result = t.step_result
        finite = result["finite"]  # a device tensor: summed without waiting for the device
        zero = torch.zeros((), device=finite.device)
        self._sums[0] = self._sums[0] + torch.where(finite, result["loss"].detach().float(), zero)
        acc = torch.as_tensor(_detached(result["scalars"].get("acc", float("nan"))),
                              device=finite.device)
        self._sums[1] = self._sums[1] + torch.where(finite, acc, zero)
        self._sums[2] = self._sums[2] + finite.float()
        if not ((t.iter + 1) % self.period == 0 or t.iter + 1 == t.num_iters) or not finite:
            return
        loss = _value(result["loss"])
        acc = _value(result["scalars"].get("acc", float("nan")))
        if t.bar is not None:
            t.bar.set_postfix(loss=f"{loss:.3f}", acc=f"{acc:.2f}")
        if not is_main_process():
            return
        t.logger.info("epoch %d iter %d/%d  loss %.4f  acc %.3f", t.epoch + 1, t.iter + 1,
                      t.num_iters, loss, acc)
        if t.writer is None:
            return
        step = t.global_step
        t.writer.add_scalar("train/loss", loss, step)
        for name, value in result["losses"].items():
            t.writer.add_scalar(f"train/{name}", _value(value), step)
        for name, value in result["scalars"].items():
            t.writer.add_scalar(name if "/" in name else f"train/{name}", _value(value), step)
        for name, values in result["histograms"].items():
            t.writer.add_histogram(name, values.detach().float().cpu(), step)

    def after_epoch(self) -> None:
        t = self.trainer
        self._epochs_done += 1
        now = time.time()
        remaining = t.cfg.SOLVER.MAX_EPOCHS - (t.epoch + 1)
        eta = (now - self._train_start) / self._epochs_done * remaining
        loss_sum, acc_sum, steps = (_value(x) for x in self._sums)
        means = (f"mean loss {loss_sum / steps:.4f}, acc {acc_sum / steps:.3f}"
                 if steps else "no finite step")
        lr = max(group["lr"] for group in t.optimizer.param_groups)
        t.logger.info("epoch %d/%d done in %.1f s: %s, lr %.2e; ETA %s", t.epoch + 1,
                      t.cfg.SOLVER.MAX_EPOCHS, now - self._epoch_start, means, lr,
                      format_duration(eta) if remaining else "done")

    def after_train(self) -> None:
        t = self.trainer
        if t.writer is not None:
            t.writer.flush()


def format_duration(seconds: float) -> str:
    """``1 h 02 min``, ``4 min 05 s`` or ``12 s``."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"
    if seconds >= 60:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds} s"


class EvalHook(HookBase):
    """Evaluates every evaluation set every ``period`` epochs and after the last one; logs the
    metrics, writes them to TensorBoard and appends them to ``trainer.history``."""

    def __init__(self, period: int):
        self.period = max(1, int(period))

    def after_epoch(self) -> None:
        t = self.trainer
        if (t.epoch + 1) % self.period != 0 and not t.final_epoch:
            return
        # every rank extracts its shard with rank 0's BatchNorm statistics (those it checkpoints)
        broadcast_buffers(t.model)
        results = {}
        for name, eval_set in t.data.eval_sets.items():
            metrics = evaluate(t.model, eval_set, t.cfg, t.device)
            results[name] = metrics
            t.logger.info("epoch %d %s [%s feature]: %s", t.epoch + 1, name, t.cfg.TEST.FEAT,
                          format_metrics(metrics))
            if t.writer is not None:
                for key in ("mAP", "R1", "mINP", "fg_precision"):
                    if key in metrics:
                        t.writer.add_scalar(f"{name}/{key}", metrics[key], t.epoch + 1)
        t.history.append({"epoch": t.epoch + 1, "results": results})


class BestCheckpointer(HookBase):
    """After an evaluation, keeps the epoch with the best mAP on the validation split (the test
    split when there is none) in ``trainer.best`` and writes its weights to model_best.pth."""

    def after_epoch(self) -> None:
        t = self.trainer
        if not t.history or t.history[-1]["epoch"] != t.epoch + 1:
            return
        results = t.history[-1]["results"]
        split = "val" if "val" in results else "test"
        score = results[split]["mAP"]
        if t.best is None or score > t.best["mAP"]:
            t.best = {"epoch": t.epoch + 1, "split": split, "mAP": score, "metrics": results}
            if is_main_process():
                ckpt.atomic_torch_save(ckpt.with_checksum(
                    {"model": t.model.state_dict(), "epoch": t.epoch + 1, "metrics": results,
                     "cfg": t.cfg.dump()}), os.path.join(t.output_dir, "model_best.pth"))


class PeriodicCheckpointer(HookBase):
    """Writes a resumable checkpoint every ``period`` epochs and after the last one, keeping the
    newest ``keep_last`` epoch checkpoints (``utils.checkpoint``)."""

    def __init__(self, period: int):
        self.period = max(1, int(period))

    def after_epoch(self) -> None:
        t = self.trainer
        if (t.epoch + 1) % self.period == 0 or t.final_epoch:
            t.save_checkpoint(t.epoch + 1, 0)


class PreemptionCheckpointer(HookBase):
    """SIGTERM (a cluster pre-empting the job) sets ``trainer.stop_requested``; after the current
    iteration every rank checkpoints the position and the run exits with SystemExit."""

    def __init__(self):
        self._previous = None

    def _request_stop(self, signum, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.trainer.logger.warning("signal %d received: checkpointing after this iteration", signum)
        self.trainer.stop_requested = True

    def before_train(self) -> None:
        self._previous = signal.signal(signal.SIGTERM, self._request_stop)

    def after_train(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def after_step(self) -> None:
        t = self.trainer
        # Under DDP the ranks receive a signal at slightly different moments: they agree after
        # every step, so all of them stop after the same iteration.
        stop = any_rank(t.stop_requested, t.device) if is_distributed() else t.stop_requested
        if stop:
            t.save_checkpoint(t.epoch, t.iter + 1)
            raise SystemExit(f"stopped by signal at epoch {t.epoch + 1} iteration {t.iter + 1}; "
                             f"resume with --resume")


def default_hooks(cfg, extra: List[HookBase] = ()) -> List[HookBase]:
    """The training hooks of ``cfg``, with ``extra`` (user hooks) after the writer."""
    s = cfg.SOLVER
    return ([LRScheduler(), PeriodicWriter(s.LOG_PERIOD)] + list(extra) +
            [EvalHook(s.EVAL_PERIOD), BestCheckpointer(), PeriodicCheckpointer(s.CHECKPOINT_PERIOD),
             PreemptionCheckpointer()])

