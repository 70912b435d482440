"""Which config keys a run reads: a recording CfgNode (tests/test_key_reach.py), and the one list
of keys that only a tool reads.

``record_reads(cfg)`` returns a copy of ``cfg`` whose nodes note every leaf key read through them
(attribute access, ``cfg["KEY"]``, ``.get``, and the values of ``.items()`` / ``.values()``), and
the set they note it in. Copying (``clone``), ``dump`` and printing are not reads.
"""
import copy
from contextlib import contextmanager
from typing import Set, Tuple

from yacs.config import CfgNode

# Keys that a plain training run does not read, only the file named (whose source contains the
# key); a shipped config may set them. key -> the file that reads it.
TOOL_KEYS = {
    "TEST.WEIGHT": "test_net.py",
    "TEST.EXPORT": "test_net.py",
    # load_weights (test_net.py and the tools); Trainer.resume reads it too, with --resume
    "MODEL.LOAD_STRICT": "engine/defaults.py",
}


class _Recorder:
    """The set of read keys, shared by every node of a recorded tree and by its copies."""

    def __init__(self):
        self.keys: Set[str] = set()
        self.paused = 0

    def __deepcopy__(self, memo):
        return self

    @contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1


class RecordingCfgNode(CfgNode):
    """A CfgNode noting the dotted names of the leaf keys read through it (see the module)."""

    def _note(self, key, value):
        recorder = self.__dict__["_recorder"]
        if not recorder.paused and not isinstance(value, CfgNode):
            recorder.keys.add(self.__dict__["_prefix"] + str(key))
        return value

    def __getattr__(self, name):
        if name in self:
            return self[name]
        raise AttributeError(name)

    def __getitem__(self, key):
        return self._note(key, super().__getitem__(key))

    def get(self, key, default=None):
        return self[key] if key in self else default

    def items(self):
        return [(k, self._note(k, v)) for k, v in super().items()]

    def values(self):
        return [v for _, v in self.items()]

    def _quietly(self, method, *args, **kwargs):
        with self.__dict__["_recorder"].pause():
            return method(*args, **kwargs)

    def __deepcopy__(self, memo):  # clone(): a recording copy into the same set
        copied = _convert(self, self.__dict__["_recorder"], self.__dict__["_prefix"])
        if self.is_frozen():
            copied.freeze()
        return copied

    def _immutable(self, is_immutable):
        return self._quietly(super()._immutable, is_immutable)

    def __str__(self):
        return self._quietly(super().__str__)

    def __reduce__(self):  # pickled (e.g. to a worker process) as a plain CfgNode, unread
        return CfgNode, (_plain(self),)


def _plain(node: CfgNode) -> dict:
    return {k: _plain(v) if isinstance(v, CfgNode) else v for k, v in dict.items(node)}


def _convert(node: CfgNode, recorder: _Recorder, prefix: str) -> RecordingCfgNode:
    out = RecordingCfgNode()
    out.__dict__["_recorder"], out.__dict__["_prefix"] = recorder, prefix
    for key, value in dict.items(node):
        if isinstance(value, CfgNode):
            value = _convert(value, recorder, f"{prefix}{key}.")
        else:
            value = copy.deepcopy(value)
        dict.__setitem__(out, key, value)
    return out


def record_reads(cfg: CfgNode) -> Tuple[RecordingCfgNode, Set[str]]:
    """(a copy of ``cfg`` that records its reads, frozen as ``cfg`` is; the set of dotted keys
    read through it so far)."""
    recorder = _Recorder()
    recorded = _convert(cfg, recorder, "")
    if cfg.is_frozen():
        recorded.freeze()
    return recorded, recorder.keys
