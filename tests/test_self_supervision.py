"""DNA++ (supervision kind "ssl"): the EMA update, the ensemble target, the crops, progressive blocks (block 1's input
is block 0's best-rated candidate), the rating as the same loss on the rating split, exact resume with the EMA
state, and a whole run that builds, trains and downloads no teacher."""
import pytest
import torch
import torch.nn.functional as F
import yaml
from typer.testing import CliRunner

from dna.checkpoint import load_checkpoint
from dna.config import parse_params
from dna.distill import build_block, distill_block, load_block
from dna.errors import ConfigError
from dna.pipeline import Run, stage_data, stage_distill, stage_rate
from dna.rate import rate_candidate_naive
from dna.self_supervision import BootstrapCriterion, SelfSupervised, SslOptions, crops
from tests.conftest import tiny_raw


def ssl_raw(outputs, **options) -> dict:
    raw = tiny_raw(outputs)
    raw["supervision"] = {"kind": "ssl", **options}
    raw["teacher"] = {"source": "none"}  # no teacher: its boundaries need not match the space
    return raw


@pytest.fixture(scope="module")
def ssl_run(tmp_path_factory):
    """The tiny run with supervision ssl: data, then block 1 distilled (which trains nothing of block 0 but rates
    it, as block 1's input needs)."""
    run = Run(parse_params(ssl_raw(tmp_path_factory.mktemp("ssl") / "outputs", ensemble=2)))
    stage_data(run)
    stage_distill(run, 0)
    return run


def test_the_ema_copy_moves_towards_the_cells_by_one_minus_the_momentum(ssl_run):
    torch.manual_seed(0)
    cells = build_block(ssl_run.space, 1, ssl_run.supervision.shapes(), 1)
    criterion = BootstrapCriterion(cells, 32, SslOptions(momentum=0.9))
    before = [p.clone() for p in criterion.target.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(before, cells.parameters())), "a copy at first"
    with torch.no_grad():
        for p in cells.parameters():
            p.add_(1.0)
        for b in cells.buffers():
            b.add_(2)
    criterion.after_step(1)
    for ema, old, new in zip(criterion.target.parameters(), before, cells.parameters()):
        assert torch.allclose(ema, 0.9 * old + 0.1 * new)
        assert not ema.requires_grad
    assert all(torch.equal(a, b) for a, b in zip(criterion.target.buffers(), cells.buffers()))
    assert {n.split(".")[0] for n, _ in criterion.named_parameters()} == {"target", "predictor"}


def test_the_ensemble_target_is_the_normalised_mean_of_sampled_paths_of_every_cell(ssl_run):
    torch.manual_seed(0)
    cells = build_block(ssl_run.space, 1, ssl_run.supervision.shapes(), 16)
    criterion = BootstrapCriterion(cells, 32, SslOptions(ensemble=3))
    view = torch.randn(5, 16, 8, 8)
    target = criterion.ensemble_target(view, torch.Generator().manual_seed(4))
    draws, vectors = torch.Generator().manual_seed(4), []
    for cell in criterion.target.values():
        depth = len(cell.layers) - cell.num_fixed
        for _ in range(3):
            path = tuple(torch.randint(len(cell.layers[-1]), (depth,), generator=draws).tolist())
            vectors.append(F.normalize(cell(view, path).mean(dim=(2, 3)), dim=1))
    assert len(vectors) == 3 * len(cells)
    assert torch.allclose(target, F.normalize(torch.stack(vectors).mean(0), dim=1), atol=1e-6)
    assert torch.allclose(target.norm(dim=1), torch.ones(5))
    outputs = [cells[name](view, (0,) * len(cells[name].layers)) for name in cells]
    torch.manual_seed(11)
    losses = criterion.losses(outputs, view)
    torch.manual_seed(11)  # the training loss draws its target paths from torch's random state
    vectors = []
    for cell in criterion.target.values():
        for _ in range(3):
            path = tuple(torch.randint(len(cell.layers[-1]), (len(cell.layers) - cell.num_fixed,)).tolist())
            vectors.append(F.normalize(cell(view, path).mean(dim=(2, 3)), dim=1))
    expected_target = torch.stack(vectors).mean(0)
    for loss, output in zip(losses, outputs, strict=True):
        prediction = criterion.predictor(output.mean(dim=(2, 3)))
        expected = (2 - 2 * F.cosine_similarity(prediction, expected_target, dim=1)).mean()
        assert loss.item() == pytest.approx(expected.item(), abs=1e-5)
    assert losses[0].item() != pytest.approx(losses[1].item(), abs=1e-4), "each cell its own loss"


def test_crops_are_seeded_per_image_and_keep_the_size():
    x = torch.arange(2 * 16 * 16, dtype=torch.float32).reshape(2, 1, 16, 16)
    a, b = crops(x, 0.5, torch.Generator().manual_seed(1)), crops(x, 0.5, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, crops(x, 0.5, torch.Generator().manual_seed(2)))
    assert a.min() >= x.min() and a.max() <= x.max()
    constant = torch.full((3, 2, 8, 8), 0.25)
    assert torch.allclose(crops(constant, 0.3), constant)


def test_block_one_takes_block_zero_best_rated_candidate_as_its_input(ssl_run):
    """The front of block 1 computes what block 0's best-rated candidate computes, taken from block 0's supernet on
    its own and BatchNorm-calibrated on the calibration images; the worst-rated candidate computes something else."""
    import pandas as pd

    from dna.rate import calibrate

    sup = SelfSupervised.from_run(ssl_run)
    assert not ssl_run.paths.rating(0).is_file()
    (front,) = sup.front(1)
    table = pd.read_csv(ssl_run.paths.rating(0), dtype={"path": str}).sort_values("score")  # rated on the way
    p = ssl_run.params
    calibration = ssl_run.data.images("train", positions=ssl_run.data.stratified("train", p.rating.calibration_size,
                                                                                  p.seed))

    class Candidate(torch.nn.Module):
        def __init__(self, row):
            super().__init__()
            self.cell = load_block(ssl_run.space, 0, sup.shapes(), 1, ssl_run.paths.supernet(0))[row.cell]
            self.ops = tuple(int(o) for o in row.path.split("-"))

        def forward(self, x):
            return self.cell(x, self.ops)

    best, worst = Candidate(table.iloc[0]), Candidate(table.iloc[-1])
    for candidate in (best, worst):
        calibrate(candidate, calibration)
    torch.manual_seed(5)
    x1, x2 = next(sup.pairs(1, "train", 8))
    torch.manual_seed(5)  # the training views are drawn from torch's random state
    images, _ = next(iter(ssl_run.data.loader("train", 8)))
    view1, view2 = crops(images, sup.options.crop_scale), crops(images, sup.options.crop_scale)
    with torch.no_grad():
        assert torch.allclose(x1, best(view1), atol=1e-5) and torch.allclose(x2, best(view2), atol=1e-5)
        assert torch.allclose(front(images), best(images), atol=1e-5)
        assert not torch.allclose(front(images), worst(images), atol=1e-3), "the worst candidate is told apart"
    assert x1.shape == (8, *sup.shapes()[0]) and not torch.equal(x1, x2), "two views"
    assert not front.training and not any(q.requires_grad for q in front.parameters()), "frozen, in eval mode"


def test_the_rating_is_the_same_loss_on_the_rating_split_candidate_by_candidate(ssl_run):
    stage_distill(ssl_run, 1)
    table = stage_rate(ssl_run, 1)
    rating = ssl_run.supervision.for_rating()
    supernet = load_block(ssl_run.space, 1, rating.shapes(), 1, ssl_run.paths.supernet(1))
    calib, _ = rating.sample(1, "train", ssl_run.params.rating.calibration_size, ssl_run.params.seed)
    for row in table.drop_duplicates(["cell", "path"]).head(3).itertuples():
        ops = tuple(int(o) for o in str(row.path).split("-"))
        batches = rating.pairs(1, "rate", ssl_run.params.rating.batch_size)
        expected = rate_candidate_naive(supernet[row.cell], ops, calib, batches, scorer=rating.scorer(1))
        assert row.score == pytest.approx(expected, abs=1e-5)
    assert table["score"].nunique() > len(table) // 3, "candidates are told apart"
    saved = load_checkpoint(ssl_run.paths.supernet(1))
    assert set(saved["states"]["criterion"]) >= {"predictor.0.weight"}
    assert not any(key.startswith("target") for key in saved["model"]), "the cells alone are the block's model"


def test_a_block_fingerprint_follows_the_rating_that_picks_its_input(tmp_path):
    """Block 1's input is block 0's best candidate as `rating` rates and calibrates it: a block of kind ssl trained
    under another rating section is not resumed. The teacher kind's blocks take the teacher's features, whatever the
    rating; and at the rating's defaults an ssl fingerprint is what it was before the rating was part of it."""
    from dna.checkpoint import digest
    from dna.config import RatingConfig
    from dna.targets import TeacherTargets

    def fingerprints(raw: dict, calibration_size: int) -> list[str]:
        run = Run(parse_params(raw | {"rating": {**raw["rating"], "calibration_size": calibration_size}}))
        if not run.params.supervision.kind == "ssl":  # no teacher built: what the blocks see of it is its key
            run.shared["supervision"] = TeacherTargets(torch.nn.Identity(), [2, 3], run.data, torch.device("cpu"),
                                                         key=("a teacher",))
        return [run.block_fingerprint(block) for block in range(2)]

    ssl, teacher = ssl_raw(tmp_path / "outputs"), tiny_raw(tmp_path / "outputs")
    stage_data(Run(parse_params(ssl)))
    assert fingerprints(ssl, 64)[1] != fingerprints(ssl, 32)[1]
    assert fingerprints(ssl, 64) == fingerprints(ssl, 64)
    assert fingerprints(teacher, 64) == fingerprints(teacher, 32)
    defaults = parse_params(ssl | {"rating": RatingConfig().model_dump()})
    sup = SelfSupervised(Run(defaults))
    added = ("projector", "projection", "symmetric", "augment")  # options added since: left out at their defaults

    before = {k: v for k, v in sup.options.model_dump(mode="json").items() if k not in added}
    assert sup.fingerprint() == digest("ssl", before, defaults.space)


def test_an_interrupted_ssl_block_resumes_to_the_same_weights_and_ema(ssl_run, tmp_path):
    class Crash(RuntimeError):
        pass

    def distill(path, on_epoch=None):
        return distill_block(ssl_run.space, ssl_run.supervision, 0, ssl_run.params.distill, path, in_chans=1, seed=0,
                             fingerprint="test", device=torch.device("cpu"), on_epoch=on_epoch)

    def crash(row):
        raise Crash

    distill(tmp_path / "whole.pt")
    with pytest.raises(Crash):
        distill(tmp_path / "cut.pt", on_epoch=crash)
    assert distill(tmp_path / "cut.pt").resumed_from == 1
    whole, cut = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(tmp_path / "cut.pt")
    for part in (whole["model"], whole["states"]["criterion"]):
        other = cut["model"] if part is whole["model"] else cut["states"]["criterion"]
        assert part.keys() == other.keys() and all(torch.equal(part[k], other[k]) for k in part)


def test_options_and_what_needs_a_teacher_are_checked_before_any_work(tmp_path):
    from dna.pipeline import validate
    from dna.rounds import all_rounds

    with pytest.raises(ConfigError, match=r"supervision.momentum=1.0: Input should be less than 1"):
        parse_params(ssl_raw(tmp_path, momentum=1.0))
    with pytest.raises(ConfigError, match=r"supervision.momentun: unknown key; allowed keys here: kind, augment, "):
        parse_params(ssl_raw(tmp_path, momentun=0.9))  # the options of a kind of space are checked the same way
    with pytest.raises(ConfigError, match=r"supervision.ensemble"):
        parse_params(ssl_raw(tmp_path, ensemble=0))
    raw = ssl_raw(tmp_path)
    raw["retrain"] = {"kd_alpha": 0.5}
    with pytest.raises(ConfigError, match=r"retrain.kd_alpha=0.5 distils from the teacher, but teacher.source is none"):
        validate(parse_params(raw), check_profile=False, data=False)
    with pytest.raises(ConfigError, match=r"rounds.count=2: .* supervision.kind='ssl' uses no teacher"):
        all_rounds(parse_params(ssl_raw(tmp_path) | {"rounds": {"count": 2}}))
    with pytest.raises(ConfigError, match=r"supervision.kind='ssl' uses no teacher: set teacher.source: none \(with "
                                          r"teacher.source='train' the teacher stage would build a teacher nothing"):
        parse_params(ssl_raw(tmp_path) | {"teacher": {"source": "train"}})
    with pytest.raises(ConfigError, match=r"teacher.source='none', but supervision.kind='teacher' learns from a "
                                          r"teacher; set teacher.source to train"):
        parse_params(tiny_raw(tmp_path) | {"teacher": {"source": "none"}})
    teacher = tiny_raw(tmp_path)
    teacher["teacher"]["boundaries"] = [2]
    with pytest.raises(ConfigError, match="teacher.boundaries has 1 entries but space.blocks has 2"):
        parse_params(teacher)


@pytest.mark.slow  # the whole tiny pipeline: about a minute
def test_dna_run_with_ssl_builds_no_teacher_and_ends_with_a_parity_checked_onnx_model(tmp_path):
    from dna.cli import app

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(ssl_raw(tmp_path / "outputs")))
    result = CliRunner().invoke(app, ["run", "--params", str(tmp_path / "params.yaml")])
    assert result.exit_code == 0, result.output
    teacher = tmp_path / "outputs" / "teacher"
    assert sorted(p.name for p in teacher.iterdir()) == ["history.csv", "metrics.json", "teacher.pt"]
    assert load_checkpoint(teacher / "teacher.pt") == {"teacher": None}, "a record of none"
    from dna.pipeline import Run
    from dna.teacher import load_teacher

    params = parse_params(ssl_raw(tmp_path / "outputs"))
    with pytest.raises(ConfigError, match=r"teacher.pt records no teacher \(teacher.source: none\)"):
        load_teacher(params, Run(params).paths.teacher, torch.device("cpu"))
    assert "no teacher (teacher.source: none); exported network in ONNX Runtime" in result.output
    import json

    export = json.loads((tmp_path / "outputs" / "targets" / "default" / "export" / "metrics.json").read_text())
    assert export["max_abs_diff"] <= export["atol"] and export["onnx_test_accuracy"] > 0.5


def test_the_dna_plusplus_preset_builds_no_teacher_and_learns_from_its_own_cells(tmp_path, monkeypatch):
    """configs/dna_plusplus.yaml is params.yaml with supervision ssl: its teacher stage builds, trains and downloads
    nothing (no model is created), and a block's targets come from the block's own cells (their EMA copy)."""
    import timm

    import dna.teacher
    from dna.config import load_params, preset_overrides
    from dna.pipeline import stage_teacher
    from dna.stages import STAGES, step_keys
    from tests.conftest import ROOT
    from tests.test_config import resolved_preset_is_a_dvc_params_file

    differs = preset_overrides(ROOT / "configs" / "dna_plusplus.yaml", ROOT / "params.yaml")
    assert {key.split(".")[0] for key in differs} == {"outputs", "supervision", "teacher"}  # the same data and space
    assert differs["supervision.kind"] == "ssl"
    resolved_preset_is_a_dvc_params_file(ROOT / "configs" / "dna_plusplus.yaml")
    teacher_step = step_keys(next(s for s in STAGES if s.name == "teacher"))
    seen = [key for key in differs if any(key == k or key.startswith(f"{k}.") for k in teacher_step)]
    assert seen == ["teacher.source"], "its teacher stage writes another teacher.pt: DVC must see a key change"

    def no_model(*args, **kwargs):
        raise AssertionError("the DNA++ preset builds no teacher")

    monkeypatch.setattr(timm, "create_model", no_model)
    monkeypatch.setattr(dna.teacher, "create_teacher", no_model)
    run = Run(load_params(ROOT / "configs" / "dna_plusplus.yaml", {"outputs": str(tmp_path / "outputs")}))
    stage_data(run)
    assert stage_teacher(run)["model"] is None
    assert load_checkpoint(run.paths.teacher) == {"teacher": None}
    assert isinstance(run.supervision, SelfSupervised) and run.supervision.options.ensemble == 2
    torch.manual_seed(0)
    cells = build_block(run.space, 1, run.supervision.shapes(), run.data.in_chans)
    target = run.supervision.criterion(1, cells).target
    assert [n for n, _ in target.named_parameters()] == [n for n, _ in cells.named_parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target.parameters(), cells.parameters())), "the cells' own copy"
