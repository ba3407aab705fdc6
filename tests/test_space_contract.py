"""What every registered search space must do, checked on each (the MBConv space and the tiny test space): its cost
tables add up to the network it builds, its members parse back, extraction copies every tensor of the chosen paths,
the networks it builds export to ONNX with parity, and its pieces cover every network."""
import random

import pytest
import torch

import tests.tiny_space
from dna.arch import Arch, count_cost
from dna.config import SpaceConfig, parse_params
from dna.distill import build_block
from dna.errors import ConfigError
from dna.export import EXPORTERS, export_onnx
from dna.spaces import SPACES, build_space, space_class
from tests.conftest import tiny_raw

IN_CHANS, IMAGE_SIZE, NUM_CLASSES = 3, 32, 5
EXAMPLES = {
    "mbconv": {"stem": 16, "first_stage": ["ds_r1_k3_s1_c16_se0.25"], "head": 32,
               "ops": ["ir_k3_e3_se0.25", "ir_k5_e6_se0.25", "ds_k3"],
               "blocks": [{"stride": 2, "depths": [1, 2], "widths": [16, 24]},
                          {"stride": 1, "depths": [1, 3], "widths": [24, 32]}]},
    "vit": {"stem": 16, "first_stage": ["ds_r1_k3_s1_c16"], "head": 32, "ops": ["mha_h2_e2", "mqa_h4_e3_k3"],
            "blocks": [{"stride": 2, "depths": [1, 2], "widths": [16, 24]},
                       {"stride": 1, "depths": [1, 2], "widths": [24, 32]}]},
    "hybrid": {"stem": 16, "first_stage": ["ds_r1_k3_s1_c16"], "head": 32, "join": "ir_k3_e2",
               "ops": ["ir_k3_e3_se0.25", "mha_h2_e2_k3", "ds_k5"],
               "blocks": [{"stride": 2, "depths": [1, 2], "widths": [16, 24], "down_positions": [0, 1]},
                          {"stride": 2, "depths": [1, 2], "widths": [24, 32], "down_positions": [1, 0]}]},
    "tiny": tests.tiny_space.EXAMPLE,
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", params=SPACES.names())
def space(request):
    if request.param not in EXAMPLES:
        pytest.fail(f"space kind {request.param!r} has no example configuration in EXAMPLES")
    cfg = SpaceConfig.model_validate({**EXAMPLES[request.param], "kind": request.param})
    return build_space(cfg, IN_CHANS, IMAGE_SIZE, NUM_CLASSES)


def random_choice(space, rng: random.Random):
    cells = [rng.choice(space.cells(b)) for b in range(space.num_blocks)]
    return [(c, rng.choice(list(space.candidates(c)))) for c in cells]


def test_the_spaces_are_registered():
    assert {"mbconv", "vit", "hybrid", "tiny"} <= set(SPACES.names())
    assert space_class("tiny") is tests.tiny_space.TinySpace


@pytest.mark.parametrize("seed", range(3))
def test_costs_add_up_to_the_built_network(space, seed):
    choice = random_choice(space, random.Random(seed))
    stem, head = space.stem_table(), space.head_table()
    params, macs, width = int(stem.params[0]), int(stem.macs[0]), int(stem.out_width[0])
    for cell, ops in choice:
        table = space.candidate_table(cell.block)
        rows = [r for r in range(len(table)) if table.choice(r) == (cell, ops) and table.in_width[r] == width]
        assert len(rows) == 1
        params, macs, width = params + int(table.params[rows[0]]), macs + int(table.macs[rows[0]]), cell.width
    (last,) = [r for r in range(len(head)) if head.in_width[r] == width]
    params, macs = params + int(head.params[last]), macs + int(head.macs[last])

    model = space.build(space.arch(choice))
    counted = count_cost(model, (1, IN_CHANS, IMAGE_SIZE, IMAGE_SIZE))
    assert counted[:2] == (params, macs)
    assert counted[2] == (1, NUM_CLASSES)


@pytest.mark.parametrize("seed", range(5))
def test_members_parse_back(space, seed):
    choice = random_choice(space, random.Random(100 + seed))
    arch = space.arch(choice)
    assert space.outside(arch) == []
    assert space.parse(arch) == choice
    assert space.parse(Arch.from_yaml(arch.to_yaml())) == choice


def test_a_network_with_a_missing_block_is_outside(space):
    arch = space.arch(random_choice(space, random.Random(0)))
    shorter = Arch(stem=arch.stem, stages=arch.stages[:-1], head=arch.head)
    assert space.outside(shorter)
    with pytest.raises(ValueError):
        space.parse(shorter)


def test_the_pieces_cover_every_network_and_the_resolutions_every_block(space):
    keys = {p.key for p in space.pieces()}
    for seed in range(5):
        chain = space.chain(random_choice(space, random.Random(seed)))
        assert {p.key for p in chain} <= keys
        assert [p.kind for p in chain[:1] + chain[-1:]] == ["stem", "head"]
    sizes = space.block_resolutions()
    assert len(sizes) == space.num_blocks + 1 and sizes[0] < IMAGE_SIZE


@pytest.mark.parametrize("seed", range(2))
def test_extraction_copies_every_tensor_of_the_chosen_paths(space, seed):
    """With targets as wide as the chosen cells every layer has a counterpart: each tensor of the network outside
    the head is the supernet's tensor of the chosen op, found by value among the chosen paths' tensors only."""
    choice = random_choice(space, random.Random(seed))
    sizes = space.block_resolutions()
    shapes = [(cell.width, sizes[b + 1], sizes[b + 1]) for b, (cell, _) in enumerate(choice)]
    torch.manual_seed(seed)
    supernets, chosen = [], []
    for block, (cell, ops) in enumerate(choice):
        supernet = build_block(space, block, shapes, IN_CHANS)
        state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in supernet.state_dict().items()}
        supernets.append(state)
        path = supernet[cell.name].full_path(ops)
        prefixes = tuple(f"{cell.name}.layers.{level}.{op}." for level, op in enumerate(path))
        chosen += [v for k, v in state.items() if k.startswith(prefixes) and v.is_floating_point()]

    arch = space.arch(choice)
    model = space.build(arch)
    extraction = space.extract(arch, supernets, model)
    assert extraction.not_copied == {}
    head = tuple(f"{name}." for name in extraction.no_counterpart)
    state = model.state_dict()
    copied = [v for k, v in state.items() if not k.startswith(head) and v.is_floating_point()]
    assert len(copied) == len(chosen) > 0
    unmatched = list(chosen)
    for tensor in copied:
        match = next(i for i, v in enumerate(unmatched) if v.shape == tensor.shape and torch.equal(v, tensor))
        del unmatched[match]
    assert extraction.tensors == sum(1 for k in state if not k.startswith(head))


@pytest.mark.parametrize("exporter", sorted(EXPORTERS))
def test_built_networks_export_with_parity(space, tmp_path, exporter):
    torch.manual_seed(0)
    model = space.build(space.arch(random_choice(space, random.Random(7))))
    images = torch.randn(4, IN_CHANS, IMAGE_SIZE, IMAGE_SIZE)
    report = export_onnx(model, images, tmp_path / "model.onnx", {"kind": space.kind}, exporter=exporter)
    assert report.path.is_file() and report.max_abs_diff <= 1e-4


# the registry --------------------------------------------------------------------------------------------------------
def test_an_unknown_kind_is_a_config_error_naming_the_kinds(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["space"]["kind"] = "swin"
    allowed = r"space\.kind='swin' is not a search space; allowed: .*hybrid.*mbconv.*tiny.*vit"
    with pytest.raises(ConfigError, match=allowed):
        parse_params(raw)


def test_a_kind_checks_its_own_keys(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["space"] = {**EXAMPLES["tiny"], "ops": ["conv_k3", "ir_k3_e3"]}
    with pytest.raises(ConfigError, match=r"space\.ops: 'ir_k3_e3' is not an op of the tiny space"):
        parse_params(raw)
    raw["space"] = {**EXAMPLES["mbconv"], "ops": ["conv_k3"]}
    with pytest.raises(ConfigError, match=r"space\.ops: 'conv_k3'"):
        parse_params(raw)


def test_a_kind_is_registered_once():
    with pytest.raises(ValueError, match="search space .tiny. is already registered"):
        SPACES.register("tiny")(type("Other", (), {}))
