"""deepranking.losses: exact values on hand-made batches (points on a line, worked out by hand)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deepranking import losses
from deepranking.losses import MINERS, RankingLoss

MODES = sorted(MINERS)


def line(xs) -> torch.Tensor:
    """Points (x, 0) in 2-D, float32 [M, 2], requiring grad."""
    return torch.tensor([[float(x), 0.0] for x in xs], requires_grad=True)


def labels_of(ls) -> torch.Tensor:
    return torch.tensor(ls, dtype=torch.long)


def value(stats, name) -> tuple[float, float]:
    s, c = stats[name]
    return s.item(), c.item()


# Semi-hard batch, b = 3 (M = 9), margin 1. Rows: q0 q1 q2 | p0 p1 p2 | n0 n1 n2.
SEMI_X = [0.0, 10.0, 16.8, 2.0, 13.0, 17.8, 1.0, 2.5, -2.8]
SEMI_L = [0, 1, 2, 0, 1, 2, 3, 4, 5]


def test_csv_triplets_without_labels_by_hand():
    # q0=0 p0=1 n0=3 | q1=10 p1=(10,2) n1=(10,1); margin 1: hinges max(0, 1+1-3)=0 and 1+2-1=2.
    emb = torch.tensor([[0.0, 0], [10, 0], [1, 0], [10, 2], [3, 0], [10, 1]], requires_grad=True)
    loss_fn = RankingLoss(1.0)
    assert not loss_fn.needs_labels
    loss, stats = loss_fn(emb, None, 2)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)
    assert value(stats, "loss") == pytest.approx((1.0, 1.0), abs=1e-6)
    assert value(stats, "d_pos") == pytest.approx((3.0, 2.0), abs=1e-6)
    assert value(stats, "d_neg") == pytest.approx((4.0, 2.0), abs=1e-6)
    assert value(stats, "active_fraction") == pytest.approx((1.0, 2.0))
    assert value(stats, "mined_fraction") == pytest.approx((2.0, 2.0))
    assert value(stats, "triplet_loss") == pytest.approx((2.0, 2.0), abs=1e-6)
    t = losses.csv_triplets(losses.distance_matrix(emb.detach()), None, 2, 1.0)
    assert t.anchor.tolist() == [0, 1] and t.positive.tolist() == [2, 3] and t.negative.tolist() == [4, 5]
    assert t.valid.tolist() == [True, True]


def test_none_equals_triplet_hinge_loss_with_the_same_gradient():
    torch.manual_seed(0)
    x = torch.randn(12, 5)
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    loss, stats = RankingLoss(0.7)(a, None, 4)
    ref = losses.triplet_hinge_loss(b[:4], b[4:8], b[8:], 0.7)
    loss.backward()
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    s, c = stats["triplet_loss"]
    assert (s / c).item() == pytest.approx(ref.item(), abs=1e-6)


def test_batch_hard_by_hand_excludes_anchor_without_positive():
    # b=2. Rows (x, label): 0:(0,0) 1:(10,1) 2:(1,0) 3:(12,1) 4:(4,2) 5:(7.5,0).
    # Anchor 4 is the only row of class 2: no positive, invalid.
    emb = line([0, 10, 1, 12, 4, 7.5])
    labels = labels_of([0, 1, 0, 1, 2, 0])
    t = losses.batch_hard(losses.distance_matrix(emb.detach()), labels, 2, 1.0)
    assert t.anchor.tolist() == [0, 1, 2, 3, 4, 5]
    assert t.valid.tolist() == [True, True, True, True, False, True]
    ok = t.valid
    assert t.positive[ok].tolist() == [5, 3, 5, 1, 0]  # farthest same-class row
    assert t.negative[ok].tolist() == [4, 5, 4, 5, 1]  # closest other-class row
    # margin 1: d_pos = 7.5 2 6.5 2 7.5, d_neg = 4 2.5 3 4.5 2.5 -> hinges 4.5 .5 4.5 0 6.
    loss, stats = RankingLoss(1.0, "batch-hard")(emb, labels, 2)
    assert loss.item() == pytest.approx(15.5 / 5, abs=1e-6)
    assert value(stats, "d_pos") == pytest.approx((25.5, 5.0), abs=1e-5)
    assert value(stats, "d_neg") == pytest.approx((16.5, 5.0), abs=1e-5)
    assert value(stats, "active_fraction") == pytest.approx((4.0, 5.0))
    assert value(stats, "mined_fraction") == pytest.approx((5.0, 6.0))
    # CSV triplets: 1+1-4 -> 0 and 1+2-2.5 = .5
    assert value(stats, "triplet_loss") == pytest.approx((0.5, 2.0), abs=1e-6)
    loss.backward()
    assert emb.grad.abs().sum() > 0


def test_batch_hard_without_negatives_is_a_zero_loss_with_a_graph():
    emb = line([0, 1, 2, 3, 4, 5])
    loss, stats = RankingLoss(1.0, "batch-hard")(emb, torch.zeros(6, dtype=torch.long), 2)  # one class
    assert loss.item() == 0.0
    assert value(stats, "mined_fraction") == (0.0, 6.0)
    assert value(stats, "d_pos") == (0.0, 0.0)
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    # and an anchor with a negative but no positive: every class once
    t = losses.batch_hard(losses.distance_matrix(emb.detach()), torch.arange(6), 2, 1.0)
    assert not t.valid.any()


def test_hard_negative_by_hand():
    # b=2. Rows (x, label): q0 (0,0) q1 (10,1) | p0 (1,0) p1 (11,1) | n0 (5,2) n1 (20,0).
    # q0: closest other-class row is n0 (5) = its CSV negative; q1: n0 at 5 beats its CSV negative n1 at 10.
    emb = line([0, 10, 1, 11, 5, 20])
    labels = labels_of([0, 1, 0, 1, 2, 0])
    t = losses.hard_negative(losses.distance_matrix(emb.detach()), labels, 2, 5.0)
    assert t.anchor.tolist() == [0, 1] and t.positive.tolist() == [2, 3]
    assert t.negative.tolist() == [4, 4] and t.valid.all()
    loss, stats = RankingLoss(5.0, "hard-negative")(emb, labels, 2)
    assert loss.item() == pytest.approx(1.0, abs=1e-6)  # 5+1-5 = 1 twice
    assert value(stats, "d_neg") == pytest.approx((10.0, 2.0), abs=1e-6)
    assert value(stats, "triplet_loss") == pytest.approx((1.0, 2.0), abs=1e-6)  # 5+1-5=1, 5+1-10 -> 0


def test_hard_negative_keeps_the_csv_negative_without_other_class_rows():
    emb = line([0, 10, 1, 11, 5, 20])
    labels = torch.zeros(6, dtype=torch.long)  # one class: no query has another-class row
    t = losses.hard_negative(losses.distance_matrix(emb.detach()), labels, 2, 1.0)
    assert t.negative.tolist() == [4, 5] and t.valid.tolist() == [True, True]
    loss, _ = RankingLoss(5.0, "hard-negative")(emb, labels, 2)
    ref = losses.triplet_hinge_loss(emb[:2], emb[2:4], emb[4:], 5.0)
    assert loss.item() == pytest.approx(ref.item(), abs=1e-6)


def test_semi_hard_by_hand_drops_pairs_without_a_band_negative():
    # Positive pairs (a,p) and their other-class distances, margin 1 (band D(a,p) < D(a,n) < D(a,p)+1):
    #   (0,3) D=2: n1 2.5 and n2 2.8 in (2,3) -> n1 (7); n0 at 1 is hard and is skipped.
    #   (3,0) D=2: n0 1, n1 .5 hard, n2 4.8 easy, nothing in (2,3)   -> dropped, not replaced.
    #   (1,4) D=3: everything beyond 4 (easy)                        -> dropped.
    #   (4,1) D=3: q2 at 3.8 in (3,4) -> q2 (2).
    #   (2,5), (5,2) D=1: nothing in (1,2)                           -> dropped.
    emb = line(SEMI_X)
    labels = labels_of(SEMI_L)
    t = losses.semi_hard(losses.distance_matrix(emb.detach()), labels, 3, 1.0)
    assert len(t.valid) == 81
    assert t.valid.nonzero().flatten().tolist() == [0 * 9 + 3, 4 * 9 + 1]
    v = t.valid
    assert t.anchor[v].tolist() == [0, 4] and t.positive[v].tolist() == [3, 1] and t.negative[v].tolist() == [7, 2]
    loss, stats = RankingLoss(1.0, "semi-hard")(emb, labels, 3)
    assert loss.item() == pytest.approx((0.5 + 0.2) / 2, abs=1e-6)  # 1+2-2.5 and 1+3-3.8
    assert value(stats, "d_pos") == pytest.approx((5.0, 2.0), abs=1e-6)
    assert value(stats, "d_neg") == pytest.approx((6.3, 2.0), abs=1e-6)
    assert value(stats, "active_fraction") == pytest.approx((2.0, 2.0))
    assert value(stats, "mined_fraction") == pytest.approx((2.0, 81.0))
    assert value(stats, "triplet_loss") == pytest.approx((2.0, 3.0), abs=1e-6)  # 1+2-1 = 2, the others 0


def test_semi_hard_band_is_strict_and_an_empty_batch_is_a_zero_loss_with_a_graph():
    # q=0 p=1 n=2, margin 1: from q, D(q,n)=2 = D(q,p)+margin (not inside); from p, D(p,n)=1 = D(p,q) (not farther).
    emb = line([0, 1, 2])
    labels = labels_of([0, 0, 1])
    t = losses.semi_hard(losses.distance_matrix(emb.detach()), labels, 1, 1.0)
    assert not t.valid.any()
    loss, stats = RankingLoss(1.0, "semi-hard")(emb, labels, 1)
    assert loss.item() == 0.0
    assert value(stats, "mined_fraction") == (0.0, 9.0)
    assert value(stats, "active_fraction") == (0.0, 0.0)
    assert value(stats, "triplet_loss") == pytest.approx((0.0, 1.0), abs=1e-6)
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))
    # only easy negatives: the hardest one is NOT used instead
    emb = line([0, 1, 10])
    loss, stats = RankingLoss(1.0, "semi-hard")(emb, labels, 1)
    assert loss.item() == 0.0 and value(stats, "mined_fraction") == (0.0, 9.0)


@pytest.mark.parametrize("mode", MODES)
def test_shapes_do_not_depend_on_the_data(mode):
    m, b = 9, 3
    dist_a = losses.distance_matrix(line(SEMI_X).detach())
    dist_b = losses.distance_matrix(torch.randn(m, 4, generator=torch.Generator().manual_seed(1)))
    out = [MINERS[mode](dist_a, labels_of(SEMI_L), b, 1.0),
           MINERS[mode](dist_b, torch.zeros(m, dtype=torch.long), b, 1.0),
           MINERS[mode](dist_b, torch.arange(m), b, 0.1)]
    a = {"none": b, "hard-negative": b, "batch-hard": m, "semi-hard": m * m}[mode]
    for t in out:
        assert isinstance(t, losses.Triplets)
        for idx in (t.anchor, t.positive, t.negative):
            assert idx.shape == (a,) and idx.dtype == torch.long
            assert int(idx.min()) >= 0 and int(idx.max()) < m
        assert t.valid.shape == (a,) and t.valid.dtype == torch.bool


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_gives_tensor_stats_and_gradients(mode):
    emb = line(SEMI_X)
    labels = labels_of(SEMI_L)
    loss, stats = RankingLoss(1.0, mode)(emb, labels, 3)
    assert set(stats) == {"loss", "d_pos", "d_neg", "active_fraction", "mined_fraction", "triplet_loss"}
    for name, (s, c) in stats.items():
        assert isinstance(s, torch.Tensor) and isinstance(c, torch.Tensor), name
        assert s.dim() == 0 and c.dim() == 0 and not s.requires_grad and not c.requires_grad, name
    ref = losses.triplet_hinge_loss(emb[:3], emb[3:6], emb[6:], 1.0)
    s, c = stats["triplet_loss"]
    assert (s / c).item() == pytest.approx(ref.item(), abs=1e-6)
    assert stats["loss"][0].item() == pytest.approx(loss.item())
    loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_half_precision_embeddings_are_computed_in_float32():
    emb = line(SEMI_X).detach().bfloat16().requires_grad_()
    loss, _ = RankingLoss(1.0, "semi-hard")(emb, labels_of(SEMI_L), 3)
    assert loss.dtype == torch.float32
    loss.backward()
    assert emb.grad.dtype == torch.bfloat16


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown mining"):
        RankingLoss(1.0, "hard")
    assert all(RankingLoss(1.0, m).needs_labels for m in ("batch-hard", "hard-negative", "semi-hard"))
    with pytest.raises(ValueError, match="needs labels"):
        RankingLoss(1.0, "semi-hard")(line(range(6)), None, 2)
    with pytest.raises(ValueError, match="3 \\* n_triplets"):
        RankingLoss(1.0)(line(range(6)), None, 3)
    with pytest.raises(ValueError, match="labels must be"):
        RankingLoss(1.0, "batch-hard")(line(range(6)), torch.zeros(5, dtype=torch.long), 2)
    with pytest.raises(ValueError, match="needs class labels"):
        losses.batch_hard(torch.zeros(6, 6), None, 2, 1.0)


def test_distance_matrix_is_exact():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0 + 1e-3]])
    d = losses.distance_matrix(emb)
    assert d.dtype == torch.float32 and d.shape == (3, 3)
    assert torch.equal(d.diagonal(), torch.zeros(3))
    assert d[0, 1].item() == 5.0
    assert d[1, 2].item() == pytest.approx(1e-3, rel=1e-3)  # near duplicates stay apart


def test_cosine_classifier_init_forward_and_class_loss():
    torch.manual_seed(0)
    head = losses.CosineClassifier(8, 5)
    torch.manual_seed(0)
    assert torch.equal(head.weight.detach(), torch.randn(5, 8) * 8 ** -0.5)
    assert head.weight.shape == (5, 8) and head.scale == 16.0
    assert [n for n, _ in head.named_parameters()] == ["weight"]
    emb = F.normalize(torch.randn(4, 8), dim=1).requires_grad_()
    logits = head(emb)
    ref = 16.0 * emb @ F.normalize(head.weight, dim=1).T
    assert logits.shape == (4, 5) and torch.allclose(logits, ref, atol=1e-6)
    labels = torch.tensor([0, 1, 4, 1])
    loss, stats = losses.class_loss(logits, labels)
    assert loss.item() == pytest.approx(F.cross_entropy(ref, labels).item(), abs=1e-6)
    s, c = stats["class_loss"]
    assert isinstance(s, torch.Tensor) and s.item() == pytest.approx(loss.item()) and c.item() == 1.0
    loss.backward()
    assert emb.grad.abs().sum() > 0 and head.weight.grad.abs().sum() > 0
    assert losses.CosineClassifier(8, 5, scale=4.0)(emb).abs().max() <= 4.0 + 1e-5


def test_class_loss_margin_lowers_only_the_true_class_logit():
    # Two rows, three classes; by hand: row 0 true class 2, row 1 true class 0, margin 1.5 (logit units).
    logits = torch.tensor([[2.0, 0.0, 3.0], [1.0, 1.0, -1.0]])
    labels = torch.tensor([2, 0])
    loss, _ = losses.class_loss(logits, labels, margin=1.5)
    row0 = -math.log(math.exp(1.5) / (math.exp(2.0) + math.exp(0.0) + math.exp(1.5)))
    row1 = -math.log(math.exp(-0.5) / (math.exp(-0.5) + math.exp(1.0) + math.exp(-1.0)))
    assert loss.item() == pytest.approx((row0 + row1) / 2, abs=1e-6)
    assert losses.class_loss(logits, labels, margin=0.0)[0].item() == pytest.approx(
        F.cross_entropy(logits, labels).item(), abs=1e-7)
    assert loss.item() > losses.class_loss(logits, labels)[0].item()  # the margin asks for more
    # Smoothing 0.3 over C = 3: target 0.8 on the true class, 0.1 on each other; by hand for row 1.
    logp1 = [x - math.log(math.exp(1.0) + math.exp(1.0) + math.exp(-1.0)) for x in (1.0, 1.0, -1.0)]
    want1 = -(0.8 * logp1[0] + 0.1 * logp1[1] + 0.1 * logp1[2])
    smooth, _ = losses.class_loss(logits[1:], labels[1:], smoothing=0.3)
    assert smooth.item() == pytest.approx(want1, abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("mode", MODES)
def test_no_host_synchronisation_on_the_gpu(mode):
    emb = line(SEMI_X).detach().cuda().requires_grad_()
    labels = labels_of(SEMI_L).cuda()
    loss_fn = RankingLoss(1.0, mode)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, stats = loss_fn(emb, labels, 3)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref_loss, _ = RankingLoss(1.0, mode)(emb.detach().cpu().requires_grad_(), labels.cpu(), 3)
    assert loss.item() == pytest.approx(ref_loss.item(), abs=1e-6)


def test_miners_match_a_brute_force_reference_on_random_batches():
    g = torch.Generator().manual_seed(3)
    for trial in range(5):
        b, margin = 4, 0.8
        emb = torch.randn(3 * b, 3, generator=g)
        labels = torch.randint(0, 3, (3 * b,), generator=g)
        d = losses.distance_matrix(emb)
        m = 3 * b
        t = losses.semi_hard(d, labels, b, margin)
        bh = losses.batch_hard(d, labels, b, margin)
        for a in range(m):
            pos = [j for j in range(m) if j != a and labels[j] == labels[a]]
            neg = [j for j in range(m) if labels[j] != labels[a]]
            assert bool(bh.valid[a]) == bool(pos and neg)
            if pos and neg:
                assert int(bh.positive[a]) == max(pos, key=lambda j: d[a, j])
                assert int(bh.negative[a]) == min(neg, key=lambda j: d[a, j])
            for p in range(m):
                band = [n for n in neg if d[a, p] < d[a, n] < d[a, p] + margin]
                k = a * m + p
                assert bool(t.valid[k]) == bool(p in pos and band), (trial, a, p)
                if t.valid[k]:
                    assert int(t.negative[k]) == min(band, key=lambda n: d[a, n])
