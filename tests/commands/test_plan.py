"""`samtrain plan`: modes, overrides that compose, the fastest fit, and vit_h planned without weights."""

from __future__ import annotations

import json
import subprocess
import sys

import hydra
import pytest
from hydra.core.global_hydra import GlobalHydra

from samtrain.commands import cli, plan
from samtrain.lightning.memory_plan import StepMemory
from samtrain.lightning.sam_module import SamModule
from tests.conftest import ROOT

# The tiny model with 1 + 1 + 1 passes: a short trace.
TINY = [
    "model.net.image_size=64",
    "data.batch_size=2",
    "data.train_dataset.transform.max_masks=2",
    "prompts.num_click_passes=1",
    "prompts.num_mask_only_passes=1",
]


@pytest.fixture(autouse=True)
def _clear_hydra():
    yield
    GlobalHydra.instance().clear()


def test_json_lists_the_modes_and_the_fastest_fit(capsys):
    assert (
        cli.main(["plan", *TINY, "--modes", "plain", "per-pass backward", "--memory", "4GiB", "--json"]) == 0
    )
    result = json.loads(capsys.readouterr().out)
    plain, per_pass = result["modes"]
    assert (plain["name"], per_pass["name"]) == ("plain", "per-pass backward")
    assert "model.decoder_backward_per_pass=true" in per_pass["overrides"]
    for mode in (plain, per_pass):
        resident = mode["parameter_bytes"] + mode["optimizer_state_bytes"]
        assert mode["peak_bytes"] == resident + mode["step_peak_bytes"]
        # AdamW: two moments per parameter and a 4-byte step counter per tensor
        assert 0 < mode["optimizer_state_bytes"] - 2 * mode["gradient_bytes"] < 4096
    # The switch reaches the traced module (at this size its per-pass sums outweigh what it saves).
    assert per_pass["step_peak_bytes"] != plain["step_peak_bytes"]
    assert result["fits"]["name"] == "plain"  # the fastest mode, and 4 GiB is plenty


def test_modes_traced_in_parallel_equal_one_by_one():
    """Two traces at a time in processes give what one process gives; equal settings trace once."""
    setup = plan.read_setup(plan.compose_train_config(TINY))
    plain, per_pass = plan.MODES[:2]
    configured = plan.configured_mode(setup.cfg)
    assert configured.settings() == plain.settings()
    parallel = plan.plan_modes(setup, [configured, plain, per_pass], jobs=2)
    assert parallel["configured"] is parallel["plain"]
    assert parallel["per-pass backward"] == plan.plan_mode(setup, per_pass)


def test_the_search_takes_the_fastest_mode_then_smaller_shapes(monkeypatch):
    """fastest_fit on made-up step memories (bytes = images x masks x a per-mode cost): the fastest
    mode that fits, one image per device before fewer masks, nothing when nothing fits."""
    cost = {m.name: 100 - 10 * i for i, m in enumerate(plan.FULL_MODES)}  # slower modes take less
    traced = []

    def fake_plan(setup, mode, shape=None):
        shape = shape or setup.shape
        traced.append((mode.name, shape.images, shape.masks))
        step = cost[mode.name] * shape.images * shape.masks
        return StepMemory(
            parameters=0, optimizer_state=0, trainable_parameters=0, step_peak=step, grads_at_peak=0, ops=0
        )

    monkeypatch.setattr(plan, "plan_mode", fake_plan)
    setup = plan.Setup(
        cfg=None, shape=plan.Shape(2, 64, 1024), precision="bf16-mixed", strategy="single", world_size=1
    )
    fit = plan.fastest_fit(setup, 2 * 64 * 100, {}, jobs=1)
    assert fit["name"] == "plain" and fit["images"] == 2
    fit = plan.fastest_fit(
        setup, 1 * 64 * 85, {}, jobs=1
    )  # one image: per-pass (90) does not fit, ckpt + per-pass (80) does
    assert (fit["name"], fit["images"], fit["masks_per_image"]) == ("encoder ckpt + per-pass", 1, 64)
    assert "trainer.accumulate_grad_batches=2" in fit["overrides"] and "data.batch_size=1" in fit["overrides"]
    traced.clear()
    assert plan.fastest_fit(setup, 1, {}, jobs=1) is None
    assert [t[0] for t in traced] == ["encoder ckpt + per-pass"] * 5  # one trace per shape tried


def test_every_mode_overrides_compose_into_its_module():
    for mode in plan.MODES:
        cfg = plan.compose_train_config(["model.net.image_size=64", *mode.overrides()])
        GlobalHydra.instance().clear()
        module = hydra.utils.instantiate(cfg.model)
        assert isinstance(module, SamModule)
        assert module.decoder_backward_per_pass == mode.switches.get("decoder_backward_per_pass", False)
        assert ("image_encoder" in module.freeze) == mode.freeze_encoder
        assert ("embedding_cache" in cfg.callbacks) == mode.cached_embeddings


def test_smaller_shapes_and_byte_sizes():
    shapes = plan.smaller_shapes(plan.Shape(2, 64, 1024))
    assert [(s.images, s.masks) for s in shapes] == [(2, 64), (1, 64), (1, 32), (1, 16), (1, 8)]
    assert plan.parse_bytes("24GiB") == 24 * 2**30
    assert plan.parse_bytes("80GB") == 80 * 10**9
    assert plan.parse_bytes("512MiB") == 512 * 2**20


# Runs `samtrain plan ARGS`, then writes the process's own peak RSS (VmHWM, bytes) as the last line
# of stderr.
PLAN_AND_REPORT_RSS = """
import sys
from bench.common import proc_status_bytes
from samtrain.commands import cli
code = cli.main(["plan", *sys.argv[1:]])
print(proc_status_bytes("VmHWM"), file=sys.stderr)
sys.exit(code)
"""


@pytest.mark.slow
def test_planning_vit_h_at_1024_allocates_no_weights():
    """vit_h's parameters alone take 2.5 GB (10 GB with gradients and AdamW state): the planning
    process's peak RSS stays far below that (torch and Lightning themselves take ~0.6 GB)."""
    argv = ["model=sam_vit_h", "trainer=gpu", "data.batch_size=1", "--modes", "per-pass backward", "--json"]
    done = subprocess.run(
        [sys.executable, "-c", PLAN_AND_REPORT_RSS, *argv], capture_output=True, text=True, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    peak_rss = int(done.stderr.strip().splitlines()[-1])
    assert peak_rss < 1.5e9
    (mode,) = json.loads(done.stdout)["modes"]
    assert mode["parameter_bytes"] > 2.5e9  # 641M fp32 parameters
    assert mode["masks_per_image"] == 64 and mode["peak_bytes"] > 4 * mode["parameter_bytes"]


def test_a_sam2_is_planned_in_every_mode_its_cache_holding_three_levels():
    setup = plan.read_setup(plan.compose_train_config(["model=sam2_hiera_n", "prompts=sam2", *TINY]))
    modes = {m.name: m for m in plan.MODES if plan.allowed(setup, m)}
    assert modes.keys() == {m.name for m in plan.MODES}
    cached, plain = (plan.plan_mode(setup, modes[name]) for name in ("cached embeddings + per-pass", "plain"))
    # Cached: no encoder gradients or moments, and the step reads the three stored levels.
    assert cached.trainable_parameters < plain.trainable_parameters and cached.step_peak < plain.step_peak


@pytest.mark.parametrize("trainer", ["fsdp", "fsdp2"])
def test_a_sam2_under_fsdp_is_planned_per_device(trainer):
    setup = plan.read_setup(
        plan.compose_train_config(["model=sam2_hiera_n", "prompts=sam2", f"trainer={trainer}", *TINY])
    )
    assert (setup.strategy, setup.world_size) == ("fsdp", 8)
    (plain,) = [m for m in plan.MODES if m.name == "plain"]
    memory = plan.plan_mode(setup, plain)
    assert memory.gathered_units > 0 and plan.device_peak(setup, memory) < memory.peak
    refused = [m for m in plan.MODES if m.switches.get("decoder_backward_per_pass") or m.cached_embeddings]
    assert refused and not any(plan.allowed(setup, m) for m in refused)


def test_half_precision_weights_are_refused_by_name():
    setup = plan.read_setup(plan.compose_train_config(["trainer.precision=bf16-true", *TINY]))
    with pytest.raises(ValueError, match=r"'bf16-true': samtrain trains \(and the planner plans\)"):
        plan.plan_mode(setup, plan.MODES[0])
