"""The method's schema is composed at the application's edge: importing dna.config imports nothing of the pipeline
(no entry points, no environment), and the pipeline's sections join only when the application adds them."""
from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
from importlib.metadata import entry_points

from tests.conftest import ROOT

PROBE = """
import json, os, sys
before = dict(os.environ)
import dna.config
from dna.config import load_params, use_sections
from dna.errors import ConfigError
out = {"flows": sorted(m for m in sys.modules if m.startswith("flows")),
       "environment": sorted(k for k in os.environ if before.get(k) != os.environ[k])}
try:
    load_params("params.yaml", check_paths=False, deep=False)
except ConfigError as exc:
    out["alone"] = str(exc)
from flows.settings import SECTIONS
use_sections(SECTIONS)
out["composed"] = load_params("params.yaml", check_paths=False, deep=False).mlflow.registered_model
print(json.dumps(out))
"""


def test_the_method_alone_knows_no_pipeline_section_until_the_application_adds_it():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MPL", "XDG_"))}
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["flows"] == [] and out["environment"] == []
    assert "mlflow: unknown key" in out["alone"] and "orchestration: unknown key" in out["alone"]
    assert out["composed"] == "dna-student"


def test_a_section_cannot_take_the_name_of_the_methods_or_of_another_model():
    import pytest
    from pydantic import BaseModel

    from dna.config import use_sections
    from flows.settings import SECTIONS

    class Other(BaseModel):
        pass

    with pytest.raises(ValueError, match=r"\['search'\] are the method's own"):
        use_sections({"search": Other})
    with pytest.raises(ValueError, match="another model is in use"):
        use_sections({"mlflow": Other})
    use_sections(SECTIONS)  # the same models again: nothing changes


COMPOSE_PROBE = """
import json, os, sys
before = dict(os.environ)
changed = lambda: sorted(k for k in os.environ if before.get(k) != os.environ[k])
import flows, flows.settings, flows.steps, flows.env
from dna.config import load_params
from dna.errors import ConfigError
out = {"after_package": changed()}
try:
    load_params("params.yaml", check_paths=False, deep=False)
except ConfigError as exc:
    out["package_schema"] = str(exc)
import flows.pipeline
from prefect.settings import get_current_settings
out |= {"after_entry": changed(), "prefect_home": str(get_current_settings().home),
        "entry_schema": load_params("params.yaml", check_paths=False, deep=False).mlflow.registered_model}
print(json.dumps(out))
"""


def test_a_flows_entry_point_sets_up_the_application_before_prefect_and_the_package_alone_nothing():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MPL", "XDG_", "SCIKIT_"))}
    done = subprocess.run([sys.executable, "-c", COMPOSE_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out["after_package"] == [] and "mlflow: unknown key" in out["package_schema"]
    assert {"PREFECT_HOME", "XDG_CACHE_HOME", "MPLBACKEND"} <= set(out["after_entry"])
    assert out["prefect_home"] == str(ROOT / ".prefect")  # set before Prefect read its settings
    assert out["entry_schema"] == "dna-student"


def _imports(tree: ast.Module) -> list[str]:
    """The modules a module imports at its top level, in order."""
    names = []
    for node in tree.body:
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module != "__future__":
            names += [node.module] if node.module != "flows" else [f"flows.{a.name}" for a in node.names]
    return names


def _starts_a_process(tree: ast.Module, name: str, entrypoints: set[str]) -> bool:
    main = any(isinstance(node, ast.If) and "__main__" in ast.unparse(node.test) for node in tree.body)
    return main or name in entrypoints


def test_every_flows_module_that_imports_prefect_mlflow_or_dvc_or_starts_a_process_sets_up_the_app_first():
    entrypoints = {e.split(":")[0].removesuffix(".py").replace("/", ".")
                   for e in re.findall(r"entrypoint:\s*(\S+)", (ROOT / "prefect.yaml").read_text())}
    late = []
    for path in sorted((ROOT / "flows").glob("*.py")):
        name, tree = f"flows.{path.stem}", ast.parse(path.read_text())
        imports = _imports(tree)
        tools = [i for i, m in enumerate(imports) if m.split(".")[0] in ("prefect", "mlflow", "dvc")]
        if (tools or _starts_a_process(tree, name, entrypoints)) and name != "flows.app":
            first = imports.index("flows.app") if "flows.app" in imports else None
            if first is None or (tools and first > tools[0]):
                late.append(name)
    assert entrypoints == {"flows.pipeline"}
    assert late == [], f"import flows.app before Prefect, MLflow or DVC in {late}"


def test_the_dna_command_sets_up_the_application_it_is_installed_with():
    setup = {e.value for e in entry_points(group="dna.setup")}
    assert setup == {"flows.env:configure_environment"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MPL", "XDG_", "SCIKIT_"))}
    probe = "import os; import dna.cli; print(os.environ.get('PREFECT_HOME'))"
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=True)
    assert done.stdout.strip().splitlines()[-1] == str(ROOT / ".prefect")
