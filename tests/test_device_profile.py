"""Latency profiles taken on another device: the kit `dna device-kit` writes, timed in another process with other
thread settings, budgets a target's latency."""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from tests.conftest import tiny_raw


@pytest.fixture(scope="module")
def device(tmp_path_factory):
    """A kit of the tiny space, timed by its script in another process (2 threads, isolated mode)."""
    from dna.cli import app

    root = tmp_path_factory.mktemp("project")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_raw(root / "outputs")))
    runner = CliRunner()
    result = runner.invoke(app, ["device-kit", str(root / "kit"), "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    done = subprocess.run([sys.executable, "-I", "time_pieces.py", "--threads", "2", "--runs", "6", "--rounds", "2",
                           "--warmup", "1"], cwd=root / "kit", capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return root


def test_the_kit_script_needs_only_onnxruntime_and_numpy(device):
    tree = ast.parse((device / "kit" / "time_pieces.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert imported - set(sys.stdlib_module_names) == {"onnxruntime", "numpy"}


def test_a_device_profile_has_every_piece_and_its_settings(device):
    import json

    from dna.config import parse_params
    from dna.latency import device_profile, pieces
    from dna.run import Run

    run = Run(parse_params(tiny_raw(device / "outputs")))
    table = device_profile(device / "kit" / "latency.csv", run.space).table
    expected = pd.DataFrame(pieces(run.space))
    assert table["kind"].iloc[0] == "overhead" and len(table) == len(expected) + 1
    assert table.iloc[1:][["kind", "block", "position", "op", "in_width", "width"]].reset_index(drop=True).equals(
        expected[["kind", "block", "position", "op", "in_width", "width"]])
    assert (table["latency_ms"] > 0).all()
    meta = json.loads((device / "kit" / "profile.json").read_text())
    assert meta["device"] and meta["settings"]["threads"] == 2 and meta["settings"]["runs"] == 6


def test_a_profile_of_another_space_is_refused_naming_its_path(device):
    from dna.config import parse_params
    from dna.errors import ConfigError
    from dna.latency import device_profile
    from dna.run import Run

    raw = tiny_raw(device / "outputs")
    raw["space"]["head"] = 48
    with pytest.raises(ConfigError, match=r"kit/latency\.csv: measured for another space"):
        device_profile(device / "kit" / "latency.csv", Run(parse_params(raw)).space)
    with pytest.raises(ConfigError, match=r"nowhere/latency\.csv: not a device's profile"):
        device_profile(device / "nowhere" / "latency.csv", Run(parse_params(raw)).space)


def test_the_kit_refuses_a_folder_that_is_not_empty(device):
    from dna.cli import app

    result = CliRunner().invoke(app, ["device-kit", str(device / "kit"), "--params", str(device / "params.yaml")])
    assert result.exit_code == 2 and "kit: exists and is not an empty folder" in result.output
    assert (device / "kit" / "latency.csv").is_file()  # nothing of it removed


def test_a_target_budgets_the_latency_its_device_measured(device, prepared_run, tmp_path, monkeypatch):
    """Two targets at one latency budget, one on this machine's profile, one on the device's: each chosen network
    meets its own device's budget, as that device's profile predicts it."""
    from dna.arch import Arch
    from dna.config import parse_params
    from dna.latency import LatencyTable, device_profile
    from dna.pipeline import Run, stage_profile, stage_rate, stage_search

    monkeypatch.chdir(tmp_path)
    shutil.copytree(device / "kit", tmp_path / "kit")
    shutil.copytree(prepared_run.paths.root, tmp_path / "outputs")
    raw = tiny_raw(tmp_path / "outputs")
    raw["profile"] = {"runs": 6, "rounds": 2, "warmup": 1}
    run = Run(parse_params(raw))
    for block in range(run.space.num_blocks):
        stage_rate(run, block)
    stage_profile(run)
    phone = device_profile(tmp_path / "kit" / "latency.csv", run.space)
    targets = {"here": {"latency_ms": 1e3}, "phone": {"latency_ms": 1e3, "latency_profile": "kit/latency.csv"}}
    raw["search"] = {"targets": targets}
    stage_search(Run(parse_params(raw)))
    unbound = pd.read_csv(run.paths.targets_table).set_index("target").loc["phone", "latency_ms"]
    targets["phone"]["latency_ms"] = 0.99 * unbound  # binds on the device's own latency
    run = Run(parse_params(raw))
    stage_search(run)
    family = pd.read_csv(run.paths.targets_table).set_index("target")
    arch = Arch.load(run.paths.at("phone").arch)
    assert family.loc["phone", "latency_ms"] == pytest.approx(phone.predict(run.space, arch))
    assert family.loc["phone", "latency_ms"] <= 0.99 * unbound
    assert family.loc["phone", "latency_profile"] == "kit/latency.csv"
    here = LatencyTable.load(run.paths.latency).predict(run.space, Arch.load(run.paths.at("here").arch))
    assert family.loc["here", "latency_ms"] == pytest.approx(here)  # this machine's profile for the other target
