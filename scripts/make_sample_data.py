"""Generate the small synthetic COCO-format sample dataset under data/sample/.

Each image shows 2-6 textured shapes (ellipses, rectangles, polygons and stars, rings with a
hole, thin curved strokes, blobs) on a gradient, noise, stripe or check background. Later
shapes occlude earlier ones, so every mask is the visible part of its shape. Masks are stored
as compressed RLE (a few as polygons) in COCO instance format.

    python scripts/make_sample_data.py --out data/sample --seed 0

The output is a pure function of the arguments (numpy's seeded Generator, OpenCV drawing and
JPEG encoding).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
from pycocotools import mask as mask_utils

CATEGORIES = ("ellipse", "rectangle", "polygon", "ring", "stroke", "blob")
MIN_VISIBLE_AREA = 40  # px; shapes occluded below this are dropped
POLYGON_PROB = 0.15  # share of simple shapes stored as polygons instead of RLE
JPEG_QUALITY = 90


def random_color(rng: np.random.Generator) -> np.ndarray:
    """A random RGB colour, float (3,) in 0-255."""
    return rng.uniform(0, 255, size=3)


def linear_gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Two colours blended along a random direction: float (h, w, 3)."""
    angle = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xx * np.cos(angle) + yy * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    return (1 - t)[..., None] * random_color(rng) + t[..., None] * random_color(rng)


def smooth_noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Low-frequency colour noise plus fine grain: float (h, w, 3)."""
    cell = int(rng.integers(8, 24))
    coarse = rng.uniform(0, 255, size=(h // cell + 2, w // cell + 2, 3)).astype(np.float32)
    smooth = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    return smooth + rng.normal(0, 6, size=(h, w, 3))


def stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Soft sinusoidal stripes of two colours at a random angle: float (h, w, 3)."""
    angle = rng.uniform(0, np.pi)
    period = rng.uniform(6, 24)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = 0.5 + 0.5 * np.sin(2 * np.pi * (xx * np.cos(angle) + yy * np.sin(angle)) / period)
    return (1 - t)[..., None] * random_color(rng) + t[..., None] * random_color(rng)


def checks(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A checkerboard of two colours with a random cell size and offset: float (h, w, 3)."""
    cell = int(rng.integers(8, 28))
    oy, ox = rng.integers(0, cell, size=2)
    yy, xx = np.mgrid[0:h, 0:w]
    board = (((yy + oy) // cell + (xx + ox) // cell) % 2).astype(np.float32)
    return (1 - board)[..., None] * random_color(rng) + board[..., None] * random_color(rng)


def solid_grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One colour with pixel noise: float (h, w, 3)."""
    return random_color(rng) + rng.normal(0, rng.uniform(3, 12), size=(h, w, 3))


BACKGROUNDS = (linear_gradient, smooth_noise, stripes, checks)
FILLS = (solid_grain, linear_gradient, stripes, solid_grain)


def draw_ellipse(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float) -> np.ndarray:
    """A filled rotated ellipse: uint8 (h, w) in {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    axes = (int(size * rng.uniform(0.5, 1.0)), int(size * rng.uniform(0.3, 0.8)))
    cv2.ellipse(mask, tuple(int(v) for v in center), axes, rng.uniform(0, 180), 0, 360, 1, -1)
    return mask


def draw_rectangle(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float) -> np.ndarray:
    """A filled rotated rectangle: uint8 (h, w) in {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    box = (
        (float(center[0]), float(center[1])),
        (size * rng.uniform(0.8, 2.0), size * rng.uniform(0.5, 1.4)),
        float(rng.choice([0.0, rng.uniform(0, 90)])),
    )
    cv2.fillPoly(mask, [np.round(cv2.boxPoints(box)).astype(np.int32)], 1)
    return mask


def draw_polygon(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float) -> np.ndarray:
    """A filled star (alternating radii) or irregular polygon: uint8 (h, w) in {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    if rng.random() < 0.5:
        n = int(rng.integers(5, 9))
        angles = np.arange(2 * n) * np.pi / n + rng.uniform(0, np.pi)
        radii = np.where(np.arange(2 * n) % 2 == 0, size, size * rng.uniform(0.35, 0.55))
    else:
        n = int(rng.integers(3, 8))
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=n))
        radii = size * rng.uniform(0.6, 1.1, size=n)
    points = center + np.stack([np.cos(angles), np.sin(angles)], axis=1) * radii[:, None]
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


def draw_ring(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float) -> np.ndarray:
    """An elliptical ring (concave, with a hole): uint8 (h, w) in {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    c = tuple(int(v) for v in center)
    axes = (int(size * rng.uniform(0.7, 1.0)), int(size * rng.uniform(0.6, 1.0)))
    angle = rng.uniform(0, 180)
    inner = rng.uniform(0.4, 0.7)
    cv2.ellipse(mask, c, axes, angle, 0, 360, 1, -1)
    cv2.ellipse(mask, c, (int(axes[0] * inner), int(axes[1] * inner)), angle, 0, 360, 0, -1)
    return mask


def draw_stroke(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float) -> np.ndarray:
    """A thin curved line (cubic Bezier): uint8 (h, w) in {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    control = center + rng.uniform(-1.6, 1.6, size=(4, 2)) * size
    t = np.linspace(0, 1, 48)[:, None]
    curve = (
        (1 - t) ** 3 * control[0]
        + 3 * (1 - t) ** 2 * t * control[1]
        + 3 * (1 - t) * t**2 * control[2]
        + t**3 * control[3]
    )
    cv2.polylines(mask, [np.round(curve).astype(np.int32)], False, 1, int(rng.integers(3, 7)))
    return mask


def draw_blob(rng: np.random.Generator, h: int, w: int, center: np.ndarray, size: float) -> np.ndarray:
    """A smooth random closed shape (radius with a few harmonics): uint8 (h, w) in {0, 1}."""
    mask = np.zeros((h, w), np.uint8)
    theta = np.linspace(0, 2 * np.pi, 90, endpoint=False)
    radius = np.ones_like(theta)
    for k in (2, 3, 4):
        radius += rng.uniform(0.05, 0.25) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    points = center + np.stack([np.cos(theta), np.sin(theta)], axis=1) * (size * radius)[:, None]
    cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
    return mask


DRAWERS = (draw_ellipse, draw_rectangle, draw_polygon, draw_ring, draw_stroke, draw_blob)


def place(rng: np.random.Generator, h: int, w: int, previous: list[np.ndarray]) -> np.ndarray:
    """A shape centre (x, y): near an earlier shape's centre (to touch or occlude it) or anywhere."""
    if previous and rng.random() < 0.45:
        ys, xs = np.nonzero(previous[int(rng.integers(len(previous)))])
        if len(xs):
            i = int(rng.integers(len(xs)))
            return np.array([xs[i], ys[i]], float) + rng.normal(0, 6, size=2)
    return np.array([rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h])


def render_image(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Draw one scene. Returns RGB uint8 (h, w, 3) and [(category index, visible mask bool (h, w))]."""
    image = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))](rng, h, w)
    shapes: list[tuple[int, np.ndarray]] = []
    for _ in range(int(rng.integers(2, 7))):
        kind = int(rng.integers(len(DRAWERS)))
        size = rng.uniform(0.12, 0.3) * min(h, w)
        mask = DRAWERS[kind](rng, h, w, place(rng, h, w, [m for _, m in shapes]), size).astype(bool)
        if not mask.any():
            continue
        fill = FILLS[int(rng.integers(len(FILLS)))](rng, h, w)
        image[mask] = fill[mask]
        shapes = [(k, m & ~mask) for k, m in shapes]  # the new shape hides what it covers
        shapes.append((kind, mask))
    visible = [(k, m) for k, m in shapes if m.sum() >= MIN_VISIBLE_AREA]
    return np.clip(image, 0, 255).astype(np.uint8), visible


def polygon_segmentation(mask: np.ndarray) -> list[list[float]] | None:
    """The outline of a single hole-free region as a COCO polygon, or None when that would be lossy."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if len(contours) != 1 or len(contours[0]) < 3:
        return None
    polygon = [contours[0].reshape(-1).astype(float).tolist()]
    h, w = mask.shape
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygon, h, w))).astype(bool)
    iou = (decoded & mask).sum() / max((decoded | mask).sum(), 1)
    return polygon if iou >= 0.8 else None


def annotation(
    rng: np.random.Generator, mask: np.ndarray, ann_id: int, image_id: int, category_id: int
) -> dict:
    """A COCO instance annotation for a bool (h, w) mask: compressed RLE, sometimes a polygon."""
    h, w = mask.shape
    segmentation: list | dict | None = None
    if (
        CATEGORIES[category_id - 1] in ("rectangle", "polygon", "ellipse", "blob")
        and rng.random() < POLYGON_PROB
    ):
        segmentation = polygon_segmentation(mask)
    if segmentation is None:
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        rle_for_stats = rle
    else:
        rle_for_stats = mask_utils.merge(mask_utils.frPyObjects(segmentation, h, w))
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "segmentation": segmentation,
        "area": int(mask_utils.area(rle_for_stats)),
        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle_for_stats)],
        "iscrowd": 0,
    }


def make_split(rng: np.random.Generator, out_dir: Path, num_images: int, first_image_id: int) -> dict:
    """Render a split into out_dir (JPEGs + annotations.json). Returns the COCO dict."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for image_id in range(first_image_id, first_image_id + num_images):
        h, w = (int(v) for v in rng.integers(128, 193, size=2))
        image, shapes = render_image(rng, h, w)
        while len(shapes) < 2:  # every sample image shows at least two objects
            image, shapes = render_image(rng, h, w)
        file_name = f"{image_id:06d}.jpg"
        bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
        if not cv2.imwrite(str(out_dir / file_name), bgr, [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY]):
            raise OSError(f"could not write {out_dir / file_name}")
        images.append({"id": image_id, "file_name": file_name, "height": h, "width": w})
        for kind, mask in shapes:
            annotations.append(annotation(rng, mask, len(annotations) + 1, image_id, kind + 1))
    coco = {
        "info": {"description": "samtrain synthetic sample dataset (scripts/make_sample_data.py)"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i + 1, "name": n, "supercategory": "shape"} for i, n in enumerate(CATEGORIES)],
    }
    (out_dir / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
    return coco


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "data" / "sample")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=48, help="number of training images")
    parser.add_argument("--val", type=int, default=16, help="number of validation images")
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    for split in ("train", "val"):
        shutil.rmtree(args.out / split, ignore_errors=True)
    train = make_split(rng, args.out / "train", args.train, first_image_id=1)
    val = make_split(rng, args.out / "val", args.val, first_image_id=1001)
    for name, coco in (("train", train), ("val", val)):
        print(f"{name}: {len(coco['images'])} images, {len(coco['annotations'])} masks")


if __name__ == "__main__":
    main()
