"""The S3T plan of a version: shards, their sequences, each prefix's checkpoint, and what
is active. Pure data and functions (no torch), stored as `s3t_manifest.json` in the version.

Content addressing: a prefix (the first k slices of a sequence, in order) is named by

    h_0 = sha256(base model sha256 | training config)
    h_k = sha256(h_{k-1} | record-set hash of slice k)

where a record-set hash is the sha256 of the sorted "record id:content sha256" lines of its
records. Two sequences that start with the same slices in the same order, over the same
records, name the same prefixes, and a prefix's checkpoint (its group's LoRA weights) is
trained once (SISA's reuse). Deleting a record changes its slice's hash, so every prefix
from that slice on gets a new name and is retrained; the ones before keep theirs.

Deactivation: a sequence stays active only up to (excluding) its first prefix whose
training records include a deleted record. Serving uses each shard's longest active
sequence; a shard with none drops out of the ensemble.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "s3t_manifest.json"
FORMAT = "oblivio-s3t/1"


@dataclass(frozen=True)
class PlanRecord:
    """One record as the plan sees it (no content, only its hash)."""

    record_id: str
    subject_id: str | None
    shard: int
    slice: int
    content_sha256: str


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def record_set_hash(records: Iterable[PlanRecord]) -> str:
    lines = sorted(f"{r.record_id}:{r.content_sha256}" for r in records)
    return _sha("\n".join(lines))


def root_hash(base_model_sha256: str, training_key: dict[str, Any]) -> str:
    return _sha(f"{base_model_sha256}|{json.dumps(training_key, sort_keys=True)}")


def prefix_hash(parent: str, slice_hash: str) -> str:
    return _sha(f"{parent}|{slice_hash}")


@dataclass(frozen=True)
class Prefix:
    """Step k of a sequence: group k trained on the records of its first k slices."""

    position: int            # k - 1 (0 = the first slice, the top layer group)
    slice: int               # the slice this step adds
    prefix_hash: str
    record_ids: tuple[str, ...]  # cumulative: every record this group was trained on
    record_set_sha256: str       # record_set_hash of those records (ids + content hashes)
    layers: tuple[int, ...]


def plan_prefixes(order: Sequence[int], records: Sequence[PlanRecord], *, root: str,
                  layers_of_group: Any) -> list[Prefix]:
    """The prefixes of one sequence of one shard (records: that shard's live records)."""
    by_slice: dict[int, list[PlanRecord]] = {}
    for r in records:
        by_slice.setdefault(r.slice, []).append(r)
    out: list[Prefix] = []
    parent = root
    seen: list[PlanRecord] = []
    for position, slice_ in enumerate(order):
        members = sorted(by_slice.get(slice_, []), key=lambda r: r.record_id)
        parent = prefix_hash(parent, record_set_hash(members))
        seen += members
        out.append(Prefix(position=position, slice=slice_, prefix_hash=parent,
                          record_ids=tuple(sorted(r.record_id for r in seen)),
                          record_set_sha256=record_set_hash(seen),
                          layers=tuple(layers_of_group(position))))
    return out


# --- the manifest ------------------------------------------------------------------------

def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> None:
    version_dir.mkdir(parents=True, exist_ok=True)
    (version_dir / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def read_manifest(version_dir: Path) -> dict[str, Any]:
    path = version_dir / MANIFEST
    if not path.is_file():
        raise ValueError(f"{version_dir} is not an S3T version (no {MANIFEST})")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"unsupported S3T manifest format {manifest.get('format')!r}")
    return manifest


def deactivate(manifest: dict[str, Any], deleted: Iterable[str]) -> dict[str, Any]:
    """A copy of `manifest` in which every sequence is cut before its first prefix whose
    training records include a deleted record id. Never lengthens a sequence."""
    gone = set(deleted)
    out = json.loads(json.dumps(manifest))
    for shard in out["shards"]:
        for seq in shard["sequences"]:
            active = seq["active"]
            for prefix in seq["prefixes"][:active]:
                if gone.intersection(prefix["record_ids"]):
                    active = prefix["position"]
                    break
            seq["active"] = active
    out["deleted_record_ids"] = sorted(set(out.get("deleted_record_ids", [])) | gone)
    return out


def serving_choice(manifest: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]]]]:
    """(shard, active prefixes) per shard that still has one: its longest active sequence
    (the lowest sequence index among equals)."""
    out = []
    for shard in manifest["shards"]:
        best = max(shard["sequences"], key=lambda s: (s["active"], -s["index"]), default=None)
        if best is not None and best["active"] > 0:
            out.append((shard["shard"], best["prefixes"][:best["active"]]))
    return out


def active_groups(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Every prefix (layer group checkpoint) that serving uses, with its shard."""
    return [{**prefix, "shard": shard} for shard, prefixes in serving_choice(manifest)
            for prefix in prefixes]


def exactness_evidence(manifest: dict[str, Any], deleted: Iterable[str]) -> dict[str, Any]:
    """What a receipt shows: every served layer group, the hash of the records it saw, and
    that none of the deleted ids is among them."""
    gone = set(deleted)
    groups = active_groups(manifest)
    overlap = sorted({i for g in groups for i in g["record_ids"] if i in gone})
    return {
        "served_groups": [{"shard": g["shard"], "position": g["position"],
                           "prefix_hash": g["prefix_hash"],
                           "record_set_sha256": g["record_set_sha256"],
                           "records": len(g["record_ids"])} for g in groups],
        "deleted_ids_in_served_groups": overlap,
        "exact": not overlap,
    }
