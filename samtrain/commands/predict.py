"""``samtrain predict CKPT IMAGE... --points/--boxes ... | --prompts prompts.json --out DIR``.

Prompts, in original-image pixels:

- ``--points X,Y[,LABEL] ...``: the points of one object (label 1 foreground, 0 background;
  default 1); with a single ``--boxes`` box they go with the box.
- ``--boxes X1,Y1,X2,Y2 ...``: one object per box.
- ``--prompts prompts.json``: per image (by file name, or path as given), a list of objects, each
  ``{"points": [[x, y], ...], "labels": [1, ...], "box": [x1, y1, x2, y2]}`` (any of the keys).

A single point gives SAM's three masks, of which the one with the highest predicted IoU is kept;
other prompts give one mask. Writes ``<stem>_<k>.png`` (0/255) per object, ``<stem>_overlay.png``
per image and ``scores.json`` (per image the objects' prompts, predicted IoU and mask file).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from samtrain.commands.loading import add_model_arguments, load_model
from samtrain.data.image_io import read_rgb_image
from samtrain.inference.predictor import SamPredictor
from samtrain.visualize import draw_box, draw_clicks, overlay_mask

PALETTE = ((230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain predict",
        description="Masks for point/box prompts: a PNG per mask, an overlay per image, scores.json.",
    )
    add_model_arguments(parser)
    parser.add_argument("images", nargs="+", help="image files")
    parser.add_argument("--points", nargs="+", metavar="X,Y[,LABEL]", help="the points of one object")
    parser.add_argument("--boxes", nargs="+", metavar="X1,Y1,X2,Y2", help="one object per box")
    parser.add_argument("--prompts", help="JSON: {image name: [{points, labels, box}, ...]}")
    parser.add_argument("--out", required=True, help="output folder")
    return parser


def parse_numbers(text: str, counts: tuple[int, ...], what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in counts:
        raise ValueError(f"{what} {text!r}: expected {' or '.join(map(str, counts))} comma-separated numbers")
    return values


def prompts_from_arguments(points: Sequence[str] | None, boxes: Sequence[str] | None) -> list[dict]:
    """--points/--boxes -> the objects: one per box, or one of all the points."""
    parsed_points = [parse_numbers(p, (2, 3), "--points") for p in points or ()]
    parsed_boxes = [parse_numbers(b, (4,), "--boxes") for b in boxes or ()]
    if parsed_points and len(parsed_boxes) > 1:
        raise ValueError("--points go with at most one box (they are the points of one object)")
    point_part = {}
    if parsed_points:
        point_part = {
            "points": [p[:2] for p in parsed_points],
            "labels": [int(p[2]) if len(p) == 3 else 1 for p in parsed_points],
        }
    if not parsed_boxes:
        return [point_part]
    return [dict(point_part, box=box) for box in parsed_boxes]


def read_prompt_file(path: str | Path) -> dict[str, list[dict]]:
    path = Path(path)
    try:
        prompts = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"prompts file {path} could not be read: {err}") from err
    if not isinstance(prompts, dict) or not all(isinstance(v, list) for v in prompts.values()):
        raise ValueError(f"prompts file {path} must map image names to lists of objects")
    for name, objects in prompts.items():
        for obj in objects:
            if not isinstance(obj, dict) or not ({"points", "box"} & set(obj)):
                raise ValueError(
                    f"prompts file {path}: an object of {name!r} has neither points nor box: {obj}"
                )
    return prompts


def predict_object(predictor: SamPredictor, prompt: dict) -> tuple[np.ndarray, float]:
    """One object's mask (H, W) bool and predicted IoU."""
    points = prompt.get("points")
    coords = np.asarray(points, dtype=np.float64) if points else None
    labels = np.asarray(prompt.get("labels", [1] * len(points)), dtype=np.int64) if points else None
    box = np.asarray(prompt["box"], dtype=np.float64) if prompt.get("box") is not None else None
    single_point = coords is not None and len(coords) == 1 and box is None
    masks, scores, _ = predictor.predict(
        point_coords=coords, point_labels=labels, box=box, multimask_output=single_point
    )
    best = int(np.argmax(scores))
    return masks[best], float(scores[best])


def draw_overlay(image: np.ndarray, masks: list[np.ndarray], prompts: list[dict]) -> np.ndarray:
    out = image
    for k, (mask, prompt) in enumerate(zip(masks, prompts, strict=True)):
        out = overlay_mask(out, mask, PALETTE[k % len(PALETTE)])
        if prompt.get("box") is not None:
            out = draw_box(out, prompt["box"])
        if prompt.get("points"):
            out = draw_clicks(
                out,
                np.asarray(prompt["points"]),
                np.asarray(prompt.get("labels", [1] * len(prompt["points"]))),
            )
    return out


def write_png(path: Path, rgb_or_mask: np.ndarray) -> None:
    image = rgb_or_mask if rgb_or_mask.ndim == 2 else cv2.cvtColor(rgb_or_mask, cv2.COLOR_RGB2BGR)
    if not cv2.imwrite(str(path), image):
        raise OSError(f"could not write {path}")


def run(args: argparse.Namespace) -> dict[str, Any]:
    if (args.prompts is None) == (args.points is None and args.boxes is None):
        raise ValueError("give --points/--boxes or --prompts (one of the two)")
    per_image = read_prompt_file(args.prompts) if args.prompts else None
    shared = prompts_from_arguments(args.points, args.boxes) if per_image is None else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    predictor = SamPredictor(load_model(args))
    results: dict[str, Any] = {}
    for image_path in tqdm([Path(p) for p in args.images], desc="predict", unit="image"):
        prompts = shared
        if per_image is not None:
            prompts = per_image.get(str(image_path), per_image.get(image_path.name))
            if prompts is None:
                raise ValueError(f"prompts file {args.prompts} has no entry for {image_path}")
        image = read_rgb_image(image_path)
        predictor.set_image(image)
        masks, objects = [], []
        for k, prompt in enumerate(prompts):
            try:
                mask, score = predict_object(predictor, prompt)
            except ValueError as err:
                raise ValueError(f"{image_path}: object {k} {prompt}: {err}") from err
            mask_file = out / f"{image_path.stem}_{k}.png"
            write_png(mask_file, mask.astype(np.uint8) * 255)
            masks.append(mask)
            objects.append(
                {**prompt, "predicted_iou": score, "area": int(mask.sum()), "mask": mask_file.name}
            )
        overlay = out / f"{image_path.stem}_overlay.png"
        write_png(overlay, draw_overlay(image, masks, prompts))
        results[str(image_path)] = {"overlay": overlay.name, "objects": objects}
    (out / "scores.json").write_text(json.dumps(results, indent=2))
    return results


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"samtrain predict: {err}", flush=True)
        return 2
    print(f"wrote {args.out}", flush=True)
    return 0
