"""The checker of §12.9 on hand-made histories: it accepts linearizable ones and rejects
stale reads, lost creates and impossible values (so a live run's verdict means something)."""

from __future__ import annotations

import errno
import random
import time

from linearizability import Op, check

BS = 4096


def op(process, obj, name, args, invoke, complete, result=None, error=None):
    return Op(process, obj, name, tuple(args), invoke, complete, result, error)


def test_sequential_writes_and_reads_are_linearizable():
    h = [op(0, "file:a", "write", (0, "t1"), 0, 10),
         op(1, "file:a", "read", (0,), 20, 30, "t1"),
         op(1, "file:a", "stat", (), 40, 50, BS),
         op(0, "file:a", "write", (2, "t2"), 60, 70),
         op(1, "file:a", "read", (1,), 80, 90, None),
         op(1, "file:a", "stat", (), 95, 99, 3 * BS)]
    assert check(h, BS).ok


def test_stale_read_after_a_completed_write_is_caught():
    h = [op(0, "file:a", "write", (0, "t1"), 0, 10),
         op(0, "file:a", "write", (0, "t2"), 20, 30),
         op(1, "file:a", "read", (0,), 40, 50, "t1")]  # t2 had completed: stale
    verdict = check(h, BS)
    assert not verdict.ok
    assert "NOT linearizable" in verdict.report() and "file:a" in verdict.report()


def test_overlapping_read_may_see_either_value_but_not_both_orders():
    base = [op(0, "file:a", "write", (0, "old"), 0, 5), op(0, "file:a", "write", (0, "new"), 10, 100)]
    assert check(base + [op(1, "file:a", "read", (0,), 20, 30, "old")], BS).ok
    assert check(base + [op(1, "file:a", "read", (0,), 20, 30, "new")], BS).ok
    # Once one reader saw "new", a reader starting after it completed cannot see "old".
    h = base + [op(1, "file:a", "read", (0,), 20, 30, "new"), op(2, "file:a", "read", (0,), 40, 50, "old")]
    assert not check(h, BS).ok


def test_value_never_written_is_caught():
    h = [op(0, "file:a", "write", (0, "t1"), 0, 10), op(1, "file:a", "read", (0,), 5, 15, "bogus")]
    assert not check(h, BS).ok


def test_size_must_follow_completed_writes():
    h = [op(0, "file:a", "write", (3, "t"), 0, 10), op(1, "file:a", "stat", (), 20, 30, BS)]
    assert not check(h, BS).ok


def test_namespace_rules():
    ok = [op(0, "ns:d", "create", ("x",), 0, 10),
          op(1, "ns:d", "create", ("x",), 5, 15, error=errno.EEXIST),
          op(0, "ns:d", "rename", ("x", "y"), 20, 30),
          op(1, "ns:d", "exists", ("x",), 40, 50, error=errno.ENOENT),
          op(1, "ns:d", "list", (), 60, 70, ("y",)),
          op(0, "ns:d", "unlink", ("y",), 80, 90),
          op(1, "ns:d", "unlink", ("y",), 100, 110, error=errno.ENOENT)]
    assert check(ok, BS).ok
    both_created = [op(0, "ns:d", "create", ("x",), 0, 10), op(1, "ns:d", "create", ("x",), 5, 15)]
    assert not check(both_created, BS).ok
    lost = [op(0, "ns:d", "create", ("x",), 0, 10), op(1, "ns:d", "exists", ("x",), 20, 30, error=errno.ENOENT)]
    assert not check(lost, BS).ok
    stale_listing = [op(0, "ns:d", "create", ("x",), 0, 10), op(1, "ns:d", "list", (), 20, 30, ())]
    assert not check(stale_listing, BS).ok


def test_indeterminate_operations_may_or_may_not_take_effect():
    timed_out = op(0, "file:a", "write", (0, "t1"), 0, 10, error=errno.ETIMEDOUT)
    assert check([timed_out, op(1, "file:a", "read", (0,), 20, 30, "t1")], BS).ok
    assert check([timed_out, op(1, "file:a", "read", (0,), 20, 30, None)], BS).ok
    # It may even take effect late, after a read that did not see it.
    assert check([timed_out, op(1, "file:a", "read", (0,), 20, 30, None),
                  op(1, "file:a", "read", (0,), 40, 50, "t1")], BS).ok


def test_failed_observations_are_left_out_and_stale_reads_still_caught():
    failed = [op(2, "file:a", name, args, 5 + i, 15 + i, error=errno.EIO)
              for i in range(40) for name, args in (("read", (i % 4,)), ("stat", ()))]
    history = [op(0, "file:a", "write", (0, "t1"), 0, 10), op(1, "file:a", "read", (0,), 20, 30, "t1")] + failed
    verdict = check(history, BS)
    assert verdict.ok and verdict.explored == 2
    stale = check(history + [op(1, "file:a", "read", (0,), 40, 50, None)], BS)
    assert not stale.ok
    assert len(stale.history) == 3


def test_random_linearizable_histories_pass_quickly():
    """Histories made by running a model with random overlaps must always pass."""
    rng = random.Random(7)
    for _ in range(20):
        history, value, now = [], {}, 0
        for i in range(150):
            process = rng.randrange(3)
            block = rng.randrange(4)
            start = now
            point = start + rng.randrange(1, 20)      # where it takes effect
            end = point + rng.randrange(1, 20)
            now = point  # the next op takes effect after this one: overlaps, same effect order
            if rng.random() < 0.5:
                value[block] = f"p{process}-{i}"
                history.append(op(process, "file:f", "write", (block, value[block]), start, end))
            else:
                history.append(op(process, "file:f", "read", (block,), start, end, value.get(block)))
        # Processes are sequential: drop overlaps within one process by re-numbering.
        for index, entry in enumerate(history):
            entry.process = index
        began = time.monotonic()
        assert check(history, BS).ok
        assert time.monotonic() - began < 10
