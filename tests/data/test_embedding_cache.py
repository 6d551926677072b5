"""Cached-embedding mode: cached items and steps equal the plain ones; the cache is reused while its
key holds and rebuilt when the encoder, the image size, the preprocessing or the files change."""

from __future__ import annotations

import functools
import json
import pickle
from types import SimpleNamespace

import pytest
import torch

from samtrain.commands.train import train
from samtrain.data import CocoInstanceDataset, SamTransform, collate_sam_batch
from samtrain.data.datamodule import SamDataModule
from samtrain.data.embedding_cache import CachedEmbeddingDataset, ensure_embedding_cache
from samtrain.data.errors import SampleError, SkipBadSamples
from samtrain.interactive.protocols import evaluate_batch
from samtrain.interactive.simulate import PromptRecipe
from samtrain.lightning.callbacks.embedding_cache import EmbeddingCache, check_frozen_encoder
from samtrain.lightning.sam_module import SamModule
from samtrain.models import build_sam
from tests.conftest import ROOT

SAMPLE = ROOT / "data" / "sample" / "val"


def sample_dataset(image_size: int = 64, **transform_kwargs) -> CocoInstanceDataset:
    transform = SamTransform(image_size=image_size, train=False, max_masks=2, **transform_kwargs)
    return CocoInstanceDataset(
        annotation_file=SAMPLE / "annotations.json", image_dir=SAMPLE, transform=transform
    )


def tiny_net(image_size: int = 64, seed: int = 0):
    torch.manual_seed(seed)
    return build_sam("vit_t", image_size=image_size)


class EncoderCalls:
    """Counts the image encoder's forward calls."""

    def __init__(self, net) -> None:
        self.count = 0
        net.image_encoder.register_forward_hook(self.hook)

    def hook(self, *args) -> None:
        self.count += 1


def cached(dataset, net, folder, dtype="float32") -> CachedEmbeddingDataset:
    ensure_embedding_cache(dataset, net, folder, dtype=dtype, batch_size=4)
    return CachedEmbeddingDataset(folder, source=dataset)


@pytest.fixture(scope="module")
def fp32_cache(tmp_path_factory):
    net, dataset = tiny_net(), sample_dataset()
    return net, dataset, cached(dataset, net, tmp_path_factory.mktemp("cache32"))


def test_cached_items_match_the_dataset(fp32_cache):
    net, dataset, cache = fp32_cache
    assert len(cache) == len(dataset)
    for i in (0, 5):
        plain, item = dataset[i], cache[i]
        assert "image" not in item
        assert torch.equal(item["masks"], plain["masks"]) and item["masks"].dtype == torch.bool
        for key in ("input_size", "original_size"):
            assert torch.equal(item[key], plain[key])
        assert item["image_id"] == plain["image_id"]
        with torch.no_grad():
            expected = net.eval().image_encoder(plain["image"][None])[0]
        assert item["image_embedding"].dtype == torch.float32
        torch.testing.assert_close(item["image_embedding"], expected, atol=1e-5, rtol=1e-5)


def step(module, batch):
    """Loss and the gradients of every trainable parameter after one training step's backward."""
    module.zero_grad(set_to_none=True)
    loss, _ = module.interactive_loss(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def flat(grads: dict) -> torch.Tensor:
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


def trainer_of(net, **recipe) -> SamModule:
    module = SamModule(
        net=net,
        optimizer=functools.partial(torch.optim.AdamW),
        freeze=["image_encoder"],
        prompts=PromptRecipe(**recipe),
    )
    return module.train()


def test_cached_step_matches_plain_step(fp32_cache):
    """A float32 cache gives the plain step's loss and gradients, click passes included."""
    net, dataset, cache = fp32_cache
    module = trainer_of(net, num_click_passes=2, num_mask_only_passes=1)
    items = [0, 1, 2]
    plain_loss, plain_grads = step(module, collate_sam_batch([dataset[i] for i in items]))
    cached_batch = collate_sam_batch([cache[i] for i in items])
    assert "image" not in cached_batch and cached_batch["image_embedding"].shape == (3, 256, 4, 4)
    cached_loss, cached_grads = step(module, cached_batch)
    assert plain_grads.keys() == cached_grads.keys()
    assert any(n.startswith("net.mask_decoder") for n in cached_grads)
    assert not any(n.startswith("net.image_encoder") for n in cached_grads)
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-6, rtol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_float16_cache_is_close(tmp_path, fp32_cache):
    """What README.md states: float16 rounds the embeddings to about 2e-4 relative (RMS; measured
    2.1e-4), and a first pass's loss agrees with the plain step's to 1e-5 relative (measured 1e-6).
    Compared on the first pass alone: later passes click where the previous mask was wrong, and a
    pixel at the threshold can move a click."""
    net, dataset, fp32 = fp32_cache
    fp16 = cached(dataset, net, tmp_path / "float16", dtype="float16")
    items = [0, 1, 2]
    exact = torch.stack([fp32[i]["image_embedding"] for i in items])
    rounded = torch.stack([fp16[i]["image_embedding"] for i in items])
    assert ((rounded - exact).norm() / exact.norm()) < 3e-4
    module = trainer_of(net, num_click_passes=0, num_mask_only_passes=0)
    plain_loss, _ = step(module, collate_sam_batch([dataset[i] for i in items]))
    cached_loss, _ = step(module, collate_sam_batch([fp16[i] for i in items]))
    torch.testing.assert_close(cached_loss, plain_loss, atol=0, rtol=1e-5)


def test_cache_reused_then_rebuilt_on_changes(tmp_path, caplog):
    net, dataset, folder = tiny_net(), sample_dataset(), tmp_path / "c"
    calls = EncoderCalls(net)
    cached(dataset, net, folder)
    built = calls.count
    assert built == 4  # 16 images, 4 per encoder call

    cached(dataset, net, folder)  # nothing changed
    assert calls.count == built

    with torch.no_grad():  # new encoder weights
        next(net.image_encoder.parameters()).add_(0.01)
    caplog.set_level("WARNING", logger="samtrain.data.embedding_cache")
    cached(dataset, net, folder)
    assert calls.count == 2 * built
    assert "encoder" in caplog.text and "rebuilding" in caplog.text

    net.pixel_mean.add_(1.0)  # other preprocessing constants
    cached(dataset, net, folder)
    assert calls.count == 3 * built

    cached(sample_dataset(max_mask_fraction=0.5), net, folder)  # another transform
    assert calls.count == 4 * built


def test_cache_rebuilt_for_another_image_size(tmp_path):
    folder = tmp_path / "c"
    cache = cached(sample_dataset(64), tiny_net(64), folder)
    assert cache[0]["image_embedding"].shape == (256, 4, 4)
    net = tiny_net(96)
    calls = EncoderCalls(net)
    cache = cached(sample_dataset(96), net, folder)
    assert calls.count == 4
    assert cache[0]["image_embedding"].shape == (256, 6, 6) and cache[0]["masks"].shape[-1] == 96


def test_interrupted_or_tampered_cache_is_rebuilt(tmp_path):
    net, dataset, folder = tiny_net(), sample_dataset(), tmp_path / "c"
    calls = EncoderCalls(net)
    cached(dataset, net, folder)
    (folder / "manifest.json").unlink()  # as after a crash before the manifest was written
    cached(dataset, net, folder)
    assert calls.count == 8

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["key"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    cached(dataset, net, folder)
    assert calls.count == 12

    (folder / "embeddings.npy").write_bytes(b"not an array")
    cached(dataset, net, folder)
    assert calls.count == 16
    assert not list(folder.glob("*.tmp*"))


def test_unreadable_samples_stay_skipped_and_the_reader_pickles(tmp_path):
    net, dataset = tiny_net(), sample_dataset()
    for name in ("load_sample", "load_encoded_sample"):  # whichever the transform asks for
        load = getattr(dataset, name)

        def flaky(index: int, load=load) -> dict:
            if index == 1:
                raise SampleError("broken.jpg", "cannot decode image")
            return load(index)

        setattr(dataset, name, flaky)
    cache = cached(dataset, net, tmp_path / "c")
    assert cache.manifest["num_skipped"] == 1
    assert SkipBadSamples(cache)[1] is None
    with pytest.raises(SampleError, match="unreadable"):
        cache[1]
    cache[0]  # opens the memory maps in this process
    copy = pickle.loads(pickle.dumps(cache))  # what a DataLoader worker gets: paths, not arrays
    assert copy._arrays is None
    assert torch.equal(copy[2]["image_embedding"], cache[2]["image_embedding"])


def test_refuses_augmentation_and_a_trainable_encoder(tmp_path):
    net = tiny_net()
    dataset = sample_dataset()
    dataset.transform = SamTransform(image_size=64, train=True)
    with pytest.raises(ValueError, match="augments"):
        ensure_embedding_cache(dataset, net, tmp_path / "c")
    with pytest.raises(ValueError, match="frozen image encoder"):
        check_frozen_encoder(net)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "ModelParallelStrategy"])
def test_refuses_a_sharded_strategy(tmp_path, strategy):
    """A sharded encoder cannot be fingerprinted or run on rank zero alone; the decoder side that
    cached mode trains needs no sharding."""
    import pytorch_lightning.strategies

    trainer = SimpleNamespace(strategy=getattr(pytorch_lightning.strategies, strategy)())
    with pytest.raises(ValueError, match=f"do not run under {strategy}.*trainer=ddp"):
        EmbeddingCache(dir=tmp_path).setup(trainer, SimpleNamespace(net=tiny_net()), "fit")


@pytest.mark.parametrize(
    "experiment",
    [
        ("experiment=finetune_cached", "model.net.variant=vit_t"),
        ("experiment=finetune_sam2_cached", "model=sam2_hiera_n"),
    ],
    ids=["sam", "sam2"],
)
def test_fast_dev_run_with_the_experiment(tiny_cfg, tmp_path, caplog, experiment):
    cache_dir = tmp_path / "embedding_cache"
    cfg = tiny_cfg(
        *experiment,
        "model.net.image_size=64",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "debug=fdr",
        f"callbacks.embedding_cache.dir={cache_dir}",
    )
    assert cfg.data.train_dataset.transform.train is False
    metrics = train(cfg)
    assert "train/loss" in metrics and "val/resized_mIoU@1" in metrics
    for split in ("train", "val"):
        manifest = json.loads((cache_dir / split / "manifest.json").read_text())
        assert manifest["components"]["image_size"] == 64
        assert len(manifest["embedding_shapes"]) == (3 if "sam2" in cfg.model.net.variant else 1)
    caplog.set_level("INFO", logger="samtrain.data.embedding_cache")
    train(cfg)  # a second run reuses both caches
    assert caplog.text.count("up to date, reused") == 2 and "rebuilding" not in caplog.text


def test_the_datamodule_swaps_its_datasets_through_a_public_method():
    dataset = sample_dataset()
    datamodule = SamDataModule(train_dataset=dataset, val_dataset=dataset)
    assert datamodule.datasets() == {"train": dataset, "val": dataset}
    replacement = sample_dataset(max_mask_fraction=0.5)
    datamodule.replace_datasets({"val": replacement})
    assert datamodule.datasets() == {"train": dataset, "val": replacement}
    with pytest.raises(ValueError, match="no split"):
        datamodule.replace_datasets({"training": replacement})


# -- SAM 2.1: three feature levels ------------------------------------------------------------------


@pytest.fixture(scope="module")
def sam2_cache(tmp_path_factory):
    torch.manual_seed(0)
    net = build_sam("sam2.1_hiera_n", image_size=64)
    dataset = sample_dataset(frame="square")
    return net, dataset, cached(dataset, net, tmp_path_factory.mktemp("sam2_cache"))


def test_a_sam2_cache_holds_its_three_feature_levels(sam2_cache):
    net, dataset, cache = sam2_cache
    assert cache.manifest["embedding_shapes"] == [[16, 256, 4, 4], [16, 64, 8, 8], [16, 32, 16, 16]]
    item, plain = cache[3], dataset[3]
    with torch.no_grad():
        expected = net.eval().image_encoder(plain["image"][None])[0].tensors()
    got = [item["image_embedding"], *item["high_res_features"]]
    for level, want in zip(got, expected, strict=True):
        torch.testing.assert_close(level, want, atol=1e-5, rtol=1e-5)
    batch = collate_sam_batch([cache[i] for i in (0, 1)])
    assert [t.shape for t in batch["high_res_features"]] == [(2, 64, 8, 8), (2, 32, 16, 16)]


def test_a_cached_sam2_step_and_evaluation_match_the_plain_ones(sam2_cache):
    net, dataset, cache = sam2_cache
    module = trainer_of(net, num_click_passes=2, num_mask_only_passes=1)
    items = [0, 1, 2]
    plain_batch, cached_batch = (collate_sam_batch([d[i] for i in items]) for d in (dataset, cache))
    plain_loss, plain_grads = step(module, plain_batch)
    cached_loss, cached_grads = step(module, cached_batch)
    assert plain_grads.keys() == cached_grads.keys()
    without_fine = {
        **cached_batch,
        "high_res_features": [torch.zeros_like(t) for t in cached_batch["high_res_features"]],
    }
    assert not torch.isclose(step(module, without_fine)[0], cached_loss)  # the finer levels are read
    torch.testing.assert_close(cached_loss, plain_loss, atol=1e-6, rtol=1e-6)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        plain, from_cache = (evaluate_batch(net.eval(), b, max_clicks=3) for b in (plain_batch, cached_batch))
    for key, value in plain.items():
        torch.testing.assert_close(from_cache[key], value, atol=1e-5, rtol=1e-5, msg=key)


def test_a_sam2_cache_missing_a_level_is_rebuilt(tmp_path):
    torch.manual_seed(0)
    net, dataset, folder = (
        build_sam("sam2.1_hiera_n", image_size=64),
        sample_dataset(frame="square"),
        tmp_path / "c",
    )
    calls = EncoderCalls(net)
    cached(dataset, net, folder)
    (folder / "embeddings.2.npy").unlink()
    cached(dataset, net, folder)
    assert calls.count == 8 and (folder / "embeddings.2.npy").is_file()


def test_a_cache_of_an_older_format_is_rebuilt_and_named_so(tmp_path, caplog):
    net, dataset, folder = tiny_net(), sample_dataset(), tmp_path / "c"
    cached(dataset, net, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["components"]["format"] = 2
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="format 2, this samtrain reads format 3"):
        CachedEmbeddingDataset(folder)
    caplog.set_level("WARNING", logger="samtrain.data.embedding_cache")
    cached(dataset, net, folder)
    assert "written in cache format 2" in caplog.text


def test_a_sam2_cache_rebuilt_for_a_sam_leaves_no_finer_levels(tmp_path, sam2_cache):
    net, dataset, _ = sam2_cache
    folder = tmp_path / "c"
    cached(dataset, net, folder)
    assert (folder / "embeddings.2.npy").is_file()
    cache = cached(sample_dataset(), tiny_net(), folder)
    assert len(cache.manifest["embedding_shapes"]) == 1
    assert sorted(p.name for p in folder.glob("embeddings*.npy")) == ["embeddings.npy"]
