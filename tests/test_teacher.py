import re

import pytest
import torch

from dna.checkpoint import load_checkpoint
from dna.paths import Paths
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
    teacher, result = make_teacher(params, prepared_run.data, Paths(tmp_path), torch.device("cpu"), "fp")
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


# teacher.source arch: a network this project searched and retrained ---------------------------------------------
@pytest.fixture
def arch_teacher(tmp_path, one_torch_thread):
    """A network of the tiny space, chosen as the search stage chooses one and given weights as the retrain stage
    saves them (random, BatchNorm statistics too); and the tiny params with it as the teacher (source arch)."""
    from dna.arch import Arch
    from dna.checkpoint import save_checkpoint
    from dna.config import parse_params
    from dna.pipeline import Run, choice_of, stage_data, stage_tables
    from tests.conftest import tiny_raw

    run = Run(parse_params(tiny_raw(tmp_path / "outputs")))
    stage_data(run)
    stages = stage_tables(run.space, scored=False)
    arch = choice_of(run.space, stages, (0, *(len(s) - 1 for s in stages[1:-1]), 0))  # the deepest, widest cells
    arch.save(tmp_path / "arch.yaml")
    torch.manual_seed(1)
    model = run.space.build(arch)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.copy_(torch.rand_like(buffer) + 0.5)
    save_checkpoint(tmp_path / "model.pt", {"model": model.state_dict(), "arch": arch.to_yaml()})
    raw = tiny_raw(tmp_path / "teacher_run")
    raw["teacher"] = {"source": "arch", "arch": str(tmp_path / "arch.yaml"), "checkpoint": str(tmp_path / "model.pt"),
                      "train": {**raw["teacher"]["train"], "epochs": 0}}
    assert Arch.load(tmp_path / "arch.yaml") == arch
    return run, arch, model.state_dict(), raw


def _arch_params(raw: dict, **teacher):
    from dna.config import parse_params

    return parse_params({**raw, "teacher": {**raw["teacher"], **teacher}})


def test_arch_teacher_has_the_saved_weights_bit_for_bit(arch_teacher, tmp_path):
    run, arch, saved, raw = arch_teacher
    params = _arch_params(raw)
    teacher, result = make_teacher(params, run.data, Paths(tmp_path), torch.device("cpu"), "fp")
    assert result.history == [] and not teacher.training
    state = teacher.state_dict()
    assert state.keys() == saved.keys()
    assert all(torch.equal(state[k], saved[k]) for k in saved)
    reloaded = load_teacher(params, Paths(tmp_path).teacher, torch.device("cpu"))  # as distillation loads it
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), saved.values()))
    assert load_checkpoint(Paths(tmp_path).teacher)["arch"] == arch.to_yaml()


def test_arch_teacher_is_split_at_its_own_blocks_whose_shapes_the_space_takes(arch_teacher, tmp_path):
    """The natural case: the same params' space searched again with the retrained network as teacher. Its default
    boundaries are the ends of its searched blocks, the config's check passes, and the block targets have the
    blocks' resolutions and the chosen network's block widths."""
    from dna.pipeline import validate
    from dna.targets import TeacherTargets, arch_teacher_shapes

    run, arch, _, raw = arch_teacher
    params = _arch_params(raw)
    assert params.teacher.boundaries == [2, 3] == list(range(2, len(arch.stages) + 1))
    validate(params, check_profile=False)
    teacher, _ = make_teacher(params, run.data, Paths(tmp_path), torch.device("cpu"), "fp")
    shapes = TeacherTargets(teacher, params.teacher.boundaries, run.data, torch.device("cpu")).shapes()
    sizes = run.space.block_resolutions()[1:]
    widths = [int(stage[-1].split("_c")[1].split("_")[0]) for stage in arch.stages[1:]]
    assert shapes == [(w, s, s) for w, s in zip(widths, sizes)]
    assert shapes == arch_teacher_shapes(params.teacher.arch, 1, params.data.image_size, params.teacher.boundaries)


def test_arch_teacher_blocks_end_where_the_space_blocks_end_when_a_stride_sits_in_a_later_layer(tmp_path):
    """A network of a space with stride positions (DNA+ over the hybrid preset): block 0, its stride in layer 1, is
    two stages; the default boundaries are the ends of the blocks, not of the stages, and the teacher's features
    there have the blocks' resolutions."""
    from dna.checkpoint import save_checkpoint
    from dna.config import parse_params
    from dna.pipeline import Run, validate
    from dna.spaces.base import Cell
    from dna.targets import arch_teacher_shapes
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path / "outputs")
    raw["space"] |= {"kind": "hybrid", "ops": ["ir_k3_e3_se0.25", "mha_h2_e2"]}
    raw["space"]["blocks"][0]["down_positions"] = [0, 1]
    run = Run(parse_params(raw))
    arch = run.space.arch([(Cell(0, 2, 16, 1), (1, 0)), (Cell(1, 2, 32), (0, 1))])
    assert len(arch.stages) == 4
    arch.save(tmp_path / "arch.yaml")
    save_checkpoint(tmp_path / "model.pt", {"model": run.space.build(arch).state_dict(), "arch": arch.to_yaml()})
    raw["teacher"] = {"source": "arch", "arch": str(tmp_path / "arch.yaml"), "checkpoint": str(tmp_path / "model.pt"),
                      "train": {**raw["teacher"]["train"], "epochs": 0}}
    params = parse_params(raw)
    assert params.teacher.boundaries == [3, 4]
    validate(params, check_profile=False)  # the shapes at the boundaries are the blocks'
    sizes = run.space.block_resolutions()[1:]
    assert arch_teacher_shapes(params.teacher.arch, 1, params.data.image_size, [3, 4]) == [(16, sizes[0], sizes[0]),
                                                                                          (32, sizes[1], sizes[1])]


def test_arch_teacher_weights_that_do_not_fit_are_a_config_error_before_any_work(arch_teacher, tmp_path):
    from dna.arch import Arch
    from dna.checkpoint import save_checkpoint
    from dna.errors import ConfigError
    from dna.pipeline import validate

    run, arch, saved, raw = arch_teacher
    last = tuple(re.sub(r"_k\d", "_k7", layer) for layer in arch.stages[-1])  # the space's kernels are 3 and 5
    other = Arch(stem=arch.stem, head=arch.head, stages=(*arch.stages[:-1], last))
    plain = {k: v for k, v in saved.items() if not k.startswith("classifier")}
    torch.save(plain, tmp_path / "plain.pt")
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint=.*plain\.pt.*do not fit the network of teacher\.arch="
                                          r".*missing classifier\.weight, classifier\.bias \(2\)$"):
        validate(_arch_params(raw, checkpoint=str(tmp_path / "plain.pt")), check_profile=False)
    other.save(tmp_path / "other.yaml")
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint=.*model\.pt' holds the weights of another "
                                          r"architecture than teacher\.arch=.*other\.yaml"):
        validate(_arch_params(raw, arch=str(tmp_path / "other.yaml")), check_profile=False)
    (tmp_path / "garbage.pt").write_bytes(b"not weights at all")
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint=.*garbage\.pt' cannot be read as weights"):
        validate(_arch_params(raw, checkpoint=str(tmp_path / "garbage.pt")), check_profile=False)
    save_checkpoint(tmp_path / "other_weights.pt", {"model": saved, "arch": other.to_yaml()})
    kernels = r"shapes: blocks\.2\.0\.conv_dw\.weight is \(\d+, 1, 5, 5\), not \(\d+, 1, 7, 7\)"
    with pytest.raises(ConfigError, match=r"^teacher\.checkpoint=.*other_weights\.pt': its weights do not fit .*"
                                          + kernels):
        validate(_arch_params(raw, checkpoint=str(tmp_path / "other_weights.pt"), arch=str(tmp_path / "other.yaml")),
                 check_profile=False)


def test_a_scaled_arch_teacher_is_the_wider_deeper_network_trained_here(arch_teacher, tmp_path):
    """width/depth multipliers: the network of teacher.arch scaled as timm scales EfficientNets, trained from
    scratch (the unscaled weights do not fit it), split at the same boundaries with wider targets; its checkpoint
    carries the scaled architecture, so distillation loads it back."""
    from dna.pipeline import validate
    from dna.targets import TeacherTargets

    run, arch, _, raw = arch_teacher
    train = {**raw["teacher"]["train"], "epochs": 1}
    params = _arch_params(raw, checkpoint=None, width_multiplier=1.5, depth_multiplier=2.0, train=train)
    validate(params, check_profile=False)
    scaled = arch.scaled(1.5, 2.0)
    assert [len(s) for s in scaled.stages] == [2 * len(s) for s in arch.stages]
    teacher, result = make_teacher(params, run.data, Paths(tmp_path), torch.device("cpu"), "fp")
    assert len(result.history) == 1 and result.test_accuracy is not None
    saved = load_checkpoint(Paths(tmp_path).teacher)
    assert saved["arch"] == scaled.to_yaml() and saved["name"].endswith("x1.5 wide x2 deep")
    reloaded = load_teacher(params, Paths(tmp_path).teacher, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), teacher.state_dict().values()))
    shapes = TeacherTargets(teacher, params.teacher.boundaries, run.data, torch.device("cpu")).shapes()
    widths = [int(stage[-1].split("_c")[1].split("_")[0]) for stage in scaled.stages[1:]]
    sizes = run.space.block_resolutions()[1:]
    assert shapes == [(w, s, s) for w, s in zip(widths, sizes)]
    assert widths != [int(stage[-1].split("_c")[1].split("_")[0]) for stage in arch.stages[1:]]


@pytest.mark.parametrize("teacher, message", [
    ({"width_multiplier": 1.5}, r"with teacher.checkpoint=.*the weights of the unscaled network do not fit"),
    ({"width_multiplier": 1.5, "checkpoint": None},
     r"the scaled network is trained here from scratch; teacher.train.epochs must be at least 1, not 0"),
    ({"depth_multiplier": 0.5}, r"teacher.depth_multiplier=0.5: .*greater than or equal to 1"),
    ({"source": "train", "model": "tinynet_e", "width_multiplier": 2.0},
     r"scale a network of teacher.source 'arch', not of source 'train'"),
])
def test_multipliers_are_checked_before_any_work(arch_teacher, teacher, message):
    from dna.errors import ConfigError

    _, _, _, raw = arch_teacher
    with pytest.raises(ConfigError, match=message):
        _arch_params(raw, **teacher)


def test_arch_teacher_fingerprint_follows_its_files(arch_teacher, tmp_path):
    from dna.arch import Arch
    from dna.checkpoint import save_checkpoint
    from dna.pipeline import Run

    _, arch, saved, raw = arch_teacher
    params = _arch_params(raw)
    before = Run(params).teacher_fingerprint()
    assert Run(_arch_params(raw)).teacher_fingerprint() == before
    moved = {k: v + 1 if v.is_floating_point() else v for k, v in saved.items()}
    save_checkpoint(params.teacher.checkpoint, {"model": moved, "arch": arch.to_yaml()})
    after_weights = Run(params).teacher_fingerprint()
    assert after_weights != before
    relu = Arch(stem=arch.stem, head=arch.head, stages=arch.stages, settings={"act": "relu"})
    relu.save(params.teacher.arch)  # the same weights fit: only the file tells the networks apart
    assert Run(params).teacher_fingerprint() not in (before, after_weights)


def test_arch_teacher_is_trained_further_when_asked(arch_teacher, tmp_path):
    run, _, saved, raw = arch_teacher
    params = _arch_params(raw, train={**raw["teacher"]["train"], "epochs": 1})
    teacher, result = make_teacher(params, run.data, Paths(tmp_path), torch.device("cpu"), "fp")
    assert len(result.history) == 1
    assert not torch.equal(teacher.state_dict()["classifier.weight"], saved["classifier.weight"])


def test_arch_teacher_drives_the_teacher_stage_and_distillation_of_a_block(arch_teacher):
    from dna.checkpoint import checkpoint_digest
    from dna.pipeline import Run, stage_data, stage_distill, stage_features, stage_teacher

    _, arch, _, raw = arch_teacher
    run = Run(_arch_params(raw))
    stage_data(run)
    metrics = stage_teacher(run)
    assert metrics["model"] == f"arch:{run.params.teacher.arch}" and metrics["epochs"] == 0
    stage_features(run)
    assert run.supervision.key[0] == checkpoint_digest(run.paths.teacher)
    result = stage_distill(run, 1)
    assert result["epochs"] == run.params.distill.epochs and result["final_loss"] > 0
