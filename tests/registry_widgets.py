"""A registry for tests/test_registry.py whose built-in entry lives in another module (tests/registry_builtin.py)."""
from dna.registry import Registry


def _built_in() -> None:
    from tests import registry_builtin  # noqa: F401


WIDGETS: Registry[type] = Registry("widget", "thing.kind", _built_in)
