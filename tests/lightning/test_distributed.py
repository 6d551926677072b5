"""Distributed training and fault tolerance, through real `python train.py` processes on CPU.

Each run is a tiny vit_t at 64 px on the sample data, on one thread per process so that runs are
bitwise repeatable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from samtrain.lightning.callbacks import read_metrics_csv
from samtrain.lightning.checkpoint_io import PARTIAL_PREFIX
from tests.conftest import ROOT, TINY

pytestmark = pytest.mark.slow

RUN = (
    *(
        o
        for o in TINY
        if not o.startswith(("trainer.max_epochs", "trainer.limit_train_batches", "data.batch"))
    ),
    "validate_before=false",
    "export=false",
    "trainer.limit_val_batches=0",
    "trainer.max_epochs=1",
    "data.global_batch_size=4",
)


def run_env(**extra: str) -> dict[str, str]:
    """The test's environment without SLURM's variables (Lightning would take the run for a SLURM job)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", PYTHONPATH=str(ROOT), **extra)
    env.pop("LOCAL_RANK", None)
    return env


def train(
    run_dir: Path,
    *overrides: str,
    launcher: tuple[str, ...] = (),
    check: bool = True,
    timeout=300,
    env: dict[str, str] | None = None,
):
    """Runs `[launcher] train.py RUN overrides` with its Hydra run dir in run_dir."""
    args = [*launcher, "train.py", *RUN, f"hydra.run.dir={run_dir}", *overrides]
    cmd = args if launcher else [sys.executable, *args]
    done = subprocess.run(
        cmd, cwd=ROOT, env=run_env(**(env or {})), capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
        )
    return done


def save_weights(dirpath: Path) -> tuple[str, ...]:
    return (
        "+callbacks.save_weights._target_=tests.fault_injection.SaveWeights",
        f"+callbacks.save_weights.dirpath={dirpath}",
    )


def signal_at(step: int, name: str) -> tuple[str, ...]:
    return (
        "+callbacks.signal._target_=tests.fault_injection.SignalAtStep",
        f"+callbacks.signal.step={step}",
        f"+callbacks.signal.signal_name={name}",
    )


def kill_during_checkpoint_write(step: int) -> tuple[str, ...]:
    return (
        "+callbacks.kill_write._target_=tests.fault_injection.KillDuringCheckpointWrite",
        f"+callbacks.kill_write.step={step}",
    )


def weights(dirpath: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(dirpath / f"weights_rank{rank}.pt", weights_only=True)


def train_losses(run_dir: Path) -> list[float]:
    return [value for _, value in train_loss_history(run_dir)]


def train_loss_history(run_dir: Path) -> list[tuple[int, float]]:
    return read_metrics_csv(run_dir / "csv" / "metrics.csv")["train/loss"]


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a if a[k].numel())
    assert worst <= atol, f"weights differ by up to {worst}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SAM2 = ("model=sam2_hiera_n", "prompts=sam2", "prompts.num_click_passes=2")


@pytest.mark.parametrize(
    ("model", "ddp_mode"),
    [
        ((), ()),
        ((), ("model.decoder_backward_per_pass=true",)),
        (SAM2, ("model.decoder_backward_per_pass=true",)),
    ],
    ids=["plain", "per_pass", "sam2_per_pass"],
)
def test_two_process_ddp_equals_one_process_with_the_same_global_batch(tmp_path, model, ddp_mode):
    """``ddp_mode`` only for the DDP run (per-pass backward gives the same gradients)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    train(single, *model, "trainer.max_steps=3", *save_weights(single))
    train(ddp, *model, "trainer=ddp_cpu", "trainer.max_steps=3", *ddp_mode, *save_weights(ddp))
    assert_same_weights(weights(ddp, 0), weights(ddp, 1))  # the ranks stay in lockstep
    single_losses, ddp_losses = train_losses(single), train_losses(ddp)
    assert len(single_losses) == len(ddp_losses) == 3
    assert ddp_losses == pytest.approx(single_losses, abs=1e-5)
    assert_same_weights(weights(ddp), weights(single), atol=1e-4)


def test_two_nodes_through_torchrun(tmp_path):
    port = free_port()
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                "--nproc_per_node=1",
                f"--node_rank={node}",
                "--master_addr=127.0.0.1",
                f"--master_port={port}",
                "train.py",
                *RUN,
                f"hydra.run.dir={tmp_path / f'node{node}'}",
                "trainer=ddp_cpu",
                "trainer.devices=1",
                "trainer.num_nodes=2",
                "trainer.max_steps=2",
                *save_weights(tmp_path),
            ],
            cwd=ROOT,
            env=run_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for node in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in processes]
    for p, out in zip(processes, outputs, strict=True):
        assert p.returncode == 0, out[-5000:]
    assert_same_weights(weights(tmp_path, 0), weights(tmp_path, 1))
    assert len(train_losses(tmp_path / "node0")) == 2


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("uninterrupted")
    train(run, "trainer.max_steps=8", "callbacks.step_checkpoint.every_n_train_steps=3", *save_weights(run))
    return run


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_run) -> dict[str, torch.Tensor]:
    return weights(uninterrupted_run)


@pytest.fixture
def tmpdir_elsewhere(tmp_path) -> Iterator[Path]:
    """A TMPDIR on another file system than the run directory (a tmpfs), as on clusters."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no tmpfs at /dev/shm on another file system than the test's folder")
    folder = shm / f"samtrain-{os.getpid()}-{tmp_path.name}"
    folder.mkdir()
    yield folder
    shutil.rmtree(folder)


def test_kill_9_during_a_checkpoint_write_then_resume_in_place(tmp_path, tmpdir_elsewhere, uninterrupted_run):
    """The SLURM layout: the requeued run resumes in its own run directory, TMPDIR elsewhere. The
    write of step 6's checkpoint is killed half-way: step 3's stays readable, the leftover is
    removed at the next start, the resumed run ends with bitwise the uninterrupted weights, and its
    metrics.csv holds every step once, before and after the kill, with the uninterrupted losses."""
    steps = ("trainer.max_steps=8", "callbacks.step_checkpoint.every_n_train_steps=3")
    env = {"TMPDIR": str(tmpdir_elsewhere)}
    killed = train(tmp_path, *steps, *kill_during_checkpoint_write(6), check=False, env=env)
    assert killed.returncode == -9, killed.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["global_step"] == 3
    leftovers = list(last.parent.glob(f"{PARTIAL_PREFIX}*"))
    assert len(leftovers) == 1
    # step 5 is logged after its checkpoint write, which the kill interrupted
    assert [step for step, _ in train_loss_history(tmp_path)] == [0, 1, 2, 3, 4]

    train(tmp_path, *steps, f"ckpt_path={last}", *save_weights(tmp_path), env=env)
    assert not any(p.exists() for p in leftovers)
    assert_same_weights(weights(tmp_path), weights(uninterrupted_run))
    assert train_loss_history(tmp_path) == train_loss_history(uninterrupted_run)
    assert [step for step, _ in train_loss_history(tmp_path)] == list(range(8))


def test_kill_9_mid_epoch_then_resume_gives_the_uninterrupted_weights(tmp_path, uninterrupted):
    steps = ("trainer.max_steps=8", "callbacks.step_checkpoint.every_n_train_steps=3")
    killed = train(tmp_path, *steps, *signal_at(5, "SIGKILL"), check=False)
    assert killed.returncode == -9
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3  # mid-epoch: an epoch here is 12 steps
    resumed = tmp_path / "resumed"
    train(resumed, *steps, f"ckpt_path={last}", *save_weights(resumed))
    assert_same_weights(weights(resumed), uninterrupted)


def test_sigterm_saves_a_loadable_checkpoint_and_exits_cleanly(tmp_path, uninterrupted):
    steps = ("trainer.max_steps=8", "callbacks.step_checkpoint.every_n_train_steps=100")
    done = train(tmp_path, *steps, *signal_at(2, "SIGTERM"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    last = tmp_path / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    assert 2 <= checkpoint["global_step"] < 8
    resumed = tmp_path / "resumed"
    train(resumed, *steps, f"ckpt_path={last}", *save_weights(resumed))
    assert_same_weights(weights(resumed), uninterrupted)


def test_sigusr1_outside_slurm_also_checkpoints_and_exits_cleanly(tmp_path):
    done = train(tmp_path, "trainer.max_steps=8", *signal_at(2, "SIGUSR1"), check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert 2 <= checkpoint["global_step"] < 8
