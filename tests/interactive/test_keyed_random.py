import math

import pytest
import torch

from samtrain.interactive.keyed_random import KeyedRandom, hash_keys, mix_seed


def test_rows_depend_on_their_key_only():
    keys = torch.tensor([5, -3, 2**40 + 7, 0])
    whole = KeyedRandom(keys, salt=11)
    part = KeyedRandom(keys[[2, 0]], salt=11)
    a, b = whole.rand(3), part.rand(3)
    assert torch.equal(a[[2, 0]], b)
    assert torch.equal(whole.randn(2)[[2, 0]], part.randn(2))


def test_draws_columns_salts_and_keys_differ():
    rng = KeyedRandom(torch.arange(64), salt=1)
    first, second = rng.rand(4), rng.rand(4)
    assert not torch.equal(first, second)
    assert len(set(first.flatten().tolist())) == first.numel()
    assert not torch.equal(KeyedRandom(torch.arange(64), salt=2).rand(4), first)
    assert rng.draws == 2


def test_uniform_and_normal_statistics():
    rng = KeyedRandom(torch.arange(200_000), salt=mix_seed("stats", 0))
    u = rng.rand(1)
    assert u.dtype == torch.float32 and u.min() >= 0.0 and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    histogram = torch.histc(u, bins=10, min=0.0, max=1.0) / len(u)
    assert (histogram - 0.1).abs().max() < 0.005
    z = rng.randn(1)
    assert abs(z.mean().item()) < 0.01 and abs(z.std().item() - 1.0) < 0.01
    assert math.isfinite(z.abs().max().item())
    assert abs((z.abs() < 1).float().mean().item() - 0.6827) < 0.005
    pairs = rng.rand(2)  # columns of one draw are uncorrelated
    assert abs(torch.corrcoef(pairs.T)[0, 1].item()) < 0.01


def test_hash_keys_combines_parts_in_order():
    a, b = torch.tensor([1, 2, 3]), torch.tensor([0, 0, 1])
    assert torch.equal(hash_keys(a, b), hash_keys(a, b))
    assert not torch.equal(hash_keys(a, b), hash_keys(b, a))
    assert (hash_keys(a, b) >= 0).all() and (hash_keys(a, b) < 2**32).all()
    with pytest.raises(ValueError, match="at least one"):
        hash_keys()


def test_bad_keys():
    with pytest.raises(ValueError, match=r"\(N,\)"):
        KeyedRandom(torch.zeros(2, 2, dtype=torch.int64), salt=0)
