"""The field's unlearning metrics on hand-computed values (no model)."""

from __future__ import annotations

import math

import pytest

from workers.evaluation.fluency import mean_repetition_rate, perplexity, repetition_rate
from workers.evaluation.membership import (
    loss_score,
    min_k_plus_plus,
    min_k_prob,
    priv_leak,
    roc_auc,
)
from workers.evaluation.memorisation import (
    continuation_probes,
    knowledge_memorisation,
    verbatim_memorisation,
)
from workers.evaluation.robustness import relearning_recovery, sustainability
from workers.evaluation.rouge import lcs_length, rouge_l, rouge_l_recall, words

# ------------------------------------------------------------------------------ ROUGE-L


def test_words_fold_case_and_split_on_punctuation():
    assert words("Charles Darwin's HMS-Beagle, 1831!") == ["charles", "darwin", "s", "hms",
                                                          "beagle", "1831"]


def test_lcs_of_word_lists():
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length("a b c".split(), "c b a".split()) == 1
    assert lcs_length([], ["a"]) == 0


def test_rouge_l_hand_computed():
    # reference 6 words, candidate 4 words, LCS "darwin was born shrewsbury" = 4
    score = rouge_l("Charles Darwin was born in Shrewsbury.", "Darwin was born, Shrewsbury")
    assert score.recall == pytest.approx(4 / 6)
    assert score.precision == pytest.approx(4 / 4)
    assert score.f1 == pytest.approx(2 * (4 / 6) * 1.0 / (4 / 6 + 1.0))


def test_rouge_l_recall_is_order_sensitive_and_zero_without_overlap():
    assert rouge_l_recall("the cat sat", "sat cat the") == pytest.approx(1 / 3)
    assert rouge_l_recall("the cat sat", "I don't know.") == 0.0
    assert rouge_l_recall("", "anything") == 0.0


# ------------------------------------------------------------------------------ MIA


def test_loss_and_min_k_scores():
    logps = [-0.1, -2.0, -0.5, -4.0, -0.2, -1.0, -0.3, -0.4, -0.6, -3.0]
    assert loss_score(logps) == pytest.approx(-12.1 / 10)
    # 20% of 10 tokens = the 2 lowest: -4.0 and -3.0
    assert min_k_prob(logps, k=0.2) == pytest.approx(-3.5)
    # at least one token is always kept
    assert min_k_prob([-1.0, -2.0], k=0.2) == pytest.approx(-2.0)
    assert min_k_prob(logps, k=1.0) == pytest.approx(loss_score(logps))


def test_min_k_plus_plus_standardises_each_token_before_taking_the_lowest():
    logps = [-1.0, -3.0, -2.0, -0.5]
    means = [-2.0, -2.0, -1.0, -0.5]
    stds = [1.0, 0.5, 2.0, 0.0]   # the last distribution is one-hot: z = 0
    # z-scores: 1.0, -2.0, -0.5, 0.0; the lowest 50% (2 tokens): -2.0 and -0.5
    assert min_k_plus_plus(logps, means, stds, k=0.5) == pytest.approx(-1.25)
    with pytest.raises(ValueError, match="one value per token"):
        min_k_plus_plus(logps, means[:2], stds)


def test_roc_auc_counts_wins_and_half_ties():
    assert roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    # pairs: (2>1) win, (2=2) tie, (0<1) loss, (0<2) loss -> 1.5 / 4
    assert roc_auc([2.0, 0.0], [1.0, 2.0]) == pytest.approx(0.375)
    with pytest.raises(ValueError):
        roc_auc([], [1.0])


def test_priv_leak_is_relative_to_the_reference():
    assert priv_leak(0.75, 0.5) == pytest.approx(0.5)      # leaks: members still stand out
    assert priv_leak(0.5, 0.5) == 0.0
    assert priv_leak(0.25, 0.5) == pytest.approx(-0.5)     # over-unlearned
    with pytest.raises(ValueError):
        priv_leak(0.5, 0.0)


# ------------------------------------------------------------------------------ fluency


def test_perplexity_of_token_logprobs():
    assert perplexity([math.log(0.5), math.log(0.5)]) == pytest.approx(2.0)
    assert perplexity([math.log(0.25), math.log(1.0)]) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        perplexity([])


def test_repetition_rate_hand_computed():
    assert repetition_rate("Charles Darwin was born in Shrewsbury.") == 0.0
    # bigrams: (the,the) x3 -> 1 distinct of 3
    assert repetition_rate("the the the the") == pytest.approx(2 / 3)
    # unigrams a b a b: 2 distinct of 4
    assert repetition_rate("a b a b", n=1) == pytest.approx(0.5)
    assert repetition_rate("one", n=2) == 0.0
    assert mean_repetition_rate(["the the the the", "a b"]) == pytest.approx(1 / 3)


# ------------------------------------------------------------------------------ MUSE memorisation


def test_continuation_probes_split_forget_texts():
    (probe,) = continuation_probes(["one two three four five six seven eight", "too short"])
    assert probe.prefix == "one two three four"
    assert probe.reference == "five six seven eight"


def test_verbatim_and_knowledge_memorisation_are_mean_rouge_l_recall():
    refs = ["five six seven eight", "Shrewsbury"]
    assert verbatim_memorisation(refs, ["five six nine eight", "I do not know"]) == \
        pytest.approx((3 / 4 + 0.0) / 2)
    assert knowledge_memorisation(["Charles Darwin"], ["It was Darwin."]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="1 outputs for 2 references"):
        verbatim_memorisation(refs, ["x"])


# ------------------------------------------------------------------------------ robustness


def test_relearning_recovery():
    assert relearning_recovery(before=1.0, after=0.2, relearned=0.2) == 0.0
    assert relearning_recovery(before=1.0, after=0.2, relearned=0.6) == pytest.approx(0.5)
    assert relearning_recovery(before=1.0, after=0.2, relearned=1.0) == pytest.approx(1.0)
    assert relearning_recovery(before=0.8, after=0.2, relearned=1.0) == 1.0   # clipped
    assert relearning_recovery(before=0.5, after=0.5, relearned=0.9) is None  # nothing forgot


def test_sustainability_over_sequential_requests():
    points = sustainability([
        {"forget_ratios": [0.1], "utility_ratio": 0.9},
        {"forget_ratios": [0.3, 0.1], "utility_ratio": 0.81},
    ])
    assert [p.requests for p in points] == [1, 2]
    assert points[1].forget_ratio == pytest.approx(0.2)
    assert points[1].utility_retention == pytest.approx(0.9)
    with pytest.raises(ValueError, match="expected 2"):
        sustainability([{"forget_ratios": [0.1], "utility_ratio": 1.0},
                        {"forget_ratios": [0.1], "utility_ratio": 1.0}])
