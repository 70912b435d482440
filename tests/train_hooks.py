"""``train_net.py`` with test hooks, run as a subprocess (also under torchrun) by the tests.

    python tests/train_hooks.py [train_net.py arguments]

Hooks, read from the environment (none of them touches a random number generator, so a hooked
run trains exactly as a plain one):

    HOOK_STEP_SLEEP=0.3         sleep this many seconds after every training step, so that a test
                                has time to signal the process in the middle of an epoch
    HOOK_STOP_AT=R:E:I          on rank R, after iteration I (1-based) of epoch E (1-based), act as
                                if SIGTERM had arrived (only that rank: the ranks must agree)
"""
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import train_net  # noqa: E402
from engine.cli import run_cli  # noqa: E402
from engine.hooks import HookBase  # noqa: E402
from utils.dist import get_rank  # noqa: E402


class TestHook(HookBase):
    """Sleeps after each step and/or requests a stop at one (rank, epoch, iteration)."""

    def __init__(self, sleep: float, stop):
        self.sleep, self.stop = sleep, stop

    def after_step(self) -> None:
        t = self.trainer
        if self.stop is not None and (get_rank(), t.epoch + 1, t.iter + 1) == self.stop:
            t.stop_requested = True
        if self.sleep:
            time.sleep(self.sleep)


def hooks_from_env():
    sleep = float(os.environ.get("HOOK_STEP_SLEEP", "0") or 0)
    stop_at = os.environ.get("HOOK_STOP_AT", "")
    if not sleep and not stop_at:
        return []
    stop = tuple(int(x) for x in stop_at.split(":")) if stop_at else None
    return [TestHook(sleep, stop)]


if __name__ == "__main__":
    run_cli(lambda argv: train_net.main(argv, hooks=hooks_from_env()))
