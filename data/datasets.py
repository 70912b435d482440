"""Tri-modal re-identification datasets: RGBNT201, RGBNT100, MSVR310 and a generated Synthetic set.

Every dataset yields three lists of :class:`Sample` (``train``, ``query``, ``gallery``).  A sample
holds the paths of its RGB, NI and TI images (or, for RGBNT100, one file holding the three side by
side), its identity and its 0-based camera.  Train identities are relabelled ``0..n-1`` (in
increasing order of the original id); query and gallery keep the original ids.

Loading checks that every modality file of every sample exists and raises
:class:`DatasetLayoutError` (expected layout, the first missing paths, and how to fall back to the
synthetic dataset) otherwise.  Listings are sorted, so the sample order is deterministic.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Set, Tuple

import numpy as np
from PIL import Image

from utils.registry import Registry

from . import synthetic as _synthetic

__all__ = [
    "Sample",
    "DatasetLayoutError",
    "BadImageError",
    "ReIDDataset",
    "RGBNT201",
    "RGBNT100",
    "MSVR310",
    "Synthetic",
    "DATASET_REGISTRY",
    "build_dataset",
    "read_image",
    "read_triplet",
    "to_rgb8",
]

_SYNTHETIC_HINT = (
    "To run without the real data, use the generated synthetic dataset instead: set "
    "`DATASETS.NAMES Synthetic` (it is generated on first use under DATASETS.ROOT_DIR), e.g. "
    "`python train_net.py --config_file configs/Synthetic/quickstart.yml`."
)
_MAX_LISTED_MISSING = 5

# Dataset classes by the name ``DATASETS.NAMES`` selects: ``@DATASET_REGISTRY.register()``.
DATASET_REGISTRY = Registry("dataset")


@dataclass(frozen=True)
class Sample:
    """One image triplet."""

    paths: Tuple[str, ...]  # (rgb, ni, ti) files; or (one_file,) holding RGB|NI|TI side by side
    pid: int                # identity; relabelled 0..n-1 in the train split, original elsewhere
    camid: int              # 0-based camera
    sceneid: int = -1       # MSVR310 scene id, -1 elsewhere
    mask_path: str = ""     # synthetic foreground mask (PNG, same HxW as the images), "" elsewhere


class DatasetLayoutError(FileNotFoundError):
    """The dataset folder, a split folder or some modality files are missing."""


class BadImageError(OSError):
    """An image file exists but cannot be decoded (corrupt or truncated)."""


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------
def _sorted_entries(folder: str, want_dirs: bool) -> List[str]:
    """Sorted names of the files (or sub-folders) of ``folder``."""
    names = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith("."):
                continue
            if want_dirs and entry.is_dir():
                names.append(entry.name)
            elif not want_dirs and entry.is_file():
                names.append(entry.name)
    return sorted(names)


def _file_names(folder: str) -> Set[str]:
    with os.scandir(folder) as it:
        return {entry.name for entry in it if entry.is_file()}


def _is_jpg(name: str) -> bool:
    return name.lower().endswith(".jpg")


def is_image_file(name: str) -> bool:
    """Whether a file name has an image extension (jpg, jpeg, png, bmp)."""
    return name.lower().endswith((".jpg", ".jpeg", ".png", ".bmp"))


def _layout_error(dataset: str, root: str, layout: str, missing: Sequence[str]) -> DatasetLayoutError:
    shown = "\n".join(f"  {p}" for p in missing[:_MAX_LISTED_MISSING])
    more = len(missing) - _MAX_LISTED_MISSING
    extra = f"\n  ... and {more} more" if more > 0 else ""
    message = (
        f"{dataset}: the dataset under {root!r} is missing or incomplete; {len(missing)} expected "
        f"path(s) missing:\n{shown}{extra}\n"
        f"Expected layout under DATASETS.ROOT_DIR:\n{layout}\n{_SYNTHETIC_HINT}"
    )
    err = DatasetLayoutError(message)
    err.missing = list(missing)  # all missing paths, for programmatic use
    return err


def relabel(samples: List[Sample]) -> List[Sample]:
    """Map original ids to 0..n-1 in increasing order of the original id."""
    mapping = {pid: label for label, pid in enumerate(sorted({s.pid for s in samples}))}
    return [dataclasses.replace(s, pid=mapping[s.pid]) for s in samples]


# ---------------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------------
class ReIDDataset:
    """Train / query / gallery lists of :class:`Sample`.

    It can also be built directly from lists (e.g. after carving a validation split):
    ``ReIDDataset(train, query, gallery, name="custom")``.

    A registered subclass is built from the config by :meth:`from_config` (default:
    ``cls(DATASETS.ROOT_DIR)``); ``TRAIN_SIZE`` = (training identities, cameras) as published,
    for sizing a model without reading the data (``tools/model_size.py``).
    """

    name = "ReIDDataset"
    uses_scenes = False
    TRAIN_SIZE: Optional[Tuple[int, int]] = None
    OPTIONS: Tuple[str, ...] = ()  # keyword arguments of __init__ after ``root``

    @classmethod
    def from_config(cls, cfg) -> "ReIDDataset":
        return cls(cfg.DATASETS.ROOT_DIR)

    @classmethod
    def train_size(cls, cfg) -> Tuple[int, int]:
        """(classes, cameras) a model trained on this dataset with ``cfg`` has, without reading
        the data (the training identities less ``DATASETS.VAL_IDS``)."""
        if cls.TRAIN_SIZE is None:
            raise ValueError(f"dataset {cls.name} does not declare TRAIN_SIZE (training identities, "
                             "cameras): pass the sizes explicitly")
        ids, cams = cls.TRAIN_SIZE
        return ids - cfg.DATASETS.VAL_IDS, cams

    def __init__(self, train: Sequence[Sample], query: Sequence[Sample],
                 gallery: Sequence[Sample], name: Optional[str] = None,
                 uses_scenes: Optional[bool] = None, dataset_dir: str = "") -> None:
        if name is not None:
            self.name = name
        if uses_scenes is not None:
            self.uses_scenes = bool(uses_scenes)
        self.dataset_dir = dataset_dir
        self.train: List[Sample] = list(train)
        self.query: List[Sample] = list(query)
        self.gallery: List[Sample] = list(gallery)
        self.num_train_pids = len({s.pid for s in self.train})
        cams = [s.camid for s in self.train + self.query + self.gallery]
        # Camera-embedding tables are indexed by camid, so count up to the largest one.
        self.num_cams = max(cams) + 1 if cams else 0

    def statistics_table(self) -> str:
        """A small text table: split | ids | triplets | cameras (and scenes when used)."""
        header = ["split", "ids", "triplets", "cameras"]
        if self.uses_scenes:
            header.append("scenes")
        rows = []
        for split, samples in (("train", self.train), ("query", self.query),
                               ("gallery", self.gallery)):
            row = [split, len({s.pid for s in samples}), len(samples),
                   len({s.camid for s in samples})]
            if self.uses_scenes:
                row.append(len({s.sceneid for s in samples}))
            rows.append(row)
        widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]

        def fmt(cells) -> str:
            first = str(cells[0]).ljust(widths[0])
            rest = [str(c).rjust(w) for c, w in zip(cells[1:], widths[1:])]
            return " | ".join([first] + rest)

        rule = "-+-".join("-" * w for w in widths)
        lines = [f"Dataset {self.name} statistics:", fmt(header), rule]
        lines += [fmt(r) for r in rows]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, train={len(self.train)}, "
                f"query={len(self.query)}, gallery={len(self.gallery)}, "
                f"num_train_pids={self.num_train_pids}, num_cams={self.num_cams})")


def _check_split_folders(dataset: str, root: str, folder: str, splits, layout: str) -> str:
    """``root/folder`` and its split sub-folders must exist; returns ``root/folder``."""
    dataset_dir = os.path.join(root, folder)
    if not os.path.isdir(dataset_dir):
        raise _layout_error(dataset, root, layout, [dataset_dir])
    missing = [os.path.join(dataset_dir, f) for _, f in splits
               if not os.path.isdir(os.path.join(dataset_dir, f))]
    if missing:
        raise _layout_error(dataset, root, layout, missing)
    return dataset_dir


def _check_nonempty(dataset: str, split: str, samples: List[Sample], folder: str) -> None:
    if not samples:
        raise ValueError(f"{dataset}: the {split} split is empty: no images found in {folder!r}")


# ---------------------------------------------------------------------------------------------
# RGBNT201 (and the Synthetic set, which shares its layout)
# ---------------------------------------------------------------------------------------------
@DATASET_REGISTRY.register()
class RGBNT201(ReIDDataset):
    """RGBNT201 persons: ``root/RGBNT201/{train_171,test}/{RGB,NI,TI}/*.jpg``.

    NI and TI files share the RGB file's name.  pid = int of the first 6 characters of the first
    ``_`` field, camera from the second field (``cam3`` -> 2, 0-based).  The test folder is both
    query and gallery.
    """

    name = "RGBNT201"
    TRAIN_SIZE = (171, 4)
    folder = "RGBNT201"
    modalities = ("RGB", "NI", "TI")
    train_folder = "train_171"
    test_folder = "test"

    def __init__(self, root: str) -> None:
        self.root = root
        dataset_dir = os.path.join(root, self.folder)
        missing = self._missing_folders(dataset_dir)
        if missing:
            raise _layout_error(self.name, root, self.expected_layout(), missing)
        train, missing_train = self._load_split(dataset_dir, self.train_folder)
        test, missing_test = self._load_split(dataset_dir, self.test_folder)
        missing = missing_train + missing_test
        if missing:
            raise _layout_error(self.name, root, self.expected_layout(), missing)
        _check_nonempty(self.name, "train", train,
                        os.path.join(dataset_dir, self.train_folder, self.modalities[0]))
        _check_nonempty(self.name, "query/gallery (test)", test,
                        os.path.join(dataset_dir, self.test_folder, self.modalities[0]))
        super().__init__(relabel(train), test, list(test), dataset_dir=dataset_dir)

    @classmethod
    def expected_layout(cls) -> str:
        f = cls.folder
        mods = ",".join(cls.modalities)
        return (f"  {f}/{cls.train_folder}/{{{mods}}}/*.jpg   (NI and TI named as the RGB file, "
                f"e.g. 000001_cam1_0_00.jpg)\n"
                f"  {f}/{cls.test_folder}/{{{mods}}}/*.jpg   (used as both query and gallery)")

    def _missing_folders(self, dataset_dir: str) -> List[str]:
        if not os.path.isdir(dataset_dir):
            return [dataset_dir]
        missing = []
        for split in (self.train_folder, self.test_folder):
            for modality in self.modalities:
                path = os.path.join(dataset_dir, split, modality)
                if not os.path.isdir(path):
                    missing.append(path)
        return missing

    @staticmethod
    def parse_name(name: str) -> Tuple[int, int]:
        """(pid, 0-based camid) of an RGBNT201 file name such as ``000123_cam3_2_05.jpg``."""
        fields = os.path.splitext(name)[0].split("_")
        try:
            if len(fields) < 2 or not fields[1].startswith("cam"):
                raise ValueError
            pid = int(fields[0][:6])
            cam = int(fields[1][3:])
        except ValueError:
            raise ValueError(f"cannot parse pid/camera from RGBNT201 file name {name!r} "
                             f"(expected e.g. 000123_cam3_2_05.jpg)") from None
        if cam < 1:
            raise ValueError(f"camera number must start at 1 in {name!r}")
        return pid, cam - 1

    def _extra_fields(self, dataset_dir: str, split: str, name: str) -> Dict[str, str]:
        """Additional :class:`Sample` fields (the Synthetic set adds its masks)."""
        return {}

    def _extra_paths(self, sample: Sample) -> Iterable[str]:
        """Further files that must exist for a sample besides its images."""
        return ()

    def _load_split(self, dataset_dir: str, split: str) -> Tuple[List[Sample], List[str]]:
        split_dir = os.path.join(dataset_dir, split)
        first, others = self.modalities[0], self.modalities[1:]
        present = {m: _file_names(os.path.join(split_dir, m)) for m in others}
        samples: List[Sample] = []
        missing: List[str] = []
        for name in _sorted_entries(os.path.join(split_dir, first), want_dirs=False):
            if not _is_jpg(name):
                continue
            pid, camid = self.parse_name(name)
            paths = (os.path.join(split_dir, first, name),) + tuple(
                os.path.join(split_dir, m, name) for m in others)
            for m, path in zip(others, paths[1:]):
                if name not in present[m]:
                    missing.append(path)
            sample = Sample(paths=paths, pid=pid, camid=camid,
                            **self._extra_fields(dataset_dir, split, name))
            missing.extend(p for p in self._extra_paths(sample) if not os.path.isfile(p))
            samples.append(sample)
        return samples, missing


@DATASET_REGISTRY.register()
class Synthetic(RGBNT201):
    """The generated tri-modal set, in RGBNT201's layout under ``root/Synthetic``.

    It is generated on first use, and again whenever ``meta.json`` is absent or was written with
    other arguments (``generator_args``: see :func:`data.synthetic.synthetic_args`, whose
    defaults are the config's).  Samples carry the path of their foreground mask.
    """

    name = "Synthetic"
    folder = "Synthetic"
    train_folder = _synthetic.SPLIT_FOLDERS[0]
    test_folder = _synthetic.SPLIT_FOLDERS[1]
    OPTIONS = tuple(_synthetic.DEFAULT_ARGS)

    def __init__(self, root: str, **generator_args) -> None:
        self.generator_args = _synthetic.synthetic_args(**generator_args)
        _synthetic.ensure_synthetic(os.path.join(root, self.folder), **self.generator_args)
        super().__init__(root)

    @staticmethod
    def config_args(cfg) -> Dict[str, int]:
        """Generator arguments from ``DATASETS.SYNTHETIC``."""
        return {key.lower(): value for key, value in cfg.DATASETS.SYNTHETIC.items()}

    @classmethod
    def from_config(cls, cfg) -> "Synthetic":
        """Load it from DATASETS.ROOT_DIR; generate it there only with DATASETS.GENERATE True."""
        root, args = cfg.DATASETS.ROOT_DIR, cls.config_args(cfg)
        folder = os.path.join(root, cls.folder)
        if not cfg.DATASETS.GENERATE and not _synthetic.is_complete(folder, **args):
            meta = _synthetic.read_meta(folder)
            if meta is None:
                raise DatasetLayoutError(
                    f"Synthetic: no generated dataset in {folder} (DATASETS.ROOT_DIR {root!r}): point "
                    "DATASETS.ROOT_DIR at the folder that holds Synthetic/, or set DATASETS.GENERATE "
                    "True to generate it there (about 30 MB)")
            wanted = _synthetic.synthetic_args(**args)
            differ = {k: (v, wanted[k]) for k, v in (meta.get("args") or {}).items()
                      if wanted.get(k) != v}
            listed = ", ".join(f"{k.upper()} {old} (config: {new})" for k, (old, new) in differ.items())
            raise DatasetLayoutError(
                f"Synthetic: {folder} was generated with other arguments ({listed or 'another version'}): "
                "set DATASETS.SYNTHETIC to match, or DATASETS.GENERATE True to regenerate it")
        return cls(root, **args)

    @classmethod
    def train_size(cls, cfg) -> Tuple[int, int]:
        args = _synthetic.synthetic_args(**cls.config_args(cfg))
        return args["num_train_ids"] - cfg.DATASETS.VAL_IDS, args["num_cams"]

    @classmethod
    def expected_layout(cls) -> str:
        return (super().expected_layout() +
                f"\n  {cls.folder}/{_synthetic.MASK_FOLDER}/{{{cls.train_folder},"
                f"{cls.test_folder}}}/<stem>.png   (foreground masks)\n"
                f"  {cls.folder}/{_synthetic.META_NAME}   (completion marker; delete it to "
                f"regenerate)")

    def _extra_fields(self, dataset_dir: str, split: str, name: str) -> Dict[str, str]:
        stem = os.path.splitext(name)[0]
        return {"mask_path": os.path.join(dataset_dir, _synthetic.MASK_FOLDER, split,
                                          stem + ".png")}

    def _extra_paths(self, sample: Sample) -> Iterable[str]:
        return (sample.mask_path,)


# ---------------------------------------------------------------------------------------------
# RGBNT100
# ---------------------------------------------------------------------------------------------
@DATASET_REGISTRY.register()
class RGBNT100(ReIDDataset):
    """RGBNT100 vehicles: ``root/RGBNT100/rgbir/{bounding_box_train,query,bounding_box_test}``.

    Each jpg holds RGB | NI | TI side by side (x 0-256, 256-512, 512-768); pid and camera come
    from the regex ``([-\\d]+)_c([-\\d]+)`` (cameras 1..8, made 0-based).  Images with pid -1
    (junk, as in Market-1501-style sets) are skipped.
    """

    name = "RGBNT100"
    TRAIN_SIZE = (50, 8)
    folder = os.path.join("RGBNT100", "rgbir")
    splits = (("train", "bounding_box_train"), ("query", "query"),
              ("gallery", "bounding_box_test"))
    _pattern = re.compile(r"([-\d]+)_c([-\d]+)")

    def __init__(self, root: str) -> None:
        self.root = root
        dataset_dir = _check_split_folders(self.name, root, self.folder, self.splits,
                                           self.expected_layout())
        loaded = {}
        for split, sub in self.splits:
            folder = os.path.join(dataset_dir, sub)
            loaded[split] = self._load_split(folder)
            _check_nonempty(self.name, split, loaded[split], folder)
        super().__init__(relabel(loaded["train"]), loaded["query"], loaded["gallery"],
                         dataset_dir=dataset_dir)

    @classmethod
    def expected_layout(cls) -> str:
        return ("  RGBNT100/rgbir/{bounding_box_train,query,bounding_box_test}/*.jpg   "
                "(each jpg is RGB|NI|TI side by side, 768x128; names like 0001_c003_....jpg)")

    @classmethod
    def parse_name(cls, name: str) -> Tuple[int, int]:
        """(pid, 0-based camid) parsed with the regex ``([-\\d]+)_c([-\\d]+)``."""
        match = cls._pattern.search(name)
        if match is None:
            raise ValueError(f"cannot parse pid/camera from RGBNT100 file name {name!r} "
                             f"(expected <pid>_c<cam>..., e.g. 0001_c003_00000001.jpg)")
        return int(match.group(1)), int(match.group(2)) - 1

    def _load_split(self, folder: str) -> List[Sample]:
        samples = []
        for name in _sorted_entries(folder, want_dirs=False):
            if not _is_jpg(name):
                continue
            pid, camid = self.parse_name(name)
            if pid == -1:
                continue
            samples.append(Sample(paths=(os.path.join(folder, name),), pid=pid, camid=camid))
        return samples


# ---------------------------------------------------------------------------------------------
# MSVR310
# ---------------------------------------------------------------------------------------------
@DATASET_REGISTRY.register()
class MSVR310(ReIDDataset):
    """MSVR310 vehicles: ``root/MSVR310/{bounding_box_train,query3,bounding_box_test}/<vid>/
    {vis,ni,th}/<img>``.

    NI and TH files share the vis file's name; vid = int(name[0:4]), scene = int(name[6:9]),
    cam = int(name[11]) (already 0-based, 0..7).
    """

    name = "MSVR310"
    TRAIN_SIZE = (155, 8)
    folder = "MSVR310"
    uses_scenes = True
    modalities = ("vis", "ni", "th")
    splits = (("train", "bounding_box_train"), ("query", "query3"),
              ("gallery", "bounding_box_test"))

    def __init__(self, root: str) -> None:
        self.root = root
        layout = self.expected_layout()
        dataset_dir = _check_split_folders(self.name, root, self.folder, self.splits, layout)
        loaded, missing = {}, []
        for split, sub in self.splits:
            samples, split_missing = self._load_split(os.path.join(dataset_dir, sub))
            loaded[split] = samples
            missing += split_missing
        if missing:
            raise _layout_error(self.name, root, layout, missing)
        for split, sub in self.splits:
            _check_nonempty(self.name, split, loaded[split], os.path.join(dataset_dir, sub))
        super().__init__(relabel(loaded["train"]), loaded["query"], loaded["gallery"],
                         dataset_dir=dataset_dir)

    @classmethod
    def expected_layout(cls) -> str:
        return ("  MSVR310/{bounding_box_train,query3,bounding_box_test}/<vid>/{vis,ni,th}/<img>"
                "   (ni and th named as the vis file; name[0:4] = vehicle id, name[6:9] = scene, "
                "name[11] = camera 0..7)")

    @staticmethod
    def parse_name(name: str) -> Tuple[int, int, int]:
        """(vid, sceneid, camid) from ``name[0:4]``, ``name[6:9]`` and ``name[11]``."""
        try:
            if len(name) < 12:
                raise ValueError
            return int(name[0:4]), int(name[6:9]), int(name[11])
        except ValueError:
            raise ValueError(f"cannot parse vehicle/scene/camera from MSVR310 file name {name!r} "
                             f"(expected e.g. 0001_s001_v1_000.jpg: name[0:4] vid, name[6:9] "
                             f"scene, name[11] camera)") from None

    def _load_split(self, split_dir: str) -> Tuple[List[Sample], List[str]]:
        samples: List[Sample] = []
        missing: List[str] = []
        first, others = self.modalities[0], self.modalities[1:]
        for vid in _sorted_entries(split_dir, want_dirs=True):
            vid_dir = os.path.join(split_dir, vid)
            dirs = {m: os.path.join(vid_dir, m) for m in self.modalities}
            absent = [d for d in dirs.values() if not os.path.isdir(d)]
            if absent:
                missing.extend(absent)
                continue
            present = {m: _file_names(dirs[m]) for m in others}
            for name in _sorted_entries(dirs[first], want_dirs=False):
                if not is_image_file(name):
                    continue
                pid, sceneid, camid = self.parse_name(name)
                paths = tuple(os.path.join(dirs[m], name) for m in self.modalities)
                for m, path in zip(others, paths[1:]):
                    if name not in present[m]:
                        missing.append(path)
                samples.append(Sample(paths=paths, pid=pid, camid=camid, sceneid=sceneid))
        return samples, missing


# ---------------------------------------------------------------------------------------------
# Factory and image reading
# ---------------------------------------------------------------------------------------------
def dataset_class(name: str) -> type:
    """The registered dataset class called ``name`` (case-insensitive)."""
    canonical = {n.lower(): n for n in DATASET_REGISTRY}.get(str(name).lower(), name)
    return DATASET_REGISTRY.get(canonical)


def build_dataset(name: str, root: str, options: Optional[dict] = None) -> ReIDDataset:
    """Load registered dataset ``name`` (case-insensitive) from ``root``.

    ``options``: keyword arguments of the dataset class (the Synthetic set's generator sizes;
    keys case-insensitive, so the config's upper-case keys work too).
    """
    cls = dataset_class(name)
    kwargs = {str(key).lower(): value for key, value in (options or {}).items()}
    unknown = [key for key in kwargs if key not in cls.OPTIONS]
    if unknown:
        raise ValueError(f"unknown {cls.name} dataset option(s) {', '.join(unknown)}; valid "
                         f"options: {', '.join(cls.OPTIONS) or 'none'}")
    return cls(root, **kwargs)


def build_dataset_from_config(cfg) -> ReIDDataset:
    """The dataset ``DATASETS.NAMES`` names, built by its ``from_config``."""
    return dataset_class(cfg.DATASETS.NAMES).from_config(cfg)


# Bit depths an integer image of more than 8 bits is assumed to have: the smallest that holds its
# largest value (a 12-bit thermal frame stored in a 16-bit PNG is scaled by 4095, not 65535).
HIGH_BIT_DEPTHS = (8, 10, 12, 14, 16)


def to_rgb8(img: Image.Image, name: str = "image") -> Image.Image:
    """``img`` as an 8-bit RGB image, scaled (never clipped) when it has more than 8 bits.

    Integer images of more than 8 bits (Pillow modes I;16*, I: 16-bit PNG / TIFF, as thermal
    cameras write them) are scaled by ``255 / (2**bits - 1)``, ``bits`` the smallest of
    :data:`HIGH_BIT_DEPTHS` that holds the image's largest value; values outside 0..65535 are
    scaled by the image's own range (min to max). Float images (mode F) in [0, 1] are scaled by 255,
    others by their range; NaN or infinite values raise BadImageError naming ``name``. 8-bit
    modes are converted by Pillow. (16-bit colour PNGs reach us already reduced to 8 bits by
    Pillow: their high byte.)
    """
    if img.mode not in ("I", "F") and not img.mode.startswith("I;16"):
        return img.convert("RGB")
    arr = np.asarray(img).astype(np.float64)
    if not np.isfinite(arr).all():
        raise BadImageError(f"image {name!r} holds NaN or infinite values: it is not an image "
                            "(fix or remove it)")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 0.0)
    if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
        scaled = arr * 255.0
    elif img.mode != "F" and lo >= 0 and hi <= 65535:
        bits = next(b for b in HIGH_BIT_DEPTHS if hi <= 2 ** b - 1)
        scaled = arr * (255.0 / (2 ** bits - 1))
    else:  # by the image's own range
        scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L").convert("RGB")


def read_image(path: str) -> Image.Image:
    """Fully decode ``path`` into an 8-bit RGB-mode image (:func:`to_rgb8`: an image of more than
    8 bits is scaled, not clipped).

    A missing file raises FileNotFoundError and an undecodable one BadImageError, both naming it.
    """
    try:
        with Image.open(path) as img:
            img.load()  # decode everything now so truncated files fail here
            return to_rgb8(img, path)
    except FileNotFoundError:
        raise FileNotFoundError(2, "image file not found", path) from None
    except BadImageError:  # to_rgb8's own, already naming the file
        raise
    except IsADirectoryError:
        raise BadImageError(f"cannot read image {path!r}: it is a directory") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise BadImageError(f"cannot decode image {path!r}: {exc}") from exc


def read_triplet(sample: Sample) -> Tuple[Image.Image, Image.Image, Image.Image]:
    """RGB-mode (rgb, ni, ti) images of a sample.

    A one-file sample (RGBNT100) holds the three side by side: its width is split into thirds.
    """
    if len(sample.paths) == 3:
        rgb, ni, ti = (read_image(p) for p in sample.paths)
        return rgb, ni, ti
    if len(sample.paths) == 1:
        path = sample.paths[0]
        img = read_image(path)
        third = img.width // 3
        if third == 0:
            raise BadImageError(f"side-by-side image {path!r} is too narrow ({img.width} px) to "
                                f"hold three modalities")
        rgb, ni, ti = (img.crop((i * third, 0, (i + 1) * third, img.height)) for i in range(3))
        return rgb, ni, ti
    raise ValueError(f"a sample holds 1 or 3 paths, got {len(sample.paths)}: {sample.paths}")
