"""The whole chain through the `dna` command on a tiny configuration, and its outputs checked against each other."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from typer.testing import CliRunner

from dna.arch import Arch, count_cost
from dna.checkpoint import load_checkpoint
from dna.cli import app
from dna.config import load_params
from dna.export import onnx_predict, read_metadata
from dna.pipeline import Run
from tests.conftest import tiny_raw


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    raw = tiny_raw(root / "outputs")
    raw["search"]["budgets"] = {"params": 60_000}
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    return Run(load_params(root / "params.yaml")), result.output, root


def test_run_prints_where_outputs_went(finished):
    run, output, _ = finished
    for path in (run.paths.arch, run.paths.model, run.paths.onnx):
        assert path.is_file()
    for path in (run.paths.arch.parent.parent, run.paths.model, run.paths.onnx):  # the search's: every target's
        assert str(path) in output
    assert "teacher test accuracy" in output


def test_chosen_arch_is_in_the_space_and_meets_the_budget(finished):
    run, _, _ = finished
    arch = Arch.load(run.paths.arch)
    assert run.space.outside(arch) == []
    search = json.loads((run.paths.search_dir / "metrics.json").read_text())
    params, macs, _ = count_cost(arch.build(run.data.num_classes, run.data.in_chans), (1, 1, 16, 16))
    assert (search["params"], search["macs"]) == (params, macs), "search cost = cost of the built network"
    assert params <= 60_000
    front = pd.read_csv(run.paths.search_dir / "front.csv")
    assert front["chosen"].sum() <= 1
    assert (front["macs"].diff().dropna() > 0).all() and (front["score"].diff().dropna() < 0).all()
    # every front point under the budget rates no better than the chosen one (it is the optimum)
    assert front.loc[front["params"] <= 60_000, "score"].min() >= search["score"] - 1e-9


def test_exported_model_matches_the_retrained_one(finished):
    run, _, _ = finished
    state = load_checkpoint(run.paths.model)
    arch = Arch.from_yaml(state["arch"])
    model = arch.build(run.data.num_classes, run.data.in_chans).eval()
    model.load_state_dict(state["model"])
    images = run.data.images("test")
    with torch.no_grad():
        expected = model(images).numpy()
    got = onnx_predict(run.paths.onnx, images.numpy())
    assert np.abs(got - expected).max() <= 1e-4
    meta = read_metadata(run.paths.onnx)
    assert Arch.from_dict(json.loads(meta["arch"])) == Arch.load(run.paths.arch)
    retrain = json.loads((run.paths.retrain_dir / "metrics.json").read_text())
    export = json.loads((run.paths.export_dir / "metrics.json").read_text())
    assert float(meta["test_accuracy"]) == pytest.approx(retrain["test_accuracy"], abs=1e-6)
    assert export["onnx_test_accuracy"] == pytest.approx(retrain["test_accuracy"], abs=1 / len(run.data.test))


def test_second_run_resumes_everything_from_checkpoints(finished):
    run, _, root = finished
    result = CliRunner().invoke(app, ["run", "--params", str(root / "params.yaml")])
    assert result.exit_code == 0, result.output
    assert "teacher: resuming after epoch 2" in result.output
    assert "retrain: resuming after epoch 2" in result.output
    assert "epoch 1/2" not in result.output, "no epoch is trained again"
    for block in range(run.space.num_blocks):
        assert load_checkpoint(run.paths.supernet(block))["epoch"] == run.params.distill.epochs


def test_arch_cost_reports_membership(finished, tmp_path):
    run, _, root = finished
    member = CliRunner().invoke(app, ["arch", "cost", str(run.paths.arch), "--params", str(root / "params.yaml")])
    assert member.exit_code == 0, member.output
    assert "member of the configured search space" in member.output
    outsider = Arch.load(run.paths.arch).to_dict()
    outsider["arch"][1][0] = outsider["arch"][1][0].replace("_k3_", "_k7_").replace("_k5_", "_k7_")
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(outsider))
    other = CliRunner().invoke(app, ["arch", "cost", str(tmp_path / "other.yaml"),
                                     "--params", str(root / "params.yaml")])
    assert other.exit_code == 1
    assert "block 0 layer 0" in other.output


def test_bad_params_fail_before_any_work(tmp_path):
    raw = tiny_raw(tmp_path / "outputs")
    raw["retrain"]["train"]["optimizer"] = "adagrad"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    result = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 2
    assert "retrain.train.optimizer" in result.output and "adamw" in result.output
    assert not (tmp_path / "outputs").exists()


def test_supernet_init_extracts_the_subnet_then_re_estimates_batchnorm(finished):
    from dna.data import eval_view
    from dna.pipeline import build_student, init_from_supernet

    run, _, _ = finished
    arch = Arch.load(run.paths.arch)
    model = build_student(run, arch)
    extraction = init_from_supernet(run, model, arch)
    (cell0, ops0), (cell1, ops1) = run.space.parse(arch)
    sup0 = load_checkpoint(run.paths.supernet(0))["model"]
    sup1 = load_checkpoint(run.paths.supernet(1))["model"]
    # the tiny space's block 0 is as wide as the teacher's boundary: every searched layer has a counterpart
    assert extraction.not_copied == {}
    assert len(extraction.copied) == 3 + cell0.depth + cell1.depth
    assert torch.equal(model.conv_stem.weight, sup0[f"{cell0.name}.layers.0.0.0.weight"])
    assert torch.equal(model.blocks[1][0].conv_dw.weight, sup0[f"{cell0.name}.layers.1.{ops0[0]}.conv_dw.weight"])
    assert torch.equal(model.blocks[2][0].conv_pw.weight, sup1[f"{cell1.name}.layers.0.{ops1[0]}.conv_pw.weight"])
    # BatchNorm statistics are those of the network's own features on a calibration batch, not the supernet's
    data = eval_view(run.data)
    positions = data.stratified("train", run.params.rating.calibration_size, run.params.seed)
    images = data.images("train", positions=positions)
    with torch.no_grad():
        stem = model.conv_stem(images)
    assert torch.allclose(model.bn1.running_mean, stem.mean(dim=(0, 2, 3)), atol=1e-5)
    assert not torch.allclose(model.bn1.running_mean, sup0[f"{cell0.name}.layers.0.0.1.running_mean"], atol=1e-3)


def test_retraining_builds_the_network_with_the_configured_drop_path(tmp_path):
    from timm.layers import DropPath

    from dna.config import parse_params
    from dna.pipeline import build_student

    raw = tiny_raw(tmp_path / "outputs")
    raw["retrain"]["train"] = {**raw["retrain"]["train"], "drop_path_rate": 0.3}
    run = Run(parse_params(raw))
    cells = [run.space.cells(b)[-1] for b in range(run.space.num_blocks)]
    arch = run.space.arch([(cell, (0,) * cell.depth) for cell in cells])
    probs = [m.drop_prob for m in build_student(run, arch).modules() if isinstance(m, DropPath)]
    layers = sum(len(stage) for stage in arch.stages)
    assert probs == pytest.approx([0.3 * i / layers for i in range(1, layers)])


def test_rand_augment_of_a_recipe_reaches_only_the_training_split_it_trains_on(tmp_path):
    from PIL import Image

    from dna.config import parse_params
    from dna.pipeline import stage_data
    from tests.test_data import _rand_augmented as rand_augmented

    for label, level in enumerate((40, 200)):
        folder = tmp_path / "images" / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(8):
            Image.fromarray(np.full((20, 20, 3), level + i, dtype=np.uint8), "RGB").save(folder / f"{i}.png")
    raw = tiny_raw(tmp_path / "outputs")
    raw["data"] = {"source": "imagefolder", "root": str(tmp_path / "images"), "image_size": 16, "channels": 3,
                   "rate_fraction": 0.25, "test_fraction": 0.25}
    raw["retrain"]["train"] = {**raw["retrain"]["train"], "rand_augment": "rand-m9-mstd0.5"}  # not the teacher's
    run = Run(parse_params(raw))
    stage_data(run)
    assert run.data_for(run.params.teacher.train) is run.data and not rand_augmented(run.data.train)
    data = run.data_for(run.params.retrain.train)
    assert rand_augmented(data.train) and not rand_augmented(data.rate) and not rand_augmented(data.test)
    assert data.train.indices == run.data.train.indices, "the same split"


def test_the_figures_stage_draws_every_picture_from_the_tables_alone(finished, monkeypatch):
    """The search and retrain stages write tables; the figures stage draws the front (the chosen network marked), the
    rating spread and the curves from them, without building a model or touching what trained."""
    import matplotlib.pyplot as plt

    from dna.stages.figures import stage_figures

    run, output, _ = finished
    pictures = [run.paths.search_dir / "front.png", run.paths.search_dir / "rating_spread.png",
                run.paths.search_dir / "curves.png"]
    assert all(p.is_file() for p in pictures)  # `dna run` ran the figures stage
    trained = {p: p.stat().st_mtime_ns for p in (run.paths.model, run.paths.arch)}
    for p in pictures:
        p.unlink()
    marked = []
    real = plt.Axes.scatter
    monkeypatch.setattr(plt.Axes, "scatter", lambda ax, x, y, **kw: marked.append((x, y)) or real(ax, x, y, **kw))
    assert stage_figures(run)["figures"] == [str(p) for p in pictures]
    assert all(p.is_file() and p.stat().st_size > 1000 for p in pictures)
    chosen = json.loads((run.paths.search_dir / "metrics.json").read_text())
    assert marked == [([chosen[chosen["front_axis"]]], [chosen["score"]])]  # the chosen network on the front
    assert {p: p.stat().st_mtime_ns for p in trained} == trained
