#!/usr/bin/env bash
# Training-speed benchmark on one GPU (sized for an H200: under 8 minutes in all).
#
# Models (random init, 256x128, batch 64 triplets = 8 ids x 8): DeMo (configs/RGBNT201/DeMo.yml:
# CLIP ViT-B/16 shared by RGB/NI/TI, PIFE + HDM + ATMoE) and DeMo + SDTPS + DGAF
# (configs/RGBNT201/DeMo_SDTPS_DGAF.yml), both on the generated synthetic dataset at 256x128.
# Variants per model (bench/train_speed.py each; the first WARMUP steps untimed):
#   image-bf16        per-image loader (DATALOADER.NUM_WORKERS workers), bf16 autocast, eager
#   cache-bf16        DATALOADER.CACHE memory + INPUT.AUG_DEVICE model (store and augmentation
#                     on the GPU), bf16, eager
#   cache-fp16        the same in fp16 with the grad scaler (DeMo's precision)
#   cache-bf16-compiled   + MODEL.COMPILE default (compilation in the untimed warm-up)
# Each prints triplets/s and images/s, peak GPU memory, the share of time blocked on the data
# loader, and model FLOP utilisation against an assumed peak of 989 TFLOP/s (H100/H200 SXM dense
# BF16); the image-bf16 run also times one evaluation of the 840-triplet test split (RGBNT201:
# 836).
#
#   bash bench/gpu.sh                                 # from anywhere
#   STEPS=100 VARIANTS="image-bf16 cache-bf16" bash bench/gpu.sh     # knobs below, all optional
#
# Output: the summaries on stdout; bench_gpu.log and train_speed_<model>_<variant>.json under
# $OUT when set, else under ./output/bench_gpu. Installs nothing unless a package is missing;
# then from the local wheel folder ./.whl when it holds wheels (no network needed), else with pip
# from requirements.txt. torch itself is never installed (use the machine's CUDA build).
# To prepare the wheels on a machine with network access:
#   python -m pip download --no-deps -d .whl yacs==0.1.8      (+ timm etc. if also missing)
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
PY=${PYTHON:-python3}
STEPS=${STEPS:-40}               # timed training steps per variant
WARMUP=${WARMUP:-8}              # untimed steps first (compilation included)
MODELS=${MODELS:-"DeMo DeMo_SDTPS_DGAF"}
VARIANTS=${VARIANTS:-"image-bf16 cache-bf16 cache-fp16 cache-bf16-compiled"}
BATCH=${BATCH:-64}               # triplets per step (SOLVER.IMS_PER_BATCH)
INSTANCES=${INSTANCES:-8}        # K of the P x K identity batches
WORKERS=${WORKERS:-8}            # data-loader workers (the RGBNT201 configs use 8)
TRAIN_IDS=${TRAIN_IDS:-141}      # synthetic identities x 28 triplets (RGBNT201: 3,951 triplets)
TEST_IDS=${TEST_IDS:-30}         # x 28 = 840 test triplets (RGBNT201: 836)
DEVICE=${DEVICE:-cuda}           # cpu only to smoke-test this script
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
status=0
set +e
for model in $MODELS; do
    for variant in $VARIANTS; do
        case "$variant" in
            image-*) input=(DATALOADER.CACHE none INPUT.AUG_DEVICE loader) ;;
            cache-*) input=(DATALOADER.CACHE memory INPUT.AUG_DEVICE model) ;;
        esac
        case "$variant" in *fp16*) amp=fp16 ;; *) amp=bf16 ;; esac
        case "$variant" in *compiled) compile=default ;; *) compile='""' ;; esac
        timeeval=""; [ "$variant" = image-bf16 ] && timeeval="--eval"  # the test split, once a model
        say "== $model $variant"
        PYTHONUNBUFFERED=1 "$PY" bench/train_speed.py --steps "$STEPS" --warmup "$WARMUP" \
            --config_file "configs/RGBNT201/$model.yml" \
            --tag "${model}_${variant}" --peak-tflops "$PEAK_TFLOPS" \
            --json "$OUT_DIR/train_speed_${model}_${variant}.json" $timeeval \
            MODEL.DEVICE "$DEVICE" MODEL.PRETRAIN_PATH '""' MODEL.COMPILE "$compile" \
            DATASETS.NAMES Synthetic DATASETS.ROOT_DIR "$DATA_ROOT" DATASETS.GENERATE True \
            DATASETS.SYNTHETIC.HEIGHT 256 DATASETS.SYNTHETIC.WIDTH 128 \
            DATASETS.SYNTHETIC.NUM_TRAIN_IDS "$TRAIN_IDS" DATASETS.SYNTHETIC.NUM_TEST_IDS "$TEST_IDS" \
            DATASETS.SYNTHETIC.SAMPLES_PER_ID 28 \
            DATALOADER.NUM_WORKERS "$WORKERS" DATALOADER.NUM_INSTANCE "$INSTANCES" \
            SOLVER.IMS_PER_BATCH "$BATCH" SOLVER.AMP "$amp" "${input[@]}" \
            OUTPUT_DIR "${TMPDIR:-/tmp}/bench_gpu_run" 2>&1 | tee -a "$LOG"
        [ "${PIPESTATUS[0]}" = 0 ] || status=1
    done
done
set -e
say "bench/gpu.sh: exit status $status after $(( $(date +%s) - start )) s of measurement; log $LOG"
exit "$status"
