"""Named targets (search.targets): one network per target from the one rating."""
from __future__ import annotations

import shutil

import pandas as pd
import pytest

from tests.conftest import tiny_raw


def _params(raw):
    from dna.config import parse_params

    return parse_params(raw)


def test_budgets_alone_are_the_one_target_default_and_fingerprint_as_before(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["search"]["budgets"] = {"macs": 1e6}
    search = _params(raw).search
    assert list(search.named_targets()) == ["default"]
    assert search.named_targets()["default"].budgets() == {"macs": 1e6}
    assert search.target_key("default") == "search.budgets"
    dumped = search.model_dump(mode="json", context={"fingerprint": True})
    assert dumped == {"budgets": {"macs": 1e6}, "front_axis": "macs"}  # the keys added since leave older digests


@pytest.mark.parametrize("search, message", [
    ({"budgets": {"macs": 1e6}, "targets": {"small": {"macs": 1e6}}}, "not both"),
    ({"targets": {"Small": {"macs": 1e6}}}, "target name 'Small'"),
    ({"targets": {"a-b": {"macs": 1e6}}}, "target name 'a-b'"),
    ({"targets": {"phone": {"latency_ms": 5, "latency_profile": "/etc/latency.csv"}}}, "inside the project"),
    ({"targets": {"phone": {"latency_ms": 5, "latency_profile": "../latency.csv"}}}, "inside the project"),
    ({"targets": {"small": {"flops": 1e6}}}, "flops"),
])
def test_bad_targets_are_refused_naming_the_key(tmp_path, search, message):
    from dna.errors import ConfigError

    raw = tiny_raw(tmp_path)
    raw["search"] = search
    with pytest.raises(ConfigError, match=message):
        _params(raw)


def rated(prepared_run, tmp_path) -> dict:
    """The tiny params of a copy of the prepared run whose blocks are rated: ready to search."""
    from dna.pipeline import Run, stage_rate

    shutil.copytree(prepared_run.paths.root, tmp_path / "outputs")
    raw = tiny_raw(tmp_path / "outputs")
    run = Run(_params(raw))
    for block in range(run.space.num_blocks):
        stage_rate(run, block)
    return raw


def test_each_target_gets_its_own_network_under_its_budgets(prepared_run, tmp_path):
    from dna.arch import Arch
    from dna.pipeline import Run, stage_search

    raw = rated(prepared_run, tmp_path)
    raw["search"] = {"budgets": {}}
    largest = stage_search(Run(_params(raw)))["macs"]
    budgets = {"small": 0.8 * largest, "large": 2 * largest, "also_small": 0.8 * largest}
    raw["search"] = {"targets": {name: {"macs": macs} for name, macs in budgets.items()}, "front_axis": "macs"}
    run = Run(_params(raw))
    metrics = stage_search(run)
    family = pd.read_csv(run.paths.targets_table)
    assert list(family["target"]) == ["small", "large", "also_small"]
    for row in family.itertuples():
        assert row.macs <= budgets[row.target] and row.budget_macs == budgets[row.target]
        assert Arch.load(run.paths.at(row.target).arch).tag() == row.arch
        assert metrics["targets"][row.target]["macs"] == row.macs
    small, large, also = family.itertuples()
    assert small.macs < large.macs and small.score > large.score  # the larger budget buys a better rating
    assert (also.same_as, small.same_as, large.same_as) == ("small", "small", "large")
    assert Arch.load(run.paths.arch) == Arch.load(run.paths.at("small").arch)  # the primary target's
    front = pd.read_csv(run.paths.search_dir / "front.csv")
    assert front["targets"].fillna("").str.contains("large").sum() <= 1
    chosen = pd.read_csv(run.paths.search_dir / "chosen.csv")
    assert list(chosen["target"]) == list(family["target"])


def test_a_target_no_network_meets_is_named(prepared_run, tmp_path):
    from dna.errors import ConfigError
    from dna.pipeline import Run, stage_search

    raw = rated(prepared_run, tmp_path)
    raw["search"] = {"targets": {"roomy": {"macs": 1e12}, "tiny": {"params": 1e12, "macs": 1.0}}}
    with pytest.raises(ConfigError, match=r"search\.targets\.tiny"):
        stage_search(Run(_params(raw)))


def test_the_paper_preset_chooses_dna_a_to_d_in_well_under_a_second(tmp_path, monkeypatch):
    """`dna space` on configs/imagenet.yaml: the four targets at the paper's multiply-adds, each searched exactly over
    a synthetic rating of the 3.5e20-network space."""
    import re
    from pathlib import Path

    from typer.testing import CliRunner

    from dna.cli import app

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["space", "--params", "configs/imagenet.yaml", "-S", f"outputs={tmp_path}"],
                                terminal_width=200)
    assert result.exit_code == 0, result.output
    rows = {m[0]: (float(m[1].replace(",", "")), float(m[2].replace(",", "")), float(m[3]))
            for m in re.findall(r"(dna_[abcd]) .*?macs ([\d,]+) .*?[\d,]+ .*?([\d,]+) .*?([\d.]+) s", result.output)}
    assert sorted(rows) == ["dna_a", "dna_b", "dna_c", "dna_d"]
    for budget, macs, seconds in rows.values():
        assert 0.9 * budget < macs <= budget and seconds < 1.0


def test_a_preset_chooses_its_targets_whole(tmp_path, monkeypatch):
    """A preset's targets replace its base's (merged, and as the overrides a DVC experiment applies: the base's other
    targets removed with `~key`)."""
    import yaml

    from dna.config import differences, load_params, merged, parse_overrides

    base = {"search": {"targets": {"small": {"macs": 1}, "large": {"macs": 2}}, "front_axis": "macs"}}
    preset = {"search": {"targets": {"phone": {"latency_ms": 5}}}}
    assert merged(base, preset)["search"] == {"targets": {"phone": {"latency_ms": 5}}, "front_axis": "macs"}
    assert merged(base, {"search": {"budgets": {"macs": 3}}})["search"] == {"budgets": {"macs": 3},
                                                                            "front_axis": "macs"}
    assert differences(base, preset) == {"~search.targets.small": None, "~search.targets.large": None,
                                         "search.targets.phone": {"latency_ms": 5}}
    raw = tiny_raw(tmp_path / "outputs") | {"search": {"targets": {"small": {"macs": 1e6}, "large": {"macs": 2e6}}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    params = load_params("params.yaml", parse_overrides(["~search.targets.small", "search.targets.tiny.macs=5e5"]),
                         deep=False)
    assert list(params.search.named_targets()) == ["large", "tiny"]


def test_two_targets_of_one_network_train_it_once(prepared_run, tmp_path, caplog):
    """Two targets whose budgets choose the same network: `dna retrain` trains the first, and the second resumes
    from its finished state (the fingerprint matches), so both hold the same weights and history."""
    import logging

    import torch

    from dna.checkpoint import load_checkpoint
    from dna.pipeline import Run, stage_search
    from dna.stages import STAGES, run_stage

    raw = rated(prepared_run, tmp_path)
    raw["search"] = {"targets": {"first": {"macs": 1e9}, "second": {"params": 1e9}}}
    run = Run(_params(raw))
    stage_search(run)
    assert list(pd.read_csv(run.paths.targets_table)["same_as"]) == ["first", "first"]
    retrain = next(s for s in STAGES if s.name == "retrain")
    with caplog.at_level(logging.INFO, logger="dna.stages.retrain"):
        first, second = run_stage(retrain, run)
    assert "target second chose the network of target first: resumed from its training" in caplog.text
    assert first == second
    one, two = (load_checkpoint(run.paths.at(t).model)["model"] for t in ("first", "second"))
    assert all(torch.equal(one[k], two[k]) for k in one)
    histories = [pd.read_csv(run.paths.at(t).retrain_dir / "history.csv") for t in ("first", "second")]
    assert histories[0].equals(histories[1])


def test_a_target_that_is_not_there_is_refused_by_the_stage_commands(tmp_path):
    import yaml
    from typer.testing import CliRunner

    from dna.cli import app

    raw = tiny_raw(tmp_path / "outputs")
    raw["search"] = {"targets": {"small": {"macs": 1e6}}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["export", "--params", str(tmp_path / "params.yaml"), "--target", "large"])
    assert result.exit_code == 2 and "--target large: the search targets are small" in result.output
    assert not (tmp_path / "outputs").exists()
