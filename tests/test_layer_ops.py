"""Transformer ops: the timm block strings they stand for, their checks, their cost (attention's matrix products
counted), and how the spaces read, cost and extract them."""
import pytest
import torch
from timm.models._efficientnet_builder import _decode_block_str

from dna.arch import build_layers, count_cost
from dna.config import SpaceConfig, parse_params
from dna.errors import ConfigError
from dna.spaces import build_space
from dna.spaces.base import Cell
from dna.spaces.layer_ops import check_op, op_layers, op_module
from dna.supervision import uses_teacher
from tests.conftest import tiny_raw

VIT = {"kind": "vit", "stem": 16, "first_stage": ["ds_r1_k3_s1_c16"], "head": 32, "ops": ["mha_h2_e2", "mha_h4_e4_k3"],
       "blocks": [{"stride": 2, "depths": [1, 2], "widths": [16, 24]}, {"stride": 1, "depths": [2], "widths": [24]}]}


def test_a_transformer_op_is_attention_then_feed_forward_at_the_cells_width():
    layers = op_layers("mha_h4_e2_k3", 1, 32, 32, "cn_k3")
    attention, ffn = (_decode_block_str(s)[0] for s in layers)
    assert attention["block_type"] == "mha" and (attention["num_heads"], attention["key_dim"]) == (4, 8)
    assert attention["out_chs"] == ffn["out_chs"] == 32 and attention["stride"] == ffn["stride"] == 1
    assert ffn["block_type"] == "uir" and ffn["exp_ratio"] == 2.0
    assert (ffn["dw_kernel_size_start"], ffn["dw_kernel_size_mid"], ffn["dw_kernel_size_end"]) == (0, 3, 0)
    assert _decode_block_str(op_layers("mqa_h2_e4", 1, 16, 16, "cn_k3")[1])[0]["dw_kernel_size_mid"] == 0


@pytest.mark.parametrize("stride, in_width, joined", [(1, 32, False), (2, 32, True), (1, 16, True), (2, 16, True)])
def test_the_join_comes_first_where_stride_or_width_change(stride, in_width, joined):
    layers = op_layers("mha_h4_e2", stride, in_width, 32, "er_k3_e2")
    assert len(layers) == (3 if joined else 2)
    if joined:
        join = _decode_block_str(layers[0])[0]
        assert (join["block_type"], join["stride"], join["out_chs"]) == ("er", stride, 32)
    out = op_module("mha_h4_e2", stride, in_width, 32, "er_k3_e2")(torch.zeros(2, in_width, 8, 8))
    assert out.shape == (2, 32, 8 // stride, 8 // stride)


def test_attention_costs_its_two_matrix_products():
    """On CPU torch's counter does not know the fused attention kernel; count_cost is told, and counts what the
    unfused (explicit matmul) attention of the same block counts."""
    block = build_layers(op_layers("mha_h4_e2", 1, 32, 32, "cn_k3"), 32)
    fused = count_cost(block, (1, 32, 6, 6))
    block[0].attn.fused_attn = False
    unfused = count_cost(block, (1, 32, 6, 6))
    assert fused == unfused
    convolutions = 32 * 96 + 32 * 32 + 2 * 32 * 64  # qkv, output projection, feed-forward
    tokens = 36
    assert fused[1] == tokens * convolutions + 2 * tokens * tokens * 32


@pytest.mark.parametrize("op, problem", [
    ("mha_h4", "not a valid transformer op"), ("mha_h4_e2_c32", "not a valid transformer op"),
    ("mha_k3_h4_d16", "not a valid transformer op"), ("mqa_h0_e2", "not a valid transformer op"),
    ("mha_h2_e0", "not a valid transformer op"),
])
def test_malformed_transformer_ops_are_refused(op, problem):
    with pytest.raises(ValueError, match=problem):
        check_op(op)


@pytest.mark.parametrize("change, problem", [
    ({"join": "mha_h2_e2"}, r"space\.join: 'mha_h2_e2' is a transformer op"),
    ({"ops": ["mha_h2_e2", "mha_h16_e2"]}, r"space\.blocks\[0\]: width 24 is not a multiple of the 16 heads of "
                                          r"op 'mha_h16_e2'"),
    ({"ops": ["mha_h2_e2", "ir_k3_e3"]}, r"space\.ops: \['ir_k3_e3'\] are not transformer ops"),
    ({"kind": "hybrid"}, r"space\.ops: .* are all transformer ops; a space of kind hybrid mixes both"),
])
def test_wrong_transformer_spaces_name_the_key(tmp_path, change, problem):
    raw = tiny_raw(tmp_path)
    raw["space"] = {**VIT, **change}
    with pytest.raises(ConfigError, match=problem):
        parse_params(raw)


@pytest.fixture(scope="module")
def vit():
    return build_space(SpaceConfig.model_validate(VIT), 3, 16, 4)


def test_a_transformer_network_outside_the_space_says_where(vit):
    choice = [(Cell(0, 2, 24), (0, 1)), (Cell(1, 2, 24), (1, 1))]
    arch = vit.arch(choice)
    assert vit.parse(arch) == choice
    wrong_heads = [s.replace("_h4_d6_", "_h2_d12_") for s in arch.stages[2]]
    stages = (*arch.stages[:2], tuple(wrong_heads))
    problems = vit.outside(type(arch)(stem=arch.stem, stages=stages, head=arch.head))
    layer = next(p for p in problems if p.startswith("block 1 layer 0:"))
    assert layer.startswith("block 1 layer 0: 'mha_r1_k3_h2_d12_s1_c24' is not one of this layer's ops")
    assert "mha_r1_k3_h4_d6_s1_c24+uir_r1_a0_k3_s1_e4_c24" in layer  # what layer 0 may be
    assert not any(p.startswith("block 0") for p in problems)


def test_extraction_pairs_a_transformer_op_from_its_last_block(vit):
    """Block 1's supernet saw the target's 16 channels at the boundary (a join before its first attention block);
    the network's block 0 chose width 24 = block 1's width, so it has no join there: the attention and
    feed-forward blocks are still copied, nothing is paired with the wrong block."""
    choice = [(Cell(0, 1, 24), (0,)), (Cell(1, 2, 24), (1, 0))]
    supernets = []
    torch.manual_seed(0)
    for block, in_chs in ((0, 3), (1, 16)):
        cell = vit.build_cell(choice[block][0], in_chs, 24)
        supernets.append({f"{choice[block][0].name}.{k}": torch.randn_like(v) if v.is_floating_point() else v
                          for k, v in cell.state_dict().items()})
    arch = vit.arch(choice)
    model = vit.build(arch)
    extraction = vit.extract(arch, supernets, model)
    assert extraction.not_copied == {}
    source = supernets[1]["d2_w24.layers.0.1.1.attn.qkv.weight"]  # layer 0, op 1, its second block: attention
    assert torch.equal(model.state_dict()["blocks.2.0.attn.qkv.weight"], source)
    assert torch.equal(model.state_dict()["blocks.2.2.attn.qkv.weight"],
                       supernets[1]["d2_w24.layers.1.0.0.attn.qkv.weight"])


@pytest.mark.parametrize("preset, kind", [("vit", "vit"), ("hybrid", "hybrid")])
def test_the_transformer_presets_are_the_dna_plusplus_preset_but_for_the_space(preset, kind):
    """Same data, recipes, supervision and budget as configs/dna_plusplus.yaml (the family table compares them);
    every key dvc.yaml tracks is there, so `dvc repro` runs them as params.yaml; no teacher is read, and the
    candidates of their blocks hold attention layers."""
    from dna.config import load_params, preset_overrides
    from tests.conftest import ROOT
    from tests.test_config import resolved_preset_is_a_dvc_params_file

    differs = preset_overrides(ROOT / "configs" / f"{preset}.yaml", ROOT / "configs" / "dna_plusplus.yaml")
    assert {key.split(".")[0] for key in differs} == {"outputs", "space"} and differs["space.kind"] == kind
    resolved_preset_is_a_dvc_params_file(ROOT / "configs" / f"{preset}.yaml")
    params = load_params(ROOT / "configs" / f"{preset}.yaml")
    assert any(op.startswith("mha_") for op in params.space.ops)
    assert not uses_teacher(params)  # DNA++: the blocks learn from their own cells
    space = build_space(params.space, params.data.channels, params.data.image_size, 10)
    cell = space.cells(1)[0]
    built = space.build_cell(cell, space.in_widths(1)[0], 32)
    assert any(type(m).__name__ == "MobileAttention" for m in built.modules()), "its candidates hold attention"
