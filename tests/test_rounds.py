"""DNA+ rounds: each round after the first has the network the round before found and retrained as its teacher, bit
for bit; every round's params are checked before any work; a run stopped inside a round resumes inside it, by `dna run`
or by the rounds stage (`dna rounds`), which runs the rounds after the first."""
import json
import shutil

import pytest
import torch
import yaml
from typer.testing import CliRunner

from dna.checkpoint import load_checkpoint
from dna.cli import app
from dna.config import parse_params
from dna.engine import Engine
from dna.errors import ConfigError
from dna.paths import Paths
from dna.rounds import all_rounds, primary_target, round_dir, round_params, summary_rows
from tests.conftest import tiny_raw


def two_rounds(tmp_path) -> dict:
    raw = tiny_raw(tmp_path / "outputs")
    raw["rounds"] = {"count": 2}
    return raw


def test_round_two_is_the_same_search_with_round_one_network_as_teacher(tmp_path):
    params = parse_params(two_rounds(tmp_path))
    first, second = all_rounds(params)  # round 2 is checked before round 1 has written its network
    assert first.outputs == params.outputs and first.teacher == params.teacher
    assert first.rounds.count == 1 and second.rounds.count == 1
    assert second.outputs == str(tmp_path / "outputs" / "rounds" / "round_2") == str(round_dir(params, 2))
    previous = Paths(tmp_path / "outputs")
    assert (second.teacher.source, second.teacher.arch, second.teacher.checkpoint) == (
        "arch", str(previous.arch), str(previous.model))
    assert second.teacher.boundaries == [2, 3]  # the ends of its searched stages: one per block of the space
    assert second.teacher.output_stride == 32 and second.teacher.train.epochs == 0  # taken as it is
    for key in ("data", "space", "supervision", "distill", "rating", "search", "retrain", "export", "seed"):
        assert getattr(second, key) == getattr(params, key), key
    with pytest.raises(ValueError, match="round 3 of rounds.count=2"):
        round_params(params, 3)
    with pytest.raises(ConfigError, match=r"teacher.checkpoint=.*outputs/targets/default/retrain/model.pt.* must be an "
                                          r"existing file"):
        round_params(params, 2)  # with paths checked, round 2 needs round 1's network


def test_with_a_multiplier_round_two_trains_round_one_network_scaled_up(tmp_path):
    raw = two_rounds(tmp_path)
    raw["rounds"] |= {"width_multiplier": 1.5, "depth_multiplier": 2.0}
    params = parse_params(raw)
    _, second = all_rounds(params)
    teacher = second.teacher
    assert (teacher.source, teacher.arch, teacher.checkpoint) == ("arch", str(Paths(tmp_path / "outputs").arch), None)
    assert (teacher.width_multiplier, teacher.depth_multiplier) == (1.5, 2.0)
    assert teacher.train == params.teacher.train and teacher.train.epochs > 0  # round 1's recipe, from scratch
    dumped = parse_params(two_rounds(tmp_path)).model_dump(context={"fingerprint": True})
    assert "width_multiplier" not in dumped["rounds"]


def test_rounds_count_is_checked_and_one_round_dumps_as_before(tmp_path):
    raw = two_rounds(tmp_path)
    raw["rounds"] = {"count": 0}
    with pytest.raises(ConfigError, match=r"rounds.count=0"):
        parse_params(raw)
    raw["rounds"] = {"count": 2, "every": 1}
    with pytest.raises(ConfigError, match=r"rounds.every: unknown key; allowed keys here: count"):
        parse_params(raw)
    one = parse_params(tiny_raw(tmp_path / "outputs"))
    # configs without rounds fingerprint as before the key existed
    assert "rounds" not in one.model_dump(context={"fingerprint": True})


@pytest.fixture(scope="module")
def two_round_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("rounds")
    (root / "params.yaml").write_text(yaml.safe_dump(two_rounds(root)))
    result = CliRunner().invoke(app, ["run", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    return root, result.output


@pytest.mark.slow  # two whole tiny runs: about a minute here
def test_round_two_teacher_is_round_one_retrained_network_bit_for_bit(two_round_run):
    root, output = two_round_run
    one, two = Paths(root / "outputs"), Paths(root / "outputs" / "rounds" / "round_2")
    retrained, teacher = load_checkpoint(one.model), load_checkpoint(two.teacher)
    assert teacher["arch"] == retrained["arch"]
    assert retrained["model"].keys() == teacher["model"].keys()
    assert all(torch.equal(retrained["model"][k], teacher["model"][k]) for k in retrained["model"])
    for paths in (one, two):
        assert paths.onnx.is_file() and paths.arch.is_file()
    rows, saved = summary_rows(root / "outputs"), json.loads((root / "outputs" / "rounds.json").read_text())
    assert [r["round"] for r in rows] == [1, 2]
    best = max(rows, key=lambda r: r["test_accuracy"])
    assert (saved["best_round"], saved["best_test_accuracy"]) == (best["round"], best["test_accuracy"])
    retrain_one = json.loads((one.retrain_dir / "metrics.json").read_text())
    assert rows[1]["teacher_test_accuracy"] == pytest.approx(retrain_one["test_accuracy"], abs=1e-6)
    assert rows[1]["teacher"] == f"arch:{one.arch}" and rows[0]["teacher"] == "tinynet_e"
    assert rows[1]["arch"] and rows[1]["macs"] > 0
    assert "round 2 of 2" in output and "rounds.json" in output


@pytest.mark.slow
def test_the_rounds_stage_resumes_a_run_stopped_inside_round_two(two_round_run, monkeypatch):
    root, _ = two_round_run
    two = Paths(root / "outputs" / "rounds" / "round_2")
    before = json.loads((root / "outputs" / "rounds.json").read_text())
    for folder in (two.search_dir, two.retrain_dir, two.export_dir):  # stopped after round 2's distillation
        shutil.rmtree(folder)
    resumed = []
    original = Engine.resume

    def spy(self):
        fitted = original(self)
        resumed.append((self.name, fitted.resumed_from, self.epochs))
        return fitted

    monkeypatch.setattr(Engine, "resume", spy)
    result = CliRunner().invoke(app, ["rounds", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    trained = [(name, start) for name, start, epochs in resumed if start < epochs]
    assert trained == [("retrain", 0)], resumed  # only round 2's retraining ran: every other stage was in place
    assert [r[0] for r in resumed].count("retrain") == 1, "round 1 is left to the default stages"
    after = json.loads((root / "outputs" / "rounds.json").read_text())
    assert after == before  # the same network found, retrained to the same weights


def test_the_dna_plus_preset_teaches_round_two_with_round_one_network_scaled_up(tmp_path):
    """configs/dna_plus.yaml is params.yaml (data, teacher, space, recipes) searched in two rounds, and round 2's
    teacher is the network round 1 found made wider and deeper, trained from scratch: a bigger teacher than the
    network it teaches to find, not that network again."""
    from timm.models._efficientnet_builder import _decode_block_str

    from dna.config import load_params, preset_overrides
    from dna.spaces import build_space
    from dna.teacher import create_teacher, teacher_arch
    from tests.conftest import ROOT

    # the same data, teacher, space and recipes: only the rounds (and where the outputs go) differ
    differs = preset_overrides(ROOT / "configs" / "dna_plus.yaml", ROOT / "params.yaml")
    assert set(differs) == {"outputs", "rounds"} and differs["rounds"]["count"] == 2  # params.yaml has no rounds
    params = load_params(ROOT / "configs" / "dna_plus.yaml", {"outputs": str(tmp_path / "outputs")}, check_paths=False)
    space = build_space(params.space, params.data.channels, params.data.image_size, num_classes=10)
    found = space.arch([(space.cells(b)[-1], (0,) * space.cells(b)[-1].depth) for b in range(space.num_blocks)])
    first = Paths(tmp_path / "outputs", primary_target(params))
    found.save(first.arch)  # what round 1 writes: its first target's network
    second = round_params(params, 2).teacher
    assert (second.source, second.arch, second.checkpoint) == ("arch", str(first.arch), None)
    assert second.train == params.teacher.train and second.train.epochs >= 1  # trained from scratch, as round 1's
    teacher = teacher_arch(second)

    def width(layer: str) -> int:
        return _decode_block_str(layer)[0]["out_chs"]

    assert teacher.stem > found.stem and teacher.head > found.head
    for ours, theirs in zip(teacher.stages, found.stages, strict=True):
        assert len(ours) > len(theirs) and width(ours[-1]) > width(theirs[-1]), (ours, theirs)
    bigger = create_teacher(round_params(params, 2), num_classes=10, in_chans=1)
    assert sum(p.numel() for p in bigger.parameters()) > sum(p.numel() for p in space.build(found).parameters())
