"""SeededShardSampler: each rank's share of an epoch, with a seed per sample; streams get the epoch."""

from __future__ import annotations

import pytest

from samtrain.data.sampler import SeededShardSampler


def shares(size: int, world: int, *, epoch: int = 0, even: bool = True, shuffle: bool = True):
    samplers = [
        SeededShardSampler(size, seed=7, shuffle=shuffle, rank=r, world_size=world, even=even)
        for r in range(world)
    ]
    for s in samplers:
        s.set_epoch(epoch)
    return [list(s) for s in samplers]


def test_ranks_split_an_epoch_without_duplicates_and_evenly():
    ranks = shares(11, 2)
    assert len(ranks[0]) == len(ranks[1]) == 5  # even: one sample of 11 left out this epoch
    indices = [i for rank in ranks for i, _ in rank]
    assert len(set(indices)) == 10
    everything = shares(11, 2, even=False)
    assert sorted(i for rank in everything for i, _ in rank) == list(range(11))


def test_ranks_at_batch_b_see_what_one_process_sees_at_batch_world_times_b():
    (single,) = shares(12, 1)
    ranks = shares(12, 3)
    for step in range(2):  # batch 2 per rank, 6 in the single process
        together = sorted(p for rank in ranks for p in rank[2 * step : 2 * step + 2])
        assert together == sorted(single[6 * step : 6 * step + 6])  # same indices, same seeds


def test_order_and_seeds_follow_the_epoch():
    first, second = shares(20, 1, epoch=0)[0], shares(20, 1, epoch=1)[0]
    assert first != second and sorted(i for i, _ in first) == sorted(i for i, _ in second)
    seeds_first = dict(first)
    assert all(seeds_first[i] != s for i, s in second)  # augmentation differs between epochs
    assert shares(20, 1, epoch=0)[0] == first  # and repeats exactly (resume)
    assert [i for i, _ in shares(5, 1, shuffle=False)[0]] == [0, 1, 2, 3, 4]


def test_bad_rank():
    with pytest.raises(ValueError, match="rank"):
        SeededShardSampler(4, seed=0, shuffle=True, rank=2, world_size=2)
