"""A linearizability checker for file-system histories (SPEC.md §12.9).

A history is a list of `Op`s, each with the time it was invoked and the time it completed
(monotonic nanoseconds, all taken on this machine) and its observed result. The history is
split per object (P-compositionality: a history is linearizable iff each object's is):

- `file:<name>`: one data file. Its operations are `write(block, token)`, `read(block)` and
  `stat()`. A block holds the token of its last write (or None: never written, reads as zeros),
  and the size is (highest written block + 1) * block size.
- `ns:<dir>`: a directory's set of names. Operations: `create(name)` (O_CREAT|O_EXCL: ok or
  EEXIST), `unlink(name)`, `rename(a, b)`, `exists(name)` (stat: ok or ENOENT), `list()`.

Each object is checked with the Wing–Gong algorithm with Lowe's memoization: search for an
order of the operations that respects real time (an operation that completed before another
was invoked comes first) and in which every result equals what the sequential model returns.
An operation that failed with an indeterminate error (ETIMEDOUT, EIO) may or may not have
taken effect: it is kept as a possible effect with an unconstrained result, and may stay
pending forever; one that only observes (read, stat, exists, list) is left out.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass, field
from typing import Any, Optional

# Errors after which the call may or may not have taken effect: a timeout, a lost connection,
# an interrupted call, and the agent itself dying under the caller (ENOTCONN, ECONNABORTED).
INDETERMINATE = {errno.ETIMEDOUT, errno.EIO, errno.EINTR, errno.ENOTCONN, errno.ECONNABORTED}
NEVER = 1 << 62  # completion time of an operation that never returned
# Operations without effect on the model's state.
OBSERVATIONS = {"read", "stat", "exists", "list"}


@dataclass
class Op:
    process: int
    obj: str
    name: str
    args: tuple
    invoke: int
    complete: int
    result: Any = None          # the value returned, or None
    error: Optional[int] = None  # errno, or None for success
    index: int = field(default=-1)
    via: str = ""               # how the client made the call (reports only)

    @property
    def indeterminate(self) -> bool:
        return self.error in INDETERMINATE

    def describe(self, origin: int) -> str:
        outcome = f"-> {errno.errorcode.get(self.error, self.error)}" if self.error is not None else f"-> {self.result!r}"
        end = "never" if self.complete >= NEVER else f"{(self.complete - origin) / 1e6:9.3f}"
        return (f"p{self.process:<2} [{(self.invoke - origin) / 1e6:9.3f} .. {end} ms] "
                f"{self.obj} {self.name}{self.args}{' ' + self.via if self.via else ''} {outcome}")


# -- sequential models ----------------------------------------------------------------------
# A model is (initial_state, step) where step(state, op) -> (new_state, expected) and
# `expected` is ("ok", value) or ("err", errno). States must be hashable.

def file_model(block_size: int):
    def step(state, op):
        blocks = state  # tuple of tokens (None = hole), length = number of blocks that exist
        if op.name == "write":
            block, token = op.args
            extended = list(blocks) + [None] * max(0, block + 1 - len(blocks))
            extended[block] = token
            return tuple(extended), ("ok", None)
        if op.name == "read":
            (block,) = op.args
            return blocks, ("ok", blocks[block] if block < len(blocks) else None)
        if op.name == "stat":
            return blocks, ("ok", len(blocks) * block_size)
        raise ValueError(f"unknown file operation {op.name}")
    return (), step


def namespace_model():
    def step(state, op):
        names = state  # frozenset
        if op.name == "create":
            (name,) = op.args
            if name in names:
                return names, ("err", errno.EEXIST)
            return names | {name}, ("ok", None)
        if op.name == "unlink":
            (name,) = op.args
            if name not in names:
                return names, ("err", errno.ENOENT)
            return names - {name}, ("ok", None)
        if op.name == "rename":
            a, b = op.args
            if a not in names:
                return names, ("err", errno.ENOENT)
            return (names - {a}) | {b}, ("ok", None)
        if op.name == "exists":
            (name,) = op.args
            return names, ("ok", None) if name in names else ("err", errno.ENOENT)
        if op.name == "list":
            return names, ("ok", tuple(sorted(names)))
        raise ValueError(f"unknown namespace operation {op.name}")
    return frozenset(), step


def matches(op: Op, expected) -> bool:
    if op.indeterminate:
        return True
    kind, value = expected
    if kind == "err":
        return op.error == value
    return op.error is None and (op.result == value or (op.name == "list" and tuple(sorted(op.result)) == value))


# -- the search -----------------------------------------------------------------------------

@dataclass
class Verdict:
    ok: bool
    obj: str = ""
    history: list = field(default_factory=list)
    longest_prefix: list = field(default_factory=list)
    explored: int = 0

    def report(self) -> str:
        if self.ok:
            return "linearizable"
        origin = min((op.invoke for op in self.history), default=0)
        lines = [f"NOT linearizable: object {self.obj} ({len(self.history)} operations; times in ms from "
                 f"CLOCK_MONOTONIC {origin} ns, the clock of WEFT_TRACE_DIR traces); history:"]
        lines += ["  " + op.describe(origin) for op in sorted(self.history, key=lambda o: o.invoke)]
        lines.append(f"longest linearizable prefix found ({len(self.longest_prefix)} operations):")
        lines += ["  " + op.describe(origin) for op in self.longest_prefix]
        return "\n".join(lines)


def check_object(ops: list[Op], model, max_states: int = 2_000_000) -> Verdict:
    """Wing–Gong–Lowe search over one object's operations."""
    initial, step = model
    ops = sorted(ops, key=lambda o: o.invoke)
    for i, op in enumerate(ops):
        op.index = i
    n = len(ops)
    # Real-time order: op j must come after op i if i completed before j was invoked. An
    # indeterminate op that failed is treated as never completing (it may take effect late).
    complete = [NEVER if op.indeterminate else op.complete for op in ops]
    # An op can be linearized next only if no unlinearized op completed before it was invoked.
    done_mask = 0
    state = initial
    stack: list[tuple[int, Any, int]] = []  # (op index, previous state, previous mask)
    seen: set[tuple[int, Any]] = set()
    explored = 0
    best: list[int] = []
    path: list[int] = []

    def candidates(mask):
        # Unlinearized ops whose invocation precedes the earliest completion among the
        # unlinearized ones.
        earliest = NEVER
        for i in range(n):
            if not mask >> i & 1 and complete[i] < earliest:
                earliest = complete[i]
        return [i for i in range(n) if not mask >> i & 1 and ops[i].invoke <= earliest]

    frontier: list[list[int]] = [candidates(0)]
    all_done = (1 << n) - 1
    # Indeterminate ops may never take effect: the search may end with them unlinearized.
    optional = 0
    for i in range(n):
        if ops[i].indeterminate:
            optional |= 1 << i

    while True:
        if done_mask | optional == all_done:
            return Verdict(ok=True, explored=explored)
        options = frontier[-1]
        advanced = False
        while options:
            i = options.pop()
            new_state, expected = step(state, ops[i])
            if not matches(ops[i], expected):
                continue
            new_mask = done_mask | 1 << i
            key = (new_mask, new_state)
            if key in seen:
                continue
            seen.add(key)
            explored += 1
            if explored > max_states:
                raise RuntimeError(f"linearizability search of {len(ops)} operations exceeded {max_states} states")
            stack.append((i, state, done_mask))
            path.append(i)
            if len(path) > len(best):
                best = list(path)
            state, done_mask = new_state, new_mask
            frontier.append(candidates(done_mask))
            advanced = True
            break
        if advanced:
            continue
        # Dead end: backtrack.
        frontier.pop()
        if not stack:
            return Verdict(ok=False, history=ops, longest_prefix=[ops[i] for i in best], explored=explored)
        i, state, done_mask = stack.pop()
        path.pop()


def check(history: list[Op], block_size: int) -> Verdict:
    """Checks every object of `history`; returns the first failing object's verdict."""
    by_object: dict[str, list[Op]] = {}
    for op in history:
        # A failed observation changed nothing and showed nothing: leave it out (kept, each such
        # op would only multiply the states of the search).
        if op.indeterminate and op.name in OBSERVATIONS:
            continue
        by_object.setdefault(op.obj, []).append(op)
    explored = 0
    for obj, ops in sorted(by_object.items()):
        model = file_model(block_size) if obj.startswith("file:") else namespace_model()
        verdict = check_object(ops, model)
        explored += verdict.explored
        if not verdict.ok:
            verdict.obj = obj
            return verdict
    return Verdict(ok=True, explored=explored)
