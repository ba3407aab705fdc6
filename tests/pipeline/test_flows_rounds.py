"""DNA+ through the pipeline flow: with rounds.count 2 it reproduces rounds/dvc.yaml, i.e. the default stages (round 1)
in a real `dvc repro`, then the rounds stage, whose flow runs every step of round 2 on its own params file. MLflow
nests each round's step runs under a run of the round; both rounds' networks are registry candidates and promotion
keeps the better. The stage is the optional step of the stage table; the flow refuses a round whose teacher is not
there before any work."""
from __future__ import annotations

import hashlib
import json

import pytest
import yaml
from pipeline_support import ROOT, git_dvc_project, tiny_raw, working_directory, write_params

from flows.code_deps import code_deps, listed_code
from flows.pipeline import pipeline_steps
from flows.steps import OPTIONAL_STEPS, STAGES

ROUNDS = yaml.safe_load((ROOT / "rounds" / "dvc.yaml").read_text())


def _paths(entries: list) -> set[str]:
    return {next(iter(e)) if isinstance(e, dict) else e for e in entries}


def test_rounds_dvc_yaml_is_the_optional_step_of_the_stage_table():
    step, stage = next(s for s in OPTIONAL_STEPS if s.name == "rounds"), ROUNDS["stages"]["rounds"]
    assert list(ROUNDS["stages"]) == ["rounds"] and "rounds" not in STAGES
    assert stage["wdir"] == ".." and stage["cmd"] == "dna rounds"
    assert stage["params"] == list(step.params)
    assert _paths(stage["outs"]) == {f"${{outputs}}/{o}" for o in step.outputs}
    assert _paths(stage["metrics"]) == {f"${{outputs}}/{step.metrics}"}
    # round 1's network comes first: DVC runs the default stages before this one
    assert {"${outputs}/search/targets", "${outputs}/targets"} <= set(stage["deps"])
    assert set(listed_code(stage)) == set(code_deps([stage["cmd"]])), "python -m flows.dvc_files --write"


def test_the_rounds_flow_refuses_a_round_without_its_teacher_before_any_work(prefect_api, tmp_path):
    from dna.errors import ConfigError
    from flows.rounds import rounds_flow

    raw = tiny_raw() | {"rounds": {"count": 2}}
    write_params(tmp_path / "params.yaml", raw)
    with working_directory(tmp_path), pytest.raises(ConfigError, match=r"teacher.checkpoint=.*retrain/model.pt"):
        rounds_flow.fn("params.yaml")  # round 1 has not run: round 2 has no teacher
    assert not (tmp_path / "outputs" / "rounds").exists()


@pytest.fixture(scope="module")
def two_rounds(prefect_api, tmp_path_factory):
    """The pipeline flow on a git + DVC project whose params ask for two rounds."""
    from flows.pipeline import pipeline_flow

    repo = git_dvc_project(tmp_path_factory.mktemp("rounds-repo"),
                           ("dvc.yaml", "rounds/dvc.yaml", ".gitignore", ".dvcignore"))
    write_params(repo / "params.yaml", tiny_raw() | {"rounds": {"count": 2}})
    return repo, pipeline_flow(str(repo)), pipeline_flow(str(repo))


@pytest.mark.slow  # about four minutes: eight stage processes for round 1, then round 2 in one
def test_two_rounds_through_dvc_nest_in_mlflow_and_both_networks_are_registry_candidates(two_rounds):
    from mlflow.tracking import MlflowClient

    from dna.checkpoint import file_digest, load_checkpoint
    from dna.paths import Paths
    from dna.rounds import summary_rows
    from flows.registry import ONNX_DIGEST_TAG
    from flows.tracking import nested_runs

    repo, first, second = two_rounds
    addresses = [a for a, _ in pipeline_steps(1, ["default"])]  # a target's steps: <step>@default
    assert first["ran"][:-1] == addresses and first["ran"][-1].endswith("rounds"), first["ran"]
    assert second["ran"] == [], "a second reproduction finds every stage, the rounds one too, up to date"

    one, two = Paths(repo / "outputs"), Paths(repo / "outputs" / "rounds" / "round_2")
    round_params = yaml.safe_load((two.root / "params.yaml").read_text())
    assert repo / round_params["teacher"]["checkpoint"] == one.model and repo / round_params["outputs"] == two.root
    retrained, teacher = load_checkpoint(one.model)["model"], load_checkpoint(two.teacher)["model"]
    assert retrained.keys() == teacher.keys() and all((retrained[k] == teacher[k]).all() for k in retrained)
    assert two.onnx.is_file()
    digest = hashlib.md5((two.root / "params.yaml").read_bytes()).hexdigest()  # no other stage writes it
    assert (repo / ".dvc" / "cache" / "files" / "md5" / digest[:2] / digest[2:]).is_file(), \
        "DVC versions each round's outputs, as it does round 1's"
    rows = summary_rows(one.root)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[1]["teacher"] == "arch:outputs/search/targets/default/arch.yaml"

    client = MlflowClient(f"sqlite:///{repo / 'mlflow.db'}")
    uri = client.tracking_uri
    stages = nested_runs(uri, first["mlflow_run_id"])
    assert [r.info.run_name for r in stages] == first["ran"][:-1] + ["rounds"]
    rounds_run = stages[-1]
    (round_two,) = nested_runs(uri, rounds_run.info.run_id)
    assert round_two.info.run_name == "round 2" and round_two.data.tags["dna.round"] == "2"
    # a later round runs every step but the figures, which only draw pictures
    assert [r.info.run_name for r in nested_runs(uri, round_two.info.run_id)] == [a for a in addresses
                                                                                  if a != "figures"]
    assert all(r.info.status == "FINISHED" for r in (rounds_run, round_two))
    assert rounds_run.data.metrics["best_round"] == json.loads((one.root / "rounds.json").read_text())["best_round"]

    versions = {int(v.version): v for v in client.search_model_versions("name='dna-student'")}
    # each round registered its network; a round whose ONNX file is byte for byte an earlier round's (round 2 found
    # and retrained round 1's network again) is that same version: the registry keeps one version per ONNX file
    digests = [file_digest(p.onnx) for p in (one, two)]
    by_digest = {v.tags[ONNX_DIGEST_TAG]: n for n, v in versions.items()}
    assert sorted(by_digest) == sorted(set(digests)) and len(by_digest) == len(versions), "each round registered"
    accuracy = {n: float(v.tags["test_accuracy"]) for n, v in versions.items()}
    for row, onnx in zip(rows, digests):
        assert accuracy[by_digest[onnx]] == pytest.approx(row["test_accuracy"])
    champion = int(client.get_model_version_by_alias("dna-student", "champion").version)
    assert accuracy[champion] == max(accuracy.values()), "promotion keeps the better round's network"
