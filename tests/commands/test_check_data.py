"""`samtrain check-data`: counts, every problem with its file, exit status."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra.core.global_hydra import GlobalHydra

from samtrain.commands import check_data, cli
from tests.conftest import ROOT
from tests.data_builders import make_instance_folder, make_sa1b_folder, make_sa1b_tar


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def test_clean_coco_sample_data(capsys):
    ann = ROOT / "data" / "sample" / "val" / "annotations.json"
    assert cli.main(["check-data", "--format", "coco", "--path", str(ann), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "images: 16 readable, 0 with errors" in out and "no errors" in out
    assert "mask area / image area" in out and "image sizes (w x h)" in out


def test_problems_are_listed_with_file_and_reason(tmp_path, capsys):
    make_sa1b_folder(tmp_path, range(3))
    (tmp_path / "sa_000000" / "sa_1.json").write_text("{not json")
    assert cli.main(["check-data", "--format", "sa1b", "--path", str(tmp_path), "--no-progress"]) == 1
    out = capsys.readouterr().out
    assert "images: 2 readable, 1 with errors" in out
    assert f"ERROR {tmp_path / 'sa_000000' / 'sa_1.json'}: annotation JSON does not parse" in out


def test_tar_shards_and_mask_folders(tmp_path, capsys):
    make_sa1b_tar(tmp_path / "shards" / "sa_0.tar", range(3), k=2)
    assert (
        cli.main(["check-data", "--format", "sa1b_tar", "--path", str(tmp_path / "shards"), "--no-progress"])
        == 0
    )
    assert "masks: 6;" in capsys.readouterr().out
    make_instance_folder(tmp_path / "inst", 2)
    assert (
        cli.main(
            ["check-data", "--format", "instance_png", "--path", str(tmp_path / "inst"), "--no-progress"]
        )
        == 0
    )
    assert "images: 2 readable" in capsys.readouterr().out


def test_hydra_data_config_and_unopenable_dataset(tmp_path, capsys):
    make_instance_folder(tmp_path, 4)
    args = [
        "check-data",
        "data=instance_png",
        f"data.train_dataset.image_dir={tmp_path / 'images'}",
        f"data.train_dataset.mask_dir={tmp_path / 'masks'}",
        "data.train_dataset.split=null",
        "--split",
        "train",
        "--no-progress",
    ]
    assert cli.main(args) == 0
    assert "== train" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[")
    bad = ["check-data", "--format", "coco", "--path", str(tmp_path / "bad.json"), "--no-progress"]
    assert cli.main(bad) == 2
    assert "bad.json is not valid JSON" in capsys.readouterr().out


def test_console_script_exit_status(tmp_path):
    make_sa1b_folder(tmp_path, range(2))
    (tmp_path / "sa_000000" / "sa_0.jpg").write_bytes(b"\xff\xd8\xff")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "samtrain.commands.cli",
            "check-data",
            "--format",
            "sa1b",
            "--path",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert run.returncode == 1, run.stderr
    assert "sa_0.jpg: JPEG is truncated" in run.stdout


def test_an_unexpected_exception_during_the_walk_means_could_not_check(tmp_path, capsys, monkeypatch):
    """Exit 2 ("could not check"), with the exception's message, never 1 ("errors found")."""
    make_sa1b_folder(tmp_path, range(2))
    from samtrain.data.sa1b import Sa1bDataset

    def broken(self, index):
        raise MemoryError("cannot allocate 3 GiB for the mask stack")

    monkeypatch.setattr(Sa1bDataset, "load_encoded_sample", broken, raising=False)
    monkeypatch.setattr(Sa1bDataset, "load_sample", broken)
    status = cli.main(["check-data", "--format", "sa1b", "--path", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert status == check_data.COULD_NOT_CHECK == 2
    assert "could not check sa1b: MemoryError: cannot allocate 3 GiB for the mask stack" in out
    assert "error(s)" not in out and "no errors" not in out
