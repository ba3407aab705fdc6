"""The architecture value type: files, tags, families and build settings, building with timm, and counting costs."""
import ast
import inspect
import json
from pathlib import Path

import onnx
import pytest
import timm
import torch
import yaml
from timm.layers import BatchNormAct2d, GroupNorm1Act, LayerNormAct2d, activations
from timm.models._efficientnet_blocks import SqueezeExcite
from timm.models._efficientnet_builder import decode_arch_def
from timm.models.efficientnet import EfficientNet
from timm.models.mobilenetv3 import MobileNetV3
from torch import nn

from dna.arch import Arch, build_layers, count_cost, expand_repeats
from dna.arch_families import FAMILIES, BuildSettings, Family, get_family

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
    assert raw == {"family": "efficientnet", "build": {"act": "swish", "norm": "batchnorm", "se_gate": "sigmoid"},
                   "stem": 16, "head": 256, "arch": [list(s) for s in SMALL.stages]}
    assert list(raw) == ["family", "build", "stem", "head", "arch"]  # the file opens with what makes the network
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


MALFORMED_FILES = [
    pytest.param("- stem: 16\n- head: 64\n", "expected a mapping with keys stem, head and arch, got a list",
                 id="top-level-list"),
    pytest.param("[[ds_r1_k3_s1_c16]]\n", "got a list", id="top-level-list-of-lists"),
    pytest.param("stem: 16\nhead: [64\narch: []\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("stem: -16\nhead: 64\narch: [[ds_r1_k3_s1_c16]]\n", "stem must be a whole number of channels, "
                 "at least 1; got -16", id="negative-stem"),
    pytest.param("stem: 16\nhead: 0\narch: [[ds_r1_k3_s1_c16]]\n", "head must be a whole number of channels, "
                 "at least 1; got 0", id="zero-head"),
    pytest.param("stem: 16\nhead: null\narch: [[ds_r1_k3_s1_c16]]\n", "head must be a whole number", id="null-head"),
    pytest.param("stem: 16\nhead: 64\narch: 5\n", "arch must be a list of stages", id="arch-not-a-list"),
    pytest.param("stem: 16\nhead: 64\narch: [ds_r1_k3_s1_c16]\n", "each a list of timm block strings",
                 id="stage-not-a-list"),
]


@pytest.mark.parametrize("text, message", MALFORMED_FILES)
def test_malformed_arch_files_are_value_errors_that_say_why(text, message):
    with pytest.raises(ValueError) as err:
        Arch.from_yaml(text)
    assert message in str(err.value)


@pytest.mark.parametrize("text, message", MALFORMED_FILES)
def test_arch_cost_of_a_malformed_file_is_one_line_and_exit_code_2(tmp_path, text, message):
    from typer.testing import CliRunner

    from dna.cli import app

    path = tmp_path / "arch.yaml"
    path.write_text(text)
    params = Path(__file__).resolve().parents[1] / "params.yaml"
    result = CliRunner().invoke(app, ["arch", "cost", str(path), "--params", str(params)])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert message in " ".join(result.output.split())


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


@pytest.mark.parametrize("width, depth, model", [(1.1, 1.2, "efficientnet_b2"), (1.2, 1.4, "efficientnet_b3")])
def test_b0_scaled_is_timms_scaled_efficientnet(width, depth, model):
    """Arch.scaled scales as timm scales EfficientNet-B0 into B2 and B3: the same layers, name by name."""
    arch = Arch(stem=32, stages=B0_ARCH_DEF, head=1280)
    scaled = arch.scaled(width, depth)
    theirs = timm.create_model(model, num_classes=1000)
    ours = scaled.build(num_classes=1000, in_chans=3)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    strides = [layer.conv_dw.stride[0] for stage in ours.blocks[1:] for layer in stage]
    assert strides == [layer.conv_dw.stride[0] for stage in theirs.blocks[1:] for layer in stage]
    assert arch.scaled(1.0, 1.0) is arch and Arch.from_yaml(scaled.to_yaml()) == scaled


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


# families and build settings ------------------------------------------------------------------------------------
TINY = Arch(stem=8, head=32, stages=(("ds_r1_k3_s1_c8_se0.25",), ("ir_r1_k3_s2_e3_c16_se0.25",)))
MOBILE = BuildSettings(act="hard_swish", norm="groupnorm1", se_gate="hard_sigmoid")


def _with(arch: Arch, **changes) -> Arch:
    return Arch(**{"stem": arch.stem, "stages": arch.stages, "head": arch.head, "family": arch.family,
                   "settings": arch.settings, **changes})


def _types(model: nn.Module) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.fixture
def families():
    """The family registry, scoped: a family registered by a test is gone after it."""
    with FAMILIES.scoped() as registry:
        yield registry


def test_round_trip_with_family_and_settings(tmp_path):
    arch = _with(SMALL, settings=MOBILE)
    assert arch != SMALL and arch.stages == SMALL.stages
    raw = yaml.safe_load(arch.to_yaml())
    assert raw["family"] == "efficientnet"
    assert raw["build"] == {"act": "hard_swish", "norm": "groupnorm1", "se_gate": "hard_sigmoid"}
    loaded = Arch.load(arch.save(tmp_path / "arch.yaml"))
    assert loaded == arch and loaded.settings == MOBILE and hash(loaded) == hash(arch)
    assert Arch.from_dict(json.loads(arch.tag())) == arch
    assert '"build":{"act":"hard_swish","norm":"groupnorm1","se_gate":"hard_sigmoid"}' in arch.tag()
    assert _with(SMALL, settings={"act": "relu"}).settings == BuildSettings(act="relu")  # a mapping is read too


def test_old_file_without_family_or_build_gets_todays_defaults_and_states_them(tmp_path):
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"stem": 16, "head": 256, "arch": [list(s) for s in SMALL.stages]}))
    arch = Arch.load(old)
    assert arch == SMALL and arch.family == "efficientnet"
    assert arch.settings == BuildSettings(act="swish", norm="batchnorm", se_gate="sigmoid")
    raw = yaml.safe_load(arch.save(tmp_path / "new.yaml").read_text())
    assert raw["family"] == "efficientnet"
    assert raw["build"] == {"act": "swish", "norm": "batchnorm", "se_gate": "sigmoid"}
    # a partial `build` takes defaults for the rest and is written back whole
    partial = Arch.from_yaml("build: {act: relu}\nstem: 16\nhead: 256\narch: [[ds_r1_k3_s1_c16]]\n")
    assert yaml.safe_load(partial.to_yaml())["build"] == {"act": "relu", "norm": "batchnorm", "se_gate": "sigmoid"}


def test_default_settings_build_the_network_built_before_settings_existed():
    from timm.layers import get_act_layer

    ours = SMALL.build(num_classes=10, in_chans=3)
    before = EfficientNet(decode_arch_def([list(s) for s in SMALL.stages]), num_classes=10, num_features=256,
                          in_chans=3, stem_size=16, fix_stem=True, round_chs_fn=lambda c, *_, **__: int(c),
                          act_layer=get_act_layer("swish"))
    assert [type(m) for m in ours.modules()] == [type(m) for m in before.modules()]
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in before.state_dict().items()}


@pytest.mark.parametrize("settings, act, norm, gate", [
    (BuildSettings(), nn.SiLU, BatchNormAct2d, nn.Sigmoid),
    (BuildSettings(act="relu"), nn.ReLU, BatchNormAct2d, nn.Sigmoid),
    (MOBILE, nn.Hardswish, GroupNorm1Act, nn.Hardsigmoid),
    (BuildSettings(act="gelu", norm="layernorm2d"), activations.GELU, LayerNormAct2d, nn.Sigmoid),  # timm's GELU
], ids=["default", "relu", "mobile", "gelu-layernorm"])
def test_settings_choose_the_built_layers(settings, act, norm, gate):
    model = _with(SMALL, settings=settings).build(num_classes=5, in_chans=3)
    assert type(model.bn1) is norm and type(model.bn2) is norm  # stem and head
    assert type(model.bn1.act) is act and type(model.bn2.act) is act
    blocks = [layer for stage in model.blocks for layer in stage]
    assert all(type(layer.bn1) is norm and type(layer.bn1.act) is act for layer in blocks)
    ses = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert len(ses) == 4 and all(type(se.gate) is gate and type(se.act1) is act for se in ses)
    others = {nn.SiLU, nn.ReLU, nn.Hardswish, activations.GELU} - {act}
    assert not others & _types(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)


def test_build_layers_makes_the_family_s_layers_with_the_same_settings():
    arch = _with(SMALL, settings=MOBILE)
    model = arch.build(num_classes=5, in_chans=3)
    stage = get_family(arch.family).build_layers(arch.stages[1], 16, arch.settings)
    assert [type(m) for m in stage.modules()] == [type(m) for m in model.blocks[1].modules()]
    assert {k: v.shape for k, v in stage.state_dict().items()} == \
        {k: v.shape for k, v in model.blocks[1].state_dict().items()}
    assert nn.Hardswish in _types(build_layers(list(arch.stages[1]), 16, MOBILE))
    assert nn.SiLU in _types(build_layers(list(arch.stages[1]), 16))  # default settings, as search spaces call it


@pytest.mark.parametrize("settings, op", [(MOBILE, "HardSwish"), (BuildSettings(act="relu"), "Relu")],
                         ids=["hard_swish-groupnorm1", "relu"])
def test_non_default_settings_export_to_onnx(tmp_path, settings, op):
    from dna.export import export_onnx

    arch = _with(TINY, settings=settings)
    report = export_onnx(arch.build(num_classes=4, in_chans=3), torch.randn(2, 3, 32, 32), tmp_path / "m.onnx",
                         {"arch": arch.tag()})
    assert report.max_abs_diff <= 1e-4
    graph = onnx.load(str(report.path))
    ops = {node.op_type for node in graph.graph.node} | {
        node.op_type for function in graph.functions for node in function.node}
    assert op in ops and not ({"HardSwish", "Relu"} - {op}) & ops
    assert ("HardSigmoid" in ops) == (settings.se_gate == "hard_sigmoid")
    assert ("Sigmoid" in ops) == (settings.se_gate == "sigmoid")  # neither activation is exported as a sigmoid
    meta = {p.key: p.value for p in graph.metadata_props}
    assert Arch.from_dict(json.loads(meta["arch"])) == arch


@pytest.mark.parametrize("changes, message", [
    ({"family": "resnet"}, "family='resnet' is not an architecture family; allowed: efficientnet"),
    ({"build": {"act": "swishy"}}, "act='swishy' is unknown; allowed: .*hard_swish"),
    ({"build": {"norm": "instance"}}, "norm='instance' is unknown; allowed: batchnorm, groupnorm1, layernorm2d"),
    ({"build": {"se_gate": "relu"}}, "se_gate='relu' is unknown; allowed: sigmoid, hard_sigmoid"),
    ({"build": {"activation": "relu"}}, r"unknown build setting\(s\) \['activation'\]; allowed: act, norm, se_gate"),
    ({"build": "relu"}, "`build` must be a mapping"),
    ({"bulid": {"act": "relu"}}, r"unknown key\(s\) \['bulid'\]; allowed: family, build, stem, head, arch"),
], ids=["family", "act", "norm", "se-gate", "setting-key", "build-not-mapping", "top-level-key"])
def test_unknown_family_or_setting_is_a_clear_error(changes, message):
    raw = {**SMALL.to_dict(), **changes}
    with pytest.raises(ValueError, match=message):
        Arch.from_dict(raw)


def test_settings_and_family_are_checked_on_construction_too():
    with pytest.raises(ValueError, match="act='Swish'"):
        BuildSettings(act="Swish")
    with pytest.raises(ValueError, match="family='mobilenetv3' is not an architecture family"):
        _with(SMALL, family="mobilenetv3")


def _build_mobilenetv3(arch: Arch, num_classes: int, in_chans: int, drop_rate: float = 0.0,
                       drop_path_rate: float = 0.0) -> nn.Module:
    return MobileNetV3(decode_arch_def([list(s) for s in arch.stages]), num_classes=num_classes, in_chans=in_chans,
                       stem_size=arch.stem, fix_stem=True, num_features=arch.head, drop_rate=drop_rate,
                       drop_path_rate=drop_path_rate, **arch.settings.timm_kwargs())


def test_a_family_is_one_registered_entry(families, tmp_path):
    with pytest.raises(ValueError, match="allowed: efficientnet$"):
        _with(TINY, family="mobilenetv3")
    FAMILIES.register("mobilenetv3", Family(build=_build_mobilenetv3))
    arch = _with(TINY, family="mobilenetv3", settings=BuildSettings(act="hard_swish", se_gate="hard_sigmoid"))
    model = arch.build(num_classes=7, in_chans=3)
    assert isinstance(model, MobileNetV3) and not isinstance(model, EfficientNet)
    assert model.conv_stem.out_channels == 8 and model.conv_head.out_channels == 32
    assert model.classifier.out_features == 7
    assert nn.Hardswish in _types(model) and nn.SiLU not in _types(model)
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    loaded = Arch.load(arch.save(tmp_path / "arch.yaml"))
    assert loaded == arch and yaml.safe_load(arch.to_yaml())["family"] == "mobilenetv3"
    assert type(loaded.build(num_classes=7, in_chans=3)) is MobileNetV3
    assert arch != _with(TINY, settings=arch.settings)  # same layers, other family: another network
    with pytest.raises(ValueError, match="architecture family 'mobilenetv3' is already registered"):
        FAMILIES.register("mobilenetv3", Family(build=_build_mobilenetv3))
    with pytest.raises(ValueError, match="allowed: efficientnet, mobilenetv3"):
        _with(TINY, family="resnet")


def test_registered_test_family_is_gone_afterwards():
    assert FAMILIES.names() == ["efficientnet"]


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


def _drop_paths(model: nn.Module) -> list[float]:
    from timm.layers import DropPath

    return [m.drop_prob for m in model.modules() if isinstance(m, DropPath)]


def test_drop_path_rate_reaches_the_layers_and_makes_training_stochastic():
    assert not any(_drop_paths(SMALL.build(num_classes=10, in_chans=3)))
    torch.manual_seed(0)
    model = SMALL.build(num_classes=10, in_chans=3, drop_path_rate=0.2)
    probs = _drop_paths(model)
    # timm's rule: layer i of n drops with probability rate * i / n (the first, at 0, has none)
    assert probs == pytest.approx([0.2 * i / 4 for i in range(1, 4)])
    x = torch.randn(4, 3, 32, 32)
    model.train()
    outputs = [model.blocks[1](model.blocks[0](model.bn1(model.conv_stem(x)))) for _ in range(6)]
    assert any(not torch.equal(outputs[0], o) for o in outputs[1:]), "residual branches are dropped at random"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(x), model(x))
