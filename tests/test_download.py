"""Weights by name (utils/download.py): ``MODEL.PRETRAIN_PATH openai:ViT-B-16`` against a file
server on 127.0.0.1 (right hash, wrong hash, interrupted transfer, no server). Nothing here talks
to any other address: every test sets REID_CLIP_URL to the local server."""
import hashlib
import http.server
import io
import os
import socket
import subprocess
import sys
import threading

import pytest
import torch

from conftest import ROOT, TINY_OPTS
from utils import download
from utils.download import DownloadError, resolve_weights

NAME = "ViT-B-16"


def _payload() -> bytes:
    """A small torch state dict of a 1-block vit_tiny (loads through the backbone's safe path)."""
    from modeling.backbone import ViTBackbone

    vit = ViTBackbone("vit_tiny_patch16_224", (64, 32), (16, 16), 0, depth=1)
    buffer = io.BytesIO()
    torch.save({k: v.clone() for k, v in vit.vit.state_dict().items()}, buffer)
    return buffer.getvalue()


PAYLOAD = _payload()
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD for any path; ``server.mode`` "ok", "wrong" (other bytes, same length) or
    "cut" (announces the full length, closes after half)."""

    def do_GET(self):  # noqa: N802 - http.server's name
        self.server.requests.append(self.path)
        body = PAYLOAD if self.server.mode != "wrong" else bytes(len(PAYLOAD))
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2] if self.server.mode == "cut" else body)
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A file server on 127.0.0.1 (stopped after the test, or by itself after 60 s), the cache in
    tmp_path and OpenAI's hash of NAME replaced by the payload's."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.mode, httpd.requests = "ok", []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    watchdog = threading.Timer(60, httpd.shutdown)
    watchdog.start()
    monkeypatch.setenv("REID_CLIP_URL", f"http://127.0.0.1:{httpd.server_address[1]}/clip")
    monkeypatch.setenv("REID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(download.OPENAI_CLIP, NAME, SHA)
    yield httpd
    watchdog.cancel()
    httpd.shutdown()
    httpd.server_close()
    thread.join(5)


def _cached(tmp_path):
    return str(tmp_path / "cache" / f"{NAME}.pt")


def test_right_hash_downloads_once_and_loads_into_the_backbone(server, tmp_path):
    """The file lands at <cache>/ViT-B-16.pt from <base>/<sha256>/ViT-B-16.pt, a second use
    reads the cache without a request, and the backbone loads it (catches: a URL without the
    hash, a re-download every run, a name that never reaches the backbone's loader)."""
    from modeling.backbone import ViTBackbone

    path = resolve_weights(f"openai:{NAME}")
    assert path == _cached(tmp_path)
    with open(path, "rb") as f:
        assert f.read() == PAYLOAD
    assert server.requests == [f"/clip/{SHA}/{NAME}.pt"]
    vit = ViTBackbone("vit_tiny_patch16_224", (64, 32), (16, 16), 0, depth=1,
                      pretrain_path=f"openai:{NAME}")
    assert server.requests == [f"/clip/{SHA}/{NAME}.pt"]  # the cache, no second request
    expected = torch.load(io.BytesIO(PAYLOAD), weights_only=True)
    assert torch.equal(vit.vit.blocks[0].attn.qkv.weight, expected["blocks.0.attn.qkv.weight"])
    assert os.listdir(tmp_path / "cache") == [f"{NAME}.pt"]  # no temporary file left


def test_wrong_hash_is_refused_and_nothing_is_cached(server, tmp_path):
    """A file whose SHA-256 differs from the one in the URL is refused with a message naming it
    (catches: an unverified download used as weights)."""
    server.mode = "wrong"
    with pytest.raises(DownloadError, match="SHA-256") as info:
        resolve_weights(f"openai:{NAME}")
    assert _cached(tmp_path) in str(info.value)
    assert os.listdir(tmp_path / "cache") == []


def test_interrupted_transfer_is_refused_and_a_partial_cache_is_fetched_again(server, tmp_path):
    """A connection closed early leaves no file; a partial file already in the cache is detected
    and replaced by a complete download (catches: a truncated file kept, a stale partial copy
    loaded forever)."""
    server.mode = "cut"
    with pytest.raises(DownloadError, match=f"stopped after {len(PAYLOAD) // 2} of {len(PAYLOAD)} bytes"):
        resolve_weights(f"openai:{NAME}")
    assert os.listdir(tmp_path / "cache") == []
    with open(_cached(tmp_path), "wb") as f:
        f.write(PAYLOAD[:100])  # what an older, interrupted tool left
    server.mode = "ok"
    with open(resolve_weights(f"openai:{NAME}"), "rb") as f:
        assert f.read() == PAYLOAD
    assert len(server.requests) == 2


def test_no_server_one_line_names_the_url_and_the_path(tmp_path, synthetic_root):
    """Offline, train_net.py stops with one line naming the URL and the exact cache path
    (catches: a raw urllib traceback, a message without the place to put the file)."""
    with socket.socket() as s:  # a free port on 127.0.0.1 that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "cache"
    env = dict(os.environ, REID_CLIP_URL=f"http://127.0.0.1:{port}", REID_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "train_net.py"] + TINY_OPTS +
                          ["MODEL.PRETRAIN_PATH", f"openai:{NAME}", "DATASETS.ROOT_DIR", synthetic_root,
                           "OUTPUT_DIR", str(tmp_path / "out")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    url = f"http://127.0.0.1:{port}/{download.OPENAI_CLIP[NAME]}/{NAME}.pt"
    assert url in errors[0] and str(cache / f"{NAME}.pt") in errors[0], errors[0]


def test_local_paths_and_unknown_names():
    """A local path is returned unchanged; an unknown name suggests the nearest (catches: every
    value treated as a name, a typo sent to the network)."""
    assert resolve_weights("./pretrained/ViT-B-16.pt") == "./pretrained/ViT-B-16.pt"
    with pytest.raises(DownloadError, match="did you mean openai:ViT-B-16"):
        resolve_weights("openai:ViT-B16")
