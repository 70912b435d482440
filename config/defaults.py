"""Default configuration (yacs). Every key has a one-line comment saying what it does.

The defaults are DeMo's training recipe (its official code for RGBNT201; ``docs/recipe.md``
lists every option where this project deviates, and why).

Use :func:`get_cfg_defaults` to obtain a fresh, mutable copy; never mutate ``_C`` itself.
Experiment files in ``configs/`` override these values, and trailing ``KEY VALUE`` pairs on the
command line override the file.
"""
from yacs.config import CfgNode as CN

import modeling.sdtps as _sdtps
from data.synthetic import DEFAULT_ARGS as _SYNTHETIC_DEFAULTS

_C = CN()

# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------
_C.MODEL = CN()
# Device: "auto" picks CUDA when available, else CPU; or "cpu" / "cuda" / "cuda:1".
_C.MODEL.DEVICE = "auto"
# Registered backbone (modeling.registry.BACKBONE_REGISTRY): "vit", a timm Vision Transformer.
_C.MODEL.BACKBONE_TYPE = "vit"
# timm model name of the ViT backbone shared by the three modalities (OpenAI CLIP uses QuickGELU).
_C.MODEL.BACKBONE = "vit_base_patch16_clip_quickgelu_224"
# Override the backbone depth (number of transformer blocks); 0 keeps the timm default.
_C.MODEL.BACKBONE_DEPTH = 0
# Register tokens (Darcet et al., "Vision Transformers Need Registers", 2024): extra learnable
# tokens the backbone may use as scratch space, so that low-information patches are not taken
# over for global storage. They are dropped from the backbone's output. 0 = none (a pretrained
# backbone without registers, such as CLIP, cannot use them). See docs/sdtps.md.
_C.MODEL.REG_TOKENS = 0
# Local pretrained weights: a timm/torch state dict, or an OpenAI CLIP checkpoint
# (TorchScript archive or state dict with ``visual.*`` keys). Empty: random init (logged).
_C.MODEL.PRETRAIN_PATH = ""
# Project tokens to this width after the final LayerNorm (CLIP's 512-d projection); 0 keeps the
# backbone width (no projection).
_C.MODEL.PROJ_DIM = 512
# Patch-embedding stride (H, W); smaller than the patch size gives overlapping patches.
_C.MODEL.STRIDE_SIZE = [16, 16]
# Stochastic depth rate of the backbone (DeMo: none in the CLIP tower).
_C.MODEL.DROP_PATH = 0.0
# Resampling of pretrained position embeddings to the patch grid: "bilinear" (DeMo: plain
# bilinear, no antialias) or "bicubic" (timm's default: bicubic with antialias).
_C.MODEL.POS_EMBED_RESIZE = "bilinear"
# torch.compile the training model: "" (off, eager), or a compile mode ("default",
# "reduce-overhead", "max-autotune"). The first steps are slow while it compiles; evaluation
# and checkpoints use the eager module (the same weights).
_C.MODEL.COMPILE = ""
# Add a learnable camera embedding (SIE) to the CLS token.
_C.MODEL.SIE_CAMERA = True
# Coefficient of the camera embedding.
_C.MODEL.SIE_COE = 1.0
# The training objectives (modeling.losses.LOSS_REGISTRY), summed: "reid" (the ID and triplet
# losses below on every head), or ones registered by a module listed in IMPORTS.
_C.MODEL.LOSSES = ["reid"]
# Weight of the label-smoothed identity (cross-entropy) loss of every head.
_C.MODEL.ID_LOSS_WEIGHT = 0.25
# Weight of the batch-hard triplet loss of every head.
_C.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
# Label smoothing epsilon of the identity loss (0 disables smoothing).
_C.MODEL.LABEL_SMOOTH = 0.1
# Triplet margin (ignored when TRIPLET_SOFT_MARGIN is true).
_C.MODEL.TRIPLET_MARGIN = 0.3
# Use the soft-margin triplet loss log(1 + exp(d_ap - d_an)).
_C.MODEL.TRIPLET_SOFT_MARGIN = True
# DeMo's direct head: one head on the concatenated globals (True) or one head per modality
# (False, as DeMo does for vehicles).
_C.MODEL.DIRECT = True
# Strict loading of TEST.WEIGHT / resume checkpoints: mismatched keys are an error.
_C.MODEL.LOAD_STRICT = True
# Convert BatchNorm layers to SyncBatchNorm under DDP.
_C.MODEL.SYNC_BN = False

# DeMo's PIFE: per modality concat(CLS, mean patch) -> LayerNorm -> Linear(2C->C) -> QuickGELU.
_C.MODEL.PIFE = CN()
# Enable PIFE.
_C.MODEL.PIFE.ENABLED = False

# DeMo's HDM: seven learnable queries decouple modality-specific and shared features.
_C.MODEL.HDM = CN()
# Enable HDM.
_C.MODEL.HDM.ENABLED = False
# Attention heads of each HDM query's multi-head attention.
_C.MODEL.HDM.NUM_HEADS = 8

# DeMo's ATMoE: attention-triggered mixture of experts over the seven HDM features.
_C.MODEL.ATMOE = CN()
# Enable ATMoE (requires HDM).
_C.MODEL.ATMOE.ENABLED = False
# Gate heads (DeMo: 4 for RGBNT201, 8 for vehicles).
_C.MODEL.ATMOE.HEADS = 4

# Token selection (modeling.registry.SELECTION_REGISTRY): "none" keeps every patch; "sdtps"
# (options under MODEL.SDTPS); or one registered by a module listed in IMPORTS.
_C.MODEL.SELECTION = CN()
# Registered name of the token selection.
_C.MODEL.SELECTION.NAME = "none"

# Fusion of the (selected) patches into the "fused" head (modeling.registry.FUSION_REGISTRY):
# "none" (no fused head; needs MODEL.SELECTION.NAME none), "mean", "dgaf" (options under
# MODEL.DGAF), or one registered by a module listed in IMPORTS.
_C.MODEL.FUSION = CN()
# Registered name of the fusion.
_C.MODEL.FUSION.NAME = "none"
# Weight of the fused head's ID + triplet losses.
_C.MODEL.FUSION.LOSS_WEIGHT = 1.0

# SDTPS token selection (cosine-gated cross-modal attention, top-K patches per modality).
_C.MODEL.SDTPS = CN()
# Share of patches kept: K = max(1, ceil(N * SPARSE_RATIO)).
_C.MODEL.SDTPS.SPARSE_RATIO = 0.7
# Attention heads of each cross-modal scorer.
_C.MODEL.SDTPS.NUM_HEADS = 4
# Initial per-head gate scale (gate logit = cos * scale + bias). CLI: --init_scale.
_C.MODEL.SDTPS.GATE_INIT_SCALE = _sdtps.GATE_INIT_SCALE
# Initial per-head gate bias. CLI: --init_bias.
_C.MODEL.SDTPS.GATE_INIT_BIAS = _sdtps.GATE_INIT_BIAS
# Gate normalisation before the sigmoid (docs/sdtps.md): "none"; "patches" (standardise the cosines
# over the N patches of each sample, before the per-head affine); "heads" (the prototype's
# LayerNorm of the gate logits across the H heads, after the affine). False/True mean none/patches.
_C.MODEL.SDTPS.GATE_NORM = "none"
# Renormalise gated attention to sum to 1 over patches.
_C.MODEL.SDTPS.RENORM_ATTN = False
# How the three guides' scores combine: "mean" or "learned" (softmax weights).
_C.MODEL.SDTPS.SCORE_COMBINE = "mean"

# DGAF dual-gated adaptive fusion of the selected tokens.
_C.MODEL.DGAF = CN()
# Heads of the shared attention pooling.
_C.MODEL.DGAF.NUM_HEADS = 8
# Temperature of the entropy gate.
_C.MODEL.DGAF.TAU = 1.0
# Initial mixing weight alpha between entropy and importance gates (exact at init).
_C.MODEL.DGAF.INIT_ALPHA = 0.5

# ---------------------------------------------------------------------------------------------
# Input
# ---------------------------------------------------------------------------------------------
_C.INPUT = CN()
# Training input size (H, W).
_C.INPUT.SIZE_TRAIN = [256, 128]
# Test input size (H, W).
_C.INPUT.SIZE_TEST = [256, 128]
# Probability of a horizontal flip.
_C.INPUT.FLIP_PROB = 0.5
# Zero padding (pixels) before the random crop; 0 disables pad+crop.
_C.INPUT.PADDING = 10
# Probability of random erasing (timm's RandomErasing: one box, per-pixel N(0, 1) values).
_C.INPUT.RE_PROB = 0.5
# Range of the erased area as a share of the image (DeMo: [0.02, 1/3]).
_C.INPUT.RE_AREA = [0.02, 1.0 / 3.0]
# Resampling of the training resize: "bicubic" (DeMo) or "bilinear". Test images: bilinear.
_C.INPUT.TRAIN_INTERPOLATION = "bicubic"
# Normalisation mean (DeMo: 0.5; CLIP's own is [0.48145466, 0.4578275, 0.40821073]).
_C.INPUT.PIXEL_MEAN = [0.5, 0.5, 0.5]
# Normalisation std (DeMo: 0.5; CLIP's own is [0.26862954, 0.26130258, 0.27577711]).
_C.INPUT.PIXEL_STD = [0.5, 0.5, 0.5]
# True: one flip/crop draw per sample, shared by its three modalities (keeps them pixel-aligned);
# False: each modality draws its own (DeMo). Random erasing is always drawn per modality.
_C.INPUT.SYNC_MODALITY_AUG = False
# Where the training augmentation runs: "loader" (per image in the loader workers, or per batch in
# the loader with DATALOADER.CACHE memory) or "model" (per batch on the training device, after
# the uint8 batch is transferred). Same distribution either way (docs/input_pipeline.md).
_C.INPUT.AUG_DEVICE = "loader"

# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------
_C.DATASETS = CN()
# Registered dataset (data.datasets.DATASET_REGISTRY): "RGBNT201", "RGBNT100", "MSVR310",
# "Synthetic", or one registered by a module listed in IMPORTS.
_C.DATASETS.NAMES = "RGBNT201"
# Folder holding the dataset folders (see README for the expected layouts).
_C.DATASETS.ROOT_DIR = "./datasets"
# Identities carved from the training set as a validation split for best-checkpoint selection.
_C.DATASETS.VAL_IDS = 0

# Generate the synthetic dataset under ROOT_DIR when it is absent or was generated with other
# DATASETS.SYNTHETIC arguments. False (the default): that is an error, so that a mistyped ROOT_DIR
# does not silently generate a new dataset there (the synthetic configs set it).
_C.DATASETS.GENERATE = False
# The synthetic tri-modal dataset, generated under ROOT_DIR in RGBNT201's layout.
# Keys: the generator's arguments, upper-cased (defaults: data.synthetic.DEFAULT_ARGS).
_C.DATASETS.SYNTHETIC = CN({key.upper(): value for key, value in _SYNTHETIC_DEFAULTS.items()})

# ---------------------------------------------------------------------------------------------
# Data loader
# ---------------------------------------------------------------------------------------------
_C.DATALOADER = CN()
# Worker processes per data loader (0 loads in the main process).
_C.DATALOADER.NUM_WORKERS = 4
# Instances per identity in a training batch (K of P x K).
_C.DATALOADER.NUM_INSTANCE = 8
# Skip unreadable images (counted and logged) instead of failing.
_C.DATALOADER.SKIP_BAD_IMAGES = False
# Training images: "none" (read and decode every image at every epoch) or "memory" (decode and
# resize the training split once into a uint8 store in host memory; N x 3 x 3 x H x W bytes,
# checked against the available memory; see docs/input_pipeline.md).
_C.DATALOADER.CACHE = "none"

# ---------------------------------------------------------------------------------------------
# Solver
# ---------------------------------------------------------------------------------------------
_C.SOLVER = CN()
# Optimizer: "Adam", "AdamW" or "SGD".
_C.SOLVER.OPTIMIZER = "Adam"
# Learning rate of the parameters outside the backbone tower (the camera embedding included).
_C.SOLVER.BASE_LR = 3.5e-4
# Learning rate of the backbone tower's parameters.
_C.SOLVER.BACKBONE_LR = 5e-6
# Learning-rate multiplier of bias parameters.
_C.SOLVER.BIAS_LR_FACTOR = 2.0
# Which parameters are biases (solver/build.py): "demo" (names containing "bias", outside the
# tower; the tower keeps BACKBONE_LR) or "ndim" (every 1-d parameter, in the tower too).
_C.SOLVER.PARAM_GROUPS = "demo"
# Weight decay of weights.
_C.SOLVER.WEIGHT_DECAY = 1e-4
# Weight decay of biases.
_C.SOLVER.WEIGHT_DECAY_BIAS = 1e-4
# SGD momentum.
_C.SOLVER.MOMENTUM = 0.9
# Training epochs.
_C.SOLVER.MAX_EPOCHS = 50
# Schedule (timm's CosineLRScheduler, set before each epoch numbered from 1; solver/build.py):
# linear warm-up over epochs 1..WARMUP_EPOCHS-1, then cosine decay.
_C.SOLVER.WARMUP_EPOCHS = 10
# The warm-up starts at WARMUP_FACTOR x BASE_LR (DeMo: 0.1, the same absolute value for every group).
_C.SOLVER.WARMUP_FACTOR = 0.1
# The cosine ends at MIN_LR_FACTOR x BASE_LR (DeMo: 0.001, absolute for every group).
_C.SOLVER.MIN_LR_FACTOR = 0.001
# Scale the warm-up start and the floor by each group's lr / BASE_LR (False: DeMo's absolute values).
_C.SOLVER.SCHEDULE_RELATIVE = False
# Start the cosine after the warm-up (False: DeMo's, cosine over epoch / MAX_EPOCHS from epoch 1).
_C.SOLVER.WARMUP_PREFIX = False
# Schedule position t of the first epoch (epoch e runs at t = e - 1 + SCHEDULE_START). DeMo: 1,
# so the warm-up's start value is never used; 0: the first epoch runs at WARMUP_FACTOR x lr.
_C.SOLVER.SCHEDULE_START = 1
# Per-epoch lr noise: lr x (1 + n), n ~ N(0, LR_NOISE_STD) redrawn until |n| < LR_NOISE (0 = off).
_C.SOLVER.LR_NOISE = 0.67
# Standard deviation of the lr noise.
_C.SOLVER.LR_NOISE_STD = 1.0
# Seed of the lr noise (epoch e draws with seed LR_NOISE_SEED + e).
_C.SOLVER.LR_NOISE_SEED = 42
# Images (triplets) per training batch, P x K.
_C.SOLVER.IMS_PER_BATCH = 64
# Evaluate every N epochs (and after the last epoch).
_C.SOLVER.EVAL_PERIOD = 1
# Write a checkpoint every N epochs (and after the last epoch).
_C.SOLVER.CHECKPOINT_PERIOD = 1
# Keep the newest N epoch checkpoints (best and last are kept separately).
_C.SOLVER.KEEP_LAST = 2
# Log every N iterations.
_C.SOLVER.LOG_PERIOD = 10
# Seed of python, numpy, torch and data-loader workers.
_C.SOLVER.SEED = 1111
# Deterministic algorithms (bit-reproducible on CPU; slower on CUDA).
_C.SOLVER.DETERMINISTIC = False
# Mixed precision of training: "off", "fp16" (DeMo; autocast + grad scaler on CUDA, fp32 on CPU
# with a log line) or "bf16" (CPU and CUDA).
_C.SOLVER.AMP = "fp16"
# Stop after this many consecutive non-finite losses (each such step is skipped).
_C.SOLVER.MAX_NONFINITE = 5
# Clip the gradient norm to this value (0 disables).
_C.SOLVER.GRAD_CLIP = 0.0

# ---------------------------------------------------------------------------------------------
# Test
# ---------------------------------------------------------------------------------------------
_C.TEST = CN()
# Images per evaluation batch.
_C.TEST.IMS_PER_BATCH = 128
# Checkpoint evaluated by test_net.py.
_C.TEST.WEIGHT = ""
# Retrieval feature (modeling.heads.RETRIEVAL_FEATURES): "ori", "fused", "hdm", "moe", "ori+moe"
# or "concat" (every head the model has: ori, then hdm or moe, then fused).
_C.TEST.FEAT = "ori"
# Normalisation of a concatenated feature: "once" (DeMo: raw parts concatenated, the whole
# L2-normalised by the distance) or "per_part" (each part L2-normalised before concatenating).
_C.TEST.FEAT_NORM = "once"
# Further retrieval features scored and logged beside TEST.FEAT at every evaluation (same pass).
_C.TEST.REPORT_FEATS = []
# Precision of feature extraction: "off" (DeMo: fp32), "fp16" (CUDA) or "bf16".
_C.TEST.AMP = "off"
# BNNeck feature used at test: "before" or "after" the BN layer.
_C.TEST.NECK_FEAT = "before"
# Distance: "euclidean" (DeMo) or "cosine", both on L2-normalised features (same ranking).
_C.TEST.DIST = "euclidean"
# Missing modality at test time: none, r, n, t, rn, rt, nt, or all (test_net.py table), or
# matrix (test_net.py: every query subset against every gallery subset, 7 x 7, and a heat map).
_C.TEST.MISS = "none"
# Missing modality of the queries only ("" = as TEST.MISS), e.g. RGB-only queries against a
# full gallery: TEST.QUERY_MISS nt. Every evaluation (training too) uses it.
_C.TEST.QUERY_MISS = ""
# Missing modality of the gallery only ("" = as TEST.MISS); the gallery gets a second pass.
_C.TEST.GALLERY_MISS = ""
# Average features of the image and its horizontal flip.
_C.TEST.FLIP = False
# Write features, pids, camids and paths per split to this .npz file (test_net.py).
_C.TEST.EXPORT = ""
# Evaluators run at every evaluation (engine.evaluator.EVALUATOR_REGISTRY): "reid" (retrieval
# metrics), "foreground" (share of kept patches on the person: datasets with masks and a model
# with a token selection; otherwise it reports nothing).
_C.TEST.EVALUATORS = ["reid", "foreground"]

# k-reciprocal re-ranking.
_C.TEST.RERANK = CN()
# Enable re-ranking.
_C.TEST.RERANK.ENABLED = False
# k1 of k-reciprocal re-ranking.
_C.TEST.RERANK.K1 = 20
# k2 of k-reciprocal re-ranking.
_C.TEST.RERANK.K2 = 6
# lambda of k-reciprocal re-ranking (weight of the original distance).
_C.TEST.RERANK.LAMBDA = 0.3

# ---------------------------------------------------------------------------------------------
# Misc
# ---------------------------------------------------------------------------------------------
# Output folder: logs, config.yaml, checkpoints, TensorBoard events.
_C.OUTPUT_DIR = "./output"
# Python modules (dotted names) or .py files (relative to the working directory, else to the
# config file) imported before the config is validated, so that the datasets, backbones,
# selection / fusion modules, losses, retrieval features and evaluators they register can be
# named in this config (docs/extending.md).
_C.IMPORTS = []


def get_cfg_defaults() -> CN:
    """Return a fresh, mutable copy of the defaults."""
    return _C.clone()
