"""The architecture value type: files, tags, building with timm's EfficientNet, and counting costs."""
import ast
import inspect
import json

import pytest
import timm
import torch
import yaml
from torch import nn

from dna.arch import Arch, build_layers, count_cost, expand_repeats

SMALL = Arch(stem=16, head=256, stages=(
    ("ds_r1_k3_s1_c16_se0.25",),
    ("ir_r1_k5_s2_e3_c24_se0.25", "ir_r1_k3_s1_e6_c24_se0.25"),
    ("ir_r1_k7_s2_e6_c40_se0.25",),
))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _timm_b0_arch_def() -> list[list[str]]:
    """The arch_def literal of timm's _gen_efficientnet, read from timm's source."""
    from timm.models import efficientnet

    tree = ast.parse(inspect.getsource(efficientnet._gen_efficientnet))
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "arch_def" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("arch_def not found in timm's _gen_efficientnet")


B0_ARCH_DEF = [
    ["ds_r1_k3_s1_e1_c16_se0.25"], ["ir_r2_k3_s2_e6_c24_se0.25"], ["ir_r2_k5_s2_e6_c40_se0.25"],
    ["ir_r3_k3_s2_e6_c80_se0.25"], ["ir_r3_k5_s1_e6_c112_se0.25"], ["ir_r4_k5_s2_e6_c192_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"],
]


# files and tags --------------------------------------------------------------------------------------------------
def test_yaml_round_trip(tmp_path):
    text = SMALL.to_yaml()
    assert Arch.from_yaml(text) == SMALL
    raw = yaml.safe_load(text)
    assert raw == {"stem": 16, "head": 256, "arch": [list(s) for s in SMALL.stages]}
    path = SMALL.save(tmp_path / "search" / "arch.yaml")
    assert path == tmp_path / "search" / "arch.yaml" and path.read_text() == text
    loaded = Arch.load(path)
    assert loaded == SMALL and hash(loaded) == hash(SMALL)
    assert isinstance(loaded.stages, tuple) and all(isinstance(s, tuple) for s in loaded.stages)


def test_equality_is_by_value():
    lists = Arch(stem=16, head=256, stages=[list(s) for s in SMALL.stages])
    assert lists == SMALL  # stages given as lists are stored as tuples
    assert Arch(stem=16, head=128, stages=SMALL.stages) != SMALL
    assert Arch(stem=16, head=256, stages=SMALL.stages[:2]) != SMALL


def test_tag_is_one_line_of_json():
    tag = SMALL.tag()
    assert "\n" not in tag and " " not in tag
    raw = json.loads(tag)
    assert raw == SMALL.to_dict()
    assert Arch.from_dict(raw) == SMALL


@pytest.mark.parametrize("raw, missing", [
    ({"stem": 16, "head": 256}, "['arch']"),
    ({"arch": [["ds_r1_k3_s1_c16"]]}, "['head', 'stem']"),
    ({}, "['arch', 'head', 'stem']"),
    (None, "['arch', 'head', 'stem']"),
])
def test_from_dict_missing_keys(raw, missing):
    with pytest.raises(ValueError, match="lacks key") as err:
        Arch.from_dict(raw)
    assert missing in str(err.value)


def test_from_yaml_of_empty_or_partial_text():
    with pytest.raises(ValueError, match="lacks key"):
        Arch.from_yaml("")
    with pytest.raises(ValueError, match=r"\['head'\]"):
        Arch.from_yaml("stem: 16\narch: [[ds_r1_k3_s1_c16]]\n")


@pytest.mark.parametrize("bad, problem", [
    ("ir_r1_k3_s2_e3", "'c'"),  # no width
    ("ir_r1_s2_e3_c24", "'k'"),  # no kernel
    ("ir_k3_s2_e3_c24", "'r'"),  # no repeat
    ("zz_r1_k3_s1_c24", "Unknown block type (zz)"),
    ("ir_r1_kx_s1_e3_c24", "'k'"),  # kernel not a number
], ids=["no-width", "no-kernel", "no-repeat", "unknown-type", "bad-kernel"])
def test_invalid_block_strings(bad, problem):
    with pytest.raises(ValueError, match="invalid timm block string") as err:
        Arch(stem=16, head=64, stages=(("ds_r1_k3_s1_c16",), (bad,)))
    assert problem in str(err.value)


def test_empty_stage_is_invalid():
    with pytest.raises(ValueError, match="stage"):
        Arch(stem=16, head=64, stages=(("ds_r1_k3_s1_c16",), (), ("ir_r1_k3_s2_e6_c24",)))


# repeats ---------------------------------------------------------------------------------------------------------
def test_repeat_expands_to_layers_with_stride_on_the_first():
    arch = Arch(stem=16, head=64, stages=(("ds_r1_k3_s1_c16",), ("ir_r2_k3_s2_e3_c40_se0.25",)))
    assert arch.stages[1] == ("ir_r1_k3_s2_e3_c40_se0.25", "ir_r1_k3_s1_e3_c40_se0.25")
    text = arch.to_yaml()
    assert "_r2_" not in text and yaml.safe_load(text)["arch"][1] == list(arch.stages[1])
    assert Arch.from_yaml(text) == arch and Arch.from_yaml(text).to_yaml() == text


@pytest.mark.parametrize("block, layers", [
    ("ir_r3_k3_s2_e6_c24_se0.25_noskip",
     ["ir_r1_k3_s2_e6_c24_se0.25_noskip"] + ["ir_r1_k3_s1_e6_c24_se0.25_noskip"] * 2),
    ("ir_r2_s2_k5_a1_e3_c40_nre", ["ir_r1_s2_k5_a1_e3_c40_nre", "ir_r1_s1_k5_a1_e3_c40_nre"]),  # token order kept
    ("ir_r2_k3_s22_e3_c40", ["ir_r1_k3_s22_e3_c40", "ir_r1_k3_s1_e3_c40"]),  # the whole stride token is replaced
    ("ds_r1_k3_s1_e1_c16_se0.25", ["ds_r1_k3_s1_e1_c16_se0.25"]),
    ("ir_r1_k3_s2_e6_c24_skip", ["ir_r1_k3_s2_e6_c24_skip"]),  # `skip` and `se` are not s tokens
])
def test_expand_repeats_changes_only_r_and_s(block, layers):
    assert expand_repeats(block) == layers


def test_expanded_layers_decode_as_timm_builds_the_repeats():
    """Each expanded layer decodes to the block arguments timm's builder uses for that copy of the repeat."""
    from timm.models._efficientnet_builder import _decode_block_str, decode_arch_def

    block = "ir_r3_k5_s2_e6_c40_se0.25_nre_noskip"
    theirs = decode_arch_def([[block]])[0]
    for i, args in enumerate(theirs):
        args["stride"] = args["stride"] if i == 0 else 1  # what EfficientNetBuilder does to later blocks of a stack
    assert [_decode_block_str(s)[0] for s in expand_repeats(block)] == theirs


def test_same_network_however_its_repeats_are_written():
    written = Arch(stem=32, stages=B0_ARCH_DEF, head=1280)
    expanded = Arch(stem=32, stages=[[layer for s in stage for layer in expand_repeats(s)] for stage in B0_ARCH_DEF],
                    head=1280)
    assert written == expanded and hash(written) == hash(expanded)
    assert [len(s) for s in written.stages] == [1, 2, 2, 3, 3, 4, 1]
    assert written.tag() == expanded.tag() and "_r1_" in written.tag() and "_r2_" not in written.tag()
    assert written.stages[5] == ("ir_r1_k5_s2_e6_c192_se0.25",) + ("ir_r1_k5_s1_e6_c192_se0.25",) * 3
    # a stage may also mix repeat strings and single layers
    split = ["ir_r1_k5_s2_e6_c192_se0.25", "ir_r3_k5_s1_e6_c192_se0.25"]
    mixed = Arch(stem=32, head=1280, stages=[*B0_ARCH_DEF[:5], split, B0_ARCH_DEF[6]])
    assert mixed == written


def test_zero_repeats_is_invalid():
    with pytest.raises(ValueError, match="invalid timm block string"):
        Arch(stem=16, head=64, stages=(("ds_r1_k3_s1_c16",), ("ir_r0_k3_s2_e3_c24",)))


# building --------------------------------------------------------------------------------------------------------
def test_b0_arch_def_is_timms():
    assert _timm_b0_arch_def() == B0_ARCH_DEF


def test_b0_through_arch_has_timms_parameter_count():
    arch = Arch(stem=32, stages=B0_ARCH_DEF, head=1280)
    ours = arch.build(num_classes=1000, in_chans=3)
    theirs = timm.create_model("efficientnet_b0", num_classes=1000)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(theirs)
    assert abs(count(ours) - 5.3e6) < 0.05e6  # EfficientNet-B0's published size
    # and the same layers: repeats expand to 16 blocks with the same shapes, name by name
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}


def test_b0_with_repeats_is_written_back_expanded_and_builds_timms_b0(tmp_path):
    """EfficientNet-B0 in timm's notation, through a file: the canonical file has 16 `_r1` layers, same network."""
    (tmp_path / "b0.yaml").write_text(yaml.safe_dump({"stem": 32, "head": 1280, "arch": B0_ARCH_DEF}))
    arch = Arch.load(tmp_path / "b0.yaml")
    assert sum(len(s) for s in arch.stages) == 16
    assert all("_r1_" in layer for stage in arch.stages for layer in stage)
    theirs = timm.create_model("efficientnet_b0", pretrained=False)
    for stored in (arch, Arch.from_yaml(arch.to_yaml()), Arch.from_dict(json.loads(arch.tag()))):
        ours = stored.build(num_classes=1000, in_chans=3)
        assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())
        shapes = {k: v.shape for k, v in theirs.state_dict().items()}
        assert {k: v.shape for k, v in ours.state_dict().items()} == shapes
    strides = [layer.conv_dw.stride[0] for stage in ours.blocks[1:] for layer in stage]
    assert strides == [layer.conv_dw.stride[0] for stage in theirs.blocks[1:] for layer in stage]


def test_build_sets_classes_channels_and_dropout():
    model = SMALL.build(num_classes=7, in_chans=3, drop_rate=0.25)
    assert model.conv_stem.in_channels == 3 and model.conv_stem.out_channels == 16
    assert model.classifier.out_features == 7 and model.classifier.in_features == 256
    assert model.drop_rate == 0.25
    assert [len(stage) for stage in model.blocks] == [1, 2, 1]
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)


def test_build_layers_makes_one_stage():
    stage = build_layers(["ir_r1_k5_s2_e3_c24_se0.25", "ir_r1_k3_s1_e6_c24_se0.25"], in_chs=16)
    assert len(stage) == 2
    assert stage[0].conv_pw.in_channels == 16 and stage[0].conv_pw.out_channels == 48  # 16 x e3
    assert stage[0].conv_dw.kernel_size == (5, 5) and stage[0].conv_dw.stride == (2, 2)
    assert stage[1].conv_pw.out_channels == 144  # 24 x e6
    with torch.no_grad():
        assert stage.eval()(torch.randn(1, 16, 16, 16)).shape == (1, 24, 8, 8)


# costs -----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cin, cout, k, stride, padding, size", [
    (3, 8, 3, 1, 1, 10), (4, 6, 3, 2, 0, 11), (16, 32, 1, 1, 0, 7), (2, 5, 5, 2, 2, 9),
])
def test_count_cost_of_a_conv(cin, cout, k, stride, padding, size):
    conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding, bias=False)
    out = (size + 2 * padding - k) // stride + 1
    params, macs, shape = count_cost(conv, (1, cin, size, size))
    assert shape == (1, cout, out, out)
    assert params == k * k * cin * cout
    assert macs == k * k * cin * cout * out * out


def test_count_cost_is_half_the_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        conv(torch.zeros(1, 3, 10, 10))
    _, macs, _ = count_cost(conv, (1, 3, 10, 10))
    assert counter.get_total_flops() == 2 * macs == 2 * 3 * 3 * 3 * 8 * 10 * 10


def test_count_cost_of_a_small_network_and_batch():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 10))
    params, macs, shape = count_cost(model, (2, 1, 8, 8))
    assert params == (9 * 4 + 4) + 2 * 4 + (144 * 10 + 10)
    # conv 9 x 4 per output pixel, linear 144 x 10, both per image; batch norm, biases and ReLU are not counted
    assert macs == 2 * (9 * 4 * 6 * 6 + 144 * 10)
    assert shape == (2, 10)


def test_count_cost_restores_mode_and_leaves_statistics():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model.train()
    count_cost(model, (1, 1, 5, 5))
    assert model.training and model[1].training
    assert model[1].num_batches_tracked.item() == 0  # ran in eval mode: no batch statistics recorded
    model.eval()
    count_cost(model, (1, 1, 5, 5))
    assert not model.training
