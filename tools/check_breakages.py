"""Check that the test suite catches deliberate breakages (mutation testing by hand).

Each breakage replaces one exact string of one file. For each, the repository's files (tracked,
plus untracked files that git does not ignore) are copied to a temporary folder, the breakage is
applied there, and ``python -m pytest -q -x <tests>`` runs in that copy: a failing run means the
breakage is caught. The clean copy is tested first (a test that already fails would make every
breakage look caught). The working tree itself is never modified.

Usage: python tools/check_breakages.py [--only ID ...] [--keep] [--timeout S] [--no-baseline]

Exit code 0 when every breakage is caught; 1 when one is missed (or times out) or the baseline
fails; 2 when an ``old`` string is not found exactly once in its file (a stale list).
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, NamedTuple, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Breakage(NamedTuple):
    id: str
    description: str
    file: str
    old: str
    new: str
    tests: Tuple[str, ...]


BREAKAGES: List[Breakage] = [
    Breakage("triplet-easiest-positive",
             "batch-hard triplet uses the easiest (nearest, not self) positive",
             "modeling/losses.py",
             'd_ap = dist.masked_fill(~same, float("-inf")).max(dim=1).values',
             'd_ap = dist.masked_fill(~same | torch.eye(len(dist), dtype=torch.bool), '
             'float("inf")).min(dim=1).values',
             ("tests/test_losses.py",)),
    Breakage("triplet-easiest-negative",
             "batch-hard triplet uses the easiest (farthest) negative",
             "modeling/losses.py",
             'd_an = dist.masked_fill(same, float("inf")).min(dim=1).values',
             'd_an = dist.masked_fill(same, float("-inf")).max(dim=1).values',
             ("tests/test_losses.py",)),
    Breakage("triplet-soft-margin-ignored",
             "TRIPLET_SOFT_MARGIN ignored: always the margin loss",
             "modeling/losses.py",
             "F.softplus(diff) if self.soft_margin else",
             "F.softplus(diff) if False else",
             ("tests/test_losses.py",)),
    Breakage("label-smoothing-ignored",
             "CrossEntropyLabelSmooth passes label_smoothing=0",
             "modeling/losses.py",
             "label_smoothing=self.epsilon",
             "label_smoothing=0",
             ("tests/test_losses.py",)),
    Breakage("id-loss-weight-ignored",
             "MODEL.ID_LOSS_WEIGHT not applied to the ID loss",
             "modeling/losses.py",
             "w * (self.id_weight * self.id_loss(head.logits, pids))",
             "w * self.id_loss(head.logits, pids)",
             ("tests/test_losses.py",)),
    Breakage("fused-loss-weight-ignored",
             "MODEL.FUSION.LOSS_WEIGHT ignored: the fused head weighs 1",
             "modeling/model.py",
             '(m.FUSION.LOSS_WEIGHT if name == "fused" else 1.0)',
             "1.0",
             ("tests/test_losses.py", "tests/test_config.py")),
    Breakage("non-strict-loads-nothing",
             "MODEL.LOAD_STRICT False loads no key when the checkpoint differs",
             "utils/checkpoint.py",
             "compatible = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape}",
             "compatible = {k: v for k, v in state_dict.items() if k in own and v.shape == own[k].shape"
             " and not problems}",
             ("tests/test_checkpoint_loading.py",)),
    Breakage("flip-tta-mirror-only",
             "TEST.FLIP uses the mirrored image's feature only, not the mean",
             "engine/evaluator.py",
             'f = (f + retrieval_feature(flipped["heads"], feat, neck_feat, feat_norm).float()) / 2',
             'f = retrieval_feature(flipped["heads"], feat, neck_feat, feat_norm).float()',
             ("tests/test_evaluation.py",)),
    Breakage("cosine-distance-sign-flipped",
             "cosine retrieval distance cos - 1 instead of 1 - cos",
             "utils/metrics.py",
             "block.neg_().add_(1.0)",
             "block.add_(-1.0)",
             ("tests/test_metrics.py",)),
    Breakage("same-camera-junk-kept",
             "same-pid same-camera gallery items no longer removed as junk",
             "utils/metrics.py",
             "junk = member & (g_key[cols] == q_key[:, None])",
             "junk = member & False",
             ("tests/test_metrics.py",)),
    Breakage("rerank-lambda-ignored",
             "re-ranking ignores lambda_value (always 0.3)",
             "utils/rerank.py",
             "lam = float(lambda_value)",
             "lam = 0.3",
             ("tests/test_rerank.py",)),
    Breakage("sdtps-keeps-lowest",
             "SDTPS top-K keeps the K lowest-scored patches",
             "modeling/sdtps.py",
             "keep_idx = combined.detach().topk(k, dim=-1).indices",
             "keep_idx = combined.detach().topk(k, dim=-1, largest=False).indices",
             ("tests/test_sdtps.py",)),
    Breakage("sdtps-straight-through-zeroed",
             "SDTPS straight-through weight carries a zero gradient to the scorer",
             "modeling/sdtps.py",
             "ste_weights = keep_mask.to(combined.dtype) + (combined - combined.detach())",
             "ste_weights = keep_mask.to(combined.dtype) + 0.0 * (combined - combined.detach())",
             ("tests/test_distributed.py::test_every_parameter_gets_a_gradient",)),
    Breakage("dgaf-num-heads-ignored",
             "MODEL.DGAF.NUM_HEADS ignored: DGAF always built with 8 heads",
             "modeling/dgaf.py",
             "num_heads=d.NUM_HEADS",
             "num_heads=8",
             ("tests/test_config.py",)),
    Breakage("mean-fusion-ignores-weights",
             "mean fusion averages every patch, ignoring the selection weights",
             "modeling/fusion.py",
             "weight = weights.to(tokens.dtype)",
             "weight = torch.ones_like(weights, dtype=tokens.dtype)",
             ("tests/test_sdtps.py", "tests/test_model.py")),
    Breakage("predictor-missing-before-norm",
             "Predictor zero-fills a missing modality before normalisation (-mean/std after)",
             "engine/predictor.py",
             "missing = [i for i, x in enumerate(given) if x is None]",
             "missing = []",
             ("tests/test_predictor.py",)),
    Breakage("search-returns-the-query",
             "tools/search.py ranks without the junk rule: a file searched against itself "
             "returns each query first",
             "tools/search.py",
             "top = top_matches(distmat[qi], q_pids[qi], q_keys[qi], g_pids, g_keys, args.top)",
             "top = np.argsort(distmat[qi], kind=\"stable\")[:args.top]",
             ("tests/test_predictor.py",)),
    Breakage("onnx-compared-with-itself",
             "tools/export_onnx.py compares PyTorch with itself instead of with onnxruntime",
             "tools/export_onnx.py",
             "got = session.run([OUTPUT_NAME], {n: x.numpy() for n, x in zip(INPUT_NAMES, inputs)})[0]",
             "got = expected.copy()",
             ("tests/test_export_onnx.py",)),
    Breakage("batch-erase-box-one-row-taller",
             "the batched random erasing (INPUT.AUG_DEVICE model) erases one row below its box",
             "data/transforms.py",
             "& (r < (params.erase_top + params.erase_h).unsqueeze(-1)))",
             "& (r <= (params.erase_top + params.erase_h).unsqueeze(-1)))",
             ("tests/test_batch_augment.py",)),
    Breakage("fused-step-ignores-nonfinite",
             "with a fused optimizer (CUDA) a non-finite step is not skipped: found_inf not set",
             "engine/trainer.py",
             "self.optimizer.found_inf = (~finite).float()",
             "pass",
             ("tests/test_amp.py",)),
    Breakage("resume-rng-not-restored",
             "a run resumed mid-epoch does not restore the checkpoint's RNG states",
             "engine/trainer.py",
             "set_rng_state(self.resume_rng)",
             "pass",
             ("tests/test_resume_random.py",)),
    Breakage("scene-protocol-ignored",
             "MSVR310 evaluated with the camera rule: its scene labels are not used",
             "engine/evaluator.py",
             "    if eval_set.uses_scenes:",
             "    if False:",
             ("tests/test_wiring.py",)),
    Breakage("query-without-positive-counted",
             "a query without a positive left after junk removal is not dropped",
             "utils/metrics.py",
             "ok = num_pos > 0",
             "ok = num_pos >= 0",
             ("tests/test_wiring.py",)),
    Breakage("dgaf-tau-unread",
             "MODEL.DGAF.TAU not passed to DGAF (always 1.0)",
             "modeling/dgaf.py",
             "tau=d.TAU",
             "tau=1.0",
             ("tests/test_key_reach.py",)),
    Breakage("rerank-lambda-not-passed",
             "TEST.RERANK.LAMBDA not passed to the re-ranking (0.3)",
             "engine/evaluator.py",
             "lambda_value=r.LAMBDA",
             "lambda_value=0.3",
             ("tests/test_wiring.py::test_rerank_lambda_weighs_the_original_distance",)),
    Breakage("gate-init-scale-bias-swapped",
             "MODEL.SDTPS.GATE_INIT_SCALE passed as the gate bias and GATE_INIT_BIAS as the scale",
             "modeling/sdtps.py",
             "gate_init_scale=s.GATE_INIT_SCALE, gate_init_bias=s.GATE_INIT_BIAS",
             "gate_init_scale=s.GATE_INIT_BIAS, gate_init_bias=s.GATE_INIT_SCALE",
             ("tests/test_wiring.py::test_sdtps_gate_init_and_heads_reach_the_gates",)),
    Breakage("sparse-ratio-not-passed",
             "MODEL.SDTPS.SPARSE_RATIO not passed to SDTPS (0.7)",
             "modeling/sdtps.py",
             "sparse_ratio=s.SPARSE_RATIO",
             "sparse_ratio=0.7",
             ("tests/test_wiring.py::test_sdtps_sparse_ratio_sets_the_kept_patches",)),
    Breakage("lr-noise-seed-not-passed",
             "SOLVER.LR_NOISE_SEED not passed to the scheduler (42)",
             "solver/build.py",
             "noise_seed=s.LR_NOISE_SEED",
             "noise_seed=42",
             ("tests/test_wiring.py::test_lr_noise_seed_and_std_reach_the_schedule",)),
    Breakage("momentum-not-passed",
             "SOLVER.MOMENTUM not passed to SGD (0.9)",
             "solver/build.py",
             "momentum=s.MOMENTUM",
             "momentum=0.9",
             ("tests/test_wiring.py::test_optimizer_and_momentum",)),
    Breakage("bias-lr-factor-fixed",
             "SOLVER.BIAS_LR_FACTOR not used for the bias groups (2.0)",
             "solver/build.py",
             '"bias": s.BASE_LR * s.BIAS_LR_FACTOR',
             '"bias": s.BASE_LR * 2.0',
             ("tests/test_wiring.py::test_bias_lr_factor_and_weight_decays_reach_the_groups",)),
    Breakage("sie-coe-not-passed",
             "MODEL.SIE_COE not passed to the backbone (1.0)",
             "modeling/backbone.py",
             "sie_coe=m.SIE_COE",
             "sie_coe=1.0",
             ("tests/test_wiring.py::test_sie_coe_scales_the_camera_embedding",)),
    Breakage("drop-path-not-passed",
             "MODEL.DROP_PATH not passed to timm (0: no stochastic depth)",
             "modeling/backbone.py",
             "drop_path=m.DROP_PATH",
             "drop_path=0.0",
             ("tests/test_wiring.py::test_backbone_depth_and_drop_path_reach_timm",)),
    Breakage("atmoe-heads-not-passed",
             "MODEL.ATMOE.HEADS not passed to ATMoE (4)",
             "modeling/model.py",
             "heads=m.ATMOE.HEADS",
             "heads=4",
             ("tests/test_wiring.py::test_atmoe_heads_reach_the_experts",)),
    Breakage("id-triplet-weights-swapped",
             "MODEL.ID_LOSS_WEIGHT and TRIPLET_LOSS_WEIGHT swapped on the way to the loss",
             "modeling/losses.py",
             "cls(m.ID_LOSS_WEIGHT, m.TRIPLET_LOSS_WEIGHT",
             "cls(m.TRIPLET_LOSS_WEIGHT, m.ID_LOSS_WEIGHT",
             ("tests/test_wiring.py::test_reid_loss_options_reach_the_loss",)),
    Breakage("soft-margin-inverted",
             "MODEL.TRIPLET_SOFT_MARGIN inverted on the way to the loss",
             "modeling/losses.py",
             "m.TRIPLET_SOFT_MARGIN, model.loss_weights",
             "not m.TRIPLET_SOFT_MARGIN, model.loss_weights",
             ("tests/test_wiring.py::test_reid_loss_options_reach_the_loss",)),
    Breakage("eval-period-not-passed",
             "SOLVER.EVAL_PERIOD not passed to the evaluation hook (every epoch)",
             "engine/hooks.py",
             "EvalHook(s.EVAL_PERIOD)",
             "EvalHook(1)",
             ("tests/test_wiring.py::test_periods_of_evaluation_checkpoints_and_log",)),
    Breakage("recorder-counts-printing",
             "the key-reach recorder notes the reads of str(cfg) (every key would look read)",
             "config/reads.py",
             "return self._quietly(super().__str__)",
             "return super().__str__()",
             ("tests/test_key_reach.py::test_the_recorder_counts_reads_and_nothing_else",)),
    Breakage("augmentation-seed-ignored",
             "the training dataset ignores the sample's augmentation seed (draws from the "
             "worker's stream again)",
             "data/build.py",
             "        elif seed is None:",
             "        elif True:",
             ("tests/test_reproducibility.py",)),
    Breakage("augmentation-position-per-rank",
             "a sample's augmentation key counts its position per rank, not in the global list",
             "data/samplers.py",
             "yield b * global_batch + start + j, index",
             "yield b * global_batch + j, index",
             ("tests/test_reproducibility.py::test_two_ranks_see_exactly_the_images_of_one_process",)),
    Breakage("batch-erase-uniform-aspect",
             "the batched erasing draws its aspect ratio uniformly instead of log-uniformly",
             "data/transforms.py",
             "aspect = torch.exp(log_lo + (-2 * log_lo) * uniform(batch, m, self.ATTEMPTS))",
             "aspect = self.MIN_ASPECT + (1 / self.MIN_ASPECT - self.MIN_ASPECT) * uniform(batch, m, self.ATTEMPTS)",
             ("tests/test_batch_augment.py::test_draw_maps_its_uniforms_exactly_as_the_per_image_path",)),
    Breakage("fp16-scaler-not-resumed",
             "--resume does not restore the fp16 grad scaler's state",
             "engine/trainer.py",
             "            self.scaler.load_state_dict(state[\"scaler\"])",
             "            pass",
             ("tests/test_amp.py::test_fp16_grad_scaler_state_is_checkpointed_and_resumed",)),
    Breakage("ablate-new-key-any-value",
             "ablate keeps a run when a key added since has any value (not only its default)",
             "tools/ablation/plan.py",
             "elif key in new and key in defaults and new[key] == defaults[key]:",
             "elif key in new:",
             ("tests/test_ablate.py::test_a_key_added_to_the_defaults_keeps_a_finished_run",)),
]


def repo_files() -> List[str]:
    """Tracked files plus untracked files git does not ignore, that exist in the working tree."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         cwd=ROOT, check=True, capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f and os.path.isfile(os.path.join(ROOT, f))})


def copy_tree(files: List[str], dest: str) -> None:
    for rel in files:
        target = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, rel), target)


def stale(b: Breakage) -> str:
    """Why ``b`` cannot be applied to the working tree, or "" when its ``old`` occurs once."""
    path = os.path.join(ROOT, b.file)
    if not os.path.isfile(path):
        return f"{b.file} not found"
    count = open(path).read().count(b.old)
    return "" if count == 1 else f"old string found {count} times in {b.file}"


def run_tests(folder: str, tests, timeout: float) -> Tuple[str, str, float]:
    """(outcome "passed" / "failed" / "timeout", first failing test or output tail, seconds)."""
    env = dict(os.environ, PYTHONPATH=folder, PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests]
    start = time.time()
    try:
        proc = subprocess.run(cmd, cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", f"over {timeout:.0f} s", time.time() - start
    seconds = time.time() - start
    if proc.returncode == 0:
        return "passed", "", seconds
    lines = (proc.stdout + proc.stderr).splitlines()
    first = next((ln for ln in lines if ln.startswith(("FAILED ", "ERROR "))), lines[-1] if lines else "")
    return "failed", first.split(" - ")[0].replace("FAILED ", "", 1), seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="python tools/check_breakages.py [--only ID ...] [--keep]")
    parser.add_argument("--only", nargs="+", metavar="ID", help="run only these breakages")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copies")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per pytest run")
    parser.add_argument("--no-baseline", action="store_true", help="skip the clean-copy run")
    args = parser.parse_args(argv)

    ids = [b.id for b in BREAKAGES]
    if len(set(ids)) != len(ids):
        print("duplicate breakage ids", file=sys.stderr)
        return 2
    chosen = BREAKAGES
    if args.only:
        unknown = sorted(set(args.only) - set(ids))
        if unknown:
            print(f"unknown id(s): {', '.join(unknown)}; known: {', '.join(ids)}", file=sys.stderr)
            return 2
        chosen = [b for b in BREAKAGES if b.id in args.only]
    problems = [(b.id, stale(b)) for b in chosen if stale(b)]
    if problems:
        for bid, why in problems:
            print(f"STALE {bid}: {why}", file=sys.stderr)
        print("the breakage list no longer matches the code: update tools/check_breakages.py",
              file=sys.stderr)
        return 2

    start = time.time()
    files = repo_files()
    work = tempfile.mkdtemp(prefix="breakages_")
    rows, missed = [], 0
    try:
        if not args.no_baseline:
            clean = os.path.join(work, "clean")
            copy_tree(files, clean)
            tests = sorted({t for b in chosen for t in b.tests})
            outcome, detail, seconds = run_tests(clean, tests, args.timeout * 2)
            print(f"baseline (clean copy, {len(tests)} test targets): {outcome} in {seconds:.0f} s",
                  flush=True)
            if outcome != "passed":
                print(f"the tests fail without any breakage ({detail}): results would be meaningless",
                      file=sys.stderr)
                return 1
        for b in chosen:
            folder = os.path.join(work, b.id)
            copy_tree(files, folder)
            path = os.path.join(folder, b.file)
            with open(path) as f:
                text = f.read()
            with open(path, "w") as f:
                f.write(text.replace(b.old, b.new, 1))
            outcome, detail, seconds = run_tests(folder, b.tests, args.timeout)
            caught = outcome == "failed"
            missed += not caught
            verdict = "caught" if caught else ("MISSED (timeout)" if outcome == "timeout" else "MISSED")
            rows.append((b.id, b.description, verdict, detail if caught else "", f"{seconds:.0f} s"))
            print(f"  {b.id}: {verdict} ({seconds:.0f} s)", flush=True)
            if not args.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if args.keep:
            print(f"copies kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    header = ("id", "description", "result", "first failing test", "time")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    print()
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print(" | ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    print()
    print(f"{len(chosen) - missed} of {len(chosen)} breakages caught ({time.time() - start:.0f} s)")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
