"""`outputs` under DVC: dvc.yaml puts every stage's outputs under it and DVC deletes them before it runs a stage, so
the params DVC reads must keep them inside the project (`dna run`, which deletes nothing, writes anywhere)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dna.config import parse_params
from dna.errors import ConfigError
from flows.entry import check_dvc_params, load
from tests.conftest import tiny_raw

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = ["/tmp/dna-outputs", "../outputs", "runs/../../elsewhere", "~/outputs"]


@pytest.fixture
def project(tmp_path) -> Path:
    """A params.yaml spelling out every key dvc.yaml tracks (the shipped one), in a project of its own."""
    (tmp_path / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    return tmp_path


def _with_outputs(project: Path, outputs: str) -> Path:
    raw = yaml.safe_load((project / "params.yaml").read_text())
    (project / "params.yaml").write_text(yaml.safe_dump(raw | {"outputs": outputs}, sort_keys=False))
    return project / "params.yaml"


@pytest.mark.parametrize("outputs", OUTSIDE)
def test_outputs_outside_the_project_are_refused_before_dvc_runs(project, outputs):
    with pytest.raises(ConfigError) as err:
        check_dvc_params(_with_outputs(project, outputs))
    message = str(err.value)
    assert f"outputs={outputs!r}" in message and "relative path inside the project, without '..'" in message
    assert "DVC deletes them" in message and "\n" not in message


def test_an_override_of_outputs_is_checked_as_dvc_exp_run_would_write_it(project):
    check_dvc_params(project / "params.yaml")
    check_dvc_params(project / "params.yaml", {"outputs": "runs/first"})
    with pytest.raises(ConfigError, match=r"outputs='/srv/runs'"):
        check_dvc_params(project / "params.yaml", {"outputs": "/srv/runs"})


def test_a_step_that_dvc_runs_refuses_outputs_outside_the_project(project, monkeypatch, tmp_path):
    """`dvc repro` run by hand: the first step stops, so DVC does not go on to delete the later steps' outputs."""
    raw = tiny_raw(tmp_path / "outputs") | {"device": "cpu"}  # absolute: fine without DVC
    params_file = project / "params.yaml"
    params_file.write_text(yaml.safe_dump(raw, sort_keys=False))
    assert load(params_file).outputs == str(tmp_path / "outputs")
    monkeypatch.setenv("DVC_STAGE", "data")
    with pytest.raises(ConfigError, match=r"relative path inside the project"):
        load(params_file)


def test_the_library_takes_absolute_outputs():
    assert parse_params(tiny_raw(Path("/tmp/dna-run")), check_paths=False, deep=False).outputs == "/tmp/dna-run"
