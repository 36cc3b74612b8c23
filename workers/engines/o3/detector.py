"""The per-request OOD detector: does this prompt concern request i, and how much (w in [0,1])?

Built on the base model's own hidden states (no second model, no download), in four steps:

1. Features. The prompt is chat-formatted and run through the frozen base model once; per
   chosen layer, the hidden states of the *user's* tokens are mean-pooled (the template's
   system turn is identical for every prompt and would swamp the pooled vector) and
   standardised with the mean and spread of generic prompts. Serving runs this same
   forward as its prefill, so detection costs almost nothing extra.
2. Contrastive entropy training (O3). Per layer a projection P_l (d -> k) is trained so
   that two views of each forget item, word-masked and unmasked, find each other: with
   z1 = norm(P h(masked views)) and z2 = norm(P h(unmasked)) over the forget items and
   the generic prompts, each row of softmax(z1 z2^T / tau) should be sharp, i.e. its
   entropy small, summed over layers (generic prompts are the other columns a row must
   not spread onto). A reconstruction term (decode h back from P h) stands in
   for O3's LM term, which guards its fine-tuned encoder; ours is frozen and the danger is
   a collapsing projection instead.
3. Scores. Per layer, the max cosine to the forget items' projected features and minus the
   Mahalanobis distance to them (shrunk covariance); the 2L scores are standardised by the
   generic prompts' scores and aggregated with a linear one-class SVM fitted on the forget
   items' masked views (O3's global aggregation), scored leave-one-out so that they look
   like new questions about the target, not copies of training items.
4. Calibration into w: 0 up to the generic prompts' highest aggregated score (plus a
   margin), 1 from a low quantile of the forget views' scores on, linear in between.
   Cut-offs are computed per request and stored with the version (O3's code hard-codes
   them per dataset).

Everything the detector needs at serving time is tensors (no scikit-learn at inference).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from workers.engines.o3.config import DetectorConfig

DETECTOR_WEIGHTS = "detector.safetensors"
DETECTOR_META = "detector.json"


# ---------------------------------------------------------------------------------------
# 1. features


@dataclass(frozen=True)
class TemplateSpan:
    """How many tokens the chat template puts before and after the user's text."""

    prefix: int
    suffix: int


def template_span(tokenizer: Any) -> TemplateSpan:
    """Measured from two different user texts: what they share at both ends is template."""
    from workers.model import format_chat

    a = tokenizer(format_chat(tokenizer, "alpha beta"), add_special_tokens=False)["input_ids"]
    b = tokenizer(format_chat(tokenizer, "gamma"), add_special_tokens=False)["input_ids"]
    prefix = 0
    while prefix < min(len(a), len(b)) and a[prefix] == b[prefix]:
        prefix += 1
    suffix = 0
    while (suffix < min(len(a), len(b)) - prefix
           and a[len(a) - 1 - suffix] == b[len(b) - 1 - suffix]):
        suffix += 1
    return TemplateSpan(prefix=prefix, suffix=suffix)


def encode_prompts(tokenizer: Any, prompts: Sequence[str], device: Any = "cpu") -> Any:
    """Chat-formatted, left-padded (the layout generation uses)."""
    from workers.model import format_chat

    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        return tokenizer([format_chat(tokenizer, p) for p in prompts], return_tensors="pt",
                         padding=True, add_special_tokens=False).to(device)
    finally:
        tokenizer.padding_side = side


def padded_positions(attention_mask: Tensor) -> Tensor:
    """Positions of left-padded rows as generate() numbers them: from each row's first real
    token. A forward whose cache generation continues from must use these."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def content_mask(attention_mask: Tensor, span: TemplateSpan, width: int | None = None
                 ) -> Tensor:
    """(B, width) True on the user's tokens of left-padded, chat-formatted rows.

    `width` may cut the rows short (the detection forward leaves out the last token); rows
    whose user part is empty fall back to all their tokens.
    """
    batch, total = attention_mask.shape
    width = total if width is None else width
    pos = torch.arange(width, device=attention_mask.device)[None, :]
    pad = total - attention_mask.sum(-1, keepdim=True)  # left padding per row
    mask = (pos >= pad + span.prefix) & (pos < total - span.suffix)
    empty = ~mask.any(-1, keepdim=True)
    real = attention_mask[:, :width].bool()
    return torch.where(empty, real, mask & real)


def pooled_from_hidden(hidden_states: Sequence[Tensor], layers: Sequence[int],
                       mask: Tensor) -> Tensor:
    """(L, B, d) mean over the masked tokens of each chosen layer's hidden states."""
    m = mask.to(hidden_states[0].dtype)[..., None]  # (B, T, 1)
    denom = m.sum(1).clamp(min=1.0)
    return torch.stack([(hidden_states[i][:, :m.shape[1]].float() * m).sum(1) / denom
                        for i in layers])


def detector_features(hidden_states: Sequence[Tensor], layers: Sequence[int], mask: Tensor,
                      pooling: str) -> Tensor:
    """(F, B, d) features: per layer the user-token mean ("content"), the last position
    ("last", left padding puts every row's last token there), or both (F = 2L, content
    first)."""
    parts = []
    if pooling in ("content", "both"):
        parts.append(pooled_from_hidden(hidden_states, layers, mask))
    if pooling in ("last", "both"):
        parts.append(torch.stack([hidden_states[i][:, mask.shape[1] - 1].float()
                                  for i in layers]))
    return torch.cat(parts)


@torch.no_grad()
def prompt_features(model: Any, tokenizer: Any, prompts: Sequence[str], layers: Sequence[int],
                    *, pooling: str = "content", batch_size: int = 16) -> Tensor:
    """(F, N, d) features of `prompts` from the base model, computed exactly as serving
    computes them: one forward over each chat-formatted prompt without its last token (the
    forward whose KV cache generation then continues from)."""
    span = template_span(tokenizer)
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(prompts), batch_size):
        enc = encode_prompts(tokenizer, prompts[start:start + batch_size], device)
        width = enc["input_ids"].shape[1] - 1
        res = model(input_ids=enc["input_ids"][:, :width],
                    attention_mask=enc["attention_mask"][:, :width],
                    output_hidden_states=True, use_cache=False)
        mask = content_mask(enc["attention_mask"], span, width=width)
        out.append(detector_features(res.hidden_states, layers, mask, pooling).cpu())
    return torch.cat(out, 1)


def masked_view(text: str, prob: float, rng: random.Random) -> str:
    """The text with about `prob` of its words dropped (at least one word kept)."""
    words = text.split()
    kept = [w for w in words if rng.random() >= prob]
    if not kept:
        kept = [rng.choice(words)] if words else [text]
    return " ".join(kept)


# ---------------------------------------------------------------------------------------
# 2. the contrastive entropy loss


def contrastive_entropy_loss(z1: Tensor, z2: Tensor, temperature: float = 0.1) -> Tensor:
    """O3's contrastive entropy: sum over layers of the mean entropy of softmax(z1 z2^T / t).

    z1: (L, N, k) masked views; z2: (L, M, k) unmasked items (M >= N; extra rows are
    negatives such as generic prompts); 2-D inputs mean one layer. Both are L2-normalised
    here. A row's entropy is low when its masked item is much closer to one unmasked item
    than to all the others.
    """
    if z1.dim() == 2:
        z1, z2 = z1[None], z2[None]
    z1 = F.normalize(z1, dim=-1)
    z2 = F.normalize(z2, dim=-1)
    logits = z1 @ z2.transpose(-1, -2) / temperature  # (L, N, N)
    logp = torch.log_softmax(logits, -1)
    entropy = -(logp.exp() * logp).sum(-1)  # (L, N)
    return entropy.mean(-1).sum()


def reconstruction_loss(proj: Tensor, h: Tensor, z: Tensor | None = None) -> Tensor:
    """Relative error of decoding h back from its projection (tied weights), layers summed.

    proj: (L, k, d); h: (L, N, d) standardised features; z = h proj^T when already at hand.
    ||P^T P h - h||^2 = ||h||^2 - 2 ||z||^2 + z^T (P P^T) z, so only the (k, k) Gram matrix
    is needed, never the d-wide reconstruction (the costly part on a CPU).
    """
    if z is None:
        z = h @ proj.transpose(-1, -2)                       # (L, N, k)
    gram = proj @ proj.transpose(-1, -2)                     # (L, k, k)
    hh = (h ** 2).sum(-1)                                    # (L, N)
    err = hh - 2 * (z ** 2).sum(-1) + torch.einsum("lnk,lkj,lnj->ln", z, gram, z)
    return (err.mean(-1) / hh.mean(-1).clamp(min=1e-8)).sum()


def train_projection(views: Tensor, unmasked: Tensor, cfg: DetectorConfig,
                     negatives: Tensor | None = None) -> Tensor:
    """(L, k, d) projections trained with the contrastive entropy (+ reconstruction) loss.

    views: (L, V, N, d) standardised features of V masked views of N items; unmasked:
    (L, N, d); negatives: (L, G, d) extra unmasked columns (generic prompts). Full batch
    per epoch, one view set at a time; initialised with the top principal directions of
    the items and their views (a deterministic start).
    """
    n_layers, n_views, n_items, dim = views.shape
    k = min(cfg.proj_dim, dim)
    init = []
    for layer in range(n_layers):
        x = torch.cat([unmasked[layer], views[layer].reshape(-1, dim)])
        x = (x - x.mean(0, keepdim=True)).double()
        # Principal directions from the small (n, n) Gram matrix: n items << d dimensions,
        # and a full SVD of the (n, d) matrix is the slow part on a loaded CPU.
        evals, evecs = torch.linalg.eigh(x @ x.T)
        keep = evals > evals.max() * 1e-9
        evals, evecs = evals[keep].flip(0), evecs[:, keep].flip(1)
        basis = ((evecs.T @ x) / evals.sqrt()[:, None])[:k].float()
        if basis.shape[0] < k:  # fewer items than dimensions asked for: pad orthogonally
            gen = torch.Generator().manual_seed(cfg.seed + layer)
            extra = torch.randn(k - basis.shape[0], dim, generator=gen)
            basis = torch.cat([basis, extra / extra.norm(dim=-1, keepdim=True)])
        init.append(basis)
    proj = torch.stack(init).clone().requires_grad_(True)
    opt = torch.optim.Adam([proj], lr=cfg.lr)
    columns = unmasked if negatives is None else torch.cat([unmasked, negatives], 1)
    for epoch in range(cfg.epochs):
        v = views[:, epoch % n_views]  # (L, N, d)
        z1, z2 = v @ proj.transpose(-1, -2), columns @ proj.transpose(-1, -2)
        loss = contrastive_entropy_loss(z1, z2, cfg.temperature)
        if cfg.recon_weight > 0:
            loss = loss + cfg.recon_weight * reconstruction_loss(proj, columns, z2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return proj.detach()


# ---------------------------------------------------------------------------------------
# 3. scores and 4. calibration: the fitted detector


@dataclass
class Detector:
    """A fitted detector: feature standardisation, projections, forget features, aggregation.

    Shapes: L layers, d model width, k projection width, n forget items, S = 2L scores.
    """

    layers: tuple[int, ...]
    feat_mean: Tensor       # (L, d)  generic prompts' mean
    feat_std: Tensor        # (L, d)
    proj: Tensor            # (L, k, d)
    forget_z: Tensor        # (L, n, k) normalised projected forget features
    maha_mean: Tensor       # (L, k)
    maha_prec: Tensor       # (L, k, k)
    score_mean: Tensor      # (S,)  generic prompts' score statistics
    score_std: Tensor       # (S,)
    agg_coef: Tensor        # (S,)  linear aggregation (one-class SVM normal, or mean)
    agg_bias: float
    w_low: float            # aggregated score at and below which w = 0
    w_high: float           # ... at and above which w = 1
    pooling: str = "content"  # how features are taken from each layer (DetectorConfig)

    def features(self, hidden_states: Sequence[Tensor], mask: Tensor) -> Tensor:
        """(F, B, d) this detector's features from a forward's hidden states."""
        return detector_features(hidden_states, self.layers, mask, self.pooling)

    # -- scoring -----------------------------------------------------------------------

    def layer_scores(self, feats: Tensor, *, leave_out: Tensor | None = None) -> Tensor:
        """(B, 2L): per layer max cosine to the forget items, then -Mahalanobis distance.

        feats: (L, B, d) raw pooled features. leave_out: (B,) index of a forget item to
        ignore in the max cosine per row (-1: none), for scoring the forget set's own views.
        """
        h = (feats.float() - self.feat_mean[:, None]) / self.feat_std[:, None]
        z = h @ self.proj.transpose(-1, -2)                        # (L, B, k)
        cos = F.normalize(z, dim=-1) @ self.forget_z.transpose(-1, -2)  # (L, B, n)
        if leave_out is not None and self.forget_z.shape[1] > 1:
            hide = F.one_hot(leave_out.clamp(min=0), self.forget_z.shape[1]).bool()
            hide &= (leave_out >= 0)[:, None]
            cos = cos.masked_fill(hide[None], -2.0)
        max_cos = cos.max(-1).values                               # (L, B)
        diff = z - self.maha_mean[:, None]
        maha = torch.einsum("lbk,lkj,lbj->lb", diff, self.maha_prec, diff).clamp(min=0).sqrt()
        return torch.cat([max_cos, -maha]).T                       # (B, 2L)

    def aggregate(self, scores: Tensor) -> Tensor:
        """(B,) one number per input: larger = more like the forget set."""
        s = (scores - self.score_mean) / self.score_std
        return s @ self.agg_coef + self.agg_bias

    def weight_from_score(self, agg: Tensor) -> Tensor:
        return ((agg - self.w_low) / max(self.w_high - self.w_low, 1e-6)).clamp(0.0, 1.0)

    def weights(self, feats: Tensor) -> Tensor:
        """(B,) w in [0, 1] from (L, B, d) pooled features."""
        return self.weight_from_score(self.aggregate(self.layer_scores(feats)))

    def score(self, feats: Tensor) -> Tensor:
        """(B,) the aggregated score (for AUROC)."""
        return self.aggregate(self.layer_scores(feats))

    # -- storage -----------------------------------------------------------------------

    def save(self, path: Path, extra_meta: dict[str, Any] | None = None) -> None:
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        save_file(tensors, str(path / DETECTOR_WEIGHTS))
        meta = {"layers": list(self.layers), "agg_bias": self.agg_bias, "w_low": self.w_low,
                "w_high": self.w_high, "pooling": self.pooling, **(extra_meta or {})}
        (path / DETECTOR_META).write_text(json.dumps(meta, indent=2, sort_keys=True))

    @classmethod
    def load(cls, path: Path) -> Detector:
        from safetensors.torch import load_file

        tensors = load_file(str(path / DETECTOR_WEIGHTS))
        meta = json.loads((path / DETECTOR_META).read_text())
        return cls(layers=tuple(meta["layers"]), agg_bias=float(meta["agg_bias"]),
                   w_low=float(meta["w_low"]), w_high=float(meta["w_high"]),
                   pooling=str(meta.get("pooling", "content")),
                   **{name: tensors[name] for name in _TENSORS})


_TENSORS = ("feat_mean", "feat_std", "proj", "forget_z", "maha_mean", "maha_prec",
            "score_mean", "score_std", "agg_coef")


def fit_detector(*, forget: Tensor, views: Tensor, view_items: Tensor, generic: Tensor,
                 layers: Sequence[int], cfg: DetectorConfig,
                 calibration: Tensor | None = None) -> tuple[Detector, dict[str, Any]]:
    """Fit the detector from pooled features.

    forget: (F, n, d) the forget items; views: (F, m, d) their masked views, view_items:
    (m,) which item each view came from; generic: (F, g, d) generic prompts (the
    in-distribution traffic the block must leave alone) the projection trains against;
    calibration: (F, c, d) other generic prompts, used only for the score statistics and
    the cut-offs (default: `generic`). Returns the detector and its calibration summary.
    """
    torch.manual_seed(cfg.seed)
    mean = generic.mean(1)
    std = generic.std(1).clamp(min=1e-4)

    def standard(x: Tensor) -> Tensor:
        return (x - mean[:, None]) / std[:, None]

    n_items, n_feats = forget.shape[1], forget.shape[0]
    per_item = views.shape[1] // max(n_items, 1)
    # (L, V, N, d): view sets aligned with the items (views come item by item).
    aligned = standard(views).reshape(views.shape[0], n_items, per_item, -1).transpose(1, 2)
    proj = train_projection(aligned, standard(forget), cfg, negatives=standard(generic))

    z_forget = standard(forget) @ proj.transpose(-1, -2)            # (L, n, k)
    maha_mean = z_forget.mean(1)
    precisions = []
    for layer in range(z_forget.shape[0]):
        precisions.append(_shrunk_precision(z_forget[layer], cfg.shrinkage))
    det = Detector(layers=tuple(layers), feat_mean=mean, feat_std=std, proj=proj,
                   forget_z=F.normalize(z_forget, dim=-1), maha_mean=maha_mean,
                   maha_prec=torch.stack(precisions),
                   score_mean=torch.zeros(2 * n_feats), score_std=torch.ones(2 * n_feats),
                   agg_coef=torch.full((2 * n_feats,), 1.0 / (2 * n_feats)),
                   agg_bias=0.0, w_low=0.0, w_high=1.0, pooling=cfg.pooling)
    generic_scores = det.layer_scores(generic if calibration is None else calibration)
    det.score_mean = generic_scores.mean(0)
    det.score_std = generic_scores.std(0).clamp(min=1e-4)
    view_scores = det.layer_scores(views, leave_out=view_items)
    standardised = (view_scores - det.score_mean) / det.score_std
    if cfg.aggregator == "ocsvm":
        det.agg_coef, det.agg_bias = _fit_linear_ocsvm(standardised, cfg.nu)
    # Calibrate on what the aggregation says about both populations.
    g = det.aggregate(generic_scores)
    f = det.aggregate(view_scores)
    spread = float(g.std()) if g.numel() > 1 else 1.0
    det.w_low = float(torch.quantile(g, cfg.w_low_quantile)) + cfg.generic_margin * spread
    det.w_high = max(float(torch.quantile(f, cfg.w_high_quantile)), det.w_low + 1e-3 * spread)
    summary = {"generic_score_max": float(g.max()), "generic_score_mean": float(g.mean()),
               "forget_view_score_mean": float(f.mean()),
               "forget_view_score_min": float(f.min()), "w_low": det.w_low,
               "w_high": det.w_high,
               "forget_view_weight_mean": float(det.weight_from_score(f).mean()),
               "generic_weight_max": float(det.weight_from_score(g).max())}
    return det, summary


def _shrunk_precision(z: Tensor, floor: float) -> Tensor:
    """Inverse of the Ledoit-Wolf shrunk covariance of z (n, k) (n may be << k)."""
    from sklearn.covariance import LedoitWolf

    k = z.shape[1]
    if z.shape[0] < 2:
        return torch.eye(k)
    cov = torch.as_tensor(LedoitWolf().fit(z.double().numpy()).covariance_, dtype=torch.float64)
    cov = cov + floor * torch.eye(k, dtype=torch.float64) * cov.diagonal().mean()
    return torch.linalg.inv(cov).float()


def _fit_linear_ocsvm(x: Tensor, nu: float) -> tuple[Tensor, float]:
    """Normal and offset of a linear one-class SVM on x (m, S): decision = x . coef + bias.

    The scores are standardised by the generic prompts, so the origin the SVM separates the
    forget views from is the generic traffic's centre.
    """
    from sklearn.svm import OneClassSVM

    svm = OneClassSVM(kernel="linear", nu=nu).fit(x.double().numpy())
    coef = torch.tensor(svm.coef_[0].copy(), dtype=torch.float32)
    norm = float(coef.norm()) or 1.0
    return coef / norm, float(svm.intercept_[0]) / norm


# ---------------------------------------------------------------------------------------
# building one request's detector from its texts


def build_detector(model: Any, tokenizer: Any, *, forget_prompts: Sequence[str],
                   generic_prompts: Sequence[str], cfg: DetectorConfig,
                   hard_negative_prompts: Sequence[str] = ()
                   ) -> tuple[Detector, dict[str, Any]]:
    """Features from the base `model`, masked views, fit: one request's detector.

    generic_prompts and hard_negative_prompts (questions about other entities, used when
    cfg.hard_negatives) are each split into a part the projection trains against and a
    part used only for calibration.
    """
    n_hidden = int(getattr(model.config, "num_hidden_layers"))
    layers = cfg.layer_indices(n_hidden)
    rng = random.Random(cfg.seed)
    views = [masked_view(p, cfg.mask_prob, rng) for p in forget_prompts for _ in range(cfg.views)]
    view_items = torch.tensor([i for i in range(len(forget_prompts)) for _ in range(cfg.views)])

    def feats(prompts: Sequence[str]) -> Tensor:
        return prompt_features(model, tokenizer, list(prompts), layers, pooling=cfg.pooling)

    train_generic, calib_generic = split_generic(generic_prompts, cfg)
    if cfg.hard_negatives and hard_negative_prompts:
        train_hard, calib_hard = split_generic(hard_negative_prompts, cfg)
        train_generic, calib_generic = train_generic + train_hard, calib_generic + calib_hard
    return fit_detector(forget=feats(forget_prompts), views=feats(views), view_items=view_items,
                        generic=feats(train_generic), layers=layers, cfg=cfg,
                        calibration=feats(calib_generic) if calib_generic else None)


def split_generic(prompts: Sequence[str], cfg: DetectorConfig) -> tuple[list[str], list[str]]:
    """(prompts the projection trains against, prompts kept for calibration only)."""
    order = list(prompts)
    random.Random(cfg.seed).shuffle(order)
    n_cal = int(round(len(order) * cfg.calibration_share))
    if n_cal < 2 or len(order) - n_cal < 2:
        return order, []
    return order[n_cal:], order[:n_cal]


def auroc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """P(score of a positive > score of a negative), ties counting half."""
    pos, neg = list(positive), list(negative)
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))
