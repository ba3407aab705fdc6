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
    ("dna.stages", "STAGES", {"data", "teacher", "distill", "rate", "search", "retrain", "export", "rank", "rounds"}),
])
def test_every_plugin_surface_is_a_registry_with_its_built_ins(module, name, kinds):
    import importlib

    registry = getattr(importlib.import_module(module), name)
    assert isinstance(registry, Registry) and kinds <= set(registry.names())


def test_the_stage_table_keeps_run_order_and_refuses_an_entry_its_readers_could_not_take():
    from dna.stages import STAGES, Plot, Stage

    assert [s.name for s in STAGES][:3] == ["data", "teacher", "distill"] and len(STAGES) == len(STAGES.names())
    with STAGES.scoped():
        late = Stage("late", "", "m:f", (), ("late/out.json",))
        STAGES.register("late", late)
        assert list(STAGES)[-1] is late  # a stage registered later runs last
        with pytest.raises(ValueError, match=r"stage 'data' is already registered"):
            STAGES.register("data", late)
        with pytest.raises(ValueError, match=r"stage 'odd': registered as 'other'; both per block and per target; "
                                             r"checkpoints \['state.pt'\] not among its outputs"):
            STAGES.register("other", Stage("odd", "", "m:f", (), ("out",), checkpoints=("state.pt",), per_block=True,
                                           per_target=True))
        with pytest.raises(ValueError, match=r"stage 'plotting': plots of \['search/front.csv'\], which it does not "
                                             r"write"):
            STAGES.register("plotting", Stage("plotting", "", "m:f", (), ("plotting",),
                                              plots=(Plot(("plotting/a.csv", "search/front.csv"), "x", ("y",),
                                                          name="both"),)))
        with pytest.raises(ValueError, match=r"plots of \[\('plotting/a.csv',\)\] without a name"):
            STAGES.register("plotting", Stage("plotting", "", "m:f", (), ("plotting",),
                                              plots=(Plot(("plotting/a.csv",), "x", ("y", "z")),)))
        with pytest.raises(ValueError, match=r"plots of \['plotting/\{target\}/a.csv'\]: a plot is of the whole run"):
            STAGES.register("plotting", Stage("plotting", "", "m:f", (), ("plotting",),
                                              plots=(Plot(("plotting/{target}/a.csv",), "x", ("y",)),)))
    assert "late" not in STAGES
