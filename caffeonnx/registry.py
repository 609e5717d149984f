"""A name -> function registry filled by decorators in the modules of one package.

The converter's Caffe layer handlers, the foreign-ONNX emitters and the trainer's
torch kernels all follow the same rules: one function per name, duplicates refused
(naming the function that already holds the name), and the package's modules
imported on first lookup so that adding an entry touches only its own file.
"""
from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    """Functions registered by name from the modules of `package`."""

    def __init__(self, what: str, package: str) -> None:
        self.what = what  # e.g. "Caffe layer type", for messages
        self.package = package
        self._entries: dict[str, F] = {}
        self._loaded = False

    def register(self, *names: str) -> Callable[[F], F]:
        """Decorator: register the function under each of `names`; duplicates are refused."""

        def decorate(fn: F) -> F:
            for name in names:
                other = self._entries.get(name)
                if other is not None:
                    raise RuntimeError(
                        f"{self.what} {name!r} is already registered to {other.__module__}.{other.__qualname__}"
                    )
                self._entries[name] = fn
            return fn

        return decorate

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            package = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(package.__path__):
                importlib.import_module(f"{self.package}.{info.name}")

    def get(self, name: str) -> F | None:
        """The function registered under `name`, or None."""
        self._load()
        return self._entries.get(name)

    def items(self) -> list[tuple[str, F]]:
        """(name, function) pairs sorted by name."""
        self._load()
        return sorted(self._entries.items())


def summary(fn: Callable[..., object]) -> str:
    """First line of a function's docstring (what the support tables show)."""
    doc = (fn.__doc__ or "").strip()
    return doc.splitlines()[0] if doc else ""
