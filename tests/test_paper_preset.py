"""The paper's ImageNet preset: its space, its class count, EfficientNet-B0 against it, and one of its blocks at
full width, trained and rated at low resolution."""
import logging
import re

import pytest
import timm
import torch
import torch.nn.functional as F
import yaml

from dna.config import load_params
from dna.data import class_count
from dna.distill import build_block
from dna.rate import rate_candidate_naive, rate_cell
from dna.spaces import build_space
from dna.supervision import uses_teacher
from dna.targets import RelativeL1Score, teacher_shapes
from tests.conftest import ROOT

PRESET = ROOT / "configs" / "imagenet.yaml"
B0 = {"stem": 32, "head": 1280, "arch": [  # timm's efficientnet_b0 arch_def, repeats as timm writes them
    ["ds_r1_k3_s1_e1_c16_se0.25"], ["ir_r2_k3_s2_e6_c24_se0.25"], ["ir_r2_k5_s2_e6_c40_se0.25"],
    ["ir_r3_k3_s2_e6_c80_se0.25"], ["ir_r3_k5_s1_e6_c112_se0.25"], ["ir_r4_k5_s2_e6_c192_se0.25"],
    ["ir_r1_k3_s1_e6_c320_se0.25"]]}


@pytest.fixture(scope="module")
def preset():
    return load_params(PRESET, check_paths=False)


@pytest.fixture
def cli(tmp_path):
    """Run `dna` in-process, with outputs in tmp_path (no splits there); the root logger is put back afterwards."""
    from typer.testing import CliRunner

    from dna.cli import app

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield lambda *args: CliRunner().invoke(app, [*args, "--params", str(PRESET), "-S", f"outputs={tmp_path}"])
    root.handlers[:] = handlers
    root.setLevel(level)


def test_classes_come_from_the_config_when_imagenet_is_absent(preset, tmp_path):
    assert preset.data.num_classes == 1000
    assert class_count(preset.data, tmp_path / "splits.json") == 1000


def test_space_size_is_the_papers(preset):
    space = build_space(preset.space, 3, 224, 1000)
    assert [space.block_size(b) for b in range(space.num_blocks)] == [288, 1548, 1548, 2808, 18144, 6]
    # the paper's count, 16,848 in block 4, plus the 4-layer cell of 192 channels that its DNA-c has
    assert space.size() == 288 * 1548 * 1548 * 2808 * (16848 + 6 ** 4) * 6


def test_teacher_boundaries_are_b7_stage_ends(preset):
    shapes = teacher_shapes(preset.teacher.model, 3, 224, preset.teacher.boundaries)
    assert [s[0] for s in shapes] == [48, 80, 160, 224, 384, 640]
    assert [s[1] for s in shapes] == [56, 28, 14, 14, 7, 7]


def test_full_width_block_learns_and_its_rating_prefers_the_trained_path(preset):
    """The largest block (160/192 channels, 4-5 layers, 18,144 candidates) at full width on 8x8 maps: training one
    path on a fixed target lowers its loss, and rating then scores that path better than an untrained one, with the
    prefix-reuse walk equal to rating each candidate on its own."""
    torch.manual_seed(0)
    space = build_space(preset.space, 3, 224, 1000)
    shapes = teacher_shapes(preset.teacher.model, 3, 224, preset.teacher.boundaries)
    block = 4
    supernet = build_block(space, block, shapes, 3)
    cell = supernet["d5_w192"]
    assert cell.layers[0][0].conv_pw.in_channels == 224 and cell.adapter[0].out_channels == 384
    x = torch.randn(16, 224, 8, 8)
    y = F.avg_pool2d(x[:, :1].repeat(1, 384, 1, 1), 2) + 0.1 * torch.randn(16, 384, 4, 4)  # learnable from x
    trained, untrained = (0, 1, 2, 3, 4), (5, 5, 5, 5, 5)
    opt = torch.optim.Adam(cell.parameters(), lr=3e-3)
    cell.train()
    losses = []
    for _ in range(30):
        loss = F.mse_loss(cell(x, trained), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    only = [trained, (0, 1, 2, 3, 5), untrained]
    calib = x[:8]
    scores = rate_cell(cell, 5, calib, [(x, y)], len(space.ops), only=only, progress=False, scorer=RelativeL1Score())
    assert set(scores) == set(only)
    for ops in only:
        naive = rate_candidate_naive(cell, ops, calib, [(x, y)], scorer=RelativeL1Score())
        assert scores[ops] == pytest.approx(naive, abs=1e-5)
    assert scores[trained] < scores[untrained]


def test_arch_cost_of_efficientnet_b0(cli, tmp_path):
    (tmp_path / "b0.yaml").write_text(yaml.safe_dump(B0))
    result = cli("arch", "cost", str(tmp_path / "b0.yaml"))
    params = sum(p.numel() for p in timm.create_model("efficientnet_b0", pretrained=False).parameters())
    assert f"{params:,} parameters" in result.stdout and "at 3x224x224 (1000 classes)" in result.stdout
    lines = [line.strip() for line in result.stdout.splitlines()]
    assert "not in the configured search space:" in lines and result.exit_code == 1
    # the preset has no 3-layer cell of 112 channels: that stage, nothing else
    assert [line for line in lines if line.startswith("NO")] == [
        "NO  block 3: depth 3 width 112 is not a cell of this block "
        "(cells: d3_w96, d4_w96, d4_w112; widths [96, 112])"]
    assert "ok  first stage: ['ds_r1_k3_s1_e1_c16_se0.25'] builds the space's ['ds_r1_k3_s1_c16_se0.25']" in lines
    assert "ok  block 0: depth 2 width 24 is cell d2_w24" in lines
    assert "ok  block 0 layer 1: 'ir_r1_k3_s1_e6_c24_se0.25' is op ir_k3_e6_se0.25" in lines  # the repeat, stride 1
    assert "ok  block 4 layer 3: 'ir_r1_k5_s1_e6_c192_se0.25' is op ir_k5_e6_se0.25" in lines
    assert sum(" layer " in line for line in lines) == 15  # every searched layer of B0 has its line


# The paper's four networks (its Table 2; their arch_def as the authors' retraining code builds them), with the
# parameters and multiply-adds the paper reports.
PUBLISHED = {"dna_a": (4.2e6, 348e6), "dna_b": (4.9e6, 394e6), "dna_c": (5.3e6, 466e6), "dna_d": (6.4e6, 611e6)}


@pytest.mark.parametrize("name", PUBLISHED)
def test_the_published_networks_are_members_of_the_preset_space_with_the_papers_parameters(cli, name):
    """Each of DNA-a to DNA-d is in the preset's space (every block's cell and every layer's op), and its parameter
    count rounds to the paper's; its multiply-adds are within 5% of the paper's (its counter also counts what is not
    a multiply-add: activations, the squeeze-excitation pooling)."""
    result = cli("arch", "cost", str(ROOT / "configs" / "archs" / f"{name}.yaml"))
    assert result.exit_code == 0, result.output
    assert "member of the configured search space:" in result.stdout and "NO " not in result.stdout
    params, macs = (int(n.replace(",", "")) for n in re.search(r"([\d,]+) parameters, ([\d,]+) multiply-adds",
                                                                 result.stdout).groups())
    assert round(params / 1e5) * 1e5 == PUBLISHED[name][0]
    assert abs(macs - PUBLISHED[name][1]) / PUBLISHED[name][1] < 0.05


def test_arch_cost_of_a_member_written_with_repeats(cli, tmp_path):
    member = {**B0, "arch": B0["arch"][:4] + [["ir_r4_k5_s1_e6_c112_se0.25"], ["ir_r5_k5_s2_e6_c192_se0.25"],
                                               B0["arch"][6]]}
    (tmp_path / "member.yaml").write_text(yaml.safe_dump(member))
    result = cli("arch", "cost", str(tmp_path / "member.yaml"))
    assert result.exit_code == 0, result.output
    assert "member of the configured search space:" in result.stdout and "NO " not in result.stdout
    assert "ok  block 4: depth 5 width 192 is cell d5_w192" in result.stdout


def test_unknown_class_count_is_a_config_error(cli):
    result = cli("space", "-S", "data.num_classes=null")
    assert result.exit_code == 2
    assert "data.num_classes is not set" in result.stderr and "/data/imagenet" in result.stderr
    assert "whole space" in cli("space").stdout


def test_retraining_recipe_is_efficientnets(preset):
    """RMSprop-TF, 0.016 per 256 images (0.032 at the paper's 64 x 8 GPUs), x0.97 every 2.4 epochs counted in steps,
    drop-path 0.2, weight EMA 0.9999 and RandAugment on the training images only."""
    from timm.data.auto_augment import RandAugment
    from timm.layers import DropPath

    from dna.data import _transform
    from dna.recipe import make_ema, make_scheduler

    t = preset.retrain.train
    assert (t.optimizer, t.optimizer_eps, t.weight_decay, t.epochs) == ("rmsprop", 1e-3, 1e-5, 350)
    assert t.batch_size == 512 and t.lr * t.batch_size / t.lr_batch == pytest.approx(0.032)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=t.lr)
    schedule, spe = make_scheduler(optimizer, t, 100), 100
    for updates in range(1, 20 * spe + 1):
        schedule.step_update(updates)
        if updates in (5 * spe, 7 * spe, 19 * spe):
            assert optimizer.param_groups[0]["lr"] == pytest.approx(t.lr * 0.97 ** (updates // 240))
    model = timm.create_model("efficientnet_b0", pretrained=False, drop_path_rate=t.drop_path_rate)
    assert max(m.drop_prob for m in model.modules() if isinstance(m, DropPath)) == pytest.approx(0.2 * 15 / 16)
    assert make_ema(model, t).decay == 0.9999
    train, evaluation = (_transform(preset.data, training, t.rand_augment).transforms for training in (True, False))
    assert any(isinstance(s, RandAugment) for s in train) and not any(isinstance(s, RandAugment) for s in evaluation)
    assert preset.distill.lr * preset.distill.batch_size / preset.distill.lr_batch == pytest.approx(0.002)


def test_the_dna_plus_and_dna_plusplus_paper_presets_are_the_dna_preset_but_for_rounds_and_supervision(preset):
    from dna.config import preset_overrides
    from dna.paths import Paths
    from dna.rounds import round_dir, round_params

    plus = preset_overrides(ROOT / "configs" / "imagenet_dna_plus.yaml", PRESET)
    plusplus = preset_overrides(ROOT / "configs" / "imagenet_dna_plusplus.yaml", PRESET)
    assert plus == {"outputs": "outputs/imagenet-dna-plus", "rounds": {"count": 2}}  # imagenet.yaml has no rounds
    assert {key.split(".")[0] for key in plusplus} == {"outputs", "supervision", "teacher"}
    assert plusplus["supervision.kind"] == "ssl" and plusplus["teacher.source"] == "none"
    for name, rounds in (("imagenet_dna_plus", 2), ("imagenet_dna_plusplus", 1)):
        params = load_params(ROOT / "configs" / f"{name}.yaml", check_paths=False)
        assert params.rounds.count == rounds and uses_teacher(params) == (rounds == 2)
        last = round_params(params, rounds, check_paths=False)
        assert last.teacher.source == ("arch" if rounds == 2 else "none")  # round 2: round 1's network
        if rounds == 2:  # the network round 1 found and retrained for its first target, DNA-a
            first = Paths(round_dir(params, 1), "dna_a")
            assert (last.teacher.arch, last.teacher.checkpoint) == (str(first.arch), str(first.model))
        space = build_space(params.space, 3, 224, 1000)
        assert space.size() == build_space(preset.space, 3, 224, 1000).size()


@pytest.mark.parametrize("name, sizes", [
    # per block: sum over cells of 4 ops ^ depth
    ("imagenet_vit", [(4 + 16) * 2, (16 + 64 + 256) * 2, (16 + 64 + 256) * 2, (16 + 64) * 2]),
    # per block: sum over cells of 6 ops ^ depth, once per stride position the cell is deep enough for
    ("imagenet_hybrid", [(36 + 216 + 36) * 2, (36 + 216 + 1296) * 2, (36 + 216 + 1296) * 2, 216 + 1296 + 1296,
                         (1296 + 7776 + 7776) * 2, 6]),
])
def test_the_transformer_and_hybrid_paper_presets_count_their_spaces(name, sizes, preset, tmp_path):
    """The DNA++ preset but for the space: same data, recipes and supervision; `dna space` counts the space."""
    from typer.testing import CliRunner

    from dna.cli import app

    params = load_params(ROOT / "configs" / f"{name}.yaml", check_paths=False)
    base = load_params(ROOT / "configs" / "imagenet_dna_plusplus.yaml", check_paths=False)
    for section in ("data", "distill", "retrain", "supervision", "rating"):
        assert getattr(params, section) == getattr(base, section), section
    space = build_space(params.space, 3, 224, 1000)
    assert [space.block_size(b) for b in range(space.num_blocks)] == sizes
    result = CliRunner().invoke(app, ["space", "--params", str(ROOT / "configs" / f"{name}.yaml"),
                                      "-S", f"outputs={tmp_path}"])
    assert result.exit_code == 0, result.output
    total = 1
    for size in sizes:
        total *= size
    assert f"whole space: {total:,} networks" in " ".join(result.stdout.split())
