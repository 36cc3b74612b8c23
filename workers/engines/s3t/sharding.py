"""Records to shards and slices: stable, so re-planning a dataset never moves a record.

Shard = stable hash of the record's subject (or its id when it has none), so a person's
records share one shard and deleting a subject touches one shard. Within a shard, records
go to slices by subject as well (a subject's records share one slice, so a subject deletion
cuts each sequence at one place), balanced greedily in stable-hash order.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class RecordKey:
    """What placement looks at: the record's id and its data subject (may be None)."""

    record_id: str
    subject_id: str | None = None

    @property
    def unit(self) -> str:
        # Namespaced so a subject id that equals some record id is still its own unit.
        return f"subject:{self.subject_id}" if self.subject_id else f"record:{self.record_id}"


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same on every machine and Python run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def shard_of(key: RecordKey, shards: int) -> int:
    return stable_hash(f"shard|{key.unit}") % shards


def assign_slices(keys: Iterable[RecordKey], slices: int) -> dict[str, int]:
    """record id -> slice for one shard's records: whole units, balanced by record count.

    Units are taken largest first (ties in stable-hash order) and each goes to the slice
    with the fewest records so far (lowest index on ties): deterministic and balanced.
    """
    units: dict[str, list[str]] = defaultdict(list)
    for key in keys:
        units[key.unit].append(key.record_id)
    order = sorted(units, key=lambda u: (-len(units[u]), stable_hash(f"slice|{u}"), u))
    sizes = [0] * slices
    out: dict[str, int] = {}
    for unit in order:
        target = min(range(slices), key=lambda s: (sizes[s], s))
        sizes[target] += len(units[unit])
        for record_id in units[unit]:
            out[record_id] = target
    return out


def assign(keys: Iterable[RecordKey], *, shards: int, slices: int) -> dict[str, tuple[int, int]]:
    """record id -> (shard, slice) for a whole dataset."""
    by_shard: dict[int, list[RecordKey]] = defaultdict(list)
    for key in keys:
        by_shard[shard_of(key, shards)].append(key)
    out: dict[str, tuple[int, int]] = {}
    for shard, members in by_shard.items():
        for record_id, slice_ in assign_slices(members, slices).items():
            out[record_id] = (shard, slice_)
    return out
