"""Progress: a bar in a terminal, a line a minute in a log."""
import logging

import pytest

from dna import progress as P


def test_a_log_gets_a_line_per_interval_with_step_total_and_postfix(caplog):
    bar = P.LoggedProgress(range(5), "block 0 epoch 1/3", every=0.0)
    with caplog.at_level(logging.INFO, logger="dna.progress"):
        seen = []
        for i in bar:
            seen.append(i)
            bar.set_postfix(loss=f"{i / 10:.2f}")
    assert seen == [0, 1, 2, 3, 4]
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 5
    assert lines[2].startswith("block 0 epoch 1/3: step 3/5 after ") and lines[2].endswith("loss 0.20")


def test_nothing_is_logged_within_the_interval(caplog):
    with caplog.at_level(logging.INFO, logger="dna.progress"):
        assert list(P.LoggedProgress(iter(range(1000)), "fast", every=60.0)) == list(range(1000))
    assert caplog.records == []


@pytest.mark.parametrize("tty, disabled, expected", [(True, "", "tqdm"), (False, "", "LoggedProgress"),
                                                      (True, "1", "LoggedProgress")])
def test_a_bar_only_on_a_terminal(monkeypatch, tty, disabled, expected):
    monkeypatch.setattr(P.sys.stderr, "isatty", lambda: tty)
    monkeypatch.setenv("TQDM_DISABLE", disabled)
    bar = P.progress(range(3), "x")
    assert expected in type(bar).__name__
    assert list(bar) == [0, 1, 2]


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch, capsys):
    """A test runner swaps sys.stderr and closes the old one: logging keeps writing to the current one."""
    import io

    from dna.logs import setup_logging

    monkeypatch.setattr(P.sys.stderr, "isatty", lambda: False)
    setup_logging()
    old = io.StringIO()
    monkeypatch.setattr("sys.stderr", old)
    logging.getLogger("dna.test").info("first")
    old.close()
    new = io.StringIO()
    monkeypatch.setattr("sys.stderr", new)
    logging.getLogger("dna.test").info("second")
    assert new.getvalue().rstrip().endswith("dna.test second")
