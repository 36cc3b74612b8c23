"""Which slice orderings (sequences) a shard trains, under a budget of B sequences.

A sequence trains layer group k on slices 1..k of its order, so a deletion in the slice at
position p leaves the sequence p-1 layer groups; serving uses the shard's longest
surviving sequence. With one sequence, a deletion in its first slice leaves the shard
nothing. B sequences help only if their orders differ where it matters: every slice should
come early in few sequences and late in others.

Selection (after S3T's public code): the B orders are built position by position; at each
position a maximum bipartite matching pairs each sequence with a slice it has not used,
first using only slices that no other sequence's prefix holds yet, then, for sequences left
unmatched, slices held by one other prefix, and so on (repeated matchings over widening edge
sets). A slice thus starts at most one sequence while B <= slices, and prefixes overlap as
little as they can. `expected_survival` scores a choice; the tests compare it with naive
choices.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence


def select_sequences(slices: int, budget: int, *, seed: int = 0) -> list[tuple[int, ...]]:
    """`budget` distinct orderings of range(slices) (a single one is 0, 1, ..., L-1)."""
    if slices < 1 or budget < 1:
        raise ValueError("slices and budget must be at least 1")
    total = 1
    for i in range(2, slices + 1):
        total *= i
    if budget > total:
        raise ValueError(f"only {total} orderings of {slices} slice(s) exist, not {budget}")
    rng = random.Random(seed)
    rows: list[list[int]] = [[] for _ in range(budget)]
    for _position in range(slices):
        # coverage[s]: how many sequences' prefixes already hold slice s
        coverage = [sum(s in row for row in rows) for s in range(slices)]
        match = _tiered_matching(rows, coverage, slices, rng)
        for r, s in match.items():
            rows[r].append(s)
    out = [tuple(row) for row in rows]
    # Distinctness: identical orders add nothing; swap in the best unused one (tiny L only).
    seen: set[tuple[int, ...]] = set()
    for i, order in enumerate(out):
        if order in seen:
            out[i] = _best_unused(out, seen, slices)
        seen.add(out[i])
    return out


def _tiered_matching(rows: list[list[int]], coverage: list[int], slices: int,
                     rng: random.Random) -> dict[int, int]:
    """row -> slice, every row matched: maximum matchings over edges of rising cost.

    cost(row, s) = coverage[s] (other prefixes holding s); a row may only take slices it
    has not used. Rows matched at a cheaper tier stay matched (augmenting paths may move
    them to another edge of a tier already allowed).
    """
    match_of_slice: dict[int, int] = {}
    match_of_row: dict[int, int] = {}
    for tier in range(len(rows) + 1):
        def edges(r: int, tier: int = tier) -> list[int]:
            options = [s for s in range(slices) if s not in rows[r] and coverage[s] <= tier]
            # Cheapest first, then lowest index: the first sequence becomes 0..L-1.
            return sorted(options, key=lambda s: (coverage[s], s))

        for r in range(len(rows)):
            if r not in match_of_row:
                _augment(r, edges, match_of_slice, match_of_row, set())
        if len(match_of_row) == len(rows):
            break
    if len(match_of_row) < len(rows):  # more sequences than slices: repeat slices per position
        for r in range(len(rows)):
            if r not in match_of_row:
                free = [s for s in range(slices) if s not in rows[r]]
                match_of_row[r] = rng.choice(free)
    return match_of_row


def _augment(r: int, edges, match_of_slice: dict[int, int], match_of_row: dict[int, int],
             visited: set[int]) -> bool:
    """Kuhn's augmenting path from row r."""
    for s in edges(r):
        if s in visited:
            continue
        visited.add(s)
        other = match_of_slice.get(s)
        if other is None or _augment(other, edges, match_of_slice, match_of_row, visited):
            match_of_slice[s] = r
            match_of_row[r] = s
            return True
    return False


def _best_unused(current: list[tuple[int, ...]], seen: set[tuple[int, ...]],
                 slices: int) -> tuple[int, ...]:
    candidates = [p for p in itertools.permutations(range(slices)) if p not in seen]
    others = [o for o in current if o in seen]
    return max(candidates, key=lambda p: expected_survival([*others, p], slices))


def surviving_length(order: Sequence[int], affected: set[int] | frozenset[int]) -> int:
    """Layer groups of a sequence that survive: the slices before its first affected one."""
    for position, slice_ in enumerate(order):
        if slice_ in affected:
            return position
    return len(order)


def expected_survival(orders: Sequence[Sequence[int]], slices: int,
                      p_affected: float | None = None) -> float:
    """E[max over sequences of surviving layer groups] when each slice is independently
    affected by deletions with probability `p_affected` (default 1/slices: one slice hit
    on average). Exact, by enumerating the 2^L affected sets (L <= 16)."""
    p = 1.0 / slices if p_affected is None else p_affected
    total = 0.0
    for mask in range(1 << slices):
        affected = {s for s in range(slices) if mask >> s & 1}
        k = len(affected)
        weight = (p ** k) * ((1 - p) ** (slices - k))
        total += weight * max(surviving_length(o, affected) for o in orders)
    return total
