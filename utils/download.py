"""Pretrained weights by name: ``MODEL.PRETRAIN_PATH openai:ViT-B-16``.

A name ``openai:<model>`` resolves to ``<cache>/<model>.pt``. The file is downloaded once from
OpenAI's CLIP release, whose URLs carry the SHA-256 of the file in their path
(``<base>/<sha256>/<model>.pt``); the download shows a progress bar (tqdm), is verified against
that SHA-256 and written atomically (a temporary file in the cache folder, renamed into place).
A cached file whose SHA-256 differs (a partial or corrupt copy) is fetched again. Without network
the error names the URL and the exact path where to put the file. Any other value is a local path
and is returned as it is.

* cache folder: ``$REID_CACHE_DIR``, else ``$TORCH_HOME/clip``, else ``~/.cache/torch/clip``;
* base URL: ``$REID_CLIP_URL`` (the tests serve files from 127.0.0.1), else :data:`OPENAI_CLIP_URL`.

Only the standard library's urllib talks to the network, and only here.
"""
import difflib
import hashlib
import http.client
import os
import urllib.error
import urllib.request

from tqdm import tqdm

from utils.logger import get_logger

PREFIX = "openai:"
OPENAI_CLIP_URL = "https://openaipublic.azureedge.net/clip/models"
# CLIP ViT models of OpenAI's release (file name without ".pt") -> SHA-256 of the file, which is
# also the folder of its URL (OpenAI's CLIP repository, clip/clip.py, _MODELS).
OPENAI_CLIP = {
    "ViT-B-32": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}
CHUNK = 1 << 20
TIMEOUT_S = 30


class DownloadError(RuntimeError):
    """Named weights could not be fetched or verified; the message says where to put the file."""


def cache_dir() -> str:
    """The folder of downloaded weights (see the module docstring)."""
    if os.environ.get("REID_CACHE_DIR"):
        return os.environ["REID_CACHE_DIR"]
    torch_home = os.environ.get("TORCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "torch")
    return os.path.join(torch_home, "clip")


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_weights(spec: str) -> str:
    """The local file of ``spec``: ``openai:<model>`` downloaded (once) and verified, any other
    value unchanged."""
    if not spec.startswith(PREFIX):
        return spec
    name = spec[len(PREFIX):]
    if name not in OPENAI_CLIP:
        close = difflib.get_close_matches(name, list(OPENAI_CLIP), n=1)
        raise DownloadError(f"MODEL.PRETRAIN_PATH {spec}: unknown model"
                            f"{f'; did you mean {PREFIX}{close[0]}?' if close else ''} "
                            f"(known: {', '.join(PREFIX + n for n in OPENAI_CLIP)})")
    sha = OPENAI_CLIP[name]
    path = os.path.join(cache_dir(), f"{name}.pt")
    if os.path.isfile(path):
        if file_sha256(path) == sha:
            return path
        get_logger().warning("%s does not have the SHA-256 of %s (a partial or corrupt copy): "
                             "fetching it again", path, spec)
    base = os.environ.get("REID_CLIP_URL") or OPENAI_CLIP_URL
    download(f"{base.rstrip('/')}/{sha}/{name}.pt", path, sha)
    return path


def download(url: str, path: str, sha256: str) -> None:
    """Fetch ``url`` into ``path`` (atomically: a temporary file renamed into place) with a
    progress bar, verifying its length and SHA-256; on any failure nothing is left at ``path``'s
    temporary name and DownloadError names the URL and where to put the file by hand."""
    by_hand = f"download it by hand and put it at {path} (SHA-256 {sha256})"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.part{os.getpid()}"
    get_logger().info("downloading %s to %s", url, path)
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            digest, received = hashlib.sha256(), 0
            with tqdm(total=total, unit="B", unit_scale=True, desc=os.path.basename(path),
                      disable=None) as bar:
                for block in iter(lambda: response.read(CHUNK), b""):
                    f.write(block)
                    digest.update(block)
                    received += len(block)
                    bar.update(len(block))
            if total is not None and received != total:
                raise DownloadError(f"the transfer of {url} stopped after {received} of {total} "
                                    f"bytes: run again, or {by_hand}")
            if digest.hexdigest() != sha256:
                raise DownloadError(f"{url} gave a file whose SHA-256 {digest.hexdigest()} is not "
                                    f"{sha256}: run again, or {by_hand}")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except DownloadError:
        _remove(tmp)
        raise
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as exc:
        _remove(tmp)
        reason = getattr(exc, "reason", None) or exc
        raise DownloadError(f"cannot download {url} ({reason}): {by_hand}") from exc


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
