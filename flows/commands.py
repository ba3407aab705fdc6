"""The pipeline's commands of `dna` (entry points of the group `dna.commands`): `dna register` (dvc.yaml's register
stage) and `dna promote`. Light to import: every `dna` command loads this module, and a stage such as `dna data`
then imports neither MLflow nor Prefect.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from typer import Exit
from typer import Option as typer_option

ParamsOpt = typer_option(Path("params.yaml"), "--params", "-p", help="params file")


TargetOpt = typer_option(None, "--target", "-t", help="the search target (default: every target, in order)")


def register_command(params: Path = ParamsOpt,
                     set_: Optional[list[str]] = typer_option(None, "--set", "-S",
                                                              help="override a key, e.g. -S mlflow.experiment=x"),
                     target: Optional[str] = TargetOpt):
    """Register each search target's exported model in its registered model of MLflow's registry and promote it if
    it qualifies (the end of each target's chain; dvc.yaml's register stage)."""
    from dna.config import load_params, parse_overrides
    from dna.errors import ConfigError
    from flows.entry import check_first
    from flows.register import register_model

    overrides = parse_overrides(set_)
    check_first("register", params, overrides)
    targets = list(load_params(params, overrides, deep=False).search.named_targets())
    if target is not None and target not in targets:
        raise ConfigError(f"--target {target}: the search targets are {', '.join(targets)}")
    for name in [target] if target else targets:
        register_model(params, overrides, name)


def promote_command(
        params: Path = ParamsOpt,
        version: Optional[int] = typer_option(None, "--version", "-v", help="registered version (default: the newest)"),
        withdraw: Optional[int] = typer_option(None, "--withdraw", metavar="VERSION",
                                               help="take a version out of the running for champion (rollback)"),
        target: Optional[str] = typer_option(None, "--target", "-t", help="the search target (default: the first)")):
    """Alias a registered version `challenger` if it passes ONNX parity and was trained on the champion's data; move
    `champion` to it if it also beats the champion."""
    from flows.registry import promote_cli

    raise Exit(promote_cli(params, version, withdraw, target))
