"""What every registered block supervision must do, checked on each (teacher, ssl) over each kind of space that ships
(MBConv, vision transformer, hybrid): its batches fit the block's cells, where two paths give two outputs; its
criterion gives one finite loss per cell that trains them, and its after_step leaves the cells as the optimizer made
them; its rating pairs and score rate a candidate to a finite number that the same inputs reproduce and another
candidate of the trained block does not; and it says whether it reads a teacher and whether blocks depend on each
other."""
import pytest
import torch

from dna.config import parse_params
from dna.distill import build_block
from dna.pipeline import Run, stage_data, stage_distill, stage_teacher
from dna.rate import rate_candidate_naive
from dna.supervision import SUPERVISIONS, supervision_class, uses_teacher
from tests.conftest import tiny_raw

EXAMPLES = {"teacher": {"kind": "teacher"}, "ssl": {"kind": "ssl", "ensemble": 1}}
SPACES = {"mbconv": {}, "vit": {"kind": "vit", "ops": ["mha_h2_e2", "mha_h4_e2_k3"]},
          "hybrid": {"kind": "hybrid", "ops": ["ir_k3_e3_se0.25", "mha_h2_e2_k3"]}}  # changes to the tiny space
BLOCK = 1  # block 1: its input is made by block 0 (the teacher's features, or block 0's best candidate)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=[(k, s) for k in SUPERVISIONS.names() for s in SPACES], ids="-".join)
def run(request, tmp_path_factory):
    """The tiny run in each kind of space with the kind's example options, its teacher made when it reads one and
    block 0 distilled."""
    kind, space = request.param
    if kind not in EXAMPLES:
        pytest.fail(f"supervision kind {kind!r} has no example configuration in EXAMPLES")
    raw = tiny_raw(tmp_path_factory.mktemp(kind) / "outputs")
    raw["supervision"] = EXAMPLES[kind]
    raw["teacher"]["source"] = "train" if supervision_class(kind).uses_teacher else "none"  # as the checks ask
    raw["space"] |= SPACES[space]
    raw["distill"]["epochs"] = 1
    run = Run(parse_params(raw))
    stage_data(run)
    stage_teacher(run)
    run.supervision.prepare()
    stage_distill(run, 0)
    return run


def test_it_says_what_it_needs(run):
    kind = supervision_class(run.params.supervision.kind)
    assert isinstance(kind.uses_teacher, bool) and isinstance(kind.progressive, bool)
    from dna.checkpoint import load_checkpoint

    recorded = load_checkpoint(run.paths.teacher)
    assert ("model" in recorded) == kind.uses_teacher, "a teacher's weights exactly when the kind reads one"
    assert uses_teacher(run.params) == kind.uses_teacher


def test_training_batches_fit_the_cells_and_the_criterion_trains_them(run):
    sup, shapes = run.supervision, run.supervision.shapes()
    assert len(shapes) == run.space.num_blocks and all(len(s) == 3 for s in shapes)
    torch.manual_seed(0)
    cells = build_block(run.space, BLOCK, shapes, run.data.in_chans)
    criterion = sup.criterion(BLOCK, cells)
    x, second = next(sup.pairs(BLOCK, "train", 16, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert x.shape == (16, *shapes[BLOCK - 1]), "block 1 takes block 0's output"
    paths = {c.name: (0,) * c.depth for c in run.space.cells(BLOCK)}
    outputs = cells(x, paths)
    assert [o.shape[1:] for o in outputs] == [torch.Size(shapes[BLOCK])] * len(paths)
    others = cells(x, {name: (1,) * len(ops) for name, ops in paths.items()})
    assert all(not torch.allclose(a, b, atol=1e-4) for a, b in zip(outputs, others)), "another path, another output"
    losses = criterion.losses(outputs, second)
    assert len(losses) == len(paths) and all(loss.dim() == 0 and torch.isfinite(loss) for loss in losses)
    torch.stack(losses).sum().backward()
    assert all(cells[name].adapter[0].weight.grad is not None for name in paths), "every cell gets a gradient"
    torch.optim.SGD([*cells.parameters(), *criterion.parameters()], lr=0.1).step()
    stepped = {k: v.clone() for k, v in cells.state_dict().items()}
    criterion.after_step(1)
    assert all(torch.equal(v, cells.state_dict()[k]) for k, v in stepped.items()), \
        "after_step updates the criterion's own state, never the cells the optimizer trains"
    assert all(torch.isfinite(v).all() for v in criterion.state_dict().values() if v.is_floating_point())


def test_rating_pairs_and_score_rate_a_candidate_reproducibly(run):
    stage_distill(run, BLOCK)
    rating = run.supervision.for_rating()
    from dna.distill import load_block

    supernet = load_block(run.space, BLOCK, rating.shapes(), run.data.in_chans, run.paths.supernet(BLOCK))
    calib, _ = rating.sample(BLOCK, "train", 32, run.params.seed)
    again, _ = rating.sample(BLOCK, "train", 32, run.params.seed)
    assert torch.equal(calib, again), "the calibration batch is fixed"
    cell = run.space.cells(BLOCK)[0]

    def score(op: int) -> float:
        return rate_candidate_naive(supernet[cell.name], (op,) * cell.depth, calib, rating.pairs(BLOCK, "rate", 64),
                                    scorer=rating.scorer(BLOCK))

    first = score(0)
    assert first == first and first >= 0 and score(0) == pytest.approx(first, abs=1e-6)
    assert score(1) != pytest.approx(first, abs=1e-4), "the trained block tells two candidates apart"
