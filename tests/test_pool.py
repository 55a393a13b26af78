"""The worker pool on its own: results, errors and deaths in forked workers, nothing left behind."""
from __future__ import annotations

import os
import signal
import time

import pytest

from layerdiff.engine import pool
from layerdiff.errors import FormatError


def children() -> list[str]:
    return open(f"/proc/{os.getpid()}/task/{os.getpid()}/children").read().split()


def no_init() -> None:
    pass


def double(i: int) -> int:
    return 2 * i


def bad_init() -> None:
    raise FormatError("x.safetensors", "could not start")


def fails_at_37(i: int) -> int:
    if i == 37:
        raise FormatError("y.safetensors", "item 37")
    return i


def dies_at_50(i: int) -> int:
    if i == 50:
        os.kill(os.getpid(), signal.SIGKILL)
    return i


def state_payload(i: int) -> tuple[int, bool]:
    return pool.STATE["payload"] + i, pool.STATE["worker"]


def test_every_result_once_from_forked_workers_with_their_state():
    got = list(pool.run(state_payload, range(200), 2, pool.init_state, (1000, None)))
    assert sorted(v for v, _ in got) == list(range(1000, 1200)) and all(worker for _, worker in got)
    assert children() == []


def test_an_error_in_an_item_or_the_initialiser_is_raised_as_itself():
    with pytest.raises(FormatError, match="item 37"):
        list(pool.run(fails_at_37, range(100), 2, no_init, ()))
    with pytest.raises(FormatError, match="could not start"):
        list(pool.run(double, range(100), 2, bad_init, ()))
    assert children() == []


def test_a_killed_worker_is_reported_with_the_item_it_was_running():
    with pytest.raises(pool.WorkerDied) as e:
        list(pool.run(dies_at_50, range(100), 2, no_init, ()))
    assert e.value.item == 50 and "killed by SIGKILL" in e.value.problem
    assert children() == []


def test_a_pass_left_early_ends_its_workers():
    results = pool.run(double, range(10_000), 2, no_init, ())
    next(results)
    results.close()
    deadline = time.monotonic() + 5
    while children() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert children() == []
