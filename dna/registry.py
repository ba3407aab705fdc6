"""One registry helper for every plugin surface (search spaces, block supervisions, architecture families, the
stages): named entries of one kind, the built-in ones imported only when first asked for (they import torch), each
registered once. A new entry is one module that registers itself (`@SPACES.register("name")`, or `register(name,
entry)`); a stage is an entry of the table in dna/stages/__init__.py."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """`what`: what an entry is, in messages ("search space"); `key`: the params key that names one ("space.kind");
    `builtin`: a function that imports the modules registering the entries shipped with dna, called on first use
    (its imports are written out, so that reading the code finds them: DVC's code dependencies do)."""

    def __init__(self, what: str, key: str, builtin: Callable[[], object] | None = None,
                 on_register: Callable[[str, T], None] | None = None):
        self.what, self.key, self.builtin, self.on_register = what, key, builtin, on_register
        self._entries: dict[str, T] = {}
        self._loaded = False

    def register(self, name: str, entry: T | None = None):
        """Register `entry` under `name`, or, without an entry, a decorator that registers what it decorates. The same
        entry again is a no-op; another entry under a taken name is refused."""
        def add(item: T) -> T:
            if self._entries.get(name, item) is not item:
                raise ValueError(f"{self.what} {name!r} is already registered ({_name(self._entries[name])}; "
                                 f"refused: {_name(item)})")
            if self.on_register is not None:
                self.on_register(name, item)
            self._entries[name] = item
            return item
        return add if entry is None else add(entry)

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            if self.builtin is not None:
                self.builtin()

    def get(self, name: str) -> T:
        self._load()
        if name not in self._entries:
            article = "an" if self.what[0] in "aeiou" else "a"
            raise ValueError(f"{self.key}={name!r} is not {article} {self.what}; allowed: {', '.join(self.names())}")
        return self._entries[name]

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[T]:
        """The entries in the order they were registered (the stage table's: run order)."""
        self._load()
        return iter(list(self._entries.values()))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    @contextmanager
    def scoped(self) -> Iterator[Registry[T]]:
        """Entries registered inside the block are gone after it (tests that register one of their own)."""
        self._load()
        before = dict(self._entries)
        try:
            yield self
        finally:
            self._entries = before


def _name(entry) -> str:
    return getattr(entry, "__name__", type(entry).__name__)
