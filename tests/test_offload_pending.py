"""The offloader's pending-update rules as plain logic: no tensors, no streams, no engine."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from zo2_ds import zo
from zo2_ds.offload.pending import (
    PendingLog,
    Update,
    block_update,
    resolve_interval,
    split_step_update,
    tensor_update,
    upload_is_exact,
    write_back_due,
)


def test_interval_auto_is_four_with_streams_and_one_without():
    assert resolve_interval("auto", has_streams=True) == 4
    assert resolve_interval("auto", has_streams=False) == 1
    assert resolve_interval(3, has_streams=True) == resolve_interval(3, has_streams=False) == 3


@pytest.mark.parametrize("interval", [1, 2, 3, 4])
def test_write_backs_are_staggered_and_bounded(interval):
    """Steady state (one update pending per block and step): each block is written back once every
    `interval` steps, at (step + block) % interval == 0, so 1 / interval of the blocks each step."""
    num_blocks = 8
    pending = [0] * num_blocks
    written_at = {b: [] for b in range(num_blocks)}
    for step in range(1, 13):
        for b in range(num_blocks):
            pending[b] += 1  # the previous step's update
            assert pending[b] <= interval
            if write_back_due(step, b, interval, pending[b]):
                written_at[b].append(step)
                pending[b] = 0
        assert sum(step in w for w in written_at.values()) in (num_blocks // interval, -(-num_blocks // interval))
    for b, steps in written_at.items():
        assert all(later - earlier == interval for earlier, later in zip(steps, steps[1:])), (b, steps)


def test_write_back_rules():
    assert not write_back_due(None, 0, 4, 0)  # nothing pending: nothing to write, even in a flush
    assert write_back_due(None, 1, 4, 1)  # plain forwards and flushes write every pending block
    assert not write_back_due(5, 1, 4, 1)  # (5 + 1) % 4 != 0
    assert write_back_due(7, 1, 4, 1)  # its turn
    assert write_back_due(5, 1, 4, 4)  # interval updates pending: due whatever the turn


def test_exact_upload_rules():
    for step in (None, 0, 5):
        assert upload_is_exact(False, step, 2, 4, 1)  # without narrow copies every upload is the master
    assert upload_is_exact(True, None, 2, 4, 1)  # plain forward / flush: the master
    assert upload_is_exact(True, 6, 2, 4, 1)  # its write-back step
    assert not upload_is_exact(True, 5, 2, 4, 1)  # in between: the narrow copy
    assert upload_is_exact(True, 5, 2, 4, 4)  # interval updates pending: written back now, so the master


def test_step_update_is_split_into_block_entries_and_the_rest():
    a, b, c, outside = object(), object(), object(), object()
    where = {id(a): (0, 1), id(b): (2, 0), id(c): (0, 0)}
    groups = [
        SimpleNamespace(params=(a, outside), lr=0.1, weight_decay=0.0),
        SimpleNamespace(params=(b, c), lr=0.2, weight_decay=0.5),
    ]
    entries, rest = split_step_update(groups, where, [2, 1, 1], (11, 12), (0.5, -0.5))
    first, second = Update((11, 12), (0.5, -0.5), 0.1, 0.0), Update((11, 12), (0.5, -0.5), 0.2, 0.5)
    assert entries == {0: [second, first], 2: [second]}
    assert rest == [(groups[0], [outside])]
    assert block_update(entries[2]) == second
    assert block_update(entries[0]) is None  # two lr groups in one block: tensor by tensor
    assert block_update([first, None]) is None  # a tensor without update
    assert block_update([]) is None and block_update(None) is None


def test_tensor_update_derives_each_tensors_seeds_and_weight_decay():
    update = Update((11, 12), (0.5, -0.5), 0.1, 0.3)
    key = zo.param_key("w")
    seeds, coefs, lr, wd = tensor_update(update, True, key)
    assert seeds == [zo.z_seed_from_pass(11, key), zo.z_seed_from_pass(12, key)]
    assert (coefs, lr, wd) == ((0.5, -0.5), 0.1, 0.3)
    assert tensor_update(update, False, key)[3] == 0.0  # no weight decay on 1-D tensors
    assert tensor_update(None, True, key) is None


def test_pending_log():
    log = PendingLog(3)
    assert log.blocks == [] and log.longest() == 0
    log.record(1, ["u0"])
    log.record(1, ["u1"])
    log.record(2, ["u0"])
    assert log.blocks == [1, 2] and log.count(1) == 2 and log.longest() == 2
    assert log[1] == [["u0"], ["u1"]]  # oldest first
    log.clear(1)
    assert log.blocks == [2] and log.count(1) == 0
