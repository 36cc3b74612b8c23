"""Membership inference on text: does the model treat the forget texts as seen data?

Each attack turns one text's per-token log-probabilities into a score where higher means
"more likely a member" (a text the model was trained on); the AUC of member scores against
held-out (non-member) scores is the attack's success. After good unlearning the forget set
should look like held-out text: AUC near that of a model that never saw it.

- loss: the mean token log-probability (the negative loss), Yeom et al. (2018).
- Min-K% Prob (Shi et al., 2024, "Detecting Pretraining Data from LLMs"): the mean of the
  k% lowest token log-probabilities; unseen text has a few very unlikely tokens.
- Min-K%++ (Zhang et al., 2024): each token's log-probability standardised by the mean and
  spread of log-probabilities under the model's own next-token distribution,
  (log p(x_t) - mu_t) / sigma_t, then Min-K% over those.
- PrivLeak (MUSE, Shi et al., 2024): (AUC_unlearned - AUC_reference) / AUC_reference, the
  reference ideally a model retrained without the forget set. 0 is ideal; > 0 leaks
  (under-unlearning), < 0 is over-unlearning (the forget set now looks *less* familiar).

Pure Python: `workers.evaluation.scoring` computes the token statistics with a model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

DEFAULT_K = 0.2
"""Min-K% with k = 20%, the setting both papers recommend."""


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise ValueError("k must be in (0, 1]")


def _lowest_mean(values: Sequence[float], k: float) -> float:
    _check_k(k)
    if not values:
        raise ValueError("a text needs at least one scored token")
    count = max(1, int(len(values) * k))
    return sum(sorted(values)[:count]) / count


def loss_score(token_logps: Sequence[float]) -> float:
    """Mean token log-probability (= minus the loss): higher means more member-like."""
    if not token_logps:
        raise ValueError("a text needs at least one scored token")
    return sum(token_logps) / len(token_logps)


def min_k_prob(token_logps: Sequence[float], k: float = DEFAULT_K) -> float:
    """Min-K% Prob: mean of the lowest k% (at least one) of the token log-probabilities."""
    return _lowest_mean(token_logps, k)


def min_k_plus_plus(token_logps: Sequence[float], means: Sequence[float],
                    stds: Sequence[float], k: float = DEFAULT_K) -> float:
    """Min-K%++: Min-K% over (log p(x_t) - mu_t) / sigma_t.

    means[t], stds[t]: mean and standard deviation of log p(z) for z drawn from the model's
    next-token distribution at position t (E_z[log p(z)], sqrt(Var_z[log p(z)])).
    """
    if not (len(token_logps) == len(means) == len(stds)):
        raise ValueError("token_logps, means and stds must have one value per token")
    # A degenerate (one-hot) distribution has sigma 0; its token is as expected as can be.
    standardised = [(lp - mu) / sd if sd > 0 else 0.0
                    for lp, mu, sd in zip(token_logps, means, stds)]
    return _lowest_mean(standardised, k)


def roc_auc(member_scores: Sequence[float], nonmember_scores: Sequence[float]) -> float:
    """P(member score > non-member score) + 0.5 P(tie): the ROC AUC (Mann-Whitney U)."""
    if not member_scores or not nonmember_scores:
        raise ValueError("the AUC needs at least one member and one non-member score")
    wins = 0.0
    for m in member_scores:
        for n in nonmember_scores:
            wins += 1.0 if m > n else 0.5 if m == n else 0.0
    return wins / (len(member_scores) * len(nonmember_scores))


def priv_leak(auc: float, reference_auc: float) -> float:
    """MUSE's PrivLeak: relative AUC gap to the reference model (0 ideal, > 0 leaks)."""
    if reference_auc <= 0.0 or math.isnan(reference_auc):
        raise ValueError("the reference AUC must be > 0")
    return (auc - reference_auc) / reference_auc
