"""samtrain predict, annotate and export on a tiny model and the sample images."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO

from samtrain.commands import annotate, check_data, cli, export, predict
from samtrain.models import build_sam, export_sam_checkpoint
from tests.conftest import ROOT

SAMPLE = ROOT / "data" / "sample" / "val"
TINY = ["--image-size", "64", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    return export_sam_checkpoint(
        build_sam("vit_t", image_size=64), tmp_path_factory.mktemp("ckpt") / "tiny.pth"
    )


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("001001.jpg", "001002.jpg", "001003.jpg"):
        shutil.copy(SAMPLE / name, folder / name)
    return folder


def test_predict_writes_the_files_it_names(checkpoint, images, tmp_path):
    out = tmp_path / "pred"
    paths = [str(p) for p in sorted(images.iterdir())[:2]]
    argv = [
        str(checkpoint),
        *paths,
        "--points",
        "20,30",
        "40,10,0",
        "--boxes",
        "5,5,60,50",
        "--out",
        str(out),
        *TINY,
    ]
    assert cli.main(["predict", *argv]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert list(scores) == paths
    for entry in scores.values():
        assert (out / entry["overlay"]).is_file()
        (obj,) = entry["objects"]
        assert obj["points"] == [[20.0, 30.0], [40.0, 10.0]] and obj["labels"] == [1, 0]
        mask = np.asarray(Image.open(out / obj["mask"]))
        assert set(np.unique(mask)) <= {0, 255} and int((mask > 0).sum()) == obj["area"]
        assert isinstance(obj["predicted_iou"], float)


def test_predict_from_a_prompts_file(checkpoint, images, tmp_path):
    image = sorted(images.iterdir())[0]
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({image.name: [{"points": [[10, 10]]}, {"box": [0, 0, 30, 30]}]}))
    out = tmp_path / "pred"
    assert (
        predict.main([str(checkpoint), str(image), "--prompts", str(prompts), "--out", str(out), *TINY]) == 0
    )
    objects = json.loads((out / "scores.json").read_text())[str(image)]["objects"]
    assert [o["mask"] for o in objects] == [f"{image.stem}_0.png", f"{image.stem}_1.png"]
    assert all((out / o["mask"]).is_file() for o in objects)


def test_predict_refuses_points_outside_the_image(checkpoint, images, tmp_path, capsys):
    image = sorted(images.iterdir())[0]
    argv = [str(checkpoint), str(image), "--points", "5000,10", "--out", str(tmp_path), *TINY]
    assert predict.main(argv) == 2
    assert "outside" in capsys.readouterr().out


GENERATOR = ["--points-per-side", "4", "--pred-iou-thresh", "0", "--stability-score-thresh", "0"]


def test_annotate_writes_a_coco_file_check_data_accepts(checkpoint, images, tmp_path):
    out = tmp_path / "coco.json"
    assert cli.main(["annotate", str(checkpoint), str(images), "--out", str(out), *TINY, *GENERATOR]) == 0
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 3 and len(coco.getAnnIds()) > 0
    for ann in coco.loadAnns(coco.getAnnIds()):
        assert coco.annToMask(ann).sum() == ann["area"]
    assert not out.with_name("coco.json.partial.jsonl").exists()
    assert (
        check_data.main(["--format", "coco", "--path", str(out), "--image-dir", str(images), "--no-progress"])
        == 0
    )


def test_annotate_resumes_from_its_partial_file(checkpoint, images, tmp_path, monkeypatch):
    out = tmp_path / "coco.json"
    full = tmp_path / "full.json"
    assert annotate.main([str(checkpoint), str(images), "--out", str(full), *TINY, *GENERATOR]) == 0
    reference = json.loads(full.read_text())
    # An interrupted run: the first image finished, the second cut off mid-line.
    first = {
        "image": reference["images"][0],
        "annotations": [
            {k: v for k, v in a.items() if k not in ("id", "image_id")}
            for a in reference["annotations"]
            if a["image_id"] == reference["images"][0]["id"]
        ],
    }
    partial = out.with_name("coco.json.partial.jsonl")
    partial.write_text(json.dumps(first) + "\n" + '{"image": {"id": 2')
    generated = []
    original = annotate.automatic_annotations
    monkeypatch.setattr(
        annotate, "automatic_annotations", lambda g, im: generated.append(1) or original(g, im)
    )
    assert annotate.main([str(checkpoint), str(images), "--out", str(out), *TINY, *GENERATOR]) == 0
    assert len(generated) == 2  # the finished image was not done again
    assert json.loads(out.read_text()) == reference


def test_annotate_with_box_prompts_keeps_their_categories(checkpoint, tmp_path):
    source = json.loads((SAMPLE / "annotations.json").read_text())
    keep = source["images"][:2]
    ids = {img["id"] for img in keep}
    detections = {
        "images": keep,
        "annotations": [
            {
                "id": a["id"],
                "image_id": a["image_id"],
                "bbox": a["bbox"],
                "category_id": a["category_id"],
                "score": 0.9,
            }
            for a in source["annotations"]
            if a["image_id"] in ids
        ],
        "categories": source["categories"],
    }
    prompts = tmp_path / "detections.json"
    prompts.write_text(json.dumps(detections))
    out = tmp_path / "coco.json"
    assert (
        annotate.main([str(checkpoint), str(SAMPLE), "--out", str(out), "--prompts", str(prompts), *TINY])
        == 0
    )
    coco = COCO(str(out))
    anns = coco.loadAnns(coco.getAnnIds())
    assert len(anns) == len(detections["annotations"])
    assert sorted(a["category_id"] for a in anns) == sorted(
        a["category_id"] for a in detections["annotations"]
    )
    assert all(a["detector_score"] == 0.9 for a in anns)


@pytest.mark.parametrize(
    ("fmt", "name"), [("official", "out.pth"), ("safetensors", "out.safetensors"), ("hf", "hf")]
)
def test_export_formats_load_back(checkpoint, tmp_path, fmt, name):
    if fmt == "hf":
        pytest.importorskip("transformers")
    out = tmp_path / name
    assert export.main([str(checkpoint), "--format", fmt, "--out", str(out), *TINY]) == 0
    reference = build_sam("vit_t", image_size=64, checkpoint=checkpoint).state_dict()
    loaded = build_sam("vit_t", image_size=64, checkpoint=out).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in reference.items())


def test_export_onnx_writes_both_graphs(checkpoint, tmp_path):
    pytest.importorskip("onnx")
    out = tmp_path / "onnx"
    assert export.main([str(checkpoint), "--format", "onnx", "--out", str(out), "--opset", "17", *TINY]) == 0
    assert (out / "encoder.onnx").stat().st_size > 0 and (out / "decoder.onnx").stat().st_size > 0


def test_export_names_a_wrong_suffix(checkpoint, tmp_path, capsys):
    assert (
        export.main([str(checkpoint), "--format", "safetensors", "--out", str(tmp_path / "x.pth"), *TINY])
        == 2
    )
    assert ".safetensors" in capsys.readouterr().out
