"""Each kind of space checks its own keys of the space section against its class's `Options` model, as each kind of
supervision does; `kind` and `blocks` are every kind's. The MBConv kinds' fingerprint still holds every option with
its default, as when these keys belonged to the section itself, so existing checkpoints and profiles still resume."""
from __future__ import annotations

import pytest
from pydantic import ValidationError

import tests.tiny_space
from dna.checkpoint import digest
from dna.config import SpaceConfig, parse_params
from dna.errors import ConfigError
from dna.spaces import SPACES
from dna.spaces.mbconv import DEFAULT_OPS, MBConvOptions
from tests.conftest import tiny_raw

BLOCKS = [{"stride": 2, "depths": [1, 2], "widths": [16, 24]}]


@pytest.mark.parametrize("kind", SPACES.names())
def test_every_kind_names_its_own_keys_and_leaves_kind_and_blocks_to_the_section(kind):
    options = SPACES.get(kind).Options
    assert {"kind", "blocks"}.isdisjoint(options.model_fields), kind
    with pytest.raises(ValidationError, match=rf"space\.no_such_key: unknown key; allowed keys here: kind, blocks, "
                                              rf"{', '.join(sorted(options.model_fields))}"):
        SpaceConfig.model_validate({"kind": kind, "blocks": BLOCKS, "no_such_key": 1})


def test_a_kind_refuses_the_keys_of_another_kind():
    tiny = {**tests.tiny_space.EXAMPLE, "join": "cn_k3"}  # the MBConv kinds' join: the tiny kind has none
    with pytest.raises(ValidationError, match=r"space\.join: unknown key; allowed keys here: kind, blocks, head, ops, "
                                              r"stem"):
        SpaceConfig.model_validate(tiny)
    assert SpaceConfig.model_validate(tests.tiny_space.EXAMPLE).options.ops == ["conv_k1", "conv_k3"]


def test_a_wrong_option_is_a_one_line_config_error_naming_the_key(tmp_path):
    raw = tiny_raw(tmp_path)
    raw["space"] = {**raw["space"], "stme": 16}
    with pytest.raises(ConfigError) as err:
        parse_params(raw, check_paths=False)
    assert str(err.value).startswith("space.stme: unknown key; allowed keys here: kind, blocks, first_stage, head")
    raw["space"] = {**tests.tiny_space.EXAMPLE, "ops": ["conv_k2"]}
    with pytest.raises(ConfigError, match=r"space\.ops: 'conv_k2' is not an op of the tiny space"):
        parse_params(raw, check_paths=False)


def test_the_mbconv_fingerprint_holds_every_option_with_its_default():
    space = SpaceConfig.model_validate({"blocks": BLOCKS, "stem": 16})
    dumped = space.model_dump(mode="json", context={"fingerprint": True})
    assert dumped == {"kind": "mbconv", "blocks": [{"stride": 2, "depths": [1, 2], "widths": [16, 24], "cells": [],
                                                    "down_positions": [0]}],
                      "stem": 16, "first_stage": ["ds_r1_k3_s1_c16_se0.25"], "head": 256, "ops": DEFAULT_OPS,
                      "join": "cn_k3"}
    assert isinstance(space.options, MBConvOptions) and space.options.head == 256
    # the digest this space had when its keys were SpaceConfig's own fields: checkpoints made then still resume
    assert digest(space) == "9f2607ee40a8ccf8"
