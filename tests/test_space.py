"""The MBConv search space: block strings, sizes, exact cost tables, membership and cell supernets."""
import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from timm.models._efficientnet_builder import _decode_block_str
from torch import nn

from dna.arch import Arch, count_cost
from dna.config import load_params
from dna.pipeline import stage_tables
from dna.spaces.base import Cell
from dna.spaces.mbconv import MBConvSpace, check_op, layer_string
from dna.targets import teacher_shapes

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE, IN_CHANS, NUM_CLASSES = 32, 1, 10


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def default_params():
    return load_params(ROOT / "params.yaml")


@pytest.fixture(scope="module")
def default_space(default_params):
    return MBConvSpace(default_params.space, IN_CHANS, IMAGE_SIZE, NUM_CLASSES)


@pytest.fixture(scope="module")
def default_stages(default_space):
    return [s.to_frame() for s in stage_tables(default_space, scored=False)]


def _teacher_shapes(params):
    t = params.teacher
    return teacher_shapes(t.model, IN_CHANS, IMAGE_SIZE, list(t.boundaries), t.output_stride)


def _random_choice(space, rng):
    choice = []
    for block in range(space.num_blocks):
        cell = rng.choice(space.cells(block))
        choice.append((cell, tuple(rng.randrange(len(space.ops)) for _ in range(cell.depth))))
    return choice


def _with_stage(arch, index, layers):
    stages = list(arch.stages)
    if layers is None:
        del stages[index]
    else:
        stages[index] = tuple(layers)
    return Arch(stem=arch.stem, stages=tuple(stages), head=arch.head)


# block strings -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("op, stride, width, expected", [
    ("ir_k5_e3_se0.25", 2, 24, "ir_r1_k5_s2_e3_c24_se0.25"),
    ("ir_k3_e6", 1, 40, "ir_r1_k3_s1_e6_c40"),
    ("ir_k7_e6_se0.25", 1, 320, "ir_r1_k7_s1_e6_c320_se0.25"),
    ("ds_k3_se0.25", 2, 16, "ds_r1_k3_s2_c16_se0.25"),
    ("er_k3_e4", 2, 32, "er_r1_k3_s2_e4_c32"),
])
def test_layer_string_is_timms_form(op, stride, width, expected):
    text = layer_string(op, stride, width)
    assert text == expected
    args, repeat = _decode_block_str(text)
    assert repeat == 1
    assert (args["block_type"], args["stride"], args["out_chs"]) == (op.split("_")[0], stride, width)
    kernel = int(next(t for t in op.split("_")[1:] if t.startswith("k"))[1:])
    assert args["dw_kernel_size" if args["block_type"] != "er" else "exp_kernel_size"] == kernel
    if "_e" in op:
        assert args["exp_ratio"] == float(next(t for t in op.split("_")[1:] if t.startswith("e"))[1:])
    assert args["se_ratio"] == (0.25 if "se0.25" in op else 0.0)


@pytest.mark.parametrize("op", ["ir_k3_e3_se0.25", "ir_k7_e6", "ds_k5_se0.25", "er_k3_e4", "cn_k3"])
def test_check_op_accepts_ops(op):
    check_op(op)


@pytest.mark.parametrize("op, problem", [
    ("ir_k4x_e3", "not a valid op"), ("zz_k3_e3", "not a valid op"), ("ir_e6", "not a valid op"),
    ("ir_r2_k3_e3", "sets r/s/c"), ("ir_k3_s2_e3", "sets r/s/c"), ("ir_k3_e3_c24", "sets r/s/c"),
    ("mqa_k3_h4_d16_v2", "not a valid transformer op"), ("ir_k3_e3_gs5", "decodes but timm cannot build it"),
])
def test_check_op_rejects(op, problem):
    with pytest.raises(ValueError, match=problem) as err:
        check_op(op)
    assert repr(op) in str(err.value)


# sizes -----------------------------------------------------------------------------------------------------------
def test_paper_preset_block_sizes():
    params = load_params(ROOT / "configs" / "imagenet.yaml", check_paths=False)
    space = MBConvSpace(params.space, 3, 224, 1000)
    # candidates per block in the DNA paper's space, with block 4's 4-layer cell of 192 channels that DNA-c uses
    method = [288, 1548, 1548, 2808, 16848 + 6 ** 4, 6]
    assert [space.block_size(b) for b in range(space.num_blocks)] == method
    assert space.size() == math.prod(method)
    assert f"{float(space.size()):.1e}" == "2.1e+17"


def test_default_space_sizes(default_space, default_params):
    ops = len(default_params.space.ops)
    assert ops == 6
    # depths [1, 2] with one width: 6 + 36; block 2 has two widths
    assert [default_space.block_size(b) for b in range(4)] == [42, 42, 84, 42]
    assert default_space.size() == 42 * 42 * 84 * 42


def test_candidates_enumerate_every_op_per_layer(default_space):
    cell = Cell(0, 2, 24)
    candidates = list(default_space.candidates(cell))
    assert len(candidates) == 36 == len(set(candidates))
    assert set(candidates) == set(itertools.product(range(6), repeat=2))


# cost tables -----------------------------------------------------------------------------------------------------
def test_candidate_table_one_row_per_candidate_and_input_width(default_space, default_params, default_stages):
    blocks = default_params.space.blocks
    first_width = 16  # ds_r1_k3_s1_c16_se0.25
    for b in range(default_space.num_blocks):
        table = default_stages[b + 1]
        in_widths = [first_width] if b == 0 else sorted(set(blocks[b - 1].widths))
        cells = [(d, w) for w in blocks[b].widths for d in blocks[b].depths]
        assert len(table) == sum(6 ** d for d, _ in cells) * len(in_widths)
        assert sorted(table["in_width"].unique()) == in_widths
        assert not table.duplicated(["cell", "path", "in_width"]).any()
        for (d, w), in_width in itertools.product(cells, in_widths):
            rows = table[(table["cell"] == f"d{d}_w{w}") & (table["in_width"] == in_width)]
            assert set(rows["path"]) == {"-".join(map(str, p)) for p in itertools.product(range(6), repeat=d)}
            assert (rows["out_width"] == w).all() and (rows["depth"] == d).all()
            assert (rows["ops"].str.count(r"\+") == d - 1).all()
        assert (table["params"] > 0).all() and (table["macs"] > 0).all()


def test_wider_input_costs_more(default_stages):
    table = default_stages[4]  # block 3 follows block 2's widths 48 and 64
    by_width = {w: t.set_index(["cell", "path"]) for w, t in table.groupby("in_width")}
    narrow, wide = by_width[48], by_width[64]
    assert (wide["params"] > narrow["params"].loc[wide.index]).all()
    assert (wide["macs"] > narrow["macs"].loc[wide.index]).all()


def test_stem_and_head_tables(default_stages, default_params):
    stem, head = default_stages[0], default_stages[-1]
    assert len(stem) == 1 and int(stem["out_width"].iloc[0]) == 16
    assert sorted(head["in_width"]) == sorted(set(default_params.space.blocks[-1].widths))
    # the head's classifier alone: (256 + 1) * 10 parameters, 256 * 10 multiply-adds
    for _, row in head.iterrows():
        w = row["in_width"]
        conv_bn = w * 256 + 2 * 256  # 1x1 conv without bias, batch norm weight and bias
        assert row["params"] == conv_bn + 257 * 10
        assert row["macs"] == w * 256 * 4 * 4 + 256 * 10  # 32 px input is 4x4 after the stem and the blocks


@pytest.mark.parametrize("seed", [0, 1, 2, None], ids=["random-0", "random-1", "random-2", "largest"])
def test_table_costs_equal_built_network_costs(default_space, default_stages, seed):
    if seed is None:  # deepest and widest cell, largest op (k7 e6) everywhere
        cells = [max(default_space.cells(b), key=lambda c: (c.depth, c.width)) for b in range(4)]
        choice = [(c, (5,) * c.depth) for c in cells]
    else:
        choice = _random_choice(default_space, random.Random(seed))
    stem, *blocks, head = default_stages
    total = {"params": int(stem["params"].iloc[0]), "macs": int(stem["macs"].iloc[0])}
    width = int(stem["out_width"].iloc[0])
    for table, (cell, ops) in zip(blocks, choice):
        row = table[(table["cell"] == cell.name) & (table["path"] == "-".join(map(str, ops)))
                    & (table["in_width"] == width)]
        assert len(row) == 1
        for axis in total:
            total[axis] += int(row[axis].iloc[0])
        width = cell.width
    row = head[head["in_width"] == width]
    for axis in total:
        total[axis] += int(row[axis].iloc[0])

    model = default_space.arch(choice).build(NUM_CLASSES, IN_CHANS)
    params, macs, shape = count_cost(model, (1, IN_CHANS, IMAGE_SIZE, IMAGE_SIZE))
    assert shape == (1, NUM_CLASSES)
    assert (params, macs) == (total["params"], total["macs"])


# membership ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(5))
def test_members_parse_back(default_space, seed):
    choice = _random_choice(default_space, random.Random(100 + seed))
    arch = default_space.arch(choice)
    assert default_space.outside(arch) == []
    assert default_space.parse(arch) == choice
    assert default_space.parse(Arch.from_yaml(arch.to_yaml())) == choice


@pytest.fixture
def member(default_space):
    choice = [(Cell(0, 2, 24), (0, 1)), (Cell(1, 2, 32), (2, 3)), (Cell(2, 1, 48), (4,)), (Cell(3, 2, 96), (5, 0))]
    return default_space.arch(choice)


def test_member_strings(member):
    assert member.stages[0] == ("ds_r1_k3_s1_c16_se0.25",)
    assert member.stages[2] == ("ir_r1_k7_s2_e3_c32_se0.25", "ir_r1_k3_s1_e6_c32_se0.25")
    assert member.stages[3] == ("ir_r1_k5_s1_e6_c48_se0.25",)
    assert (member.stem, member.head) == (16, 256)


def test_outside_wrong_kernel(default_space, member):
    bad = "ir_r1_k9_s2_e3_c32_se0.25"
    problems = default_space.outside(_with_stage(member, 2, [bad, member.stages[2][1]]))
    assert len(problems) == 1
    assert problems[0].startswith("block 1 layer 0:") and repr(bad) in problems[0]
    assert "ir_r1_k7_s2_e3_c32_se0.25" in problems[0]  # lists the allowed strings


def test_outside_wrong_stride_in_later_layer(default_space, member):
    problems = default_space.outside(_with_stage(member, 1, ["ir_r1_k3_s2_e3_c24_se0.25"] * 2))
    assert len(problems) == 1 and problems[0].startswith("block 0 layer 1:")


def test_outside_wrong_width(default_space, member):
    problems = default_space.outside(_with_stage(member, 3, ["ir_r1_k5_s1_e6_c40_se0.25"]))
    assert len(problems) == 1
    assert problems[0].startswith("block 2:") and "width 40" in problems[0] and "[48, 64]" in problems[0]


def test_outside_too_deep(default_space, member):
    problems = default_space.outside(_with_stage(member, 3, ["ir_r1_k5_s1_e6_c48_se0.25"]
                                                 + ["ir_r1_k5_s1_e6_c48_se0.25"] * 2))
    assert len(problems) == 1 and problems[0].startswith("block 2:") and "depth 3" in problems[0]


def test_outside_wrong_number_of_blocks(default_space, member):
    problems = default_space.outside(_with_stage(member, 4, None))
    assert problems == ["3 searched stages make 3 blocks; the space has 4 blocks"]
    with pytest.raises(ValueError, match="3 searched stages"):
        default_space.parse(_with_stage(member, 4, None))


def test_outside_stem_head_and_first_stage(default_space, member):
    arch = Arch(stem=32, stages=(("ds_r1_k3_s1_c24_se0.25",), *member.stages[1:]), head=512)
    problems = default_space.outside(arch)
    assert len(problems) == 3
    assert problems[0].startswith("stem: 32") and problems[1].startswith("head: 512")
    assert problems[2].startswith("first stage")


def test_member_written_with_repeats_is_a_member(default_space):
    choice = [(Cell(0, 2, 24), (3, 3)), (Cell(1, 1, 32), (0,)), (Cell(2, 2, 64), (5, 5)), (Cell(3, 2, 96), (1, 4))]
    canonical = default_space.arch(choice)
    written = canonical.to_dict()
    written["arch"][1] = ["ir_r2_k3_s2_e6_c24_se0.25"]
    written["arch"][3] = ["ir_r2_k7_s1_e6_c64_se0.25"]
    arch = Arch.from_dict(written)
    assert arch == canonical
    assert default_space.outside(arch) == []
    assert default_space.parse(arch) == choice


def test_layers_compare_as_timm_builds_them(default_space, member):
    """Token order and a default written out (ds takes no expansion) make the same layer; a skip change does not."""
    stages = [list(s) for s in member.stages]
    stages[0] = ["ds_r1_k3_s1_e1_c16_se0.25"]
    stages[1][0] = "ir_r1_s2_k3_e3_c24_se0.25"
    reordered = Arch(stem=member.stem, stages=stages, head=member.head)
    assert default_space.outside(reordered) == []
    assert default_space.parse(reordered) == default_space.parse(member)
    stages[1][1] = stages[1][1] + "_noskip"
    problems = default_space.outside(Arch(stem=member.stem, stages=stages, head=member.head))
    assert len(problems) == 1 and problems[0].startswith("block 0 layer 1:")


def test_membership_answers_layer_by_layer(default_space, member):
    answer = default_space.membership(member)
    assert all(inside for inside, _ in answer)
    assert (True, "block 1: depth 2 width 32 is cell d2_w32") in answer
    assert (True, "block 1 layer 0: 'ir_r1_k7_s2_e3_c32_se0.25' is op ir_k7_e3_se0.25") in answer
    # build settings, stem, head, first stage; one line per block and per layer
    assert len(answer) == 4 + 4 + sum(len(s) for s in member.stages[1:])


def test_layers_of_a_stage_that_is_no_cell_are_still_checked(default_space, member):
    layers = ["ir_r1_k5_s1_e6_c48_se0.25", "ir_r1_k9_s1_e6_c48_se0.25", "ir_r1_k3_s1_e3_c48_se0.25"]
    answer = default_space.membership(_with_stage(member, 3, layers))
    block2 = [(inside, why) for inside, why in answer if why.startswith("block 2")]
    assert [inside for inside, _ in block2] == [False, True, False, True]
    assert "depth 3 width 48 is not a cell" in block2[0][1]
    assert block2[2][1].startswith("block 2 layer 1: 'ir_r1_k9_s1_e6_c48_se0.25' is not one of this layer's ops")
    assert "ir_r1_k7_s1_e6_c48_se0.25" in block2[2][1]  # the allowed strings of layer 1: stride 1
    assert block2[3][1] == "block 2 layer 2: 'ir_r1_k3_s1_e3_c48_se0.25' is op ir_k3_e3_se0.25"


# cell supernets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("block, depth, width", [(0, 2, 24), (2, 2, 64), (3, 1, 96)])
def test_cell_supernet_path_matches_teacher_target(default_space, default_params, default_stages, block, depth, width):
    shapes = _teacher_shapes(default_params)
    target_chs, target_h, target_w = shapes[block]
    sizes = default_space.block_resolutions()
    assert target_h == target_w == sizes[block + 1]  # the teacher's boundary and the block's output agree
    in_chs = 32 if block == 2 else 48  # a width of the block before
    cell = Cell(block, depth, width)
    torch.manual_seed(0)
    supernet = default_space.build_cell(cell, in_chs, target_chs).eval()
    conv, norm = supernet.adapter  # the same head for every cell, whether or not its width is the target's
    assert (conv.in_channels, conv.out_channels, norm.num_features) == (width, target_chs, target_chs)
    assert len(supernet.layers) == depth + (block == 0)
    assert all(len(choices) == 6 for choices in supernet.layers[supernet.num_fixed:])

    if block == 0:
        x = torch.randn(2, IN_CHANS, IMAGE_SIZE, IMAGE_SIZE)
    else:
        x = torch.randn(2, in_chs, sizes[block], sizes[block])
    paths = [(0,) * depth, (5,) * depth]
    with torch.no_grad():
        outs = [supernet(x, p) for p in paths]
    for out in outs:
        assert out.shape == (2, target_chs, target_h, target_w)
    assert not torch.allclose(outs[0], outs[1])  # the path selects different layers

    # the parameters a path uses are the candidate table's parameters for that path
    if block > 0:
        table = default_stages[block + 1]
        for path in paths:
            used = sum(p.numel() for layer, op in zip(supernet.layers, path) for p in layer[op].parameters())
            row = table[(table["cell"] == cell.name) & (table["path"] == "-".join(map(str, path)))
                        & (table["in_width"] == in_chs)]
            assert used == int(row["params"].iloc[0])


def test_cell_supernet_full_path(default_space):
    first = default_space.build_cell(Cell(0, 1, 24), 0, 24)
    later = default_space.build_cell(Cell(1, 2, 32), 24, 24)
    assert first.full_path((3,)) == (0, 3)
    assert later.full_path((3, 4)) == (3, 4)


def test_every_cell_of_a_block_gets_the_same_kind_of_adapter(default_space):
    """A cell as wide as the target and one narrower are scored through the same kind of head."""
    same, other = default_space.build_cell(Cell(1, 1, 32), 24, 32), default_space.build_cell(Cell(1, 1, 32), 24, 40)
    assert [type(m) for m in same.adapter] == [type(m) for m in other.adapter] == [nn.Conv2d, nn.BatchNorm2d]
    assert same.adapter[0].weight.shape == (32, 32, 1, 1) and other.adapter[0].weight.shape == (40, 32, 1, 1)


# subnet extraction -------------------------------------------------------------------------------------------------
def test_extraction_copies_every_layer_with_a_counterpart_and_names_the_others(default_space, default_params):
    """In the default space the student's widths differ from the teacher's: the first layer of each block after the
    first saw the teacher's width in its supernet, so it has no counterpart; every other layer is copied whole."""
    from dna.distill import build_block

    shapes = _teacher_shapes(default_params)
    torch.manual_seed(0)
    supernets = [build_block(default_space, b, shapes, IN_CHANS).state_dict() for b in range(default_space.num_blocks)]
    choice = _random_choice(default_space, random.Random(3))
    arch = default_space.arch(choice)
    model = arch.build(NUM_CLASSES, IN_CHANS)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    extraction = default_space.extract(arch, supernets, model)

    widths = [cell.width for cell, _ in choice]
    mismatched = {f"blocks.{b + 1}.0": (shapes[b - 1][0], widths[b - 1]) for b in range(1, len(choice))
                  if shapes[b - 1][0] != widths[b - 1]}
    assert len(mismatched) == 3, "the default space's widths all differ from tinynet_e's"
    assert set(extraction.not_copied) == set(mismatched)
    for layer, (theirs, ours) in mismatched.items():
        assert f"input width {theirs} in the supernet, {ours} in this network" in extraction.not_copied[layer]
    assert extraction.no_counterpart == ["bn2", "classifier", "conv_head"]

    state = model.state_dict()
    expected_layers = ["conv_stem", "bn1", "blocks.0.0"] + [f"blocks.{b + 1}.{i}" for b, (c, _) in enumerate(choice)
                                                             for i in range(c.depth)]
    assert sorted(extraction.copied + list(mismatched)) == sorted(expected_layers)
    for b, (cell, ops) in enumerate(choice):
        offset = 1 if b == 0 else 0
        for i, op in enumerate(ops):
            dst, src = f"blocks.{b + 1}.{i}.", f"{cell.name}.layers.{i + offset}.{op}."
            keys = [k for k in state if k.startswith(dst)]
            assert keys
            for k in keys:
                if dst.rstrip(".") in mismatched:  # left whole as initialised, not a single tensor pasted in
                    assert torch.equal(state[k], fresh[k]), k
                else:
                    assert torch.equal(state[k], supernets[b][src + k[len(dst):]]), k
    assert extraction.tensors == sum(1 for k in state if k.startswith(tuple(f"{x}." for x in extraction.copied)))


def test_an_arch_built_with_other_settings_is_not_a_member(default_space):
    """The space's supernets are made with swish, BatchNorm and sigmoid gates: their weights and ratings say nothing
    about a network built otherwise."""
    member = default_space.arch(_random_choice(default_space, random.Random(0)))
    assert default_space.outside(member) == []
    other = Arch(stem=member.stem, stages=member.stages, head=member.head, settings={"act": "relu"})
    problems = default_space.outside(other)
    assert len(problems) == 1 and problems[0].startswith("family efficientnet, build {'act': 'relu'")


def test_extraction_copies_a_first_stage_written_with_repeats(default_params):
    """A fixed first stage of two layers written as one `_r2` string: both layers are copied from block 0."""
    from dna.distill import build_block

    cfg = default_params.space.model_copy(update={"first_stage": ["ds_r2_k3_s1_c16_se0.25"]})
    space = MBConvSpace(cfg, IN_CHANS, IMAGE_SIZE, NUM_CLASSES)
    shapes = _teacher_shapes(default_params)
    torch.manual_seed(0)
    supernets = [build_block(space, b, shapes, IN_CHANS).state_dict() for b in range(space.num_blocks)]
    arch = space.arch(_random_choice(space, random.Random(1)))
    extraction = space.extract(arch, supernets, arch.build(NUM_CLASSES, IN_CHANS))
    assert {"blocks.0.0", "blocks.0.1"} <= set(extraction.copied)


# every choice changes the function ---------------------------------------------------------------------------------
def _kernels(space) -> list[int]:
    return sorted({_decode_block_str(layer_string(op, 1, 16))[0]["dw_kernel_size"] for op in space.ops})


def _layer_maps(space) -> list[tuple[int, int, int]]:
    """(block, side of the map its depthwise convs read, stride) for the first and the later layers of each block."""
    sizes = space.block_resolutions()
    out = []
    for block, cfg in enumerate(space.cfg.blocks):
        out.append((block, sizes[block], cfg.stride))
        if max(d for d, _ in cfg.cell_choices()) > 1:
            out.append((block, sizes[block + 1], 1))
    return out


def _same_function(kernel: int, larger: int, side: int, stride: int) -> bool:
    """Whether a same-padded depthwise conv of `kernel` computes what one of `larger` computes when the larger one's
    weights outside the central kernel x kernel window are zero, on a side x side map: then the larger kernel's
    outer weights never touch the map, and the two choices are one function."""
    torch.manual_seed(0)
    big = nn.Conv2d(4, 4, larger, stride, larger // 2, groups=4, bias=False)
    small = nn.Conv2d(4, 4, kernel, stride, kernel // 2, groups=4, bias=False)
    cut = (larger - kernel) // 2
    with torch.no_grad():
        small.weight.copy_(big.weight[:, :, cut:cut + kernel, cut:cut + kernel])
        x = torch.randn(2, 4, side, side)
        return torch.allclose(big(x), small(x), atol=1e-6)


def test_in_the_default_space_every_kernel_choice_of_every_layer_computes_a_different_function(default_space):
    """A same-padded k x k depthwise conv sees the whole of an s x s map from every pixel once k >= 2s - 1: past
    that, a larger kernel's outer weights never touch the map and kernels 3, 5 and 7 are one function. With the
    teacher dilated past stride 8 (output_stride 8) and blocks 2 and 3 at stride 1, no searched layer runs on a
    map below 4x4, where 3, 5 and 7 still differ."""
    kernels = _kernels(default_space)
    assert kernels == [3, 5, 7]
    maps = _layer_maps(default_space)
    assert min(side for _, side, _ in maps) == 4
    for block, side, stride in maps:
        for kernel, larger in zip(kernels, kernels[1:]):
            assert kernel < 2 * side - 1, (block, side, kernel)
            assert not _same_function(kernel, larger, side, stride), (block, side, kernel, larger)


def test_on_the_old_default_strides_the_last_blocks_kernels_were_one_function(default_params):
    """The check above can fail: with every block at stride 2 (32 px: 2x2 and 1x1 maps in the last two blocks),
    kernels 3, 5 and 7 compute the same function there."""
    cfg = default_params.space.model_copy(update={"blocks": [b.model_copy(update={"stride": 2})
                                                             for b in default_params.space.blocks]})
    old = MBConvSpace(cfg, IN_CHANS, IMAGE_SIZE, NUM_CLASSES)
    assert old.block_resolutions() == [16, 8, 4, 2, 1]
    later = [(block, side, stride) for block, side, stride in _layer_maps(old) if block >= 2 and stride == 1]
    assert [side for _, side, _ in later] == [2, 1]
    assert all(_same_function(3, 7, side, 1) and _same_function(5, 7, side, 1) for _, side, _ in later)


# stride positions --------------------------------------------------------------------------------------------------
DOWN = {"stem": 16, "first_stage": ["ds_r1_k3_s1_c16"], "head": 32, "ops": ["ir_k3_e3", "mha_h2_e2"],
        "blocks": [{"stride": 2, "depths": [1, 3], "widths": [16, 24], "down_positions": [0, 2]},
                   {"stride": 1, "depths": [2], "widths": [32]}]}


@pytest.fixture(scope="module")
def down_space():
    from dna.config import SpaceConfig
    from dna.spaces import build_space

    return build_space(SpaceConfig.model_validate({**DOWN, "kind": "hybrid"}), IN_CHANS, IMAGE_SIZE, NUM_CLASSES)


def test_a_stride_position_is_searched_in_every_cell_deep_enough(down_space):
    cells = down_space.cells(0)
    assert sorted(c.name for c in cells) == ["d1_w16", "d1_w24", "d3_w16", "d3_w16_down2", "d3_w24", "d3_w24_down2"]
    assert down_space.block_size(0) == 2 * (2 + 2 * 8)


def test_a_later_stride_splits_the_block_into_two_stages_that_parse_back(down_space):
    choice = [(Cell(0, 3, 24, 2), (1, 0, 1)), (Cell(1, 2, 32), (0, 1))]
    arch = down_space.arch(choice)
    assert len(arch.stages) == 1 + 2 + 1  # the first stage, block 0 in two stages, block 1
    assert [_decode_block_str(s)[0]["stride"] for s in arch.stages[1]] == [1, 1, 1, 1]  # join, mha, ffn, ir
    assert [_decode_block_str(s)[0]["block_type"] for s in arch.stages[2]] == ["cn", "mha", "uir"]
    assert _decode_block_str(arch.stages[2][0])[0]["stride"] == 2
    assert down_space.parse(arch) == choice
    model = down_space.build(arch)
    sizes = down_space.block_resolutions()
    x, sides = model.bn1(model.conv_stem(torch.zeros(1, IN_CHANS, IMAGE_SIZE, IMAGE_SIZE))), []
    for stage in model.blocks:
        x = stage(x)
        sides.append(x.shape[-1])
    assert sides == [sizes[0], sizes[0], sizes[1], sizes[2]]  # layers 0 and 1 of block 0 before its stride
    total = sum(down_space.piece_cost(p)[1] for p in down_space.chain(choice))
    assert count_cost(model, (1, IN_CHANS, IMAGE_SIZE, IMAGE_SIZE))[1] == total


def test_a_stride_where_the_block_has_none_is_outside(down_space):
    choice = [(Cell(0, 3, 24, 2), (1, 0, 1)), (Cell(1, 2, 32), (0, 1))]
    arch = down_space.arch(choice)
    moved = Arch(stem=arch.stem, stages=(arch.stages[0], arch.stages[1][:3], arch.stages[1][3:] + arch.stages[2],
                                         arch.stages[3]), head=arch.head)
    assert down_space.outside(moved)


@pytest.mark.parametrize("block, problem", [
    ({"stride": 1, "depths": [2], "widths": [16], "down_positions": [0, 1]}, "on a block of stride 1"),
    ({"stride": 2, "depths": [1, 2], "widths": [16], "down_positions": [0, 2]}, "position 2 is past the last layer"),
    ({"stride": 2, "depths": [2], "widths": [16], "down_positions": [1, 1]}, "distinct layer positions"),
])
def test_wrong_stride_positions_name_the_key(tmp_path, block, problem):
    from dna.config import parse_params
    from dna.errors import ConfigError
    from tests.conftest import tiny_raw

    raw = tiny_raw(tmp_path)
    raw["space"]["blocks"][0] = block
    with pytest.raises(ConfigError, match=rf"space\.blocks\.0.*{problem}"):
        parse_params(raw)
