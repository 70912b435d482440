"""Name -> object registries (the fvcore / detectron2 pattern).

    DATASET_REGISTRY = Registry("dataset")

    @DATASET_REGISTRY.register()          # registered as "MyData"
    class MyData(ReIDDataset): ...

    @FUSION_REGISTRY.register("max")      # registered as "max"
    class MaxFusion(nn.Module): ...

    DATASET_REGISTRY.get("MyData")        # unknown names raise UnknownNameError (a KeyError and
                                          # a ValueError) listing the valid ones, nearest first
    FUSION_REGISTRY.build("max", cfg, 512)  # MaxFusion.from_config(cfg, 512); PluginError (one
                                          # line: entry, its file, the rule) without from_config

The config validates its ``NAME`` keys against ``names()``, so a registered object is selectable
from a yaml file with no other edit. Code outside the package registers by being imported:
list its module or .py file under the config's ``IMPORTS``.
"""
import difflib
import inspect
import sys
from typing import Callable, Dict, Iterator, Optional, Tuple


class UnknownNameError(KeyError, ValueError):
    """A name that is not registered (a lookup error and a bad value); prints without quotes."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class PluginError(ValueError):
    """A registered part that breaks its interface; the message names the entry, its file and
    the rule."""


class Registry:
    """A named collection of objects (classes or functions) keyed by name."""

    def __init__(self, kind: str):
        self.kind = kind
        self._objects: Dict[str, object] = {}

    def register(self, name: Optional[str] = None, obj: object = None) -> Callable:
        """Register ``obj`` under ``name`` (default: its ``__name__``); usable as a decorator."""
        if obj is not None:
            self._add(name or obj.__name__, obj)
            return obj

        def decorator(target):
            self._add(name or target.__name__, target)
            return target

        return decorator

    def _add(self, name: str, obj: object) -> None:
        existing = self._objects.get(name)
        if existing is not None and existing is not obj and not _same_definition(existing, obj):
            raise KeyError(f"{self.kind} {name!r} is already registered (by "
                           f"{getattr(existing, '__module__', '?')}); choose another name")
        self._objects[name] = obj

    def get(self, name: str):
        """The object registered as ``name``; UnknownNameError naming the valid choices otherwise."""
        if name in self._objects:
            return self._objects[name]
        close = difflib.get_close_matches(str(name), self._objects, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownNameError(f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(self.names())})")

    def describe(self, name: str) -> str:
        """"<kind> '<name>' (<file that defines it>)", for messages about a registered part."""
        obj = self._objects.get(name)
        try:
            where = inspect.getsourcefile(obj)
        except TypeError:
            where = getattr(sys.modules.get(getattr(obj, "__module__", "")), "__file__", None)
        return f"{self.kind} {name!r} ({where or 'defined in an unknown file'})"

    def build(self, name: str, *args):
        """``from_config(*args)`` of the part registered as ``name``; PluginError when it has none."""
        obj = self.get(name)
        from_config = getattr(obj, "from_config", None)
        if not callable(from_config):
            raise PluginError(f"{self.describe(name)} has no from_config: a registered {self.kind} "
                              "is built by the classmethod from_config(cfg, ...) (docs/extending.md)")
        return from_config(*args)

    def names(self) -> Tuple[str, ...]:
        return tuple(self._objects)

    def items(self):
        return self._objects.items()

    def __contains__(self, name: str) -> bool:
        return name in self._objects

    def __iter__(self) -> Iterator[str]:
        return iter(self._objects)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self.names())})"


def _same_definition(a: object, b: object) -> bool:
    """True when ``a`` and ``b`` are one definition imported twice (a module run as a script and
    imported again, or a file re-imported): same module name and qualified name."""
    return (getattr(a, "__qualname__", None) == getattr(b, "__qualname__", object())
            and getattr(a, "__module__", None) == getattr(b, "__module__", object()))
