"""S3T's pure parts on hand-made data: placement, sequence selection, deactivation."""

from __future__ import annotations

import itertools

import pytest

from workers.engines.s3t import plan as plans
from workers.engines.s3t.config import S3TConfig
from workers.engines.s3t.plan import PlanRecord
from workers.engines.s3t.sequences import expected_survival, select_sequences, surviving_length
from workers.engines.s3t.sharding import RecordKey, assign, assign_slices, shard_of


def test_a_subjects_records_share_one_shard_and_one_slice() -> None:
    keys = [RecordKey(f"s{i}-r{j}", f"s{i}") for i in range(20) for j in range(3)]
    placed = assign(keys, shards=4, slices=3)
    for i in range(20):
        assert len({placed[f"s{i}-r{j}"] for j in range(3)}) == 1


def test_placement_is_stable_and_independent_of_input_order() -> None:
    keys = [RecordKey(f"r{i}", None) for i in range(50)]
    assert assign(keys, shards=3, slices=2) == assign(list(reversed(keys)), shards=3, slices=2)
    # the shard depends only on the record's own key, not on what else is in the dataset
    assert shard_of(RecordKey("r7"), 3) == shard_of(RecordKey("r7", None), 3)
    assert {shard_of(RecordKey(f"r{i}"), 3) for i in range(50)} == {0, 1, 2}


def test_slices_are_balanced_by_record_count() -> None:
    keys = [RecordKey(f"r{i}", f"s{i // 2}") for i in range(16)]  # 8 subjects x 2 records
    sizes = [0, 0, 0, 0]
    for slice_ in assign_slices(keys, 4).values():
        sizes[slice_] += 1
    assert sizes == [4, 4, 4, 4]


def test_one_sequence_is_the_natural_order() -> None:
    assert select_sequences(4, 1) == [(0, 1, 2, 3)]


@pytest.mark.parametrize("slices,budget", [(2, 2), (3, 3), (4, 2), (4, 4), (5, 3)])
def test_selected_sequences_start_apart_and_overlap_little(slices: int, budget: int) -> None:
    orders = select_sequences(slices, budget)
    assert len(set(orders)) == budget
    assert all(sorted(o) == list(range(slices)) for o in orders)
    # While B <= L, every position holds a different slice in every sequence (Latin rows),
    # so deleting any single slice still leaves B-1 sequences at least one group.
    for position in range(slices):
        assert len({o[position] for o in orders}) == budget


@pytest.mark.parametrize("slices,budget", [(3, 2), (4, 2), (4, 3), (4, 4)])
def test_selection_beats_naive_choices_in_expected_survival(slices: int, budget: int) -> None:
    chosen = expected_survival(select_sequences(slices, budget), slices)
    # naive: the first `budget` permutations in lexicographic order (they share prefixes)
    naive = list(itertools.permutations(range(slices)))[:budget]
    assert chosen > expected_survival(naive, slices)
    assert chosen > expected_survival([tuple(range(slices))], slices)
    # and it is the best possible for a single affected slice when B = L (Latin square)
    if budget == slices:
        best = max(expected_survival(list(c), slices, p_affected=0.01)
                   for c in itertools.combinations(itertools.permutations(range(slices)),
                                                   budget))
        assert expected_survival(select_sequences(slices, budget), slices,
                                 p_affected=0.01) == pytest.approx(best)


def test_surviving_length_cuts_before_the_first_affected_slice() -> None:
    assert surviving_length((2, 0, 1), set()) == 3
    assert surviving_length((2, 0, 1), {1}) == 2
    assert surviving_length((2, 0, 1), {0, 1}) == 1
    assert surviving_length((2, 0, 1), {2}) == 0


def _manifest(records: list[PlanRecord], orders: list[tuple[int, ...]]) -> dict:
    cfg = S3TConfig(shards=1, slices=3, sequences_per_shard=len(orders), layers_per_group=1)
    seqs = []
    for index, order in enumerate(orders):
        prefixes = plans.plan_prefixes(order, records, root="root",
                                       layers_of_group=lambda k: cfg.group_layers(3, k))
        seqs.append({"index": index, "slices": list(order), "active": len(order),
                     "prefixes": [{"position": p.position, "slice": p.slice,
                                   "prefix_hash": p.prefix_hash, "object_key": "k",
                                   "layers": list(p.layers), "record_ids": list(p.record_ids),
                                   "record_set_sha256": p.record_set_sha256}
                                  for p in prefixes]})
    return {"format": plans.FORMAT, "config": cfg.to_dict(), "dataset": "d",
            "shards": [{"shard": 0, "sequences": seqs}]}


RECORDS = [PlanRecord(f"r{i}", None, 0, i % 3, f"{i:064x}") for i in range(6)]


def test_deactivation_cuts_every_sequence_before_its_first_affected_slice() -> None:
    manifest = _manifest(RECORDS, [(0, 1, 2), (1, 2, 0), (2, 0, 1)])
    cut = plans.deactivate(manifest, ["r4"])  # r4 is in slice 1
    assert [q["active"] for q in cut["shards"][0]["sequences"]] == [1, 0, 2]
    # serving takes the longest survivor: sequence 2 (slices 2, 0), records of slices 2 and 0
    (shard, prefixes), = plans.serving_choice(cut)
    assert [p["slice"] for p in prefixes] == [2, 0]
    assert "r4" not in {i for p in prefixes for i in p["record_ids"]}
    assert plans.exactness_evidence(cut, ["r4"])["exact"]
    # deactivation never lengthens, and deleting everything drops the shard
    again = plans.deactivate(cut, ["r0"])
    assert [q["active"] for q in again["shards"][0]["sequences"]] == [0, 0, 1]
    assert plans.serving_choice(plans.deactivate(again, ["r2"])) == []
    assert manifest["shards"][0]["sequences"][0]["active"] == 3, "the input is not modified"


def test_identical_prefixes_have_identical_hashes_and_a_deletion_renames_the_rest() -> None:
    a = _manifest(RECORDS, [(0, 1, 2), (0, 2, 1)])["shards"][0]["sequences"]
    assert a[0]["prefixes"][0]["prefix_hash"] == a[1]["prefixes"][0]["prefix_hash"]
    assert a[0]["prefixes"][1]["prefix_hash"] != a[1]["prefixes"][1]["prefix_hash"]
    fewer = [r for r in RECORDS if r.record_id != "r4"]  # slice 1 loses r4
    b = _manifest(fewer, [(0, 1, 2)])["shards"][0]["sequences"][0]["prefixes"]
    assert b[0]["prefix_hash"] == a[0]["prefixes"][0]["prefix_hash"]  # reused
    assert b[1]["prefix_hash"] != a[0]["prefixes"][1]["prefix_hash"]  # retrained
    assert b[2]["prefix_hash"] != a[0]["prefixes"][2]["prefix_hash"]
    # a changed content hash (same ids) renames the prefix too
    edited = [PlanRecord(r.record_id, None, 0, r.slice, "f" * 64 if r.record_id == "r0"
                         else r.content_sha256) for r in RECORDS]
    c = _manifest(edited, [(0, 1, 2)])["shards"][0]["sequences"][0]["prefixes"]
    assert c[0]["prefix_hash"] != a[0]["prefixes"][0]["prefix_hash"]


def test_layer_groups_go_top_down_and_must_fit() -> None:
    from storage.errors import InvalidRequest

    cfg = S3TConfig(slices=3)
    assert cfg.group_layers(30, 0) == list(range(22, 30))
    assert cfg.group_layers(30, 2) == list(range(6, 14))
    with pytest.raises(InvalidRequest, match="do not fit"):
        S3TConfig(slices=3, layers_per_group=11).group_size(30)
    with pytest.raises(InvalidRequest, match="orderings"):
        S3TConfig(slices=2, sequences_per_shard=3)
    # prefixes trained on other layers never share a hash (so never a checkpoint)
    assert S3TConfig(slices=2).training_key(8) != S3TConfig(slices=4).training_key(8)
    assert (S3TConfig(slices=2, shards=3).training_key(30)
            == S3TConfig(slices=2, shards=1, sequences_per_shard=1).training_key(30))
    with pytest.raises(InvalidRequest, match="unknown s3t option"):
        S3TConfig.from_options({"shard": 2})


def test_shard_combination_by_logits_and_by_probabilities() -> None:
    import torch

    from workers.engines.s3t.serving import combine

    knows = torch.tensor([[10.0, 0.0, 0.0]])  # one shard is sure of token 0
    guesses = torch.tensor([[-6.0, 3.0, 0.0]])  # the other leans to token 1, never token 0
    assert torch.allclose(combine([knows, guesses], "logits"), torch.tensor([[2.0, 1.5, 0.0]]))
    mean_p = (torch.softmax(knows, -1) + torch.softmax(guesses, -1)) / 2
    probs = combine([knows, guesses], "probs")
    assert torch.allclose(probs.exp(), mean_p, atol=1e-6)
    assert int(probs.argmax()) == 0
    # a very sure wrong shard wins under logits (a geometric mean punishes token 0's -6)
    sure_wrong = torch.tensor([[-20.0, 12.0, 0.0]])
    assert int(combine([knows, sure_wrong], "logits").argmax()) == 1
    with pytest.raises(ValueError):
        combine([knows], "max")
