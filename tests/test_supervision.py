import shutil

import pytest
import torch
import torch.nn.functional as F
from pydantic import BaseModel

from dna.checkpoint import digest
from dna.config import parse_params
from dna.data import eval_view
from dna.distill import PairLoss, load_block
from dna.errors import ConfigError
from dna.rate import rate_candidate_naive
from dna.supervision import SUPERVISIONS, build_supervision, options_of
from dna.targets import RelativeL1Score, TeacherTargets, teacher_shapes
from tests.conftest import tiny_raw


class MeanSquaredScore:
    def __init__(self):
        self.squares, self.count = {}, 0

    def add_target(self, target):
        self.count += target.numel()

    def add_error(self, key, pred, target):
        self.squares[key] = self.squares.get(key, 0.0) + float((pred - target).pow(2).sum())

    def result(self):
        return {key: s / self.count for key, s in self.squares.items()}


class Projections:
    """A supervision that needs no teacher: level 0 is the image, level k+1 a fixed random 1x1 projection of level k
    pooled to the size of the teacher's boundary k (so the space's blocks fit)."""

    class Options(BaseModel):
        model_config = {"extra": "forbid"}
        seed: int = 0

    loss = staticmethod(F.l1_loss)
    prepared: list[str] = []
    uses_teacher = False
    progressive = False

    def __init__(self, shapes, in_chans, data, seed):
        self._shapes, self.data, self.seed = shapes, data, seed
        torch.manual_seed(seed)
        chans = [in_chans] + [s[0] for s in shapes]
        self.convs = [torch.nn.Conv2d(a, b, 1).eval().requires_grad_(False) for a, b in zip(chans, chans[1:])]

    @classmethod
    def from_run(cls, run):
        p = run.params
        shapes = teacher_shapes(p.teacher.model, p.data.channels, p.data.image_size, p.teacher.boundaries)
        return cls(shapes, p.data.channels, run.data, options_of(p.supervision).seed)

    def fingerprint(self):
        return digest("projections", self.seed)

    def prepare(self):
        self.prepared.append(self.fingerprint())

    def shapes(self):
        return self._shapes

    def _levels(self, x):
        levels = [x]
        for conv, shape in zip(self.convs, self._shapes):
            levels.append(F.adaptive_avg_pool2d(torch.tanh(conv(levels[-1])), shape[1:]))
        return levels

    def pairs(self, block, split, batch_size, shuffle=False, generator=None, sharded=False):
        for x, _ in self.data.loader(split, batch_size, shuffle=shuffle, generator=generator, sharded=sharded):
            levels = self._levels(x)
            yield levels[block], levels[block + 1]

    def sample(self, block, split, count, seed):
        levels = self._levels(self.data.images(split, positions=self.data.stratified(split, count, seed)))
        return levels[block], levels[block + 1]

    def criterion(self, block, cells):
        return PairLoss(self.loss)

    def scorer(self, block):
        return MeanSquaredScore()

    def for_rating(self):
        return Projections(self._shapes, self.convs[0].in_channels, eval_view(self.data), self.seed)


@pytest.fixture
def projections(monkeypatch):
    """The Projections supervision registered as kind 'projections' for one test."""
    monkeypatch.setattr(Projections, "prepared", [])
    with SUPERVISIONS.scoped():
        SUPERVISIONS.register("projections")(Projections)
        yield Projections


def _raw(tmp_path, **section):
    raw = tiny_raw(tmp_path / "outputs") | {"supervision": section}
    if section.get("kind") == "projections":  # a kind without a teacher has none
        raw["teacher"] = raw["teacher"] | {"source": "none"}
    return raw


def test_an_unknown_kind_is_rejected_naming_the_allowed_ones(tmp_path, projections):
    with pytest.raises(ConfigError, match=r"supervision.kind='ema' is not a block supervision; "
                                          r"allowed: projections, ssl, teacher"):
        parse_params(_raw(tmp_path, kind="ema"))
    assert parse_params(tiny_raw(tmp_path)).supervision.kind == "teacher", "the default"


def test_options_are_checked_against_the_kinds_own_model(tmp_path, projections):
    assert options_of(parse_params(_raw(tmp_path, kind="projections", seed=3)).supervision).seed == 3
    with pytest.raises(ConfigError, match="supervision.sede"):
        parse_params(_raw(tmp_path, kind="projections", sede=3))
    with pytest.raises(ConfigError, match="kind 'teacher' takes no options, got seed"):
        parse_params(_raw(tmp_path, kind="teacher", seed=3))


def test_a_kind_is_registered_once():
    assert SUPERVISIONS.names() == ["ssl", "teacher"]
    with pytest.raises(ValueError, match="block supervision 'teacher' is already registered"):
        SUPERVISIONS.register("teacher")(Projections)


def test_the_teacher_kind_is_teacher_features_under_mse(prepared_run):
    s = prepared_run.supervision
    assert isinstance(s, TeacherTargets) and isinstance(s.for_rating(), TeacherTargets)
    assert s.loss is F.mse_loss
    a, b = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    assert torch.equal(s.loss(a, b), ((a - b) ** 2).mean())
    assert isinstance(s.scorer(0), RelativeL1Score)


def test_the_teacher_score_is_mean_absolute_error_over_the_targets_std():
    score = RelativeL1Score()
    # targets 0, 2, 4, 6 (mean 3, population variance 5); predicting 3 everywhere errs by 3, 1, 1, 3
    for y in (torch.tensor([0.0, 2.0]), torch.tensor([4.0, 6.0])):
        score.add_target(y)
        score.add_error("mean", torch.full_like(y, 3.0), y)
        score.add_error("exact", y, y)
    assert score.result() == pytest.approx({"mean": 2 / 5 ** 0.5, "exact": 0.0})

    torch.manual_seed(0)
    ys, preds = torch.randn(3, 8, 4, 5, 5) * 2 + 1, torch.randn(3, 8, 4, 5, 5)
    score = RelativeL1Score()
    for y, pred in zip(ys, preds):
        score.add_target(y)
        score.add_error((0,), pred, y)
    expected = (ys - preds).abs().mean() / ys.std(unbiased=False)
    assert score.result()[(0,)] == pytest.approx(float(expected), rel=1e-6)


def test_a_registered_kind_trains_and_rates_a_block_through_the_stages(prepared_run, tmp_path, projections):
    from dna.pipeline import Run, stage_distill, stage_features, stage_rate

    raw = _raw(tmp_path, kind="projections", seed=1)
    raw["distill"]["epochs"] = 1
    run = Run(parse_params(raw))
    shutil.copytree(prepared_run.paths.root / "data", run.paths.root / "data")  # no teacher: these targets need none
    assert isinstance(build_supervision(run), Projections)

    stage_features(run)
    assert projections.prepared == [digest("projections", 1)]
    assert stage_distill(run, 1)["epochs"] == 1
    table = stage_rate(run, 1)
    assert len(table) == len(run.space.candidate_table(1)) and table["score"].notna().all()
    assert run.block_fingerprint(1) != prepared_run.block_fingerprint(1)

    # the table's scores are this kind's score (mean squared error) of its own targets
    rating = run.supervision.for_rating()
    supernet = load_block(run.space, 1, rating.shapes(), run.data.in_chans, run.paths.supernet(1))
    calib, _ = rating.sample(1, "train", run.params.rating.calibration_size, run.params.seed)
    row = table.iloc[0]
    ops = tuple(int(o) for o in str(row["path"]).split("-"))
    batches = rating.pairs(1, "rate", run.params.rating.batch_size)
    expected = rate_candidate_naive(supernet[row["cell"]], ops, calib, batches, scorer=MeanSquaredScore())
    assert row["score"] == pytest.approx(expected, abs=1e-5)
    relative_l1 = rate_candidate_naive(supernet[row["cell"]], ops, calib,
                                       rating.pairs(1, "rate", run.params.rating.batch_size), scorer=RelativeL1Score())
    assert row["score"] != pytest.approx(relative_l1, abs=1e-3), "the check above can fail: another score differs"
