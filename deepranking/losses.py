"""Ranking losses and triplet mining: one module behind one contract.

The contract, in the style of pytorch-metric-learning (a *miner* returns indices
that the *loss* consumes) and torchvision references/similarity (the loss owns
its miner):

* A **miner** is a pure function
  ``miner(dist [M, M], labels [M] | None, n_triplets, margin) -> Triplets``.
  ``dist`` is the detached float32 Euclidean distance matrix of the batch
  (:func:`distance_matrix`). It returns :class:`Triplets` ``(anchor, positive,
  negative, valid)``: three long index tensors [A] into the batch rows and a
  bool mask [A]. ``A`` depends only on ``M`` / ``n_triplets``, never on the
  data, and the miners use no ``nonzero()``, boolean indexing or ``.item()``:
  mining on the GPU never waits for the CPU (no host synchronisation per step).
  Rows that are not a usable triplet are kept with ``valid = False`` and are
  dropped from the loss by the mask.
* :class:`RankingLoss` mines on ``distance_matrix(emb.detach())``, then
  recomputes ``D(a, p)`` and ``D(a, n)`` exactly and differentiably with
  :func:`pairwise_distance` on the gathered rows, and averages the hinge
  ``max(0, g + D(a, p) - D(a, n))`` over the valid triplets. Its statistics are
  ``(sum, count)`` pairs of 0-d tensors, so a caller can accumulate them over
  steps and ranks and call ``.item()`` once, when it logs.
* Adding a miner = one function + one entry in :data:`MINERS`.

Batch layout of a triplet-CSV batch of ``b = n_triplets`` triplets (one forward
pass of ``M = 3b`` images)::

    rows [0, b)    queries    (anchors)
    rows [b, 2b)   positives  (row b + i is the positive of query i)
    rows [2b, 3b)  negatives  (row 2b + i is the negative of query i)

``labels`` [M] are the class ids of those rows (folder names); only the
``"none"`` miner works without them.

Distances are Euclidean, not squared, everywhere (training, mining, validation).

:class:`CosineClassifier` and :func:`class_loss` are the optional class ("id")
loss trained next to the ranking loss.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

# (sum, count) of one statistic, both 0-d float tensors on the embeddings' device.
Stat = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------
# Distances and the hinge
# ---------------------------------------------------------------------------


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance [B] of a, b [B, D] (a tiny eps keeps the gradient finite at 0)."""
    return (a - b).pow(2).sum(1).add(1e-12).sqrt()


def hinge_terms(d_pos: torch.Tensor, d_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-triplet loss [B]: max(0, g + D(q,p) - D(q,n))."""
    return F.relu(margin + d_pos - d_neg)


def triplet_hinge_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over the batch of max(0, g + D(q,p) - D(q,n)); q, p, n: [B, D], Euclidean D (not squared)."""
    return hinge_terms(pairwise_distance(q, p), pairwise_distance(q, n), margin).mean()


def distance_matrix(emb: torch.Tensor) -> torch.Tensor:
    """Euclidean distance matrix [M, M] (float32) of emb [M, D], for mining (call it on ``emb.detach()``).

    Computed from the differences, not from ``|a|^2 + |b|^2 - 2 a.b``: the Gram
    form cancels catastrophically for close points (and runs in TF32 on GPUs
    that allow it), which would scramble exactly the near-duplicate positives
    and hard negatives that mining is about. Memory stays O(M^2); the diagonal
    is exactly 0.
    """
    e = emb.float()
    return torch.cdist(e, e, compute_mode="donot_use_mm_for_euclid_dist")


# ---------------------------------------------------------------------------
# Miners: (dist [M, M], labels [M] | None, n_triplets, margin) -> Triplets of fixed size A
# ---------------------------------------------------------------------------


class Triplets(NamedTuple):
    """A miner's output: row indices [A] (long) into the batch, and which of the A triplets to use."""

    anchor: torch.Tensor  # [A] long
    positive: torch.Tensor  # [A] long
    negative: torch.Tensor  # [A] long
    valid: torch.Tensor  # [A] bool: False = not a usable triplet, dropped from the loss


Miner = Callable[[torch.Tensor, "torch.Tensor | None", int, float], Triplets]


def _need_labels(labels: torch.Tensor | None, name: str) -> torch.Tensor:
    if labels is None:
        raise ValueError(f"mining {name!r} needs class labels for the batch rows")
    return labels


def _label_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(same [M, M]: same label and not the row itself, other [M, M]: another label)."""
    eq = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return eq & ~eye, ~eq


def csv_triplets(dist: torch.Tensor, labels: torch.Tensor | None, n_triplets: int, margin: float) -> Triplets:
    """Mining "none": the CSV's triplets as given (A = b, all valid); labels may be None."""
    b = n_triplets
    i = torch.arange(b, device=dist.device)
    return Triplets(i, i + b, i + 2 * b, torch.ones(b, dtype=torch.bool, device=dist.device))


def batch_hard(dist: torch.Tensor, labels: torch.Tensor | None, n_triplets: int, margin: float) -> Triplets:
    """Batch-hard (Hermans et al. 2017, "In Defense of the Triplet Loss"): every row is an anchor (A = M).

    Its positive is the farthest *other* row with the same label, its negative
    the closest row with another label. An anchor without a positive (its
    class occurs once in the batch) or without a negative (one class only) is
    invalid. Ties go to the lowest row index.
    """
    labels = _need_labels(labels, "batch-hard")
    same, other = _label_masks(labels)  # [M, M] each
    pos = torch.where(same, dist, torch.full_like(dist, -1.0)).argmax(1)  # [M] farthest same-label row
    neg = torch.where(other, dist, torch.full_like(dist, float("inf"))).argmin(1)  # [M] closest other-label row
    valid = same.any(1) & other.any(1)  # [M]
    return Triplets(torch.arange(len(labels), device=dist.device), pos, neg, valid)


def hard_negative(dist: torch.Tensor, labels: torch.Tensor | None, n_triplets: int, margin: float) -> Triplets:
    """Hardest negative (A = b): each CSV query with its CSV positive, and as negative the closest
    row of the whole batch (any of the 3b) with another label than the query.

    A query with no other-label row in the batch keeps its CSV negative, so
    every triplet stays valid.
    """
    labels = _need_labels(labels, "hard-negative")
    b = n_triplets
    i = torch.arange(b, device=dist.device)
    other = labels[:b, None] != labels[None, :]  # [b, M]
    idx = torch.where(other, dist[:b], torch.full_like(dist[:b], float("inf"))).argmin(1)  # [b]
    neg = torch.where(other.any(1), idx, i + 2 * b)
    return Triplets(i, i + b, neg, torch.ones(b, dtype=torch.bool, device=dist.device))


def semi_hard(dist: torch.Tensor, labels: torch.Tensor | None, n_triplets: int, margin: float) -> Triplets:
    """Semi-hard negatives, the published definition (Schroff et al. 2015, FaceNet).

    Every ordered positive pair (a, p) of the batch (a != p, same label) is a
    triplet; the candidates are all M * M ordered pairs (A = M^2, anchor-major:
    triplet a * M + p), invalid where (a, p) is not a positive pair. Its
    negative is the closest other-label row n inside the margin band

        D(a, p) < D(a, n) < D(a, p) + margin

    (Euclidean distances, as in the loss; FaceNet states it for squared ones).
    A pair with **no** negative in the band is INVALID and dropped from the
    loss: it is never replaced by the hardest negative (a negative closer than
    the positive), nor by an easy one (beyond the margin, whose hinge is 0
    anyway). A batch may therefore contribute no triplet at all.

    Done without an [M, M, M] tensor: sort each anchor's other-label
    distances once, then ``searchsorted`` finds, for every pair, the first
    negative strictly farther than D(a, p). Ties go to the lowest row index.
    """
    labels = _need_labels(labels, "semi-hard")
    m = len(labels)
    same, other = _label_masks(labels)  # [M, M] each
    neg_d = torch.where(other, dist, torch.full_like(dist, float("inf")))  # [M, M] same-label rows: never chosen
    sorted_d, order = neg_d.sort(dim=1, stable=True)  # [M, M] per anchor, ascending (stable: lowest index first)
    k = torch.searchsorted(sorted_d, dist.contiguous(), right=True)  # [M, M]: first negative with D(a,n) > D(a,p)
    k_safe = k.clamp(max=m - 1)
    cand_d = sorted_d.gather(1, k_safe)  # [M, M] its distance (inf when only same-label rows remain)
    cand_n = order.gather(1, k_safe)  # [M, M] its row
    in_band = (k < m) & (cand_d < dist + margin)  # strictly inside the band; inf never is
    valid = same & in_band  # [M, M]
    a = torch.arange(m, device=dist.device)
    return Triplets(a.repeat_interleave(m), a.repeat(m), cand_n.reshape(-1), valid.reshape(-1))


# Miners that need only labels, not the CSV's [q|p|n] layout: the ones for P x K batches.
LABEL_ONLY_MINERS = ("batch-hard", "semi-hard")
MINERS: dict[str, Miner] = {
    "none": csv_triplets,
    "batch-hard": batch_hard,
    "hard-negative": hard_negative,
    "semi-hard": semi_hard,
}


# ---------------------------------------------------------------------------
# The ranking loss
# ---------------------------------------------------------------------------


class RankingLoss:
    """Triplet hinge loss with margin ``margin`` on the triplets chosen by ``MINERS[mining]``.

    ``loss, stats = RankingLoss(g, mining)(emb [M, D], labels [M] | None, b)``
    with the batch layout of the module docstring (M = 3b). ``loss`` is
    ``sum(hinge * valid) / max(n_valid, 1)``: a batch without a valid triplet
    gives 0 that still has a grad graph (backward works, gradients are 0).
    ``stats`` maps names to (sum, count) 0-d tensors, never Python numbers:

    - ``loss``: (loss, 1)
    - ``d_pos`` / ``d_neg``: (sum over valid triplets of D(a,p) / D(a,n), n_valid)
    - ``active_fraction``: (valid triplets with hinge > 0, n_valid)
    - ``mined_fraction``: (n_valid, A)
    - ``triplet_loss``: (sum of the plain hinge over the CSV triplets as given, b):
      validation's definition, so train and val curves compare whatever the miner.
    """

    def __init__(self, margin: float, mining: str = "none"):
        if mining not in MINERS:
            raise ValueError(f"unknown mining {mining!r}; choose from {sorted(MINERS)}")
        self.margin = float(margin)
        self.mining = mining
        self.miner = MINERS[mining]

    @property
    def needs_labels(self) -> bool:
        return self.mining != "none"

    def __call__(self, emb: torch.Tensor, labels: torch.Tensor | None,
                 n_triplets: int | None) -> tuple[torch.Tensor, dict[str, Stat]]:
        """n_triplets: b for a triplet-CSV batch [q|p|n]; None for a P x K batch (no CSV layout: only the
        miners that need labels alone, batch-hard and semi-hard, apply, and no triplet_loss is reported)."""
        if n_triplets is None:
            if self.mining not in LABEL_ONLY_MINERS:
                raise ValueError(f"mining {self.mining!r} needs triplet-CSV batches; P x K batches take "
                                 f"{' or '.join(LABEL_ONLY_MINERS)}")
            b = 0
        else:
            b = int(n_triplets)
            if emb.dim() != 2 or b < 1 or emb.shape[0] != 3 * b:
                raise ValueError(f"emb must be [3 * n_triplets, D] (queries, positives, negatives); "
                                 f"got {tuple(emb.shape)} for n_triplets={n_triplets}")
        if labels is None and self.needs_labels:
            raise ValueError(f"mining {self.mining!r} needs labels")
        if labels is not None and labels.shape != (emb.shape[0],):
            raise ValueError(f"labels must be [{emb.shape[0]}], got {tuple(labels.shape)}")
        e = emb.float()  # [M, D]
        t = self.miner(distance_matrix(e.detach()), labels, b, self.margin)  # indices [A], valid [A]
        # Exact, differentiable distances of the chosen rows (the mining matrix is detached).
        ea = e[t.anchor]  # [A, D], gathered once for both distances
        d_pos = pairwise_distance(ea, e[t.positive])  # [A]
        d_neg = pairwise_distance(ea, e[t.negative])  # [A]
        hinge = hinge_terms(d_pos, d_neg, self.margin)  # [A]
        valid = t.valid.float()  # [A]
        n_valid = valid.sum()  # 0-d
        # where(), not multiply: an invalid row can never leak a NaN into the loss.
        loss = torch.where(t.valid, hinge, torch.zeros_like(hinge)).sum() / n_valid.clamp(min=1.0)

        with torch.no_grad():
            one = torch.ones((), device=e.device)
            ed = e.detach()
            stats = {
                "loss": (loss.detach(), one),
                "d_pos": ((d_pos.detach() * valid).sum(), n_valid),
                "d_neg": ((d_neg.detach() * valid).sum(), n_valid),
                "active_fraction": (((hinge.detach() > 0) & t.valid).float().sum(), n_valid),
                "mined_fraction": (n_valid, one * len(valid)),
            }
            if b:  # the plain hinge of the CSV triplets as given: validation's definition
                csv = hinge_terms(pairwise_distance(ed[:b], ed[b:2 * b]), pairwise_distance(ed[:b], ed[2 * b:]),
                                  self.margin)  # [b]
                stats["triplet_loss"] = (csv.sum(), one * b)
        return loss, stats


# ---------------------------------------------------------------------------
# The class ("id") loss
# ---------------------------------------------------------------------------


class CosineClassifier(torch.nn.Module):
    """Cosine classifier on embeddings: logits [M, C] = scale * emb @ normalize(weight).T.

    The embeddings are unit-norm already, so a logit is ``scale`` times a
    cosine; ``scale`` (16) makes the softmax sharp enough to train. ``weight``
    [C, D] starts at randn * D**-0.5 (rows of about unit norm).
    """

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0):
        super().__init__()
        if dim < 1 or n_classes < 1:
            raise ValueError(f"dim and n_classes must be >= 1, got {dim}, {n_classes}")
        self.scale = float(scale)
        self.weight = torch.nn.Parameter(torch.randn(n_classes, dim) * dim ** -0.5)  # [C, D]

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        return self.scale * emb.float() @ F.normalize(self.weight, dim=1).T  # [M, C]

    def extra_repr(self) -> str:
        return f"dim={self.weight.shape[1]}, n_classes={self.weight.shape[0]}, scale={self.scale}"


def class_loss(logits: torch.Tensor, labels: torch.Tensor, margin: float = 0.0,
               smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, Stat]]:
    """Cross-entropy of logits [M, C] against labels [M]; stats {"class_loss": (loss, 1)}.

    ``margin`` > 0 is subtracted from each row's true-class logit first (CosFace's
    additive margin, in logit units: scale * cosine margin), so an embedding must be
    closer to its own class than the softmax alone asks; retrieval scores the raw
    cosines, which the margin leaves untouched. ``smoothing`` > 0 is label smoothing: the
    target puts 1 - smoothing on the true class and spreads smoothing evenly over all C.
    """
    logits = logits.float()
    if margin:
        logits = logits - margin * F.one_hot(labels, logits.shape[1]).to(logits.dtype)  # [M, C]
    loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
    return loss, {"class_loss": (loss.detach(), torch.ones((), device=loss.device))}
