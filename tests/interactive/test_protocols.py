import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from samtrain.frame import (
    logits_at_original_size,
    masks_in_frame,
    resize_longest_side,
    scale_coords,
    valid_regions,
)
from samtrain.interactive.losses import binary_iou
from samtrain.interactive.metrics import number_of_clicks
from samtrain.interactive.protocols import (
    box_iou,
    click_curve,
    evaluate_batch,
)
from samtrain.models import build_sam

S = 64


class ScriptedModel:
    """A stand-in for Sam: every output j of mask i is ``outputs[i, j]`` (S x S bool) as low-res
    logits +10 / -10, the predicted IoUs are fixed, and every call is recorded."""

    def __init__(self, outputs: torch.Tensor, iou_pred: torch.Tensor | None = None) -> None:
        self.image_size = outputs.shape[-1]
        pooled = F.avg_pool2d(outputs.float(), 4)
        self.low_res = torch.where(pooled > 0.5, 10.0, -10.0)  # (N, 4, S/4, S/4)
        self.iou_pred = torch.full(outputs.shape[:2], 0.5) if iou_pred is None else iou_pred
        self.calls: list[dict] = []

    def decode_masks(
        self, image_embeddings, *, points=None, boxes=None, mask_inputs=None, image_indices=None
    ):
        self.calls.append(
            dict(points=points, boxes=boxes, mask_inputs=mask_inputs, image_indices=image_indices)
        )
        return self.low_res.clone(), self.iou_pred.clone()


class BoxModel:
    """A stand-in for Sam whose every output is the given box, pixel-inclusive."""

    image_size = S

    def decode_masks(
        self, image_embeddings, *, points=None, boxes=None, mask_inputs=None, image_indices=None
    ):
        self.boxes = boxes
        grid = torch.arange(S)
        x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
        inside = (grid[None, None, :] >= x1) & (grid[None, None, :] <= x2)
        inside = inside & (grid[None, :, None] >= y1) & (grid[None, :, None] <= y2)
        logits = torch.where(F.avg_pool2d(inside[:, None].float(), 4) > 0.5, 10.0, -10.0)
        return logits.expand(-1, 4, -1, -1), torch.full((boxes.shape[0], 4), 0.75)


def block_masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three objects on two images of input sizes (40, 64) and (64, 48), aligned to 4 px blocks so
    that +-10 low-res logits upsample to these masks up to their corners (bilinear rounds them)."""
    masks = torch.zeros(3, S, S, dtype=torch.bool)
    masks[0, 8:24, 4:20] = True
    masks[1, 20:40, 32:64] = True
    masks[2, 4:60, 12:44] = True
    masks[2, 4:16, 12:24] = False
    return masks, torch.tensor([0, 0, 1]), torch.tensor([[40, 64], [64, 48]])


def band_masks() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-width bands with 4 px aligned edges: no corners inside the image region, so +-10 low-res
    logits upsample to exactly these masks (object 2's band is cut at its image's width 48)."""
    masks = torch.zeros(3, S, S, dtype=torch.bool)
    masks[0, 8:24] = True
    masks[1, 28:40] = True
    masks[2, 4:60] = True
    return masks, torch.tensor([0, 0, 1]), torch.tensor([[40, 64], [64, 48]])


EMBEDDINGS = torch.zeros(2, 256, S // 16, S // 16)


def test_valid_regions_and_masks_in_frame():
    regions = valid_regions(torch.tensor([[40, 64], [64, 48]]), S)
    assert regions.shape == (2, S, S)
    assert regions.sum(dim=(1, 2)).tolist() == [40 * 64, 64 * 48]
    assert regions[0, 39, 63] and not regions[0, 40, 0] and not regions[1, 0, 48]
    masks = masks_in_frame(torch.ones(2, 1, S // 4, S // 4), regions)
    assert torch.equal(masks, regions)


def test_oracle_predictor_gets_iou_one_from_the_first_click():
    masks, image_indices, input_sizes = block_masks()
    model = ScriptedModel(masks[:, None].expand(-1, 4, -1, -1))
    ious, pred_ious = click_curve(
        model, EMBEDDINGS, masks, image_indices=image_indices, input_sizes=input_sizes, max_clicks=3
    )
    assert ious.shape == (3, 3) and ious.dtype == torch.float32
    assert (ious > 0.98).all()  # only a few corner pixels are lost to the bilinear upsampling
    exact, image_indices, input_sizes = band_masks()
    ious, _ = click_curve(
        ScriptedModel(exact[:, None].expand(-1, 4, -1, -1)),
        EMBEDDINGS,
        exact,
        image_indices=image_indices,
        input_sizes=input_sizes,
        max_clicks=3,
    )
    assert torch.equal(ious, torch.ones(3, 3))
    assert number_of_clicks(ious, 0.9).tolist() == [1, 1, 1]
    assert torch.equal(pred_ious, torch.full((3,), 0.5))
    assert len(model.calls) == 3 and all(torch.equal(c["image_indices"], image_indices) for c in model.calls)


def test_output_choice_and_mask_feedback():
    """Click 1: the multimask output with the highest predicted IoU (here output 2, the GT);
    later clicks: output 0 (here empty), with the previous chosen low-res logits fed back."""
    masks, image_indices, input_sizes = band_masks()
    outputs = torch.zeros(3, 4, S, S, dtype=torch.bool)
    outputs[:, 1] = True  # everything: tells output 1 apart from output 0
    outputs[:, 2] = masks
    iou_pred = torch.tensor([0.99, 0.1, 0.9, 0.2]).expand(3, 4)  # output 0 is not a candidate at click 1
    model = ScriptedModel(outputs, iou_pred)
    ious, pred_ious = click_curve(
        model, EMBEDDINGS, masks, image_indices=image_indices, input_sizes=input_sizes, max_clicks=3
    )
    assert ious.tolist() == [[1.0, 0.0, 0.0]] * 3
    assert torch.allclose(pred_ious, torch.tensor(0.9))

    first, second, third = model.calls
    assert first["mask_inputs"] is None
    torch.testing.assert_close(second["mask_inputs"], model.low_res[:, 2:3])
    torch.testing.assert_close(third["mask_inputs"], model.low_res[:, 0:1])
    coords, labels = third["points"]
    assert coords.shape == (3, 3, 2) and labels.shape == (3, 3) and labels.dtype == torch.int64
    assert torch.equal(coords[:, :2], second["points"][0]) and torch.equal(coords[:, :1], first["points"][0])
    # positive centre click; perfect mask -> negative background click; empty mask -> positive again
    assert labels.tolist() == [[1, 0, 1]] * 3
    torch.testing.assert_close(coords[:, 2], coords[:, 0])  # same error as before click 1: same centre
    x, y = coords[:, 1].long().unbind(1)
    assert not masks[torch.arange(3), y, x].any()  # in the background ...
    assert valid_regions(input_sizes, S)[image_indices, y, x].all()  # ... of the image, not the padding


def reference_centre(mask: np.ndarray) -> tuple[float, float]:
    """(x, y) of the first row-major maximum of the exact L2 distance transform, mask padded by 1 px."""
    dist = cv2.distanceTransform(np.pad(mask, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    y, x = np.unravel_index(np.argmax(dist[1:-1, 1:-1]), mask.shape)
    return float(x), float(y)


def test_first_click_is_the_distance_transform_centre():
    masks = torch.zeros(2, S, S, dtype=torch.bool)
    masks[0, 10:30, 5:50] = True  # a wide bar with a thick blob hanging below it
    masks[0, 30:45, 30:50] = True
    masks[1, 30:40, 0:64] = True  # touches the image's right edge at w = 48: cut there
    model = ScriptedModel(torch.zeros(2, 4, S, S, dtype=torch.bool))
    input_sizes = torch.tensor([[S, S], [S, 48]])
    click_curve(
        model, EMBEDDINGS, masks, image_indices=torch.tensor([0, 1]), input_sizes=input_sizes, max_clicks=1
    )
    coords, labels = model.calls[0]["points"]
    assert labels.tolist() == [[1], [1]]
    assert tuple(coords[0, 0].tolist()) == reference_centre(masks[0].numpy())
    assert tuple(coords[1, 0].tolist()) == reference_centre(masks[1, :, :48].numpy())
    assert coords[1, 0, 0].item() < 48


def test_padding_does_not_count():
    """A model that predicts everything: the IoU is |GT| / |image region|, not / S^2."""
    masks = torch.zeros(1, S, S, dtype=torch.bool)
    masks[0, 0:20, 0:32] = True
    model = ScriptedModel(torch.ones(1, 4, S, S, dtype=torch.bool))
    ious, _ = click_curve(
        model,
        EMBEDDINGS[:1],
        masks,
        image_indices=torch.tensor([0]),
        input_sizes=torch.tensor([[40, 64]]),
        max_clicks=2,
    )
    torch.testing.assert_close(ious, torch.full((1, 2), 20 * 32 / (40 * 64)))


def test_box_protocol_uses_the_tight_inclusive_box():
    masks, image_indices, input_sizes = block_masks()
    model = BoxModel()
    ious, pred_ious = box_iou(model, EMBEDDINGS, masks, image_indices=image_indices, input_sizes=input_sizes)
    assert model.boxes[0].tolist() == [4.0, 8.0, 19.0, 23.0]
    assert model.boxes[1].tolist() == [32.0, 20.0, 63.0, 39.0]
    # The box model loses the 4 corner pixels of each box to the bilinear upsampling, except where
    # a corner is on the border of the S x S frame (object 1's right side). Object 2 (1648 px) fills
    # its 56 x 32 box but for a notch that holds one of the lost corners.
    assert masks[2].sum() == 1648
    expected = torch.tensor([252 / 256, 638 / 640, (1648 - 3) / (56 * 32 - 1)])
    torch.testing.assert_close(ious, expected)
    assert torch.equal(pred_ious, torch.full((3,), 0.75))


def test_binary_iou():
    a = torch.zeros(3, 4, 4, dtype=torch.bool)
    b = torch.zeros(3, 4, 4, dtype=torch.bool)
    a[0, :2], b[0, 1:3] = True, True  # 4 / 12
    a[1], b[1] = True, True
    assert binary_iou(a, b).tolist() == pytest.approx([1 / 3, 1.0, 0.0])


@pytest.fixture(scope="module")
def tiny_batch():
    torch.manual_seed(0)
    model = build_sam("vit_t", image_size=S).eval()
    image = torch.randn(2, 3, S, S)
    image[0, :, 40:] = 0
    image[1, :, :, 48:] = 0
    masks, image_indices, input_sizes = block_masks()
    batch = {"image": image, "masks": masks, "mask_image_index": image_indices, "input_size": input_sizes}
    return model, batch


def test_evaluation_builds_no_graph(tiny_batch):
    """Called outside ``torch.no_grad`` (a script, not Lightning's validation loop), the protocols
    run without a graph: nothing keeps the encoder's or the decoder's activations."""
    model, batch = tiny_batch
    encoded = []
    hook = model.image_encoder.register_forward_hook(lambda _module, _inputs, out: encoded.append(out))
    try:
        out = evaluate_batch(model, batch, max_clicks=2)
    finally:
        hook.remove()
    assert len(encoded) == 1 and not encoded[0].requires_grad
    assert not any(v.requires_grad for v in out.values())


def test_tiny_model_shapes_and_ranges(tiny_batch):
    model, batch = tiny_batch
    out = evaluate_batch(model, batch, max_clicks=4)
    assert out["ious"].shape == (3, 4)
    for key in ("pred_ious", "box_ious", "box_pred_ious"):
        assert out[key].shape == (3,), key
    for key, value in out.items():
        assert value.dtype == torch.float32 and torch.isfinite(value).all(), key
    assert ((out["ious"] >= 0) & (out["ious"] <= 1)).all()
    assert ((out["box_ious"] >= 0) & (out["box_ious"] <= 1)).all()
    # the protocol is deterministic: a shorter run is a prefix of a longer one
    embeddings = model.image_encoder(batch["image"])
    ious, pred_ious = click_curve(
        model,
        embeddings,
        batch["masks"],
        image_indices=batch["mask_image_index"],
        input_sizes=batch["input_size"],
        max_clicks=2,
    )
    torch.testing.assert_close(ious, out["ious"][:, :2])
    torch.testing.assert_close(pred_ious, out["pred_ious"])


def test_no_objects(tiny_batch):
    model, _ = tiny_batch
    kwargs = dict(image_indices=torch.zeros(0, dtype=torch.int64), input_sizes=torch.tensor([[S, S]]))
    no_masks = torch.zeros(0, S, S, dtype=torch.bool)
    ious, pred_ious = click_curve(model, EMBEDDINGS[:1], no_masks, max_clicks=3, **kwargs)
    assert ious.shape == (0, 3) and pred_ious.shape == (0,)
    assert box_iou(model, EMBEDDINGS[:1], no_masks, **kwargs)[0].shape == (0,)


def test_rejects_masks_of_the_wrong_size():
    model = BoxModel()
    with pytest.raises(ValueError, match="gt_masks"):
        box_iou(
            model,
            EMBEDDINGS,
            torch.zeros(1, 32, 32, dtype=torch.bool),
            image_indices=torch.tensor([0]),
            input_sizes=torch.tensor([[S, S]]),
        )


# ----------------------------------------------------------------------------------------------------------
# the official segment-anything predictor as an oracle for the click protocol

ORACLE_VARIANT, ORACLE_CLICKS = "vit_t", 6
ORACLE_HW = (40, S)  # already at S on its longest side: the official resize is the identity


class RecordingModel:
    """Delegates to a Sam and records the point prompts of every decoder call."""

    def __init__(self, model) -> None:
        self.model, self.image_size, self.points = model, model.image_size, []

    def decode_masks(self, image_embeddings, **kwargs):
        self.points.append(kwargs["points"])
        return self.model.decode_masks(image_embeddings, **kwargs)


def reference_click(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float, int]:
    """The RITM centre click on one (h, w) image with cv2, as (x, y, label)."""

    def dt(region):
        return cv2.distanceTransform(np.pad(region, 1).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)[
            1:-1, 1:-1
        ]

    fn, fp = dt(gt & ~pred), dt(~gt & pred)
    dist, label = (fn, 1) if fn.max() > fp.max() else (fp, 0)
    y, x = np.unravel_index(np.argmax(dist), gt.shape)
    return float(x), float(y), label


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    from tests.oracle import official_and_samtrain, segment_anything

    official, ours = official_and_samtrain(ORACLE_VARIANT, S, tmp_path_factory.mktemp("ckpt"))

    rng = np.random.default_rng(0)
    h, w = ORACLE_HW
    image = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    gt = np.zeros((3, S, S), dtype=bool)
    gt[0, 6:30, 8:30] = True  # a rectangle
    yy, xx = np.mgrid[:S, :S]
    gt[1] = ((yy - 22) / 12) ** 2 + ((xx - 46) / 15) ** 2 <= 1  # an ellipse
    gt[2, 30:40, 20:64] = True  # a bar on the bottom-right corner of the image
    for mask, colour in zip(gt, [(250, 30, 30), (30, 250, 30), (30, 30, 250)], strict=True):
        image[mask[:h, :w]] = colour
    theirs = segment_anything.SamPredictor(official)
    theirs.set_image(image)
    return ours, theirs, image, torch.from_numpy(gt)


def test_click_protocol_matches_the_official_predictor(oracle):
    ours, theirs, image, gt = oracle
    h, w = ORACLE_HW
    assert theirs.input_size == ORACLE_HW and theirs.original_size == ORACLE_HW
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    embeddings = ours.image_encoder(ours.preprocess(pixels))
    recorder = RecordingModel(ours)
    ious, pred_ious = click_curve(
        recorder,
        embeddings,
        gt,
        image_indices=torch.zeros(3, dtype=torch.int64),
        input_sizes=torch.tensor([ORACLE_HW]),
        max_clicks=ORACLE_CLICKS,
    )
    coords, labels = (t.numpy() for t in recorder.points[-1])
    assert coords.shape == (3, ORACLE_CLICKS, 2)

    for i in range(3):
        truth = gt[i, :h, :w].numpy()
        mask_input, pred = None, np.zeros_like(truth)
        for k in range(ORACLE_CLICKS):
            # our k-th click is the RITM centre click of the official prediction after k - 1 clicks
            assert reference_click(truth, pred) == (*coords[i, k], labels[i, k]), (i, k)
            masks, scores, low_res = theirs.predict(
                point_coords=coords[i, : k + 1],
                point_labels=labels[i, : k + 1],
                mask_input=mask_input,
                multimask_output=k == 0,
            )
            chosen = int(np.argmax(scores)) if k == 0 else 0
            if k == 0:
                assert pred_ious[i].item() == pytest.approx(float(scores[chosen]), abs=1e-3)
            pred, mask_input = masks[chosen], low_res[chosen : chosen + 1]
            ref_iou = (pred & truth).sum() / max((pred | truth).sum(), 1)
            assert ious[i, k].item() == pytest.approx(ref_iou, abs=1e-3), (i, k)
    assert ious.std() > 0.01  # the curves are not trivially constant


def test_box_protocol_matches_the_official_predictor(oracle):
    ours, theirs, image, gt = oracle
    h, w = ORACLE_HW
    pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    embeddings = ours.image_encoder(ours.preprocess(pixels))
    ious, pred_ious = box_iou(
        ours,
        embeddings,
        gt,
        image_indices=torch.zeros(3, dtype=torch.int64),
        input_sizes=torch.tensor([ORACLE_HW]),
    )
    for i in range(3):
        truth = gt[i, :h, :w].numpy()
        ys, xs = np.nonzero(truth)
        box = np.array([xs.min(), ys.min(), xs.max(), ys.max()], dtype=np.float64)
        masks, scores, _ = theirs.predict(box=box, multimask_output=False)
        ref_iou = (masks[0] & truth).sum() / max((masks[0] | truth).sum(), 1)
        assert ious[i].item() == pytest.approx(ref_iou, abs=1e-3), i
        assert pred_ious[i].item() == pytest.approx(float(scores[0]), abs=1e-3), i


# ----------------------------------------------------------------------------------------------------------
# The RITM protocol at the original resolution, against an implementation written here from its rules:
# GT and predictions at the image's size; click 1 positive at the first maximum of the distance transform of
# the object padded by 1 px; then the maximum over the larger of the FN / FP distance maps, clicked pixels
# counting 0, positive when the FN maximum is larger; foreground where sigmoid(logit) > 0.49; SAM's output
# choice (click 1: the multimask output of highest predicted IoU; later: output 0; chosen logits fed back).

from scipy.ndimage import distance_transform_edt  # noqa: E402
from torch import nn  # noqa: E402

from samtrain.interactive.metrics import ritm_failures  # noqa: E402
from samtrain.interactive.protocols import (  # noqa: E402
    ImagePrompts,
    evaluate_sample,
    ritm_click_protocol,
)

LOW = S // 4


def reference_to_original(low: torch.Tensor, original: tuple[int, int]) -> torch.Tensor:
    """(C, S/4, S/4) logits -> (C, H, W): upsample to S, crop the resized image, resize to H x W."""
    height, width = original
    scale = S / max(height, width)
    h, w = int(height * scale + 0.5), int(width * scale + 0.5)
    up = F.interpolate(low[None].float(), size=(S, S), mode="bilinear", align_corners=False)[0, :, :h, :w]
    return F.interpolate(up[None], size=(height, width), mode="bilinear", align_corners=False)[0]


def reference_protocol(predict, gt: np.ndarray, clicks: int, ignore: np.ndarray | None = None):
    """One object. ``predict(t, coords, labels, mask_input, multimask) -> (logits (C, H, W) at the
    original size, scores (C,), low-res (C, S/4, S/4))``. Returns clicks [(x, y, label)], IoUs.
    ``ignore`` pixels are neither error nor part of the IoU."""
    keep = np.ones_like(gt) if ignore is None else ~ignore
    clicked = np.zeros_like(gt)
    pred = np.zeros_like(gt)
    coords, labels, ious, mask_input = [], [], [], None
    for t in range(clicks):
        errors = (gt & ~pred & keep, ~gt & pred & keep)
        dist = [distance_transform_edt(np.pad(r, 1))[1:-1, 1:-1] for r in errors]
        for d in dist:
            d[clicked] = 0
        positive = dist[0].max() > dist[1].max()
        d = dist[0] if positive else dist[1]
        row, col = np.argwhere(d == d.max())[0]
        clicked[row, col] = True
        coords.append((col, row))
        labels.append(int(positive))
        logits, scores, low = predict(t, np.array(coords), np.array(labels), mask_input, t == 0)
        chosen = int(np.argmax(scores)) if t == 0 else 0
        pred = np.asarray(torch.sigmoid(torch.as_tensor(logits[chosen])) > 0.49)
        mask_input = low[chosen : chosen + 1]
        ious.append((pred & gt & keep).sum() / ((pred | gt) & keep).sum())
    return list(zip(coords, labels, strict=True)), np.array(ious)


def reference_scores(ious: np.ndarray, clicks: int) -> dict:
    """NoC@85/90 (K when never reached), NoF@90 (NoC == K), mIoU@1, @K over objects ``ious (N, K)``."""

    def noc(curve, t):
        hits = [k + 1 for k in range(clicks) if curve[k] >= t]
        return hits[0] if hits else clicks

    nocs = {t: [noc(c, t) for c in ious] for t in (0.85, 0.9)}
    return {
        "NoC@85": np.mean(nocs[0.85]),
        "NoC@90": np.mean(nocs[0.9]),
        "NoF@90": sum(n == clicks for n in nocs[0.9]),
        "mIoU@1": ious[:, 0].mean(),
        "mIoU@K": ious[:, -1].mean(),
    }


class ScriptedSam(nn.Module):
    """Sam's interface with scripted outputs: after t + 1 clicks object i gets the low-res logits
    ``logits[t, i]`` (4, S/4, S/4) and IoU predictions ``iou_pred[t, i]`` (4,); a table with one
    object row is every object's. Records each decoder call."""

    image_size = S

    def __init__(self, logits: torch.Tensor, iou_pred: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(()))
        self.logits, self.iou_pred, self.calls = logits, iou_pred, []

    def preprocess(self, x):
        return F.pad(x, (0, S - x.shape[-1], 0, S - x.shape[-2]))

    def transform_image(self, image):  # SAM's frame
        return torch.from_numpy(np.array(resize_longest_side(image, S))).permute(2, 0, 1)[None]

    def transformed_input_size(self, image, original_size):
        return tuple(image.shape[-2:])

    def transform_coords(self, coords, original_size):
        return scale_coords(coords, original_size, S)

    def postprocess_masks(self, masks, input_size, original_size):
        return logits_at_original_size(masks, S, input_size, original_size)

    def image_encoder(self, x):
        return torch.zeros(x.shape[0], 256, S // 16, S // 16)

    def decode_masks(
        self, image_embeddings, *, points=None, boxes=None, mask_inputs=None, image_indices=None
    ):
        n = (points[0] if points is not None else boxes).shape[0]
        t = 0 if points is None else points[0].shape[1] - 1
        self.calls.append(dict(points=points, boxes=boxes, mask_inputs=mask_inputs))
        return self.logits[t].expand(n, -1, -1, -1).clone(), self.iou_pred[t].expand(n, -1).clone()

    def scripted(self, i: int):
        """The predict function of :func:`reference_protocol` for object i, at original size ``hw``."""

        def predict(t, coords, labels, mask_input, multimask):
            row = i if self.logits.shape[1] > 1 else 0
            low, scores = self.logits[t, row], self.iou_pred[t, row]
            keep = slice(1, 4) if multimask else slice(0, 1)
            return reference_to_original(low[keep], self.hw), scores[keep].numpy(), low[keep]

        return predict


def smooth_logits(gen: torch.Generator, clicks: int, objects: int, scale: float = 3.0) -> torch.Tensor:
    """(K, N, 4, S/4, S/4) random logits that change with every click."""
    coarse = torch.randn(clicks, objects * 4, 1, 6, 6, generator=gen) * scale
    fine = F.interpolate(coarse.flatten(0, 1), size=(LOW, LOW), mode="bilinear", align_corners=False)
    return fine.reshape(clicks, objects, 4, LOW, LOW)


def objects_for(hw: tuple[int, int]) -> np.ndarray:
    """Three objects at the original size: an ellipse, a 2-px-wide bar, one over 90% of the image."""
    height, width = hw
    yy, xx = np.mgrid[:height, :width]
    gt = np.zeros((3, height, width), dtype=bool)
    gt[0] = ((yy - height / 3) / (height / 4)) ** 2 + ((xx - width / 2) / (width / 4)) ** 2 <= 1
    gt[1, 3 : height - 3, width // 3 : width // 3 + 2] = True  # vanishes when resized to the model
    gt[2] = True
    gt[2, :2, :3] = False
    assert gt[2].mean() > 0.9
    return gt


def run_scripted(model: ScriptedSam, gt: np.ndarray, clicks: int, **kwargs):
    prompts = ImagePrompts(
        model=model,
        image_embedding=torch.zeros(1, 256, S // 16, S // 16),
        input_size=tuple(int(x * S / max(gt.shape[1:]) + 0.5) for x in gt.shape[1:]),
        original_size=gt.shape[1:],
    )
    return ritm_click_protocol(prompts, torch.from_numpy(gt), max_clicks=clicks, **kwargs)


def assert_matches_reference(model: ScriptedSam, gt: np.ndarray, out, clicks: int) -> np.ndarray:
    model.hw = gt.shape[1:]
    ref_ious = []
    for i in range(len(gt)):
        ref_clicks, ious = reference_protocol(model.scripted(i), gt[i], clicks)
        ours = [
            ((int(x), int(y)), int(lab)) for (x, y), lab in zip(out.coords[i], out.labels[i], strict=True)
        ]
        assert ours == [((int(x), int(y)), lab) for (x, y), lab in ref_clicks], i
        np.testing.assert_allclose(out.ious[i], ious, atol=1e-12)
        ref_ious.append(ious)
    ref_ious = np.stack(ref_ious)
    scores = reference_scores(ref_ious, clicks)
    curves = torch.from_numpy(out.ious)
    assert number_of_clicks(curves, 0.85).double().mean().item() == pytest.approx(scores["NoC@85"])
    assert number_of_clicks(curves, 0.9).double().mean().item() == pytest.approx(scores["NoC@90"])
    assert int(ritm_failures(curves, 0.9).sum()) == scores["NoF@90"]
    assert out.ious[:, 0].mean() == pytest.approx(scores["mIoU@1"])
    assert out.ious[:, -1].mean() == pytest.approx(scores["mIoU@K"])
    return ref_ious


@pytest.mark.parametrize("hw", [(50, 37), (90, 130)])
def test_ritm_protocol_matches_the_rules_on_images_of_other_sizes(hw):
    clicks = 8
    gen = torch.Generator().manual_seed(hw[0])
    model = ScriptedSam(smooth_logits(gen, clicks, 3), torch.rand(clicks, 3, 4, generator=gen))
    gt = objects_for(hw)
    out = run_scripted(model, gt, clicks)
    ious = assert_matches_reference(model, gt, out, clicks)
    assert ious.std() > 0.05  # the curves are not trivially constant
    assert out.labels[:, 0].tolist() == [1, 1, 1]
    # the prompts the model got: the clicks scaled to its input frame, the chosen logits fed back
    last = model.calls[-1]
    scale = S / max(hw)
    sx, sy = int(hw[1] * scale + 0.5) / hw[1], int(hw[0] * scale + 0.5) / hw[0]
    np.testing.assert_allclose(last["points"][0][..., 0].numpy(), out.coords[..., 0] * sx, rtol=1e-6)
    np.testing.assert_allclose(last["points"][0][..., 1].numpy(), out.coords[..., 1] * sy, rtol=1e-6)
    first_choice = model.iou_pred[0, :, 1:].argmax(dim=1) + 1
    assert torch.equal(model.calls[1]["mask_inputs"][:, 0], model.logits[0, torch.arange(3), first_choice])
    assert torch.equal(last["mask_inputs"][:, 0], model.logits[clicks - 2, :, 0])
    assert model.calls[0]["mask_inputs"] is None


def test_a_model_that_ignores_clicks_never_gets_a_pixel_twice():
    clicks = 12
    gen = torch.Generator().manual_seed(1)
    fixed = smooth_logits(gen, 1, 3).expand(clicks, -1, -1, -1, -1)
    model = ScriptedSam(fixed, torch.rand(1, 3, 4, generator=gen).expand(clicks, -1, -1))
    gt = objects_for((61, 45))
    out = run_scripted(model, gt, clicks)
    assert_matches_reference(model, gt, out, clicks)
    for i in range(3):
        pixels = {tuple(p) for p in out.coords[i].tolist()}
        assert len(pixels) == clicks, i


def test_logits_just_below_zero_are_foreground_at_probability_049():
    """Logit -0.02 is probability 0.495: foreground under RITM's rule, background at logit 0."""
    hw = (40, 56)
    logits = torch.full((2, 1, 4, LOW, LOW), -6.0)
    logits[:, :, :, 2:9, 3:12] = -0.02
    model = ScriptedSam(logits, torch.tensor([0.1, 0.9, 0.2, 0.3]).expand(2, 1, 4))
    gt = np.zeros((1, *hw), dtype=bool)
    gt[0, 8:30, 10:45] = True
    out = run_scripted(model, gt, 2)
    assert_matches_reference(model, gt, out, 2)
    assert out.ious[0, 0] > 0.5
    assert run_scripted(model, gt, 2, threshold=0.5).ious[0, 0] == 0.0


def test_every_object_of_an_image_is_scored_in_passes():
    """70 objects (more than the training transform's 64), in passes of a few objects each."""
    clicks, hw = 3, (48, 70)
    gen = torch.Generator().manual_seed(2)
    model = ScriptedSam(smooth_logits(gen, clicks, 1), torch.rand(clicks, 1, 4, generator=gen))
    gt = np.zeros((70, *hw), dtype=bool)
    for i in range(70):
        r, c = divmod(i, 10)
        gt[i, r * 6 : r * 6 + 5, c * 7 : c * 7 + 6] = True
    image = np.zeros((*hw, 3), dtype=np.uint8)
    result = evaluate_sample(model, image, gt, max_clicks=clicks, max_pixels_per_pass=8 * hw[0] * hw[1])
    assert result.clicks.ious.shape == (70, clicks) and result.box_ious.shape == (70,)
    assert sum(c["points"] is not None for c in model.calls) == 9 * clicks  # ceil(70 / 8) passes
    assert_matches_reference(model, gt, result.clicks, clicks)


def test_oracle_and_single_output_choices():
    clicks, hw = 3, (50, 37)
    gen = torch.Generator().manual_seed(3)
    model = ScriptedSam(smooth_logits(gen, clicks, 3), torch.rand(clicks, 3, 4, generator=gen))
    gt = objects_for(hw)
    oracle = run_scripted(model, gt, clicks, output_choice="oracle")
    multi = (
        torch.stack([reference_to_original(model.logits[0, i, 1:], hw) for i in range(3)]).sigmoid() > 0.49
    )
    best = [
        max(((m & g).sum() / (m | g).sum()).item() for m in ms)
        for ms, g in zip(multi, torch.from_numpy(gt), strict=True)
    ]
    np.testing.assert_allclose(oracle.ious[:, 0], best)
    np.testing.assert_allclose(oracle.oracle_iou, best)
    single = run_scripted(model, gt, clicks, output_choice="single", mask_feedback=False)
    first = reference_to_original(model.logits[0, 0, :1], hw)[0].sigmoid() > 0.49
    g = torch.from_numpy(gt[0])
    assert single.ious[0, 0] == pytest.approx(((first & g).sum() / (first | g).sum()).item())
    assert all(c["mask_inputs"] is None for c in model.calls[-clicks:])


def test_ritm_protocol_matches_the_official_predictor_at_another_size(oracle):
    """An official-format checkpoint: samtrain's protocol and the official SamPredictor driven through
    the reference protocol give the same clicks and IoUs per click (to 1e-5) on a 45 x 70 image."""
    ours, theirs, _, _ = oracle
    hw, clicks = (45, 70), 5
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, size=(*hw, 3), dtype=np.uint8)
    gt = objects_for(hw)
    for mask, colour in zip(gt[:2], [(250, 30, 30), (30, 250, 30)], strict=True):
        image[mask] = colour
    result = evaluate_sample(ours, image, gt, max_clicks=clicks)
    theirs.set_image(image)  # the module's other tests are done with the fixture's image

    def official_predict(t, coords, labels, mask_input, multimask):
        logits, scores, low = theirs.predict(
            point_coords=coords.astype(np.float64),
            point_labels=labels,
            mask_input=mask_input,
            multimask_output=multimask,
            return_logits=True,
        )
        return logits, scores, low

    for i in range(len(gt)):
        ref_clicks, ref_ious = reference_protocol(official_predict, gt[i], clicks)
        ours_clicks = [
            ((int(x), int(y)), int(lab))
            for (x, y), lab in zip(result.clicks.coords[i], result.clicks.labels[i], strict=True)
        ]
        assert ours_clicks == [((int(x), int(y)), lab) for (x, y), lab in ref_clicks], i
        np.testing.assert_allclose(result.clicks.ious[i], ref_ious, atol=1e-5)
    assert result.clicks.ious.std() > 0.01


def test_ignored_pixels_are_neither_clicked_nor_scored():
    """GrabCut's unsure band: no click lands there and the IoU leaves it out."""
    clicks, hw = 6, (52, 41)
    gen = torch.Generator().manual_seed(4)
    model = ScriptedSam(smooth_logits(gen, clicks, 1), torch.rand(clicks, 1, 4, generator=gen))
    model.hw = hw
    gt = objects_for(hw)[:1]
    ignore = gt ^ np.roll(gt, 2, axis=1)  # a band along the object's left and right edges
    out = run_scripted(model, gt, clicks, ignore=torch.from_numpy(ignore))
    ref_clicks, ref_ious = reference_protocol(model.scripted(0), gt[0], clicks, ignore=ignore[0])
    assert [tuple(map(int, c)) for c in out.coords[0]] == [tuple(map(int, xy)) for xy, _ in ref_clicks]
    np.testing.assert_allclose(out.ious[0], ref_ious, atol=1e-12)
    assert not any(ignore[0, y, x] for x, y in out.coords[0])


def test_ground_truth_boxes_reach_the_model_in_its_frame():
    """A benchmark's own boxes (COCO's bbox) replace the masks' tight boxes, scaled as the predictor scales."""
    hw = (50, 80)
    model = ScriptedSam(torch.zeros(1, 1, 4, LOW, LOW), torch.zeros(1, 1, 4))
    gt = objects_for(hw)[:2]
    boxes = np.array([[3.5, 4.0, 40.0, 30.0], [10.0, 2.0, 79.0, 49.5]])
    evaluate_sample(model, np.zeros((*hw, 3), np.uint8), gt, boxes=boxes, max_clicks=1)
    (call,) = [c for c in model.calls if c["boxes"] is not None]
    np.testing.assert_allclose(call["boxes"].numpy(), boxes * S / 80, rtol=1e-6)  # 80 -> 64, 50 -> 40
    evaluate_sample(model, np.zeros((*hw, 3), np.uint8), gt, max_clicks=1)
    tight = [c for c in model.calls if c["boxes"] is not None][-1]["boxes"].numpy()
    ys, xs = np.nonzero(gt[1])
    np.testing.assert_allclose(
        tight[1], np.array([xs.min(), ys.min(), xs.max(), ys.max()]) * S / 80, rtol=1e-6
    )


def test_a_models_low_res_clamp_reaches_the_feedback_not_the_masks():
    """SAM 2's predictor clamps the low-res logits it returns (and a user feeds back) to +-32 but
    makes its masks from the unclamped ones: so does the protocol. Scripted outputs ignore the mask
    prompt, so clamping must change no IoU; with clamped masks, large logits would move boundaries."""
    clicks, hw = 4, (45, 70)
    gen = torch.Generator().manual_seed(5)
    logits, iou_pred = smooth_logits(gen, clicks, 3, scale=40.0), torch.rand(clicks, 3, 4, generator=gen)
    gt = objects_for(hw)
    plain = run_scripted(ScriptedSam(logits, iou_pred), gt, clicks)
    clamped_model = ScriptedSam(logits, iou_pred)
    clamped_model.low_res_clamp = 2.0
    clamped = run_scripted(clamped_model, gt, clicks)
    np.testing.assert_array_equal(clamped.ious, plain.ious)
    fed_back = [c["mask_inputs"] for c in clamped_model.calls if c["mask_inputs"] is not None]
    assert fed_back and all(m.abs().max() <= 2.0 for m in fed_back)
    assert logits.abs().max() > 2.0
