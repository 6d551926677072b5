"""samtrain's SAM 2.1 training step against the official sam2 modules: `python -m bench.official_sam2 [--help]`.

Both models carry identical weights: the official ``SAM2Base``, built from sam2's own config with
samtrain's trunk spec and randomised, saved as an official checkpoint and loaded into samtrain's
``Sam2`` (``tests.models.sam2.oracle.official_and_samtrain``). The two sides take turns in every
timing round. Two measurements:

1. encoder forward (no grad) on B images: samtrain's ``image_encoder``; the official
   ``forward_image`` (trunk, neck, ``conv_s0`` / ``conv_s1``) and the top level plus ``no_mem_embed``,
   as ``SAM2Base._prepare_backbone_features`` and ``_track_step`` give them to the SAM heads on an
   initial conditioning frame;
2. the full training step of SAM 2.1's recipe (``conf/prompts/sam2.yaml``, ``conf/model/loss/sam2.yaml``):
   encoder, a point or a padded box for every mask, 7 corrective clicks with mask feedback, the
   loss on every output upsampled to the input with object scores, passes summed, backward, AdamW
   step. samtrain's side is ``SamModule.interactive_loss`` over ``Sam2.decode_masks(...,
   return_object_scores=True)``: every mask of the batch in one call. The official side is
   ``simulate_interaction`` with :class:`OfficialSam2Decoder`: per image, ``sam_prompt_encoder``
   then ``sam_mask_decoder.predict_masks`` (all four outputs and the object-score logits, as
   ``_forward_sam_heads`` calls them before it picks outputs). Both sides use samtrain's prompt
   sampler and loss with the same generators, so they draw the same prompts and only the model
   path differs: the first step's loss is the same on both sides.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate

from bench.common import synthetic_batch
from bench.mae import time_steps
from samtrain.frame import valid_regions
from samtrain.interactive.simulate import LossWeights, PromptRecipe, Prompts, simulate_interaction
from samtrain.lightning.sam_module import SamModule
from samtrain.models.sam.prompt_encoder import PADDING

SIDES = ("official", "samtrain")
CONF = Path(__file__).resolve().parents[1] / "conf"
VARIANTS = ("sam2.1_hiera_n", "sam2.1_hiera_t", "sam2.1_hiera_s", "sam2.1_hiera_b+", "sam2.1_hiera_l")


@dataclass
class Config:
    variant: str = "sam2.1_hiera_t"
    image_size: int = 256
    images: int = 1
    masks: int = 8
    repeats: int = 2
    warmup: int = 1
    threads: int | None = None  # torch's intra-op threads (None: torch's default; run() records the count)
    lr: float = 1e-5


@dataclass
class Results:
    config: Config
    encoder_s: dict[str, float]
    step_s: dict[str, float]
    losses: dict[str, float]  # each side's first step


def sam2_recipe() -> tuple[PromptRecipe, LossWeights]:
    """SAM 2.1's prompt recipe and loss weights, composed from conf/prompts/sam2.yaml and
    conf/model/loss/sam2.yaml (each over its SAM default)."""
    previous = GlobalHydra.instance().hydra if GlobalHydra.instance().is_initialized() else None
    GlobalHydra.instance().clear()  # sam2 initialises its own config module at import
    try:
        with initialize_config_dir(str(CONF), version_base="1.3", job_name="bench_official_sam2"):
            prompts = compose("prompts/sam2")
            loss = compose("model/loss/sam2")
    finally:
        GlobalHydra.instance().clear()
        if previous is not None:
            GlobalHydra.instance().initialize(previous)
    return instantiate(prompts.prompts), instantiate(loss.model.loss)


def load_oracle():
    """``tests.models.sam2.oracle.official_and_samtrain`` (the official sam2 package is a test dependency)."""
    try:
        from tests.models.sam2.oracle import official_and_samtrain
    except BaseException as err:  # pytest.importorskip raises a BaseException when it is missing
        raise SystemExit(
            f"bench.official_sam2 needs the official sam2 package ({err}); "
            "install it as the test extras do: SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2"
        ) from None
    return official_and_samtrain


def build_pair(variant: str, image_size: int, seed: int = 0):
    """(official SAM2Base, samtrain Sam2) with identical random weights, in training mode."""
    official_and_samtrain = load_oracle()
    with tempfile.TemporaryDirectory() as tmp:
        official, _, ours = official_and_samtrain(variant, image_size, Path(tmp), seed=seed)
    return official.train(), ours.train()


# ---------------------------------------------------------------------------------------------- official side


def official_features(model: torch.nn.Module, images: torch.Tensor):
    """What the official SAM heads read of an initial conditioning frame: the top level with
    ``no_mem_embed`` (B, C, S/16, S/16) and the high-resolution levels [(B, C/8, S/4, S/4),
    (B, C/4, S/8, S/8)] after ``conv_s0`` / ``conv_s1``."""
    _, feats, _, sizes = model._prepare_backbone_features(model.forward_image(images))
    high_res = [
        x.permute(1, 2, 0).view(x.size(1), x.size(2), *s) for x, s in zip(feats[:-1], sizes[:-1], strict=True)
    ]
    top = (feats[-1] + model.no_mem_embed).permute(1, 2, 0).view(-1, model.hidden_dim, *sizes[-1])
    return top, high_res


def without_padding(prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor]:
    """coords (N, T - 1, 2) and labels (N, T - 1) without samtrain's padding token: the official
    prompt encoder appends its own (at the end; token order does not change the decoder's outputs)."""
    padding = prompts.labels == PADDING
    column = padding.all(0)
    if int(column.sum()) != 1 or padding.sum() != padding[:, column].sum():
        raise ValueError(
            "OfficialSam2Decoder needs one padding token in the same place for every mask "
            "(SAM 2's recipe: choice_scope=step and pad_boxes=true)"
        )
    keep = ~column
    return prompts.coords[:, keep], prompts.labels[:, keep]


class OfficialSam2Decoder:
    """The decode callable of ``simulate_interaction`` through the official sam2 modules: per image,
    ``sam_prompt_encoder(points, masks)`` then ``sam_mask_decoder.predict_masks`` on that image's
    features, repeated for each of its masks -> (logits (N, 4, S/4, S/4), IoU (N, 4), object-score
    logits (N, 1)) in the masks' order."""

    def __init__(self, model: torch.nn.Module, features, image_indices: torch.Tensor) -> None:
        self.model = model
        self.top, self.high_res = features
        self.per_image = [torch.nonzero(image_indices == i).flatten() for i in range(len(self.top))]
        order = torch.cat(self.per_image)
        self.inverse = torch.empty_like(order)
        self.inverse[order] = torch.arange(len(order), device=order.device)

    def __call__(self, prompts: Prompts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        model = self.model
        coords, labels = without_padding(prompts)
        image_pe = model.sam_prompt_encoder.get_dense_pe()
        outputs = []
        for image, index in enumerate(self.per_image):
            if not len(index):
                continue
            masks = None if prompts.mask_input is None else prompts.mask_input[index]
            sparse, dense = model.sam_prompt_encoder(
                points=(coords[index], labels[index].int()), boxes=None, masks=masks
            )
            logits, iou, _, object_scores = model.sam_mask_decoder.predict_masks(
                image_embeddings=self.top[image : image + 1],
                image_pe=image_pe,
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                repeat_image=True,
                high_res_features=[level[image : image + 1] for level in self.high_res],
            )
            outputs.append((logits, iou, object_scores))
        return tuple(torch.cat(parts)[self.inverse] for parts in zip(*outputs, strict=True))


def official_loss(model, batch: dict, recipe: PromptRecipe, weights: LossWeights) -> torch.Tensor:
    """SAM 2.1's recipe (``simulate_interaction``) through the official modules, with the arguments
    ``SamModule.interactive_loss`` passes for this batch at step 0."""
    image_indices = batch["mask_image_index"]
    features = official_features(model, batch["image"])
    return simulate_interaction(
        OfficialSam2Decoder(model, features, image_indices),
        batch["masks"],
        valid=valid_regions(batch["input_size"], model.image_size)[image_indices],
        mask_keys=SamModule.batch_mask_keys(batch),
        seed=0,
        step=0,
        recipe=recipe,
        loss_weights=weights,
        num_masks=float(max(batch["masks"].shape[0], 1)),
    ).loss


# ---------------------------------------------------------------------------------------------- steps


class StepRunner:
    """One side's full training step: the interaction's loss, backward, AdamW step."""

    def __init__(self, side: str, net, batch: dict, recipe: PromptRecipe, weights: LossWeights, lr: float):
        self.side, self.net, self.batch = side, net, batch
        self.recipe, self.weights = recipe, weights
        self.module = (
            None
            if side == "official"
            else SamModule(
                net=net, optimizer=functools.partial(torch.optim.AdamW), prompts=recipe, loss=weights
            )
        )
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=lr)
        self.losses: list[float] = []

    def __call__(self) -> None:
        if self.module is None:
            loss = official_loss(self.net, self.batch, self.recipe, self.weights)
        else:
            loss, _ = self.module.interactive_loss(self.batch)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(loss.item())


def encoder_forward(side: str, net, images: torch.Tensor) -> None:
    with torch.no_grad():
        official_features(net, images) if side == "official" else net.image_encoder(images)


def run(cfg: Config) -> Results:
    cfg.threads = torch.get_num_threads()
    recipe, weights = sam2_recipe()
    nets = dict(zip(SIDES, build_pair(cfg.variant, cfg.image_size), strict=True))
    batch = synthetic_batch(cfg.images, cfg.masks, cfg.image_size)
    encoder_s = time_steps(
        {side: functools.partial(encoder_forward, side, net, batch["image"]) for side, net in nets.items()},
        warmup=cfg.warmup,
        iters=cfg.repeats,
    )
    runners = {side: StepRunner(side, net, batch, recipe, weights, cfg.lr) for side, net in nets.items()}
    step_s = time_steps(runners, warmup=cfg.warmup, iters=cfg.repeats)
    return Results(
        config=cfg, encoder_s=encoder_s, step_s=step_s, losses={s: r.losses[0] for s, r in runners.items()}
    )


def report(r: Results) -> str:
    cfg = r.config
    o, s = SIDES
    lines = [
        f"SAM 2.1 {cfg.variant} at {cfg.image_size} px, CPU, {cfg.threads} thread(s), "
        f"{cfg.images} image(s) x {cfg.masks} masks, median of {cfg.repeats} round(s) after {cfg.warmup} warm-up",
        "",
        "| | official sam2 | samtrain | speed-up |",
        "|---|---:|---:|---:|",
        f"| encoder forward (s) | {r.encoder_s[o]:.3f} | {r.encoder_s[s]:.3f} | {r.encoder_s[o] / r.encoder_s[s]:.2f}x |",
        f"| full training step (s) | {r.step_s[o]:.3f} | {r.step_s[s]:.3f} | {r.step_s[o] / r.step_s[s]:.2f}x |",
        f"| first step's loss | {r.losses[o]:.6f} | {r.losses[s]:.6f} | |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> Config:
    parser = argparse.ArgumentParser(
        prog="python -m bench.official_sam2",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--variant", default="sam2.1_hiera_t", choices=VARIANTS)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--images", type=int, default=1, help="images per batch")
    parser.add_argument("--masks", type=int, default=8, help="masks per image")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (each side once per round)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (on a shared CPU, 1 keeps other jobs from stalling both sides)",
    )
    a = parser.parse_args(argv)
    return Config(
        variant=a.variant,
        image_size=a.image_size,
        images=a.images,
        masks=a.masks,
        repeats=a.repeats,
        warmup=a.warmup,
        threads=a.threads,
    )


def main(argv: list[str] | None = None) -> Results:
    cfg = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads or threads)
    start = time.perf_counter()
    try:
        results = run(cfg)
    finally:
        torch.set_num_threads(threads)
    print(report(results))
    o, s = SIDES
    if abs(results.losses[o] - results.losses[s]) > 1e-4 * abs(results.losses[o]):
        raise SystemExit(
            f"the first losses differ: official {results.losses[o]}, samtrain {results.losses[s]}"
        )
    print(f"\n(benchmark wall time {time.perf_counter() - start:.0f} s; config {asdict(cfg)})", flush=True)
    return results


if __name__ == "__main__":
    main()
