"""The exit-code policy (dna/errors.py): only errors the project raises on purpose become one line; a
FileNotFoundError of a bug keeps its traceback; errors that fail alike on every try are not worth retrying."""
from __future__ import annotations

import pytest

from dna.errors import DETECTED_FAULT, ConfigError, exit_code, report


def test_a_file_not_found_by_a_bug_keeps_its_traceback():
    bug = FileNotFoundError(2, "No such file or directory", "/tmp/typo.csv")
    assert exit_code(bug) is None
    with pytest.raises(FileNotFoundError):
        report(bug)


def test_a_missing_input_of_a_stage_is_one_line(capsys, tmp_path):
    from dna.errors import MissingInput, needed

    with pytest.raises(MissingInput) as err:
        needed(tmp_path / "search" / "arch.yaml", "search")
    assert exit_code(err.value) == DETECTED_FAULT and report(err.value) == DETECTED_FAULT
    assert capsys.readouterr().err == f"error: {tmp_path}/search/arch.yaml is missing: run the search stage first " \
                                      "(dna search)\n"
    assert needed(tmp_path, "data") == tmp_path


@pytest.mark.parametrize("stage, missing", [("stage_retrain", "search/targets/default/arch.yaml"),
                                            ("stage_search", "ratings/block_0.csv"),
                                            ("stage_export", "targets/default/retrain/model.pt")])
def test_stages_name_the_stage_whose_output_they_miss(tiny_params, stage, missing):
    import dna.pipeline
    from dna.checkpoint import CheckpointError
    from dna.errors import MissingInput
    from dna.pipeline import Run

    with pytest.raises((MissingInput, CheckpointError)) as err:
        getattr(dna.pipeline, stage)(Run(tiny_params))
    assert missing in str(err.value) and exit_code(err.value) == DETECTED_FAULT


def test_errors_that_fail_alike_on_every_try():
    from dna.errors import MissingInput, fails_alike
    from dna.export import ParityError
    from dna.train import NonFiniteLoss

    alike = (ConfigError("data.root"), MissingInput("splits.json"), ParityError("atol", 0.1), NonFiniteLoss("nan"))
    for error in alike:
        assert fails_alike(error), error
    for error in (ConnectionError("lost the worker"), OSError("disk full"), RuntimeError("CUDA out of memory")):
        assert not fails_alike(error), error
