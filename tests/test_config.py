"""The params schema: the shipped presets load, malformed files fail early with a message that names the key."""
import copy
import itertools
import logging
import re
from pathlib import Path

import pytest
import yaml

from dna.config import Params, load_params, parse_params
from dna.errors import ConfigError
from dna.pipeline import stage_tables, validate
from dna.search import min_cost
from dna.spaces.mbconv import MBConvSpace

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "params.yaml"
IMAGENET = ROOT / "configs" / "imagenet.yaml"
DEFAULT_RAW = yaml.safe_load(DEFAULT.read_text())
TINY_OPS = ["ir_k3_e3_se0.25", "ir_k5_e6_se0.25"]
FINGERPRINT = {"fingerprint": True}  # a dump as a fingerprint sees it (dna.fingerprint_keys)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(autouse=True)
def _config_sklearn_home(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("SCIKIT_LEARN_DATA", str(tmp_path_factory.mktemp("sklearn_data")))


def _raw(**changes) -> dict:
    """A deep copy of the default params with dotted keys set (value None removes the key); search.budgets set
    chooses the one target, as a preset does (the default's named targets go)."""
    raw = copy.deepcopy(DEFAULT_RAW)
    if any(key.startswith("search.budgets") for key in changes):
        raw["search"].pop("targets", None)
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if value is None:
            del node[leaf]
        elif isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return raw


def _tiny_raw(**changes) -> dict:
    """The default params with a small space (two ops, one layer per block) so deep checks are quick."""
    raw = _raw(**changes)
    raw["space"]["ops"] = list(TINY_OPS)
    raw["space"]["blocks"] = [{"stride": 2, "depths": [1], "widths": [w]} for w in (24, 32, 48, 96)]
    raw["teacher"]["output_stride"] = 32  # every stage strided, as the blocks are
    return raw


# presets ----------------------------------------------------------------------------------------------------------
def test_default_params_load():
    params = load_params(DEFAULT)
    assert isinstance(params, Params)
    assert params.data.source == "digits"
    assert len(params.space.blocks) == len(params.teacher.boundaries) == 4
    assert params.space.ops == DEFAULT_RAW["space"]["ops"]


def test_default_teacher_is_dilated_to_match_the_blocks_at_stride_one():
    params = load_params(DEFAULT)
    assert params.teacher.output_stride == 8 and [b.stride for b in params.space.blocks] == [2, 2, 1, 1]
    validate(params, check_profile=False)  # the teacher's boundaries and the blocks' outputs agree
    undilated = load_params(DEFAULT, {"teacher.output_stride": 32})
    with pytest.raises(ConfigError, match=r"teacher\.boundaries\[2\]=4: the teacher's features there are 2x2 but "
                                          r"block 2 of the space outputs 4x4"):
        validate(undilated, check_profile=False)
    with pytest.raises(ConfigError, match=r"teacher\.output_stride=4: Input should be 8, 16 or 32"):
        load_params(DEFAULT, {"teacher.output_stride": 4})
    assert "output_stride" not in undilated.teacher.model_dump(context=FINGERPRINT)  # 32: as before the key


def test_imagenet_preset_loads_without_path_checks():
    params = load_params(IMAGENET, check_paths=False)
    assert params.data.source == "imagefolder" and params.data.image_size == 224
    assert params.teacher.model == "tf_efficientnet_b7"
    assert [b.stride for b in params.space.blocks] == [2, 2, 2, 1, 2, 1]
    # /data/imagenet is not here: with path checks on, the same file is rejected for its data.root
    if not Path("/data/imagenet").is_dir():
        with pytest.raises(ConfigError, match=r"data\.root='/data/imagenet' does not exist"):
            load_params(IMAGENET)


def test_fingerprints_leave_out_how_the_data_are_loaded():
    """Workers and the decoded-image cache change no result: a run with other settings of them resumes; the dump that
    is logged still shows them."""
    from dna.checkpoint import digest

    base = load_params(DEFAULT)
    loaded_otherwise = load_params(DEFAULT, overrides={"data.num_workers": 4, "data.cache_mb": 0, "data.verify": False})
    other_data = load_params(DEFAULT, overrides={"data.image_size": 48})
    assert digest(base.data) == digest(loaded_otherwise.data) != digest(other_data.data)
    assert digest(base) == digest(loaded_otherwise)
    assert loaded_otherwise.model_dump()["data"]["num_workers"] == 4
    assert loaded_otherwise.model_dump()["data"]["verify"] is False
    assert "verify" not in base.model_dump(context=FINGERPRINT)["data"]


def test_overrides_set_nested_keys(tmp_path):
    params = load_params(DEFAULT, overrides={"retrain.train.epochs": 3, "data.image_size": 48, "seed": 7})
    assert (params.retrain.train.epochs, params.data.image_size, params.seed) == (3, 48, 7)
    assert params.teacher.train.epochs == DEFAULT_RAW["teacher"]["train"]["epochs"]  # only the named key changed
    with pytest.raises(ConfigError, match=r"retrain\.train\.epochs=-2"):
        load_params(DEFAULT, overrides={"retrain.train.epochs": -2})


# malformed params: one row per mistake ---------------------------------------------------------------------------
ROOT_KEYS = ["data", "device", "distill", "export", "mlflow", "orchestration", "outputs", "rating", "retrain",
             "search", "seed", "space", "teacher"]
DATA_KEYS = ["augment", "cache_mb", "channels", "download", "image_size", "name", "num_workers", "rate_fraction",
             "root", "source", "test_fraction"]
TRAIN_KEYS = ["batch_size", "drop_rate", "epochs", "label_smoothing", "lr", "lr_decay", "optimizer", "schedule",
              "warmup_epochs", "weight_decay"]

MALFORMED = [
    pytest.param(_raw(colour="blue"), ["colour", "unknown key", *ROOT_KEYS], id="unknown-top-level-key"),
    pytest.param(_raw(**{"data.colour": "blue"}), ["data.colour", "unknown key", *DATA_KEYS], id="unknown-data-key"),
    pytest.param(_raw(**{"data.batch_size": 64}), ["data.batch_size is no longer a key", "teacher.train.batch_size",
                                                   "distill.batch_size", "rating.batch_size",
                                                   "retrain.train.batch_size"], id="removed-data-batch-size"),
    pytest.param(_raw(**{"data.cache_mb": -1}), ["data.cache_mb", "-1", "greater than or equal to 0"],
                 id="negative-cache"),
    pytest.param(_raw(**{"teacher.train.epoch": 3}), ["teacher.train.epoch", *TRAIN_KEYS], id="unknown-nested-key"),
    pytest.param(_raw(**{"space.blocks.0.depth": [1]}), ["space.blocks.0.depth", "cells", "depths", "stride", "widths"],
                 id="unknown-key-in-list-item"),
    pytest.param(_raw(**{"teacher.train.epochs": "ten"}), ["teacher.train.epochs", "'ten'", "integer"],
                 id="string-for-int"),
    pytest.param(_raw(**{"retrain.train.epochs": -1}), ["retrain.train.epochs", "-1", "greater than or equal to 0"],
                 id="negative-epochs"),
    pytest.param(_raw(**{"distill.lr": 0}), ["distill.lr", "greater than 0"], id="zero-lr"),
    pytest.param(_raw(**{"data.test_fraction": 1.5}), ["data.test_fraction", "1.5", "less than 1"],
                 id="fraction-above-one"),
    pytest.param(_raw(**{"data.rate_fraction": 0.5, "data.test_fraction": 0.45}),
                 ["data.rate_fraction + data.test_fraction"], id="fractions-leave-no-training"),
    pytest.param(_raw(**{"data.source": "csv"}), ["data.source", "'csv'", "digits", "torchvision", "imagefolder"],
                 id="unknown-literal"),
    pytest.param(_raw(**{"retrain.train.optimizer": "lion"}), ["retrain.train.optimizer", "sgd", "adamw", "rmsprop"],
                 id="unknown-optimizer"),
    pytest.param(_raw(**{"teacher.model": "efficientnet_b99"}), ["teacher.model", "'efficientnet_b99'",
                                                                 "not a timm model", "efficientnet_b0"],
                 id="unknown-timm-model"),
    pytest.param(_raw(**{"space.ops": ["ir_k3_e3_se0.25", "ir_k4x"]}), ["space.ops", "'ir_k4x'", "not a valid op"],
                 id="op-unparseable"),
    pytest.param(_raw(**{"space.ops": ["ir_k3_s2_e3_se0.25"]}), ["space.ops", "'ir_k3_s2_e3_se0.25'", "r/s/c"],
                 id="op-sets-stride"),
    pytest.param(_raw(**{"space.ops": ["ir_k3_e3_c16"]}), ["space.ops", "'ir_k3_e3_c16'", "r/s/c"],
                 id="op-sets-width"),
    pytest.param(_raw(**{"space.ops": ["ir_k3_e3_se0.25", "ir_k3_e3_gs5"]}),
                 ["space.ops", "'ir_k3_e3_gs5'", "timm cannot build"], id="op-timm-cannot-build"),
    pytest.param(_raw(**{"space.ops": ["ir_k3_e3_se0.25", "mqa_k3_h4_d16_v2"]}),
                 ["space.ops", "'mqa_k3_h4_d16_v2'", "not a valid transformer op", "mha_h<heads>_e<mlp ratio>"],
                 id="transformer-op-malformed"),
    pytest.param(_raw(**{"space.kind": "swin"}), ["space.kind='swin'", "allowed: hybrid, mbconv", "vit"],
                 id="unknown-space-kind"),
    pytest.param(_raw(**{"space.ops": []}), ["space.ops", "at least one op"], id="no-ops"),
    pytest.param(_raw(**{"space.blocks": [], "teacher.boundaries": []}), ["space.blocks", "at least one block"],
                 id="no-blocks"),
    pytest.param(_raw(**{"space.blocks.1": {"stride": 2}}), ["space.blocks.1", "depths and widths (or cells)"],
                 id="block-without-cells"),
    pytest.param(_raw(**{"space.blocks.2": {"stride": 2, "depths": [1], "widths": [48], "cells": [[1, 48]]}}),
                 ["space.blocks.2", "either cells or depths and widths"], id="block-with-both"),
    pytest.param(_raw(**{"space.blocks.2.widths": [48, 60]}), ["space.blocks.2.widths.1", "60", "multiple of 8"],
                 id="width-not-multiple-of-8"),
    pytest.param(_raw(**{"space.blocks.0.stride": 3}), ["space.blocks.0.stride", "3", "1 or 2"], id="stride-3"),
    pytest.param(_raw(**{"space.stem": 12}), ["space.stem", "12", "multiple of 8"], id="stem-not-multiple-of-8"),
    pytest.param(_raw(**{"teacher.boundaries": [2, 3, 4]}), ["teacher.boundaries", "3 entries", "space.blocks has 4"],
                 id="boundary-count"),
    pytest.param(_raw(**{"teacher.boundaries": [2, 4, 3, 6]}), ["teacher.boundaries", "[2, 4, 3, 6]",
                                                                "strictly increasing"], id="boundaries-decrease"),
    pytest.param(_raw(**{"teacher.boundaries": [2, 3, 3, 6]}), ["teacher.boundaries", "strictly increasing"],
                 id="boundaries-repeat"),
    pytest.param(_raw(**{"data.source": "imagefolder"}), ["data.root", "required", "imagefolder"],
                 id="imagefolder-without-root"),
    pytest.param(_raw(**{"data.source": "torchvision", "data.name": "NotADataset", "data.root": "/tmp"}),
                 ["data.name", "'NotADataset'", "CIFAR10"], id="unknown-torchvision-dataset"),
    pytest.param(_raw(**{"teacher.source": "checkpoint"}), ["teacher.checkpoint", "required", "checkpoint"],
                 id="checkpoint-source-without-file"),
    pytest.param(_raw(**{"search.budgets": {"flops": 10}}), ["search.budgets", "flops", "params", "macs"],
                 id="unknown-budget-axis"),
    pytest.param(_raw(**{"export.opset": 9}), ["export.opset", "9", "greater than or equal to 13"], id="old-opset"),
    pytest.param(_raw(**{"retrain.train.lr_updates": "step"}),
                 ["retrain.train.lr_updates='step'", "schedule 'step'", "'cosine' updates once per epoch",
                  "allowed: epoch"], id="per-step-lr-without-timm-schedule"),
    pytest.param(_raw(**{"retrain.train.schedule": "poly"}),
                 ["retrain.train.schedule", "'poly'", "'cosine'", "'exponential'", "'constant'", "'step'"],
                 id="unknown-schedule"),
    pytest.param(_raw(**{"retrain.train.ema_decay": 1.0}), ["retrain.train.ema_decay", "less than 1"],
                 id="ema-decay-one"),
    pytest.param(_raw(**{"teacher.train.ema_warmup": True}), ["teacher.train.ema_warmup", "needs ema_decay"],
                 id="ema-warmup-without-ema"),
    pytest.param(_raw(**{"retrain.train.drop_path_rate": 1.0}), ["retrain.train.drop_path_rate", "less than 1"],
                 id="drop-path-one"),
    pytest.param(_raw(**{"retrain.train.lr_batch": 0}), ["retrain.train.lr_batch", "greater than 0"],
                 id="lr-batch-zero"),
    pytest.param(_raw(**{"distill.lr_batch": -64}), ["distill.lr_batch", "greater than 0"], id="distill-lr-batch"),
    pytest.param(_raw(**{"retrain.train.rand_augment": "rand-m9-mstd0.5"}),
                 ["retrain.train.rand_augment", "data.source='digits' holds tensors", "torchvision, imagefolder"],
                 id="rand-augment-on-digits"),
    pytest.param(_raw(**{"retrain.train.rand_augment": "rand-x9"}),
                 ["retrain.train.rand_augment='rand-x9'", "not a timm RandAugment string", "e.g. rand-m9-mstd0.5"],
                 id="rand-augment-unknown-section"),
    pytest.param(_raw(**{"teacher.train.rand_augment": "rand-mfoo"}),
                 ["teacher.train.rand_augment='rand-mfoo'", "-m<magnitude>"], id="rand-augment-magnitude-not-a-number"),
]


@pytest.mark.parametrize("raw, expected", MALFORMED)
def test_malformed_params_name_the_key(raw, expected):
    with pytest.raises(ConfigError) as err:
        parse_params(raw, check_paths=False)
    message = str(err.value)
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


OUT_OF_RANGE = [
    pytest.param({"seed": -1}, ["seed=-1", "greater than or equal to 0"], id="negative-seed"),
    pytest.param({"seed": 2**32}, ["seed=4294967296", "less than or equal to 4294967295"], id="seed-past-32-bits"),
    pytest.param({"data.image_size": 100000}, ["data.image_size=100000", "less than or equal to 1024"],
                 id="image-size-of-tens-of-gib"),
    pytest.param({"search.budgets": {"macs": float("inf")}}, ["search.budgets.macs=inf", "finite number"],
                 id="infinite-budget"),
    pytest.param({"retrain.kd_temperature": 1e308}, ["retrain.kd_temperature=1e+308", "less than or equal to 100"],
                 id="huge-kd-temperature"),
    pytest.param({"teacher.train.decay_epochs": float("inf")}, ["teacher.train.decay_epochs=inf", "finite number"],
                 id="infinite-float-without-an-upper-bound"),
    pytest.param({"orchestration.max_workers": 1e9}, ["orchestration.max_workers=1000000000.0",
                                                      "less than or equal to 256"], id="billion-workers"),
    pytest.param({"mlflow.registered_model": "team/dna"}, ["mlflow.registered_model='team/dna'", "(it holds /)"],
                 id="model-name-with-slash"),
    pytest.param({"mlflow.registered_model": "dna:v2"}, ["(it holds :)"], id="model-name-with-colon"),
    pytest.param({"mlflow.registered_model": ".."}, ["mlflow.registered_model='..'", "'.' or '..'"],
                 id="model-name-dot-dot"),
    pytest.param({"mlflow.registered_model": " "}, ["must not be empty"], id="model-name-blank"),
    pytest.param({"outputs": ""}, ["outputs=''", "must name a folder of its own"], id="empty-outputs"),
    pytest.param({"outputs": "/"}, ["outputs='/'", "DVC deletes"], id="root-outputs"),
    pytest.param({"outputs": "./"}, ["outputs='./'"], id="project-root-outputs"),
]


@pytest.mark.parametrize("changes, expected", OUT_OF_RANGE)
def test_out_of_range_values_are_one_line_config_errors(changes, expected):
    """Values that raised a traceback deep in a stage (or allocated tens of GiB, or registered nothing) stop at
    loading, in one line naming the key."""
    with pytest.raises(ConfigError) as err:
        parse_params(_raw(**changes), check_paths=False, deep=False)
    message = str(err.value)
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_the_limits_themselves_are_accepted():
    params = parse_params(_raw(**{"seed": 2**32 - 1, "data.image_size": 1024, "retrain.kd_temperature": 100.0,
                                  "orchestration.max_workers": 256, "mlflow.registered_model": "team.dna-student v2",
                                  "outputs": "runs/first"}), check_paths=False, deep=False)
    assert (params.seed, params.outputs, params.mlflow.registered_model) == (2**32 - 1, "runs/first",
                                                                             "team.dna-student v2")


def test_recipe_keys_at_their_defaults_leave_dumps_and_fingerprints_as_before():
    """Keys added for the retraining recipe are left out of dumps while unset, so the default run's fingerprints,
    checkpoints and DVC parameters stay those of before; set, they are dumped and change the fingerprint."""
    from dna.checkpoint import digest

    params = load_params(DEFAULT)
    dumped = params.model_dump(mode="json", context=FINGERPRINT)
    assert sorted(dumped["retrain"]["train"]) == sorted(dumped["teacher"]["train"]) == TRAIN_KEYS
    assert sorted(dumped["data"]) == [k for k in DATA_KEYS if k not in ("cache_mb", "num_workers")]  # how, not what
    # params.yaml sets distill.sampling: fair, not the schema's default: it is dumped (and fingerprinted)
    assert sorted(dumped["distill"]) == ["batch_size", "cache_features", "epochs", "lr", "lr_decay", "sampling",
                                         "weight_decay"]
    uniform = load_params(DEFAULT, overrides={"distill.sampling": "uniform"})
    uniform = uniform.model_dump(mode="json", context=FINGERPRINT)
    assert "sampling" not in uniform["distill"], "at its default the key leaves the dump as before it existed"
    changed = load_params(DEFAULT, overrides={"retrain.train.ema_decay": 0.999, "distill.lr_batch": 256})
    assert changed.model_dump()["retrain"]["train"]["ema_decay"] == 0.999
    assert changed.model_dump()["distill"]["lr_batch"] == 256
    assert digest(changed.retrain) != digest(params.retrain) and digest(changed.distill) != digest(params.distill)


def test_nonexistent_data_root_is_checked_only_with_paths(tmp_path):
    missing = str(tmp_path / "nowhere")
    raw = _raw(**{"data.source": "imagefolder", "data.root": missing})
    with pytest.raises(ConfigError, match=r"data\.root=.*nowhere.* does not exist"):
        parse_params(raw)
    assert parse_params(raw, check_paths=False).data.root == missing


def test_nonexistent_teacher_checkpoint(tmp_path):
    raw = _raw(**{"teacher.source": "checkpoint", "teacher.checkpoint": str(tmp_path / "teacher.pt")})
    with pytest.raises(ConfigError, match=r"teacher\.checkpoint=.*teacher\.pt.* must be an existing file"):
        parse_params(raw)
    (tmp_path / "teacher.pt").write_bytes(b"weights")
    assert parse_params(raw).teacher.checkpoint.endswith("teacher.pt")


def _arch_teacher_raw(tmp_path, arch_text: str | None = None, **changes) -> dict:
    """The default params with a teacher of source arch: a written architecture file of five stages (the fixed first
    stage and one per searched block) and a weights file (not read by these checks)."""
    arch, weights = tmp_path / "arch.yaml", tmp_path / "model.pt"
    stages = [["ds_r1_k3_s1_c16_se0.25"], ["ir_r1_k3_s2_e3_c24_se0.25"], ["ir_r1_k3_s2_e3_c32_se0.25"],
              ["ir_r2_k5_s1_e3_c48_se0.25"], ["ir_r1_k3_s1_e6_c96_se0.25"]]
    arch.write_text(arch_text if arch_text is not None else yaml.safe_dump({"stem": 16, "head": 256, "arch": stages}))
    weights.write_bytes(b"weights")
    teacher = {"teacher.source": "arch", "teacher.arch": str(arch), "teacher.checkpoint": str(weights),
               "teacher.output_stride": None, "teacher.boundaries": None}
    merged = teacher | changes
    return _raw(**{k: v for k, v in merged.items() if v is not None or k.split(".")[1] in DEFAULT_RAW["teacher"]})


def test_arch_teacher_boundaries_default_to_the_ends_of_its_stages_after_the_first(tmp_path):
    params = parse_params(_arch_teacher_raw(tmp_path))
    assert params.teacher.boundaries == [2, 3, 4, 5]
    given = parse_params(_arch_teacher_raw(tmp_path, **{"teacher.boundaries": [1, 2, 3, 5]}))
    assert given.teacher.boundaries == [1, 2, 3, 5]
    absent = _arch_teacher_raw(tmp_path, **{"teacher.arch": str(tmp_path / "elsewhere.yaml")})
    assert parse_params(absent, check_paths=False).teacher.boundaries == [2, 3, 4, 5], "taken as one of this space"
    with pytest.raises(ConfigError, match=r"teacher\.boundaries has 3 entries but space\.blocks has 4.*teacher\.arch"):
        parse_params(_arch_teacher_raw(tmp_path, "stem: 16\nhead: 256\narch: [[ds_r1_k3_s1_c16], [ir_r1_k3_s2_e3_c24],"
                                                 " [ir_r1_k3_s2_e3_c32], [ir_r1_k3_s2_e3_c48]]\n"))


def test_arch_teacher_needs_no_timm_model_name(tmp_path):
    params = parse_params(_arch_teacher_raw(tmp_path, **{"teacher.model": "not_a_timm_model"}))
    assert params.teacher.source == "arch"
    with pytest.raises(ConfigError, match=r"teacher\.model='not_a_timm_model' is not a timm model"):
        parse_params(_raw(**{"teacher.model": "not_a_timm_model"}))


def test_a_teacher_without_an_arch_dumps_as_before_the_key():
    assert "arch" not in load_params(DEFAULT).teacher.model_dump(context=FINGERPRINT)


@pytest.mark.parametrize("arch_text, changes, expected", [
    pytest.param(None, {"teacher.arch": None}, r"^teacher\.arch is required when teacher\.source='arch'", id="no-arch"),
    pytest.param(None, {"teacher.checkpoint": None}, r"^teacher\.checkpoint is required when teacher\.source='arch'",
                 id="no-checkpoint"),
    pytest.param(None, {"teacher.arch": "absent.yaml"}, r"^teacher\.arch='absent\.yaml' must be an existing file",
                 id="absent-arch"),
    pytest.param(None, {"teacher.checkpoint": "absent.pt"},
                 r"^teacher\.checkpoint='absent\.pt' must be an existing file", id="absent-checkpoint"),
    pytest.param("stem: [16\n", {}, r"^teacher\.arch=.*arch\.yaml' is not an architecture file: while parsing",
                 id="not-yaml"),
    pytest.param("- [ds_r1_k3_s1_c16]\n", {}, r"^teacher\.arch=.* is not an architecture file: expected a mapping",
                 id="not-a-mapping"),
    pytest.param("stem: 16\narch: [[ds_r1_k3_s1_c16], [a], [b], [c], [d]]\n", {},
                 r"^teacher\.arch=.* is not an architecture file: arch file lacks key\(s\) \['head'\]", id="no-head"),
    pytest.param("stem: 16\nhead: 64\narch: [[ds_r1_k3_s1_c16], [ir_k9_bogus], [c], [d], [e]]\n", {},
                 r"^teacher\.arch=.* is not an architecture file: arch: invalid timm block string 'ir_k9_bogus'",
                 id="bad-block-string"),
    pytest.param(None, {"teacher.output_stride": 8}, r"^teacher\.output_stride=8 dilates a timm model's stages",
                 id="dilated"),
])
def test_malformed_arch_teacher_is_one_line_naming_the_key(tmp_path, arch_text, changes, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        parse_params(_arch_teacher_raw(tmp_path, arch_text, **changes))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("text, expected", [
    pytest.param("space: [unclosed\n", "not valid YAML", id="invalid-yaml"),
    pytest.param("- seed\n- 0\n", "top level must be a mapping", id="top-level-list"),
    pytest.param("just a string\n", "top level must be a mapping", id="top-level-scalar"),
])
def test_unreadable_params_files(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as err:
        load_params(path)
    assert str(path) in str(err.value)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match=r"params file .*absent\.yaml.* does not exist"):
        load_params(tmp_path / "absent.yaml")


def test_missing_required_key_does_not_claim_a_value():
    with pytest.raises(ConfigError) as err:
        parse_params(_raw(space=None), check_paths=False)
    message = str(err.value)
    assert message.startswith("space")
    assert "mlflow" not in message and "seed" not in message  # nothing of the rest of the file


def test_boundary_count_message_does_not_echo_the_file():
    with pytest.raises(ConfigError) as err:
        parse_params(_raw(**{"teacher.boundaries": [2, 3, 4]}), check_paths=False)
    message = str(err.value)
    assert message.startswith("teacher.boundaries")
    assert "mlflow" not in message


@pytest.mark.parametrize("first_stage", [["ir_r1_k3_s1_e1"], []], ids=["no-width", "empty"])
def test_first_stage_is_validated(first_stage):
    with pytest.raises(ConfigError, match=r"space\.first_stage"):
        parse_params(_raw(**{"space.first_stage": first_stage}), check_paths=False)


def test_duplicate_ops_are_rejected():
    raw = _raw(**{"space.ops": ["ir_k3_e3_se0.25", "ir_k5_e3_se0.25", "ir_k3_e3_se0.25"]})
    with pytest.raises(ConfigError, match=r"space\.ops"):
        parse_params(raw, check_paths=False)


@pytest.mark.parametrize("dotted", ["seed.value", "space.blocks.9.stride"])
def test_override_below_a_non_mapping_is_a_config_error(dotted):
    with pytest.raises(ConfigError, match=dotted.split(".")[0]):
        load_params(DEFAULT, overrides={dotted: 1})


def test_override_reaches_into_lists():
    assert load_params(DEFAULT, overrides={"space.blocks.0.stride": 1}).space.blocks[0].stride == 1


# deep checks (validate) --------------------------------------------------------------------------------------------
def _figure(message: str, axis: str) -> float:
    return float(re.search(rf"\({axis}=([0-9.e+]+)\)", message).group(1))


@pytest.fixture(scope="module")
def tiny_space_stages():
    params = parse_params(_tiny_raw())
    return [s.to_frame() for s in stage_tables(MBConvSpace(params.space, 1, 32, 10), scored=False)]


def test_tiny_space_minimum_by_enumeration(tiny_space_stages):
    """min_cost agrees with the cheapest of all 16 chains of the tiny space, summed row by row."""
    stem, *blocks, head = tiny_space_stages
    assert [len(b) for b in blocks] == [len(TINY_OPS)] * 4  # one width per block: one row per op
    for axis in ("params", "macs"):
        totals = [stem[axis].iloc[0] + sum(b[axis].iloc[r] for b, r in zip(blocks, rows)) + head[axis].iloc[0]
                  for rows in itertools.product(range(len(TINY_OPS)), repeat=4)]
        assert min_cost(tiny_space_stages, axis) == min(totals)


@pytest.mark.parametrize("axis, other", [("params", "macs"), ("macs", "params")])
def test_budget_below_smallest_network(tiny_space_stages, axis, other):
    smallest = min_cost(tiny_space_stages, axis)
    assert 1000 < smallest < 1e6  # below 1e6 the message's figure is exact (see the test below)
    # the other axis, checked first, is set to its exact minimum, which must be accepted
    budgets = {other: min_cost(tiny_space_stages, other), axis: 1000}
    with pytest.raises(ConfigError, match=rf"search\.budgets\.{axis}=1000 is below the smallest network") as err:
        validate(parse_params(_tiny_raw(**{"search.budgets": budgets})))
    assert _figure(str(err.value), axis) == smallest


def test_budget_message_gives_exact_minimum_above_a_million():
    raw = _tiny_raw(**{"search.budgets": {"macs": 1000}, "data.image_size": 96})
    raw["space"]["ops"] = TINY_OPS[:1]
    params = parse_params(raw)
    smallest = min_cost([s.costs() for s in stage_tables(MBConvSpace(params.space, 1, 96, 10))], "macs")
    assert smallest > 1e6 and smallest % 10 != 0  # not representable in 6 significant digits
    with pytest.raises(ConfigError) as err:
        validate(params)
    assert _figure(str(err.value), "macs") == smallest


def test_boundary_resolution_must_match_block_stride():
    # block 1 at stride 1 keeps 8x8 while the teacher's boundary 3 is at 4x4 (32 px input)
    raw = _tiny_raw(**{"search.budgets": {}})
    validate(parse_params(raw))  # all blocks at stride 2 match the teacher
    raw["space"]["blocks"][1]["stride"] = 1
    with pytest.raises(ConfigError) as err:
        validate(parse_params(raw))
    message = str(err.value)
    assert "teacher.boundaries[1]=3" in message and "4x4" in message and "8x8" in message
    assert "space.blocks[1].stride" in message


def test_boundary_beyond_teacher_stages():
    raw = _tiny_raw(**{"teacher.boundaries": [2, 3, 4, 9], "search.budgets": {}})
    with pytest.raises(ConfigError, match=r"teacher\.boundaries=\[2, 3, 4, 9\].*tinynet_e has boundaries 1\.\.7"):
        validate(parse_params(raw))


def test_imagefolder_without_images(tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("no images here")
    params = parse_params(_raw(**{"data.source": "imagefolder", "data.root": str(tmp_path), "data.channels": 3}))
    with pytest.raises(ConfigError, match=r"data\.root=.* contains no images"):
        validate(params)


# the CLI -------------------------------------------------------------------------------------------------------------
@pytest.fixture
def config_cli_runner():
    """typer's runner; the CLI reconfigures the root logger, which is put back afterwards."""
    from typer.testing import CliRunner

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield CliRunner()
    root.handlers[:] = handlers
    root.setLevel(level)


def test_cli_space_with_bad_params_exits_2_with_one_line(tmp_path, config_cli_runner):
    from dna.cli import app

    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(_raw(**{"distill.epochs": 0})))
    result = config_cli_runner.invoke(app, ["space", "--params", str(bad)])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "distill.epochs=0" in lines[0] and "greater than 0" in lines[0]
    assert result.stdout == ""


def test_cli_space_reports_the_space_size(config_cli_runner):
    from dna.cli import app

    result = config_cli_runner.invoke(app, ["space", "--params", str(DEFAULT)])
    assert result.exit_code == 0, result.output
    ops = len(DEFAULT_RAW["space"]["ops"])
    expected = 1
    for block in DEFAULT_RAW["space"]["blocks"]:
        expected *= sum(ops ** d for d in block["depths"]) * len(block["widths"])
    assert f"whole space: {expected:,} networks" in result.stdout


# presets as overlays --------------------------------------------------------------------------------------------------
def _write(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_preset_holds_only_what_differs_from_its_base(tmp_path, monkeypatch):
    """Mappings merge key by key over the base; a list or a value replaces the base's; a base may have its own."""
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "params.yaml", DEFAULT_RAW)
    _write(tmp_path / "configs" / "middle.yaml", {"base": "../params.yaml", "distill": {"epochs": 3}})
    preset = _write(tmp_path / "configs" / "top.yaml", {
        "base": "middle.yaml", "outputs": "outputs/top", "distill": {"lr": 0.01},
        "space": {"ops": TINY_OPS}})
    params = load_params(preset)
    expected = copy.deepcopy(DEFAULT_RAW)
    expected["outputs"] = "outputs/top"
    expected["distill"] |= {"epochs": 3, "lr": 0.01}
    expected["space"]["ops"] = TINY_OPS
    assert params == parse_params(expected)
    assert params.distill.batch_size == parse_params(DEFAULT_RAW).distill.batch_size  # kept from the base
    # -S overrides apply over the merged preset
    assert load_params(preset, {"distill.epochs": 5}).distill.epochs == 5


@pytest.mark.parametrize("base, message", [
    ("../../elsewhere.yaml", r"top\.yaml: base='../../elsewhere\.yaml' is outside the project"),
    ("top.yaml", r"top\.yaml: base='top\.yaml' leads back to itself"),
    ("loop.yaml", r"leads back to itself"),
    ("missing.yaml", r"top\.yaml: base='missing\.yaml': .*missing\.yaml does not exist"),
    (3, r"top\.yaml: base=3: expected the path of a params file"),
])
def test_a_base_outside_the_project_missing_or_circular_is_refused(tmp_path, monkeypatch, base, message):
    project = tmp_path / "project"
    monkeypatch.chdir(_write(project / "params.yaml", DEFAULT_RAW).parent)
    _write(tmp_path / "elsewhere.yaml", DEFAULT_RAW)
    _write(project / "configs" / "loop.yaml", {"base": "top.yaml"})
    preset = _write(project / "configs" / "top.yaml", {"base": base})
    with pytest.raises(ConfigError, match=message):
        load_params(preset)


@pytest.mark.parametrize("preset", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_preset_resolves_and_validates(preset, monkeypatch):
    monkeypatch.chdir(ROOT)
    params = load_params(preset, check_paths=False)
    raw = yaml.safe_load(preset.read_text())
    assert params.outputs == raw.get("outputs", params.outputs) and "base" not in params.model_dump()


def resolved_preset_is_a_dvc_params_file(preset: Path) -> None:
    """`dna params <preset>` (the preset resolved over its base) spells out every key dvc.yaml tracks, so it runs
    as params.yaml under `dvc repro`."""
    import tempfile

    from typer.testing import CliRunner

    from dna.cli import app
    from flows.entry import check_dvc_params

    result = CliRunner().invoke(app, ["params", str(preset)])
    assert result.exit_code == 0, result.output
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "params.yaml"
        path.write_text(result.stdout)
        check_dvc_params(path)
        assert load_params(path, check_paths=False) == load_params(preset, check_paths=False)


def test_dna_params_prints_a_preset_whole_or_what_differs(monkeypatch):
    from typer.testing import CliRunner

    from dna.cli import app

    monkeypatch.chdir(ROOT)
    resolved_preset_is_a_dvc_params_file(ROOT / "configs" / "dna_plus.yaml")
    result = CliRunner().invoke(app, ["params", "configs/vit.yaml", "--against", "params.yaml"])
    assert result.exit_code == 0, result.output
    differs = yaml.safe_load(result.stdout)
    assert differs["space.kind"] == "vit" and differs["supervision.kind"] == "ssl" and "data.source" not in differs
    result = CliRunner().invoke(app, ["params", "configs/missing.yaml"])
    assert result.exit_code == 2 and "configs/missing.yaml" in result.output


def test_a_key_added_to_a_section_stays_out_of_its_fingerprint_until_set_and_needs_no_list():
    """A section that gains a key (here DistillConfig and `new_knob`) fingerprints as before while the key is at its
    default, so its checkpoints resume; set, the key is in the fingerprint. Plain dumps hold every key."""
    from pydantic import create_model

    from dna.checkpoint import digest
    from dna.config import DistillConfig

    grown = create_model("DistillConfig", __base__=DistillConfig, new_knob=(int, 3))
    assert digest(grown()) == digest(DistillConfig())
    assert digest(grown(new_knob=4)) != digest(DistillConfig())
    assert "new_knob" in grown().model_dump() and "sampling" in DistillConfig().model_dump()
    assert "sampling" not in DistillConfig().model_dump(context={"fingerprint": True})  # added after the first
    assert digest(DistillConfig(sampling="fair")) != digest(DistillConfig())


def test_the_first_fingerprinted_keys_name_sections_and_keys_that_exist():
    """FIRST_KEYS is frozen; a key in it that a section lost or renamed would silently leave fingerprints."""
    import dna.self_supervision  # noqa: F401 - the kinds' options models too
    import dna.spaces.mbconv  # noqa: F401
    import flows.settings  # noqa: F401 - the pipeline's sections too
    from dna.fingerprint_keys import FIRST_KEYS, Fingerprinted

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    models = {cls.__name__: cls for cls in subclasses(Fingerprinted)}
    for name, keys in FIRST_KEYS.items():
        assert name in models, name
        assert keys <= set(models[name].model_fields), (name, keys - set(models[name].model_fields))
