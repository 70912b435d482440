"""The run manifest: what a run was a function of, so that two runs can be compared without the
data or the machine (``tools/compare_runs.py``).

``run_manifest(cfg, device, data)`` returns a JSON-ready dict, written into ``summary.json``
(training) and ``test_results.json`` (evaluation) and logged at the start of ``log.txt``:

* ``code``: git commit, whether the tree was dirty (tracked changes or untracked, not ignored
  files) and a hash of that difference; ``"unknown"`` outside git (or when git fails or times out);
* ``libraries``: python, torch, torchvision, timm, numpy;
* ``device``: type, names and count, CUDA and cuDNN versions, CPUs, torch threads, platform;
* ``world_size``, ``deterministic``, ``num_workers``;
* ``config_hash`` of the resolved config (without :data:`LOCATION_KEYS`) and the ``config``;
* ``data``: per split (``train`` as trained on, i.e. after a ``DATASETS.VAL_IDS`` carve-out;
  ``val`` when present; ``query``; ``gallery``) identities, triplets, cameras and a hash of the
  sorted file names relative to ``DATASETS.ROOT_DIR`` with their sizes.

Cheap by construction: git runs in a subprocess with a timeout, files are only ``os.stat``-ed
(untracked files of the tree up to :data:`UNTRACKED_CONTENT_LIMIT` bytes are read for the code
hash), no image is opened.
"""
import functools
import hashlib
import json
import os
import platform
import subprocess
from importlib import metadata
from typing import Dict, Iterable, List, Optional

import torch
import yaml

from config import flatten_config

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNKNOWN = "unknown"
GIT_TIMEOUT_S = 10
UNTRACKED_CONTENT_LIMIT = 1 << 20  # larger untracked files enter the code hash by name and size
LIBRARIES = ("torch", "torchvision", "timm", "numpy")
# Config keys that say where a run reads and writes, not what it computes: left out of the config
# hash (the data itself is compared by its fingerprint).
LOCATION_KEYS = ("OUTPUT_DIR", "DATASETS.ROOT_DIR")


def _sha256(chunks: Iterable[bytes]) -> str:
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _git(root: str, *args: str) -> bytes:
    return subprocess.run(["git", "-C", root, *args], capture_output=True, check=True,
                          timeout=GIT_TIMEOUT_S).stdout


def code_state(root: str = PROJECT_ROOT) -> Dict:
    """{"commit", "dirty", "diff_hash"} of the git tree holding ``root``; every value "unknown"
    when it is not a git tree or git fails. ``diff_hash`` (None for a clean tree) covers
    ``git diff HEAD`` and the untracked, not ignored files (content, or name and size when large)."""
    try:
        commit = _git(root, "rev-parse", "HEAD").decode().strip()
        diff = _git(root, "diff", "HEAD", "--binary")
        top = _git(root, "rev-parse", "--show-toplevel").decode().strip()
        untracked = sorted(p for p in _git(top, "ls-files", "--others", "--exclude-standard",
                                           "-z").decode().split("\0") if p)
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return {"commit": UNKNOWN, "dirty": UNKNOWN, "diff_hash": UNKNOWN}

    def untracked_chunks():
        for rel in untracked:
            path = os.path.join(top, rel)
            try:
                size = os.stat(path).st_size
                yield f"\0{rel}\0{size}\0".encode()
                if size <= UNTRACKED_CONTENT_LIMIT:
                    with open(path, "rb") as f:
                        yield f.read()
            except OSError:  # removed meanwhile
                yield f"\0{rel}\0gone\0".encode()

    dirty = bool(diff) or bool(untracked)
    return {"commit": commit, "dirty": dirty,
            "diff_hash": _sha256([diff, *untracked_chunks()]) if dirty else None}


def library_versions() -> Dict[str, str]:
    """Versions of python and of :data:`LIBRARIES` ("not installed" when absent)."""
    versions = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    versions["torch"] = torch.__version__  # the build actually imported (e.g. 2.x+cu130)
    return versions


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def device_info(device: Optional[torch.device] = None) -> Dict:
    """The compute device: type, names and count (GPUs, or the CPU model), CUDA and cuDNN
    versions of the torch build, CPUs, torch threads and the platform."""
    kind = (device.type if device is not None else
            "cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    else:
        names = [_cpu_name()]
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"type": kind, "names": names, "count": len(names), "cuda": torch.version.cuda,
            "cudnn": cudnn, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "platform": platform.platform()}


def config_dict(cfg) -> Dict:
    """The nested dict of a config (its yaml dump, as config.yaml holds it)."""
    return yaml.safe_load(cfg.dump())


def config_hash(cfg) -> str:
    """sha256 of the resolved config's keys and values, :data:`LOCATION_KEYS` left out."""
    flat = {k: v for k, v in flatten_config(config_dict(cfg)).items() if k not in LOCATION_KEYS}
    return _sha256([json.dumps(flat, sort_keys=True, default=str).encode()])


def split_fingerprint(samples, root: str) -> Dict:
    """{"ids", "triplets", "cameras", "files", "files_hash"} of a list of ``data.datasets.Sample``:
    the hash covers the sorted file names relative to ``root`` with their sizes (a missing file
    counts with size -1)."""
    entries = set()
    for sample in samples:
        for path in tuple(sample.paths) + ((sample.mask_path,) if sample.mask_path else ()):
            try:
                size = os.stat(path).st_size
            except OSError:
                size = -1
            entries.add((os.path.relpath(path, root), size))
    lines = (f"{name}\t{size}\n".encode() for name, size in sorted(entries))
    return {"ids": len({s.pid for s in samples}), "triplets": len(samples),
            "cameras": len({s.camid for s in samples}), "files": len(entries),
            "files_hash": _sha256(lines)}


def data_fingerprint(data, root: str) -> Dict:
    """Per split fingerprints of a :class:`data.build.DataBundle`: ``train`` is the split trained
    on (the dataset's training split less the ``val`` identities carved out of it)."""
    dataset = data.dataset
    val = data.eval_sets["val"].samples if "val" in data.eval_sets else []
    held_out = {s.paths for s in val}
    splits = {"train": [s for s in dataset.train if s.paths not in held_out]}
    if val:
        splits["val"] = val
    splits.update(query=dataset.query, gallery=dataset.gallery)
    return {"dataset": dataset.name,
            "splits": {name: split_fingerprint(samples, root) for name, samples in splits.items()}}


@functools.lru_cache(maxsize=None)
def _code_at_start() -> Dict:
    """:func:`code_state` of the project, read once per process: the code a run imported at its
    start, even when the tree is edited while it runs."""
    return code_state()


def run_manifest(cfg, device: Optional[torch.device] = None, data=None,
                 world_size: int = 1) -> Dict:
    """The manifest of a run of ``cfg`` on ``device`` (``data``: its DataBundle; without it the
    ``data`` entry is None)."""
    return {"code": dict(_code_at_start()), "libraries": library_versions(),
            "device": device_info(device), "world_size": world_size,
            "deterministic": bool(cfg.SOLVER.DETERMINISTIC),
            "num_workers": int(cfg.DATALOADER.NUM_WORKERS),
            "config_hash": config_hash(cfg), "config": config_dict(cfg),
            "data": data_fingerprint(data, cfg.DATASETS.ROOT_DIR) if data is not None else None}


def manifest_lines(manifest: Dict) -> List[str]:
    """The manifest as log lines (``config`` itself left out: config.yaml holds it)."""
    code, lib, dev = manifest["code"], manifest["libraries"], manifest["device"]
    if code["dirty"] is True:
        state = f"dirty, diff {code['diff_hash']}"
    else:
        state = "clean" if code["dirty"] is False else UNKNOWN
    lines = [
        f"code: commit {code['commit']} ({state})",
        "libraries: " + ", ".join(f"{name} {version}" for name, version in lib.items()),
        f"device: {dev['type']} x{dev['count']} ({', '.join(dev['names'])}); CUDA {dev['cuda']}, "
        f"cuDNN {dev['cudnn']}; {dev['cpus']} CPUs, {dev['torch_threads']} torch threads; "
        f"{dev['platform']}",
        f"run: world size {manifest['world_size']}, deterministic {manifest['deterministic']}, "
        f"{manifest['num_workers']} loader workers, config {manifest['config_hash']}",
    ]
    if manifest.get("data"):
        lines.append(data_line(manifest["data"]))
    return lines


def data_line(data: Dict) -> str:
    """One log line of a data fingerprint."""
    return f"data fingerprint ({data['dataset']}): " + "; ".join(
        f"{name} {fp['ids']} ids, {fp['triplets']} triplets, {fp['cameras']} cameras, "
        f"{fp['files_hash'][:19]}" for name, fp in data["splits"].items())
