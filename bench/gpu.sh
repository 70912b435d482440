#!/usr/bin/env bash
# Training-speed benchmark on one GPU (sized for an H200: well under 8 minutes in all).
#
# Model: CLIP ViT-B/16 (vit_base_patch16_clip_quickgelu_224, random init, 512-d projection)
# shared by RGB/NI/TI, camera embedding, SDTPS token selection + DGAF fusion, BNNeck heads,
# ID + triplet losses; bf16 autocast; batch 64 triplets (8 ids x 8) = 192 images of 256x128.
# Data: the generated synthetic tri-modal dataset at 256x128 (made on first use, ~3k triplets).
# Prints triplets/s and images/s, peak GPU memory, the share of time blocked on the data loader,
# and model FLOP utilisation against an assumed peak of 989 TFLOP/s (H100/H200 SXM dense BF16).
#
#   bash bench/gpu.sh                                 # from anywhere
#   STEPS=100 WORKERS=12 bash bench/gpu.sh            # knobs below, all optional
#
# Output: the summary on stdout; bench_gpu.log and train_speed.json under $OUT when set,
# else under ./output/bench_gpu. Installs nothing unless a package is missing; then from the
# local wheel folder ./.whl when it holds wheels (no network needed), else with pip from
# requirements.txt. torch itself is never installed (use the machine's CUDA build).
# To prepare the wheels on a machine with network access:
#   python -m pip download --no-deps -d .whl yacs==0.1.8      (+ timm etc. if also missing)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
STEPS=${STEPS:-300}              # timed training steps
WARMUP=${WARMUP:-30}             # untimed steps first
BATCH=${BATCH:-64}               # triplets per step (SOLVER.IMS_PER_BATCH)
INSTANCES=${INSTANCES:-8}        # K of the P x K identity batches
WORKERS=${WORKERS:-8}            # data-loader workers (the RGBNT201 configs use 8)
TRAIN_IDS=${TRAIN_IDS:-150}      # synthetic identities x 16 triplets each
DEVICE=${DEVICE:-cuda}           # cpu only to smoke-test this script
AMP=${AMP:-bf16}
PEAK_TFLOPS=${PEAK_TFLOPS:-989}
DATA_ROOT=${DATA_ROOT:-$REPO/datasets}
OUT_DIR=${OUT:-$REPO/output/bench_gpu}
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/bench_gpu.log"
: > "$LOG"
say() { echo "$*" | tee -a "$LOG"; }

# ---------------------------------------------------------------- dependencies (only if missing)
"$PY" -c "import torch" 2>/dev/null || { say "torch is not installed: install its CUDA build first"; exit 1; }
missing=$("$PY" - <<'EOF'
import importlib.util
need = {"timm": "timm", "yacs": "yacs", "yaml": "pyyaml", "numpy": "numpy", "PIL": "pillow",
        "tensorboard": "tensorboard", "tqdm": "tqdm"}
print(" ".join(pkg for mod, pkg in need.items() if importlib.util.find_spec(mod) is None))
EOF
)
if [ -n "$missing" ]; then
    SITE=${SITE:-/tmp/bench_site}
    say "missing Python packages: $missing -> installing into $SITE"
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --find-links .whl --target "$SITE" $missing
    else
        reqs=""
        for pkg in $missing; do
            line=$(grep -i -E "^${pkg}([<>=!~ ]|$)" requirements.txt || true)
            reqs="$reqs ${line:-$pkg}"
        done
        "$PY" -m pip install -q --target "$SITE" $reqs
    fi
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# ---------------------------------------------------------------- environment
if [ "$DEVICE" = cuda ]; then
    "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || { say "no CUDA device visible to torch (set DEVICE=cpu to smoke-test on CPU)"; exit 1; }
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
        --format=csv,noheader 2>&1 | tee -a "$LOG" || true
fi
"$PY" -c "import torch, timm; print('torch', torch.__version__, '| timm', timm.__version__)" | tee -a "$LOG"

# ---------------------------------------------------------------- measurement
start=$(date +%s)
set +e
PYTHONUNBUFFERED=1 "$PY" bench/train_speed.py --steps "$STEPS" --warmup "$WARMUP" \
    --tag "clip_b16_sdtps_dgaf_${AMP}" --peak-tflops "$PEAK_TFLOPS" \
    --json "$OUT_DIR/train_speed.json" \
    MODEL.DEVICE "$DEVICE" \
    MODEL.BACKBONE vit_base_patch16_clip_quickgelu_224 MODEL.PROJ_DIM 512 \
    MODEL.SELECTION.NAME sdtps MODEL.FUSION.NAME dgaf \
    INPUT.SIZE_TRAIN "[256, 128]" INPUT.SIZE_TEST "[256, 128]" \
    DATASETS.NAMES Synthetic DATASETS.ROOT_DIR "$DATA_ROOT" DATASETS.GENERATE True \
    DATASETS.SYNTHETIC.HEIGHT 256 DATASETS.SYNTHETIC.WIDTH 128 \
    DATASETS.SYNTHETIC.NUM_TRAIN_IDS "$TRAIN_IDS" DATASETS.SYNTHETIC.NUM_TEST_IDS 4 \
    DATASETS.SYNTHETIC.SAMPLES_PER_ID 16 \
    DATALOADER.NUM_WORKERS "$WORKERS" DATALOADER.NUM_INSTANCE "$INSTANCES" \
    SOLVER.IMS_PER_BATCH "$BATCH" SOLVER.AMP "$AMP" \
    OUTPUT_DIR "${TMPDIR:-/tmp}/bench_gpu_run" 2>&1 | tee -a "$LOG"
status=${PIPESTATUS[0]}
set -e
say "bench/gpu.sh: exit status $status after $(( $(date +%s) - start )) s of measurement; log $LOG"
exit "$status"
