"""The commlib command: validation before any process starts (one line, exit code 2), --f on
train, help with descriptions and defaults, simulate in the top-level usage, plain-text help."""
from __future__ import annotations

import pytest

from commlib import cli
from commlib.local import ddp_job


@pytest.fixture
def no_launch(monkeypatch):
    """Record the TrainConfig instead of starting processes."""
    seen = []

    def fake(cfg):
        seen.append(cfg)
        return {"name": "x", "params": 1, "steps": 1, "final_test_acc": 1.0, "payload_bytes_per_step": 1.0,
                "dense_bytes_per_step": 1.0, "compression": 1.0}

    monkeypatch.setattr(ddp_job, "train_local", fake)
    return seen


@pytest.mark.parametrize("argv, words", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--aggregator", "krum", "--workers", "2"], "krum"),
    (["--aggregator", "krum", "--workers", "4", "--f", "1"], "n >= 2f + 3"),
    (["--aggregator", "mean", "--f", "1"], "mean tolerates no Byzantine"),
    (["--f", "-1"], "--f must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--ratio", "2"], "ratio must be in (0, 1]"),
    (["--compressor", "nope"], "nope"),
    (["--baseline", "nope"], "--baseline must be one of"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--workers", "100000"], "training set"),
])
def test_bad_train_options_fail_in_one_line_before_any_process(argv, words, no_launch, capsys):
    assert cli.main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("commlib: error:") and words in err[0], err
    assert no_launch == []


def test_train_passes_f_to_the_robust_aggregator(no_launch, capsys):
    assert cli.main(["train", "--aggregator", "krum", "--workers", "5", "--f", "1", "--epochs", "1"]) == 0
    assert no_launch[0].scheme["aggregator_options"] == {"f": 1}
    assert no_launch[0].workers == 5


def test_train_warns_once_about_ef21_with_momentum_at_high_sparsity(no_launch, capsys):
    assert cli.main(["train", "--ratio", "0.001", "--feedback", "ef21", "--epochs", "1"]) == 0
    err = capsys.readouterr().err
    assert err.count("commlib: warning:") == 1 and "feedback='ef'" in err
    cli.main(["train", "--ratio", "0.001", "--feedback", "ef", "--epochs", "1"])
    assert "warning" not in capsys.readouterr().err


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_help_is_plain_text_with_descriptions_and_defaults(capsys):
    top = _help(["--help"], capsys)
    assert "commlib simulate" in top and "{train,simulate,info,bench}" in top
    train = _help(["train", "--help"], capsys)
    assert "number of worker processes" in train and "(default: 4)" in train and "--f F" in train
    assert "Byzantine workers the robust aggregator tolerates (default: 0)" in " ".join(train.split())
    for text in (top, train, _help(["simulate", "--help"], capsys), _help(["bench", "--help"], capsys)):
        assert "`" not in text
