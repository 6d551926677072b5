"""The evaluation run (samtrain/eval.py): checkpoints of every format, outputs, names and errors."""

from __future__ import annotations

import json
from pathlib import Path

import hydra
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from matplotlib.figure import Figure
from PIL import Image

from samtrain.commands.eval import (
    checkpoint_list,
    checkpoint_names,
    evaluate,
    load_model,
    metric_columns,
    raw_dataset,
)
from samtrain.models import build_sam, export_sam_checkpoint
from samtrain.plots import plot_click_curves
from tests.conftest import TINY, compose_config

# vit_t at 64 px, 3 clicks, four images, at most two objects per image.
EVAL_TINY = (
    "image_size=64",
    "max_clicks=3",
    "limit_images=4",
    "max_objects_per_image=2",
    "worst_objects=2",
    "progress=false",
)
METRIC_KEYS = {
    "mIoU@1",
    "mIoU@3",
    "NoC@85",
    "NoC@90",
    "NoF@85",
    "NoF@90",
    "box_mIoU",
    "oracle_mIoU@1",
    "iou_calibration",
    "boundary_mIoU@1",
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One random tiny SamModule saved twice: exported in the official layout (official.pth) and as
    a Lightning checkpoint of the module, whose state dict holds the model under ``net.``."""
    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    module = hydra.utils.instantiate(compose_config(folder / "train", *TINY).model)
    GlobalHydra.instance().clear()
    official = export_sam_checkpoint(module.net, folder / "run" / "official.pth")
    lightning = folder / "run" / "checkpoints" / "last.ckpt"
    lightning.parent.mkdir(parents=True)
    torch.save({"state_dict": module.state_dict(), "epoch": 0, "global_step": 0}, lightning)
    assert all(key.startswith("net.") for key in module.state_dict())
    return {"official": official, "lightning": lightning}


@pytest.fixture
def eval_cfg(tmp_path):
    """A function: extra overrides -> the composed tiny eval config writing to tmp_path/run."""

    def make(*overrides: str):
        return compose_config(tmp_path / "run", *EVAL_TINY, *overrides, config_name="eval")

    yield make
    GlobalHydra.instance().clear()


def test_evaluate_writes_results_for_every_checkpoint(eval_cfg, checkpoints, monkeypatch):
    figures = []
    savefig = Figure.savefig

    def record(figure, *args, **kwargs):
        figures.append(figure)
        return savefig(figure, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    cfg = eval_cfg(f"checkpoints=[{checkpoints['official']},{checkpoints['lightning']},null]")
    results = evaluate(cfg)["val"]

    names = ["official.pth", "last.ckpt", "random"]
    assert list(results) == names
    output = Path(cfg.paths.output_dir)
    saved = json.loads((output / "results.json").read_text())
    assert (saved["variant"], saved["image_size"], saved["protocol"]["max_clicks"]) == ("vit_t", 64, 3)
    assert (saved["max_objects_per_image"], saved["limit_images"]) == (2, 4)  # a capped run says so
    assert saved["protocol"]["threshold"] == 0.49 and saved["nof_definition"] == "ritm"
    runs = saved["results"]["val"]
    assert list(runs) == names
    assert runs["random"]["checkpoint"] is None
    assert runs["last.ckpt"]["checkpoint"] == str(checkpoints["lightning"])
    for name in names:
        run = runs[name]
        assert set(run["metrics"]) >= METRIC_KEYS and any(k.startswith("box_mIoU_") for k in run["metrics"])
        assert run["metrics"] == pytest.approx(results[name])
        assert run["num_images"] == 4 and 1 <= run["num_objects"] <= 8
        curve = run["miou_curve"]
        assert len(curve) == 3 and all(0.0 <= v <= 1.0 for v in curve)
        assert curve[0] == pytest.approx(run["metrics"]["mIoU@1"], abs=1e-6)
        assert curve[2] == pytest.approx(run["metrics"]["mIoU@3"], abs=1e-6)
        assert 1.0 <= run["metrics"]["NoC@90"] <= 3.0

    # The Lightning checkpoint (model under `net.`) and the export hold the same weights.
    official, lightning = runs["official.pth"], runs["last.ckpt"]
    assert official["metrics"] == lightning["metrics"]
    assert official["miou_curve"] == lightning["miou_curve"]
    # ...and they were loaded: the untrained model of the eval seed is another model.
    assert runs["random"]["miou_curve"] != official["miou_curve"]

    table = (output / "results.md").read_text().splitlines()
    header = next(
        line for line in table if line.startswith("| benchmark | checkpoint | objects | mIoU@1 | mIoU@3")
    )
    rows = [line for line in table if line.startswith("| val ")]
    assert [row.split(" | ")[1] for row in rows] == names
    assert all(row.count("|") == header.count("|") for row in rows)

    with Image.open(output / "val" / "miou_vs_clicks.png") as image:
        assert image.format == "PNG" and min(image.size) > 100
    lines = (output / "val" / "official.pth" / "objects.csv").read_text().splitlines()
    assert lines[0].split(",")[:7] == [
        "image_id",
        "object",
        "area",
        "box_iou",
        "oracle_iou@1",
        "pred_iou@1",
        "x_1",
    ]
    assert len(lines) == 1 + official["num_objects"] and len(lines[1].split(",")) == 6 + 4 * 3
    assert (output / "val" / "random" / "worst_objects.png").is_file()
    figure = figures[-1]  # the curves come last; before them one worst-objects grid per checkpoint
    assert len(figures) == 4
    (axes,) = figure.axes
    assert [line.get_label() for line in axes.get_lines()] == names
    assert [list(line.get_xdata()) for line in axes.get_lines()] == [[1, 2, 3]] * 3
    assert [t.get_text() for t in axes.get_legend().get_texts()] == names


def test_repeated_checkpoints_give_identical_metrics(eval_cfg, checkpoints):
    path = checkpoints["official"]
    results = evaluate(eval_cfg(f"checkpoints=[{path},{path}]", "max_clicks=2", "limit_images=1"))["val"]
    assert list(results) == ["official.pth", "official.pth#2"]
    first, second = results.values()
    assert first == second


def test_missing_checkpoint_is_named_before_any_work(eval_cfg, checkpoints, tmp_path):
    missing = tmp_path / "nowhere" / "missing_model.pth"
    cfg = eval_cfg(f"checkpoints=[{checkpoints['official']},{missing}]")
    with pytest.raises(FileNotFoundError, match=r"missing_model\.pth"):
        evaluate(cfg)
    assert not (tmp_path / "run" / "results.json").exists()


def test_checkpoint_of_another_variant_is_refused(checkpoints, tmp_path):
    state = torch.load(checkpoints["official"], weights_only=True)
    state["image_encoder.patch_embed.proj.weight"] = torch.zeros(768, 3, 16, 16)  # a vit_b tensor
    path = tmp_path / "other_variant.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"other_variant\.pth has tensors of the wrong shape") as err:
        load_model("vit_t", 64, str(path))
    assert "variant=vit_t" in str(err.value)


def test_checkpoint_names_and_list():
    assert checkpoint_list(None) == [None]
    assert checkpoint_list("random") == [None]
    assert checkpoint_list(["a.pth", None, "null"]) == ["a.pth", None, None]
    with pytest.raises(ValueError, match="non-empty"):
        checkpoint_list([])
    assert checkpoint_names(["r1/official.pth", "r2/checkpoints/last.ckpt", None]) == [
        "official.pth",
        "last.ckpt",
        "random",
    ]
    assert checkpoint_names(["/x/a/ckpt/last.ckpt", "/x/b/ckpt/last.ckpt"]) == [
        "a/ckpt/last.ckpt",
        "b/ckpt/last.ckpt",
    ]
    assert checkpoint_names([None, None, "m.pth", "m.pth"]) == ["random", "random#2", "m.pth", "m.pth#2"]
    assert checkpoint_names(["a.pth", "b.pth"], ["base", "tuned"]) == ["base", "tuned"]
    with pytest.raises(ValueError, match="names has 1"):
        checkpoint_names(["a.pth", "b.pth"], ["base"])


def test_default_config_columns_and_coco_without_train_split(eval_cfg, tmp_path):
    cfg = compose_config(tmp_path / "default", config_name="eval")
    assert (cfg.variant, cfg.max_clicks, list(cfg.clicks)) == ("vit_t", 20, [1, 3, 5, 9])
    assert cfg.checkpoints == [None]
    titles = [title for _, title in metric_columns(cfg)]
    assert titles == [
        "mIoU@1",
        "mIoU@3",
        "mIoU@5",
        "mIoU@9",
        "NoC@85",
        "NoC@90",
        "NoF@85",
        "NoF@90",
        "boundary mIoU@1",
        "boundary mIoU@5",
        "oracle mIoU@1",
        "box mIoU",
        "box small",
        "box medium",
        "box large",
        "IoU calibration",
    ]
    # The generic COCO config leaves the train split mandatory (???); evaluation never reads it.
    cfg = eval_cfg(
        "data=coco",
        "data.val_dataset.annotation_file=${paths.data_dir}/sample/val/annotations.json",
        "data.val_dataset.image_dir=${paths.data_dir}/sample/val",
    )
    dataset = raw_dataset(cfg.data.val_dataset)
    sample = dataset[0]  # the original image, not resized
    assert sample["image"].shape[:2] == sample["masks"].shape[1:] and max(sample["image"].shape[:2]) != 64


def test_plot_click_curves(tmp_path):
    path = plot_click_curves({"a": [0.1, 0.5, 0.7], "b": [0.2] * 20}, tmp_path / "sub" / "c.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
    with pytest.raises(ValueError, match="at least one"):
        plot_click_curves({}, tmp_path / "empty.png")


def test_untrained_model_is_the_same_for_every_run(eval_cfg):
    results = evaluate(eval_cfg("checkpoints=[null,random]", "max_clicks=1", "limit_images=1"))["val"]
    assert list(results) == ["random", "random#2"]
    first, second = results.values()
    assert first == second


def test_evaluate_a_sam2_checkpoint(eval_cfg, tmp_path):
    """``samtrain eval variant=sam2.1_hiera_*``: a SAM 2.1 export goes through the same protocols (in
    its own frame) and is loaded (its metrics are not those of the eval seed's untrained model)."""
    torch.manual_seed(1)
    model = build_sam("sam2.1_hiera_n", image_size=64)
    exported = export_sam_checkpoint(model, tmp_path / "sam2.pt")
    cfg = eval_cfg("variant=sam2.1_hiera_n", f"checkpoints=[{exported},null]")
    runs = evaluate(cfg)["val"]
    assert list(runs) == ["sam2.pt", "random"]
    assert set(runs["sam2.pt"]) >= METRIC_KEYS
    assert runs["sam2.pt"] != runs["random"]
