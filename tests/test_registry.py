"""The one registry helper behind every plugin surface: lazy built-ins, one entry per name, refusals that name the
registered entries, scoped registration for tests."""
from __future__ import annotations

import sys

import pytest

from dna.registry import Registry


def test_built_ins_load_on_first_use_and_a_name_is_taken_once():
    from tests.registry_widgets import WIDGETS as registry

    assert "tests.registry_builtin" not in sys.modules  # nothing imported until the registry is asked
    assert registry.names() == ["builtin"] and "builtin" in registry
    entry = registry.get("builtin")
    assert registry.register("builtin", entry) is entry  # the same entry again: nothing changes
    with pytest.raises(ValueError, match=r"widget 'builtin' is already registered \(Builtin; refused: Other\)"):
        registry.register("builtin")(type("Other", (), {}))
    with pytest.raises(ValueError, match=r"thing\.kind='gadget' is not a widget; allowed: builtin$"):
        registry.get("gadget")


def test_scoped_entries_are_gone_after_the_block_and_on_register_sees_each():
    seen = []
    registry: Registry[object] = Registry("item", "item", on_register=lambda name, entry: seen.append(name))
    with registry.scoped():
        registry.register("a", object())
        assert registry.names() == ["a"]
    assert registry.names() == [] and seen == ["a"]


@pytest.mark.parametrize("module, name, kinds", [
    ("dna.spaces", "SPACES", {"mbconv", "vit", "hybrid"}),
    ("dna.supervision", "SUPERVISIONS", {"teacher", "ssl"}),
    ("dna.arch_families", "FAMILIES", {"efficientnet"}),
])
def test_every_plugin_surface_is_a_registry_with_its_built_ins(module, name, kinds):
    import importlib

    registry = getattr(importlib.import_module(module), name)
    assert isinstance(registry, Registry) and kinds <= set(registry.names())
