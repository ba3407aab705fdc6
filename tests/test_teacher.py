import pytest
import torch

from dna.checkpoint import load_checkpoint
from dna.supervision import build_supervision
from dna.teacher import load_teacher, make_teacher
from dna.train import accuracy


def test_the_teacher_that_makes_the_targets_is_frozen_and_never_changes_its_statistics(prepared_run):
    targets = build_supervision(prepared_run)  # its own teacher: this test moves the teacher's statistics at the end
    teacher = targets.teacher  # the very object whose features are the block targets
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())
    stats = [b.clone() for b in teacher.buffers()]
    x = prepared_run.data.images("train", 16)
    targets.features(x)
    live = type(targets)(teacher, targets.boundaries, prepared_run.data, torch.device("cpu"))  # no cache: runs it
    next(live.pairs(1, "train", 16))
    assert all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers())), "BatchNorm statistics never change"
    teacher.train()
    teacher(x)  # the check above can fail: a forward in train mode moves them
    assert not all(torch.equal(a, b) for a, b in zip(stats, teacher.buffers()))


@pytest.mark.parametrize("fmt", ["ours", "plain state dict"])
def test_checkpoint_source_loads_the_same_teacher(prepared_run, tmp_path, fmt):
    state = load_checkpoint(prepared_run.paths.teacher)
    path = tmp_path / "teacher.pth"
    if fmt == "ours":
        path.write_bytes(prepared_run.paths.teacher.read_bytes())
    else:
        torch.save(state["model"], path)
    raw = prepared_run.params.model_dump()
    raw["teacher"].update(source="checkpoint", checkpoint=str(path))
    raw["teacher"]["train"]["epochs"] = 0
    params = type(prepared_run.params).model_validate(raw)
    teacher, result = make_teacher(params, prepared_run.data, tmp_path, torch.device("cpu"), "fp")
    reference = load_teacher(prepared_run.params, prepared_run.paths.teacher, torch.device("cpu"))
    x = prepared_run.data.images("test", 32)
    assert torch.equal(teacher(x), reference(x))
    assert result.test_accuracy == accuracy(reference, prepared_run.data.loader("test", 256), torch.device("cpu"))
    assert result.history == [], "epochs=0 uses the checkpoint as it is"


def test_a_teacher_trained_here_gets_the_configured_drop_path(tiny_params):
    from timm.layers import DropPath

    from dna.teacher import create_teacher

    assert not any(isinstance(m, DropPath) for m in create_teacher(tiny_params, 10, 1).modules())
    raw = tiny_params.model_dump()
    raw["teacher"]["train"]["drop_path_rate"] = 0.2
    teacher = create_teacher(type(tiny_params).model_validate(raw), 10, 1)
    probs = [m.drop_prob for m in teacher.modules() if isinstance(m, DropPath)]
    assert probs and 0 < max(probs) < 0.2


@pytest.mark.parametrize("output_stride, sides", [(32, [8, 4, 2, 1]), (8, [8, 4, 4, 4])])
def test_the_teacher_is_built_with_its_output_stride_as_its_shapes_are_checked(tiny_params, output_stride, sides):
    """teacher.output_stride 8 dilates the stages past stride 8: the late boundaries keep 4x4 maps at 32 px, and the
    built teacher has the shapes that the config's check (teacher_shapes) computes on the meta device."""
    from dna.targets import boundary_features, teacher_shapes
    from dna.teacher import create_teacher

    teacher_cfg = tiny_params.teacher.model_copy(update={"output_stride": output_stride})
    params = tiny_params.model_copy(update={"teacher": teacher_cfg})
    boundaries = [2, 3, 4, 6]
    with torch.no_grad():
        feats = boundary_features(create_teacher(params, 10, 1).eval(), torch.zeros(1, 1, 32, 32), boundaries)
    assert [f.shape[-1] for f in feats] == sides
    assert [tuple(f.shape[1:]) for f in feats] == teacher_shapes("tinynet_e", 1, 32, boundaries, output_stride)
