"""The `samtrain` console script (samtrain/cli.py): subcommands, help, and a tiny eval run."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from samtrain.commands import cli, config
from tests.conftest import ROOT

TINY_EVAL = (
    "image_size=64",
    "max_clicks=2",
    "batch_size=2",
    "limit_batches=1",
    "data.val_dataset.transform.max_masks=2",
)


@pytest.fixture(autouse=True)
def _restore_hydra_and_logging():
    """An in-process Hydra run leaves its global state and its log handlers on the root logger."""
    handlers, level = logging.root.handlers[:], logging.root.level
    yield
    GlobalHydra.instance().clear()
    for handler in set(logging.root.handlers) - set(handlers):
        handler.close()
    logging.root.handlers[:] = handlers
    logging.root.setLevel(level)


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "usage: samtrain" in out
    for command in ("train", "eval"):
        assert f"    {command} " in out


def test_module_help_runs_without_importing_torch():
    help_ = subprocess.run(
        [sys.executable, "-m", "samtrain.commands.cli", "--help"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert help_.returncode == 0, help_.stderr
    assert "eval" in help_.stdout and "train" in help_.stdout
    imported = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, samtrain.commands.cli; print(sorted({'torch', 'hydra'} & set(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert imported.stdout.strip() == "[]", imported.stderr


@pytest.mark.parametrize("argv", [[], ["fit"]])
def test_missing_or_unknown_subcommand_is_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    assert "usage: samtrain" in capsys.readouterr().err


def test_config_dir_missing_is_reported(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(config.CONFIG_DIR_ENV, str(tmp_path))
    assert cli.main(["eval"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path) in err and "eval.yaml" in err


def test_train_subcommand_composes_the_training_config(capsys):
    assert cli.main(["train", "--cfg", "job", "model.net.image_size=64"]) == 0
    out = capsys.readouterr().out
    assert "task_name: train" in out and "image_size: 64" in out


def test_eval_subcommand_runs_a_tiny_evaluation(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["eval", f"hydra.run.dir={run_dir}", f"paths.root_dir={ROOT}", *TINY_EVAL, "checkpoints=[null]"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "| checkpoint | mIoU@1 | mIoU@2 |" not in out  # clicks [1, 3, 5, 9] cut at max_clicks=2
    assert "| checkpoint | mIoU@1 | NoC@85 |" in out and "| random |" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert list(results["checkpoints"]) == ["random"]
    assert len(results["checkpoints"]["random"]["miou_curve"]) == 2
    assert (run_dir / "results.md").is_file() and (run_dir / "miou_vs_clicks.png").stat().st_size > 0
    assert (run_dir / "eval.log").is_file()  # Hydra's job is named after the command


def test_eval_subcommand_reports_a_missing_checkpoint(tmp_path, capsys):
    missing = tmp_path / "not_there.ckpt"
    argv = ["eval", f"hydra.run.dir={tmp_path / 'run'}", f"paths.root_dir={ROOT}", f"checkpoints=[{missing}]"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 1
    assert "not_there.ckpt" in capsys.readouterr().err
