"""The built-in entry of tests/registry_widgets.py's registry, imported on the registry's first use."""
from tests.registry_widgets import WIDGETS

WIDGETS.register("builtin")(type("Builtin", (), {}))
