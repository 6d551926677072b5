"""``samtrain annotate CKPT IMAGE_DIR --out coco.json``: pre-annotate a folder as a COCO instance file.

Without ``--prompts``, each image gets the automatic masks (:class:`AutomaticMaskGenerator`, its
options as flags). With ``--prompts detections.json`` (a COCO file: ``images`` with ``file_name``,
``annotations`` with ``bbox`` XYWH and optionally ``point_coords`` [[x, y], ...] and
``point_labels``, as a detector's output converted to COCO), each prompt gets one mask, keeping
its category and score. Segmentations are compressed RLE; each annotation also carries
``score`` (the predicted IoU) and, for automatic masks, ``stability_score``.

Large folders stream: each finished image is appended to ``<out>.partial.jsonl`` (flushed), so
an interrupted run continues where it stopped when started again (``--restart`` starts over);
the COCO file is assembled from it at the end, and the partial file removed.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm.auto import tqdm

from samtrain.commands.loading import add_model_arguments, load_model
from samtrain.data.image_io import find_images, read_rgb_image
from samtrain.inference.automatic import AutomaticMaskGenerator, encode_rles

GENERATOR_OPTIONS = {  # flag -> (type, default), the AutomaticMaskGenerator keyword of the same name
    "points_per_side": (int, 32),
    "points_per_batch": (int, 64),
    "pred_iou_thresh": (float, 0.88),
    "stability_score_thresh": (float, 0.95),
    "stability_score_offset": (float, 1.0),
    "box_nms_thresh": (float, 0.7),
    "crop_n_layers": (int, 0),
    "crop_nms_thresh": (float, 0.7),
    "crop_n_points_downscale_factor": (int, 1),
    "min_mask_region_area": (int, 0),
}
AUTOMATIC_CATEGORY = {"id": 1, "name": "object"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="samtrain annotate",
        description="A COCO instance file (RLE) of a folder's automatic masks, or of masks for "
        "per-image box/point prompts; streams and resumes.",
    )
    add_model_arguments(parser)
    parser.add_argument("image_dir", help="folder of images (searched recursively)")
    parser.add_argument("--out", required=True, help="the COCO JSON to write")
    parser.add_argument("--prompts", help="COCO JSON of box/point prompts per image (a detector's output)")
    parser.add_argument("--restart", action="store_true", help="ignore the partial file of an earlier run")
    for name, (kind, default) in GENERATOR_OPTIONS.items():
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=kind, default=default, help=f"(default {default})"
        )
    return parser


class PromptSource:
    """Box/point prompts per image file from a COCO file; categories carried over."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        try:
            coco = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"prompts file {path} could not be read: {err}") from err
        if not isinstance(coco, dict) or "images" not in coco or "annotations" not in coco:
            raise ValueError(f"prompts file {path} is not a COCO file (needs 'images' and 'annotations')")
        names = {img["id"]: img["file_name"] for img in coco["images"]}
        self.by_file: dict[str, list[dict]] = {name: [] for name in names.values()}
        for ann in coco["annotations"]:
            if ann.get("image_id") not in names:
                raise ValueError(f"prompts file {path}: annotation {ann.get('id')} names an unknown image")
            if "bbox" not in ann and "point_coords" not in ann:
                raise ValueError(
                    f"prompts file {path}: annotation {ann.get('id')} has neither bbox nor point_coords"
                )
            self.by_file[names[ann["image_id"]]].append(ann)
        self.categories = coco.get("categories") or [AUTOMATIC_CATEGORY]
        self.path = path

    def prompts(self, relative_name: str) -> list[dict]:
        return self.by_file.get(relative_name, [])


def prompted_annotations(predictor, prompts: list[dict]) -> list[dict]:
    """One mask per prompt annotation (its bbox, points, or both) -> annotation dicts (no ids)."""
    if not prompts:
        return []
    masks, scores = [], []
    for ann in prompts:
        box = None
        if "bbox" in ann:
            x, y, w, h = ann["bbox"]
            box = np.array([x, y, x + w, y + h], dtype=np.float64)
        points = np.asarray(ann["point_coords"], dtype=np.float64) if "point_coords" in ann else None
        labels = np.asarray(ann.get("point_labels", [1] * len(points))) if points is not None else None
        single = points is not None and len(points) == 1 and box is None
        out, score, _ = predictor.predict(
            point_coords=points, point_labels=labels, box=box, multimask_output=single
        )
        best = int(np.argmax(score))
        masks.append(out[best])
        scores.append(float(score[best]))
    rles = encode_rles(torch.from_numpy(np.stack(masks)))
    return [
        {
            "category_id": ann.get("category_id", AUTOMATIC_CATEGORY["id"]),
            **coco_geometry(rle),
            "score": score,
            **({"detector_score": ann["score"]} if "score" in ann else {}),
        }
        for ann, rle, score in zip(prompts, rles, scores, strict=True)
    ]


def coco_geometry(rle: dict) -> dict:
    """A compressed RLE -> COCO's segmentation (counts as text), area and bbox (XYWH, pixel extent)."""
    return {
        "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
        "area": int(mask_utils.area(rle)),
        "bbox": [float(v) for v in mask_utils.toBbox(rle)],
        "iscrowd": 0,
    }


def automatic_annotations(generator: AutomaticMaskGenerator, image: np.ndarray) -> list[dict]:
    masks = generator.generate_masks(image)
    return [
        {
            "category_id": AUTOMATIC_CATEGORY["id"],
            **coco_geometry(rle),
            "score": masks.iou[i].item(),
            "stability_score": masks.stability[i].item(),
            "point_coords": [masks.points[i].tolist()],
        }
        for i, rle in enumerate(masks.rles)
    ]


def read_partial(path: Path) -> list[dict]:
    """The finished images of an earlier run; a last line cut off mid-write is dropped."""
    if not path.is_file():
        return []
    done = []
    for line in path.read_text().splitlines():
        try:
            done.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return done


def write_coco(out: Path, entries: Iterator[dict], categories: list[dict]) -> tuple[int, int]:
    """The COCO file from per-image entries, written piece by piece; returns (images, annotations)."""
    tmp = out.with_name(out.name + ".tmp")
    images, annotations = [], 0
    with tmp.open("w") as f:
        f.write('{"annotations": [')
        for entry in entries:
            images.append(entry["image"])
            for ann in entry["annotations"]:
                annotations += 1
                ann = {"id": annotations, "image_id": entry["image"]["id"], **ann}
                f.write(("," if annotations > 1 else "") + "\n" + json.dumps(ann))
        f.write(
            '\n],\n"images": ' + json.dumps(images) + ',\n"categories": ' + json.dumps(categories) + "}\n"
        )
    tmp.replace(out)
    return len(images), annotations


def run(args: argparse.Namespace) -> tuple[int, int]:
    root = Path(args.image_dir)
    files = find_images(root)
    source = PromptSource(args.prompts) if args.prompts else None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial.jsonl")
    if args.restart:
        partial.unlink(missing_ok=True)
    done = read_partial(partial)
    finished = {entry["image"]["file_name"] for entry in done}
    model = load_model(args)
    options = {name: getattr(args, name) for name in GENERATOR_OPTIONS}
    generator = AutomaticMaskGenerator(model, **options)
    with partial.open("w") as f:  # rewritten without a possibly cut-off last line
        for entry in done:
            f.write(json.dumps(entry) + "\n")
        for image_id, path in enumerate(tqdm(files, desc="annotate", unit="image"), start=1):
            name = path.relative_to(root).as_posix()
            if name in finished:
                continue
            image = read_rgb_image(path)
            if source is None:
                annotations = automatic_annotations(generator, image)
            else:
                generator.predictor.set_image(image)
                annotations = prompted_annotations(generator.predictor, source.prompts(name))
            height, width = image.shape[:2]
            record = {"id": image_id, "file_name": name, "height": height, "width": width}
            f.write(json.dumps({"image": record, "annotations": annotations}) + "\n")
            f.flush()
    categories = source.categories if source is not None else [AUTOMATIC_CATEGORY]
    counts = write_coco(out, iter(read_partial(partial)), categories)
    partial.unlink()
    return counts


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    try:
        images, annotations = run(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"samtrain annotate: {err}", flush=True)
        return 2
    print(f"wrote {args.out}: {images} images, {annotations} annotations", flush=True)
    return 0
