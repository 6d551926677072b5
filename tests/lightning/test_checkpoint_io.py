"""Atomic checkpoint writes whatever the temporary folder is, leftovers removed, unreadable files named."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from samtrain.lightning.checkpoint_io import (
    PARTIAL_PREFIX,
    AtomicCheckpointIO,
    UnreadableCheckpointError,
    load_checkpoint_file,
    remove_partial_checkpoints,
)
from tests.conftest import ROOT

OTHER_FILE_SYSTEM = Path("/dev/shm")
# torch's advice on refusing a file, which would let it run code: "weights_only set to False".
ADVICE = re.compile(r"weights_only\W+(set to\W+)?False")

# Writes a checkpoint at step 1, then kills the process (SIGKILL) half-way through writing step 2's.
WRITE_THEN_KILL = """
import shutil, sys, torch
from pytorch_lightning.plugins.io import TorchCheckpointIO
from samtrain.lightning.checkpoint_io import AtomicCheckpointIO
from tests.fault_injection import half_then_kill

writer, path = sys.argv[1], sys.argv[2]
io = AtomicCheckpointIO() if writer == "samtrain" else TorchCheckpointIO()
io.save_checkpoint({"state_dict": {"w": torch.ones(200_000)}, "global_step": 1}, path)
if writer == "samtrain":
    torch.save = half_then_kill(torch.save)
else:  # Lightning stages the file in TMPDIR, then moves it: across file systems, a copy
    shutil._USE_CP_SENDFILE = False
    def copy_half_and_die(src, dst, length=0):
        import os, signal
        data = src.read()
        dst.write(data[: len(data) // 2]); dst.flush(); os.fsync(dst.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    shutil.copyfileobj = copy_half_and_die
io.save_checkpoint({"state_dict": {"w": torch.zeros(200_000)}, "global_step": 2}, path)
"""


def other_file_system_tmpdir(tmp_path: Path) -> Path:
    """A temporary folder on another file system than ``tmp_path`` (a tmpfs), or skip."""
    if not OTHER_FILE_SYSTEM.is_dir() or OTHER_FILE_SYSTEM.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip(f"{OTHER_FILE_SYSTEM} is not another file system here")
    tmpdir = OTHER_FILE_SYSTEM / f"samtrain-test-{os.getpid()}-{tmp_path.name}"
    tmpdir.mkdir()
    return tmpdir


def files_in(folder: Path) -> list[Path]:
    """The files under ``folder`` (importing wandb leaves empty folders in TMPDIR)."""
    return [p for p in folder.rglob("*") if p.is_file()]


def kill_during_second_write(writer: str, path: Path, tmpdir: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TMPDIR": str(tmpdir), "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", WRITE_THEN_KILL, writer, str(path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_a_kill_during_a_write_leaves_the_previous_checkpoint_with_tmpdir_elsewhere(tmp_path):
    tmpdir = other_file_system_tmpdir(tmp_path)
    path = tmp_path / "last.ckpt"
    try:
        killed = kill_during_second_write("samtrain", path, tmpdir)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert not files_in(tmpdir)  # the temporary folder plays no part
    finally:
        shutil.rmtree(tmpdir)
    kept = load_checkpoint_file(path)
    assert kept["global_step"] == 1 and torch.equal(kept["state_dict"]["w"], torch.ones(200_000))
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(PARTIAL_PREFIX)]
    assert len(partial) == 1 and partial[0].stat().st_size > 0  # the killed write's leftover
    assert remove_partial_checkpoints([tmp_path, tmp_path / "missing"]) == partial
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_lightnings_own_writer_leaves_a_truncated_checkpoint_with_tmpdir_elsewhere(tmp_path):
    """Why samtrain has its own writer (Lightning 2.6's TorchCheckpointIO, fsspec's transaction)."""
    tmpdir = other_file_system_tmpdir(tmp_path)
    path = tmp_path / "last.ckpt"
    try:
        killed = kill_during_second_write("lightning", path, tmpdir)
        assert killed.returncode == -9, killed.stderr[-3000:]
        assert len(files_in(tmpdir)) == 1  # its staged copy, left behind
    finally:
        shutil.rmtree(tmpdir)
    with pytest.raises(UnreadableCheckpointError, match="truncated or corrupted"):
        load_checkpoint_file(path)


def test_an_error_during_a_write_leaves_the_previous_checkpoint_and_no_leftover(tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {}, "global_step": 1, "w": torch.ones(1000)}, path)
    save = torch.save

    def fail_halfway(obj, f, *args, **kwargs):
        save({"half": torch.zeros(10)}, f)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        io.save_checkpoint({"state_dict": {}, "global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = io.load_checkpoint(path)
    assert kept["global_step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_partial_names_match_no_lightning_checkpoint_search():
    """Lightning resumes SLURM runs from the highest ``hpc_ckpt_<digits>`` name it finds and
    ``ckpt_path="last"`` from names holding ``last``: a leftover must look like neither."""
    assert "hpc_ckpt_" not in PARTIAL_PREFIX and "last" not in PARTIAL_PREFIX
    assert not any(c.isdigit() for c in PARTIAL_PREFIX)


class Opaque:
    pass


@pytest.fixture
def bad_checkpoints(tmp_path) -> dict[str, Path]:
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}, "global_step": 1}, good)
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        "empty": b"",
        "text": b"this is not a checkpoint\n",
    }
    paths = {}
    for name, content in files.items():
        paths[name] = tmp_path / f"{name}.ckpt"
        paths[name].write_bytes(content)
    paths["weights only"] = tmp_path / "sam.pth"
    torch.save({"image_encoder.pos_embed": torch.ones(2)}, paths["weights only"])
    paths["object"] = tmp_path / "object.ckpt"
    torch.save({"state_dict": {}, "thing": Opaque()}, paths["object"])
    return paths


REASONS = {
    "truncated": "truncated or corrupted",
    "empty": "the file is empty",
    "text": "not a PyTorch checkpoint",
    "weights only": "not a Lightning checkpoint.*model.net.checkpoint",
    "object": "holds a Python object.*Opaque",
}


@pytest.mark.parametrize("kind", REASONS)
def test_an_unreadable_checkpoint_names_the_file_and_the_reason(bad_checkpoints, kind):
    path = bad_checkpoints[kind]
    with pytest.raises(UnreadableCheckpointError) as refused:
        AtomicCheckpointIO().load_checkpoint(path)
    assert str(path) in str(refused.value)
    assert refused.match(REASONS[kind])
    shown = "".join(traceback.format_exception(refused.value))
    assert not ADVICE.search(shown)


def test_a_missing_checkpoint_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nothing\.ckpt does not exist"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "nothing.ckpt")


def test_lightning_checkpoints_round_trip(tmp_path):
    io = AtomicCheckpointIO()
    checkpoint = {"state_dict": {"w": torch.arange(5.0)}, "global_step": 3, "loops": {"a": [1, 2]}}
    io.save_checkpoint(checkpoint, tmp_path / "sub" / "x.ckpt")
    loaded = io.load_checkpoint(tmp_path / "sub" / "x.ckpt")
    assert torch.equal(loaded["state_dict"]["w"], checkpoint["state_dict"]["w"])
    assert loaded["loops"] == checkpoint["loops"]
    assert isinstance(io, TorchCheckpointIO)  # remote paths keep Lightning's behaviour
