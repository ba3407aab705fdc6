"""The method's schema is composed at the application's edge: importing dna.config imports nothing of the pipeline
(no entry points, no environment), and the pipeline's sections join only when the application adds them."""
from __future__ import annotations

import json
import os
import subprocess
import sys

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
