"""A plain epoch loop with hooks (detectron2's ``HookBase`` pattern, see ``engine/hooks.py``).

The trainer itself only steps: per iteration ``model(batch)`` returns its losses, the trainer
sums and back-propagates them (mixed precision, gradient clipping, skipping non-finite steps);
learning rates, logging, evaluation, best-checkpoint selection, checkpointing and SIGTERM
handling are hooks.

Reproducibility and resume: epoch ``e`` seeds python/numpy/torch, the identity sampler and the
loader's worker seeds from ``SOLVER.SEED + e``. A checkpoint records the position as
(epoch, iteration) plus every RNG state; ``--resume`` re-creates the epoch's batch order, skips
the batches already trained on, restores the RNG states and continues, so an interrupted run ends
with the same weights as an uninterrupted one (bit-exact on CPU with ``SOLVER.DETERMINISTIC``).
Checkpoints are written atomically (see ``utils.checkpoint``).
"""
import contextlib
import json
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from engine.evaluator import autocast_context, format_metrics, resolve_amp
from engine.hooks import HookBase, default_hooks
from solver.build import build_optimizer, build_scheduler
from utils import checkpoint as ckpt
from utils.dist import (all_gather_object, any_rank, barrier, get_rank,
                        get_world_size, is_distributed, is_main_process)
from utils.logger import get_logger
from utils.manifest import data_line, run_manifest
from utils.seed import get_rng_state, seed_everything, set_rng_state


# Per-rank offset of the epoch seeds (larger than any epoch count, so no two (rank, epoch) collide).
RANK_SEED_STRIDE = 1_000_003


class NonFiniteLossError(RuntimeError):
    """Too many consecutive non-finite losses."""


class Trainer:
    """Trains ``model`` on ``data`` (a :class:`data.build.DataBundle`) as configured by ``cfg``.

    ``hooks``: extra :class:`~engine.hooks.HookBase` hooks, run after the default writer and
    before evaluation and checkpointing (``engine.hooks.default_hooks``).
    """

    def __init__(self, cfg, model: torch.nn.Module, data, device: torch.device,
                 hooks: Sequence[HookBase] = ()):
        self.cfg = cfg
        self.device = device
        self.data = data
        self.logger = get_logger()
        self.output_dir = cfg.OUTPUT_DIR
        self.model = model.to(device)
        if cfg.MODEL.SYNC_BN and is_distributed():
            if device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:  # DDP refuses SyncBatchNorm on CPU modules
                self.logger.warning("MODEL.SYNC_BN is ignored on %s: SyncBatchNorm needs CUDA; "
                                    "each process normalises its own part of the batch", device)
        self.train_model = self.model
        if is_distributed():
            ids = [device.index] if device.type == "cuda" else None
            self.train_model = DistributedDataParallel(self.model, device_ids=ids,
                                                       find_unused_parameters=False)
        if cfg.MODEL.COMPILE:
            self.train_model = torch.compile(self.train_model, mode=cfg.MODEL.COMPILE)
            self.logger.info("training model compiled (torch.compile mode %s): the first steps "
                             "include the compilation", cfg.MODEL.COMPILE)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer)
        self.amp = resolve_amp(cfg.SOLVER.AMP, device)
        if self.amp != cfg.SOLVER.AMP:
            self.logger.warning("SOLVER.AMP fp16 needs CUDA: training in fp32 on %s (bf16 is the "
                                "mixed precision that runs on CPU)", device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=(self.amp == "fp16"))
        self.start_epoch, self.start_iter = 0, 0
        self.resume_rng: Optional[dict] = None
        self.best: Optional[Dict] = None
        self.history = []
        self.nonfinite_streak = 0
        self.nonfinite_steps = 0  # skipped steps over the whole run
        self._pending_finite: List = []  # (iteration, finite, loss) not yet read from the device
        self.skipped_train_images = 0  # unreadable training images skipped (SKIP_BAD_IMAGES)
        self.global_step = 0
        self.stop_requested = False
        self.writer = None  # TensorBoard SummaryWriter (rank 0), opened by the PeriodicWriter hook
        self.epoch, self.iter, self.num_iters = 0, 0, 0
        self.step_result: Optional[Dict] = None
        self.bar = None
        self.hooks: List[HookBase] = []
        self.register_hooks(default_hooks(cfg, hooks))
        # what the run is a function of (summary.json); the data fingerprint is logged at start
        self.manifest = run_manifest(cfg, device, data, get_world_size())
        self.logger.info("%s", data_line(self.manifest["data"]))

    def register_hooks(self, hooks: Sequence[HookBase]) -> None:
        """Append ``hooks`` (called in registration order)."""
        for hook in hooks:
            hook.trainer = self
            self.hooks.append(hook)

    def _call_hooks(self, stage: str) -> None:
        for hook in self.hooks:
            getattr(hook, stage)()

    @property
    def final_epoch(self) -> bool:
        return self.epoch + 1 == self.cfg.SOLVER.MAX_EPOCHS

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self, epoch: int, iteration: int) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "global_step": self.global_step,
            "rng": get_rng_state(),
            "best": self.best,
            "history": self.history,
            "nonfinite_steps": self.nonfinite_steps,
            "skipped_train_images": self.skipped_train_images,
            "cfg": self.cfg.dump(),
        }

    def save_checkpoint(self, epoch: int, iteration: int = 0) -> None:
        """Checkpoint the position "next: ``epoch``, batch ``iteration``" (rank 0 writes).

        Every rank must call it: under DDP the ranks' RNG states are gathered into the file (a
        resumed run continues each rank's own random stream), and no rank returns before the file
        is in place, so none can exit (or be torn down by torchrun) while rank 0 is writing.
        """
        rng_per_rank = all_gather_object(get_rng_state()) if is_distributed() else None
        if is_main_process():
            state = self.state_dict(epoch, iteration)
            if rng_per_rank is not None:
                state["rng_per_rank"] = rng_per_rank
            path = ckpt.save_epoch_checkpoint(state, self.output_dir, epoch,
                                              self.cfg.SOLVER.KEEP_LAST)
            self.logger.info("checkpoint written: %s", path)
        barrier()

    def resume(self) -> bool:
        """Load the newest readable checkpoint of OUTPUT_DIR; False when there is none."""
        found = ckpt.find_resume_checkpoint(self.output_dir)
        if found is None:
            self.logger.info("--resume: no checkpoint in %s, starting from scratch", self.output_dir)
            return False
        path, state = found
        problems = ckpt.load_model_weights(self.model, state["model"], self.cfg.MODEL.LOAD_STRICT,
                                           source=path)
        self.start_epoch, self.start_iter = state["epoch"], state.get("iteration", 0)
        if problems:  # non-strict load of another architecture: its optimizer state cannot fit
            self.logger.warning("--resume with MODEL.LOAD_STRICT False from a checkpoint of another "
                                "model: optimizer%s state not restored, starting afresh at epoch %d",
                                " and grad-scaler" if self.amp == "fp16" else "",
                                self.start_epoch + 1)
        else:  # the lr schedule is a function of the epoch: nothing to restore for it
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        self.global_step = state.get("global_step", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self.skipped_train_images = state.get("skipped_train_images", 0)
        self.best = state.get("best")
        self.history = state.get("history", [])
        rng = state["rng"]
        per_rank = state.get("rng_per_rank")
        if per_rank is not None and len(per_rank) == get_world_size():
            rng = per_rank[get_rank()]
        elif self.start_iter > 0 and (per_rank is not None or get_world_size() > 1):
            self.logger.warning("%s was written by %d process(es) and is resumed mid-epoch by %d: "
                                "the random streams (augmentation, dropout) differ from an "
                                "uninterrupted run", path, len(per_rank or [None]),
                                get_world_size())
        self.resume_rng = rng if self.start_iter > 0 else None
        self.logger.info("resumed from %s at epoch %d, iteration %d", path, self.start_epoch + 1,
                         self.start_iter)
        return True

    # ------------------------------------------------------------------ steps
    @property
    def skips_on_device(self) -> bool:
        """Whether a non-finite step is skipped inside the fused optimizer kernel (its
        ``found_inf`` input, as GradScaler uses it) instead of by a host-side check that would
        wait for the device every step. True for the fused optimizers (CUDA)."""
        return bool(self.optimizer.defaults.get("fused"))

    def train_step(self, batch: Dict) -> Dict:
        """One optimisation step on ``batch``: {"finite" (0-d bool tensor), "loss" (0-d tensor),
        "losses", "scalars", "histograms"} (the last three as the model returned them).

        With a fused optimizer nothing here waits for the device: a non-finite loss still runs
        the backward pass, and the optimizer kernel skips the update (``found_inf``; with fp16 the
        grad scaler's own check of the gradients does it). Otherwise (CPU: no device to wait
        for) the step returns before the backward pass."""
        inputs = {key: batch[key].to(self.device, non_blocking=True)
                  for key in ("images", "camids", "pids")}
        if self.data.train_augment is not None:  # INPUT.AUG_DEVICE model: uint8 -> augmented
            # drawn from the batch's key (a host tensor), not from the stream of dropout & co.
            inputs["images"] = self.data.train_augment(inputs["images"], int(batch["seed"][0]))
        with autocast_context(self.device, self.amp):
            out = self.train_model(inputs)
            loss = sum(out["losses"].values())
        finite = torch.isfinite(loss.detach())
        if is_distributed():  # every rank must agree to step or to skip
            agreed = finite.float()
            torch.distributed.all_reduce(agreed, op=torch.distributed.ReduceOp.MIN)
            finite = agreed > 0
        self.optimizer.zero_grad(set_to_none=True)
        result = {"finite": finite, "loss": loss.detach(), **out}
        on_device = self.skips_on_device
        if not on_device and not bool(finite):
            return result
        self.scaler.scale(loss).backward()
        if self.cfg.SOLVER.GRAD_CLIP > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.SOLVER.GRAD_CLIP)
        if on_device and not self.scaler.is_enabled():
            self.optimizer.found_inf = (~finite).float()  # 1: the fused kernel leaves all as is
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return result

    def handle_nonfinite(self, result: Dict, epoch: int, iteration: int) -> None:
        """Count skipped steps, warn, and stop after SOLVER.MAX_NONFINITE in a row. Flags on a
        device are read (one wait for the device) only every SOLVER.LOG_PERIOD steps and at the
        end of the epoch, so a streak is noticed up to LOG_PERIOD steps late."""
        self._pending_finite.append((iteration, result["finite"], result["loss"]))
        last = iteration + 1 == self.num_iters
        if not (result["finite"].device.type == "cpu" or last
                or (iteration + 1) % self.cfg.SOLVER.LOG_PERIOD == 0):
            return
        pending, self._pending_finite = self._pending_finite, []
        flags = torch.stack([f for _, f, _ in pending]).tolist()
        for (step, _, loss), finite in zip(pending, flags):
            self._count_nonfinite(finite, loss, epoch, step)

    def _count_nonfinite(self, finite: bool, loss: torch.Tensor, epoch: int, iteration: int) -> None:
        if finite:
            self.nonfinite_streak = 0
            return
        self.nonfinite_streak += 1
        self.nonfinite_steps += 1
        self.logger.warning("non-finite loss (%s) at epoch %d iteration %d: step skipped (%d in a row)",
                            float(loss), epoch + 1, iteration + 1, self.nonfinite_streak)
        if self.nonfinite_streak >= self.cfg.SOLVER.MAX_NONFINITE:
            raise NonFiniteLossError(
                f"{self.nonfinite_streak} consecutive non-finite losses (SOLVER.MAX_NONFINITE); "
                f"stopping. The last good checkpoint in {self.output_dir} is intact: lower the "
                f"learning rate or switch SOLVER.AMP, then resume with --resume.")

    # ------------------------------------------------------------------ loop
    def _seed_epoch(self, epoch: int) -> None:
        # The identity sampler draws the same global batches on every rank (from its own seed);
        # augmentation, dropout and drop-path are seeded per rank, or all ranks would draw the
        # same random numbers for different images. Rank 0 keeps the single-process seeds.
        seed = self.cfg.SOLVER.SEED + epoch + get_rank() * RANK_SEED_STRIDE
        seed_everything(seed)
        self.data.train_sampler.set_epoch(epoch)
        self.data.train_loader.generator.manual_seed(seed)

    def train_epoch(self, epoch: int) -> None:
        self.model.train()
        self._seed_epoch(epoch)
        loader = self.data.train_loader
        self.num_iters = num_iters = len(loader)
        skip = self.start_iter if epoch == self.start_epoch else 0
        show_bar = is_main_process() and sys.stderr.isatty()
        self.bar = bar = tqdm(loader, total=num_iters,
                              desc=f"epoch {epoch + 1}/{self.cfg.SOLVER.MAX_EPOCHS}",
                              disable=not show_bar, leave=False)
        # in a terminal the log lines are printed above the bar, not onto it
        with logging_redirect_tqdm([self.logger]) if show_bar else contextlib.nullcontext():
            skipped_images = self._run_iterations(epoch, bar, skip)
        self.bar = None
        self._count_skipped_images(epoch, skipped_images)

    def _run_iterations(self, epoch: int, bar, skip: int) -> int:
        """The epoch's steps (the first ``skip`` batches were trained before an interruption);
        returns the number of unreadable images skipped."""
        skipped_images = 0
        for iteration, batch in enumerate(bar):
            if iteration < skip:  # already trained on before the interruption
                if iteration == skip - 1 and self.resume_rng is not None:
                    # dropout & co. continue the interrupted run's streams (the augmentation
                    # is keyed per sample and needs no state)
                    set_rng_state(self.resume_rng)
                    self.resume_rng = None
                continue
            skipped_images += batch.get("num_skipped", 0)
            empty = "images" not in batch
            if is_distributed() and self.cfg.DATALOADER.SKIP_BAD_IMAGES:
                # a rank whose whole part of the batch was unreadable cannot join the DDP step,
                # so every rank skips it
                empty = any_rank(empty, self.device)
            if empty:
                self.logger.warning("epoch %d iteration %d: no readable image in the batch; step "
                                    "skipped", epoch + 1, iteration + 1)
                continue
            self.iter = iteration
            self._call_hooks("before_step")
            self.step_result = self.train_step(batch)
            self.handle_nonfinite(self.step_result, epoch, iteration)
            self.global_step += 1
            self._call_hooks("after_step")
        return skipped_images

    def _count_skipped_images(self, epoch: int, skipped: int) -> None:
        """Add this epoch's skipped training images (all ranks) to the run's count and log them."""
        total = torch.tensor([float(skipped)], device=self.device)
        if is_distributed():
            torch.distributed.all_reduce(total)
        if total.item() > 0:
            self.skipped_train_images += int(total.item())
            self.logger.warning("epoch %d: %d unreadable training image(s) skipped "
                                "(DATALOADER.SKIP_BAD_IMAGES); %d in this run so far", epoch + 1,
                                int(total.item()), self.skipped_train_images)

    def train(self) -> Dict:
        """Run the remaining epochs; returns the final summary (also written to summary.json)."""
        start = time.time()
        self._call_hooks("before_train")
        try:
            for epoch in range(self.start_epoch, self.cfg.SOLVER.MAX_EPOCHS):
                self.epoch = epoch
                self._call_hooks("before_epoch")
                self.train_epoch(epoch)
                self._call_hooks("after_epoch")
        finally:
            self._call_hooks("after_train")
        return self.finish(self.history[-1] if self.history else None, time.time() - start)

    def best_on_test(self) -> Optional[Dict]:
        """The evaluation with the highest test mAP (the published protocol: the epoch is chosen on
        the test split itself, so the figure is optimistic; for comparison with papers only)."""
        evaluated = [h for h in self.history if "test" in h["results"]]
        if not evaluated:
            return None
        top = max(evaluated, key=lambda h: h["results"]["test"]["mAP"])
        return {"epoch": top["epoch"], "evaluated_epochs": len(evaluated),
                "metrics": top["results"]["test"],
                "protocol": "best test mAP over the evaluated epochs (the paper's protocol, "
                            "test-set selection)"}

    def finish(self, last: Optional[Dict], seconds: float) -> Dict:
        """Log the final report and write summary.json: the last, best and paper-protocol
        evaluations, every evaluation (``history``) and the run manifest (``utils.manifest``)."""
        best_test = self.best_on_test()
        summary = {"last": last, "best": self.best, "best_test_paper_protocol": best_test,
                   "train_seconds": seconds,
                   "world_size": get_world_size(), "test_feat": self.cfg.TEST.FEAT,
                   "nonfinite_steps": self.nonfinite_steps,
                   "skipped_train_images": self.skipped_train_images,
                   "history": self.history, "manifest": self.manifest}
        if last is not None:
            for split, metrics in last["results"].items():
                self.logger.info("final (last epoch %d) %s: %s", last["epoch"], split,
                                 format_metrics(metrics))
        if self.best is not None:
            how = ("selected on the validation split" if self.best["split"] == "val"
                   else "selected on the TEST split (no validation split; optimistic)")
            self.logger.info("best checkpoint: epoch %d, %s (mAP %.2f), saved as model_best.pth",
                             self.best["epoch"], how, self.best["mAP"] * 100)
        if best_test is not None:
            self.logger.info("best test mAP over the %d evaluated epochs (the paper's protocol, "
                             "test-set selection; compare with published tables only): epoch %d: %s",
                             best_test["evaluated_epochs"], best_test["epoch"],
                             format_metrics(best_test["metrics"]))
        if is_main_process():
            ckpt.atomic_write_text(json.dumps(summary, indent=2, default=float),
                                   os.path.join(self.output_dir, "summary.json"))
        return summary
