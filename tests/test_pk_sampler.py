"""P classes x K images batches (image_data.PKBatchSampler, pk_batches) and their dataset (PKImages)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from deepranking import image_data
from deepranking.cli import UserError
from deepranking.image_data import PKBatchSampler, PKImages, TooFewClassesError, TripletImages, pk_batches


def imbalanced_labels(n_classes=30, low=4, high=40, seed=0) -> np.ndarray:
    sizes = np.random.default_rng(seed).integers(low, high + 1, n_classes)
    return np.repeat(np.arange(n_classes), sizes)


def balanced_labels(n_classes=12, per_class=8) -> np.ndarray:
    return np.repeat(np.arange(n_classes), per_class)


def check_pk(batch: np.ndarray, labels: np.ndarray, p: int, k: int) -> None:
    assert batch.dtype == np.int64 and batch.shape == (p * k,)
    rows = labels[batch].reshape(p, k)  # K images of one class, then the next class...
    assert (rows == rows[:, :1]).all()
    assert len(np.unique(rows[:, 0])) == p


# ---------------------------------------------------------------- batches


def test_every_batch_has_p_classes_of_k_images():
    labels = imbalanced_labels()
    sizes = np.bincount(labels)
    sampler = PKBatchSampler(labels, p=5, k=3, seed=0)
    batches = sampler.batches()
    assert len(sampler) == len(batches) == len(list(sampler))
    for batch in batches:
        check_pk(batch, labels, 5, 3)
        for chunk in batch.reshape(5, 3):
            if sizes[labels[chunk[0]]] >= 3:
                assert len(np.unique(chunk)) == 3  # no image twice in a class's K unless the class is small
    # an epoch is about N / (P K) batches and uses every image
    n = len(labels)
    assert n / 15 <= len(batches) <= n / 15 + 30 / 5 + 1
    assert set(np.concatenate(batches)) == set(range(n))


def test_balanced_epoch_uses_every_image_exactly_once():
    labels = balanced_labels(12, 8)
    batches = pk_batches(labels, p=4, k=2, seed=3, epoch=0)
    assert len(batches) == 96 // 8
    assert np.array_equal(np.sort(np.concatenate(batches)), np.arange(96))


def test_seeded():
    labels = imbalanced_labels()
    a = PKBatchSampler(labels, 4, 4, seed=1)
    b = PKBatchSampler(labels, 4, 4, seed=1)
    for epoch in (0, 1):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        assert all(np.array_equal(x, y) for x, y in zip(a.batches(), b.batches(), strict=True))
    a.set_epoch(0)
    first = [x.copy() for x in a.batches()]
    a.set_epoch(1)
    assert not all(np.array_equal(x, y) for x, y in zip(first, a.batches()))  # a new order every epoch
    other = PKBatchSampler(labels, 4, 4, seed=2).batches()
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))
    # its own stream: not the triplet order of epoch_batches for the same seed
    assert not np.array_equal(first[0], image_data.epoch_batches(len(labels), 16, 1, 0)[0])


def test_skip_resumes_exactly():
    labels = imbalanced_labels()
    sampler = PKBatchSampler(labels, 4, 2, seed=5, rank=1, world=2)
    sampler.set_epoch(2)
    full = list(sampler)
    for skip in (0, 1, 7, len(full)):
        resumed = PKBatchSampler(labels, 4, 2, seed=5, rank=1, world=2)  # a fresh process
        resumed.set_epoch(2, skip)
        assert len(resumed) == len(full) - skip
        got = list(resumed)
        assert len(got) == len(full) - skip
        assert all(np.array_equal(x, y) for x, y in zip(got, full[skip:]))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_have_equal_length_and_disjoint_batches(world):
    labels = imbalanced_labels(seed=1)
    per_rank = [PKBatchSampler(labels, 5, 2, seed=0, rank=r, world=world).batches() for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # DDP: every rank the same step count
    seen = [tuple(b) for rank in per_rank for b in rank]
    assert len(set(seen)) == len(seen)  # no batch twice, on one rank or across ranks
    for rank in per_rank:
        for batch in rank:
            check_pk(batch, labels, 5, 2)
    # balanced classes: the ranks split the images exactly
    labels = balanced_labels(12, 8)
    parts = [np.concatenate(pk_batches(labels, 4, 2, seed=0, epoch=1, rank=r, world=world)) for r in range(world)]
    assert sum(len(x) for x in parts) == 96
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(96))


def test_world_that_does_not_divide_the_batches():
    labels = balanced_labels(13, 2)  # 13 chunks of K=2 -> 13 batches at P=1; 2 ranks -> 14 batches, 7 each
    per_rank = [pk_batches(labels, 1, 2, seed=0, epoch=0, rank=r, world=2) for r in range(2)]
    assert [len(b) for b in per_rank] == [7, 7]
    assert len(pk_batches(labels, 1, 2, seed=0, epoch=0)) == 13


def test_classes_smaller_than_k_sample_with_replacement():
    labels = np.array([0, 0, 1, 1, 1, 1, 1, 2])  # class 0: 2 images, class 2: 1 image, K = 4
    batches = pk_batches(labels, p=2, k=4, seed=0, epoch=0)
    assert len(batches) == 2  # chunks: class 0 one, class 1 two (5 -> 8 with 3 others), class 2 one
    seen = np.concatenate(batches)
    for batch in batches:
        check_pk(batch, labels, 2, 4)
        for chunk in batch.reshape(2, 4):
            if labels[chunk[0]] == 0:
                assert set(chunk) == {0, 1}  # both images, then repeats
            if labels[chunk[0]] == 2:
                assert set(chunk) == {7}
    assert set(seen) == set(range(8))


def test_image_subset():
    """``images`` restricts the draw (e.g. to the training images, not the held-out ones)."""
    labels = balanced_labels(6, 10)
    train = np.flatnonzero(np.arange(60) % 10 < 6)  # 6 images of every class
    batches = pk_batches(labels, 3, 2, seed=0, epoch=0, images=train)
    assert set(np.concatenate(batches)) == set(train)
    assert len(batches) == 36 // 6
    with pytest.raises(TooFewClassesError, match="have 2"):
        PKBatchSampler(labels, 3, 2, seed=0, images=np.arange(20))


def test_errors():
    labels = balanced_labels(3, 4)
    with pytest.raises(ValueError, match=r"at least P=4 classes.*have 3") as info:
        PKBatchSampler(labels, 4, 2, seed=0)  # raised when built, before training starts
    assert isinstance(info.value, UserError)  # the CLI prints one line
    with pytest.raises(ValueError, match="P >= 1"):
        PKBatchSampler(labels, 0, 2, seed=0)
    with pytest.raises(ValueError, match="K >= 1"):
        PKBatchSampler(labels, 2, 0, seed=0)
    with pytest.raises(ValueError, match="rank"):
        PKBatchSampler(labels, 2, 2, seed=0, rank=2, world=2)
    with pytest.raises(ValueError, match="integer"):
        PKBatchSampler(labels.astype(float), 2, 2, seed=0)


# ---------------------------------------------------------------- dataset


def cache_file(tmp_path, n=40, side=16) -> np.memmap:
    rows = np.random.default_rng(0).integers(0, 256, size=(n, side, side, 3), dtype=np.uint8)
    mm = np.memmap(tmp_path / "cache.u8", dtype=np.uint8, mode="w+", shape=rows.shape)
    mm[:] = rows
    mm.flush()
    return np.memmap(tmp_path / "cache.u8", dtype=np.uint8, mode="r", shape=rows.shape)


def test_pk_images_gathers_rows_and_pickles_by_path(tmp_path):
    images = cache_file(tmp_path)
    labels = balanced_labels(8, 5)
    data = PKImages(images)
    assert len(data) == 40
    batch = PKBatchSampler(labels, 4, 3, seed=0).batches()[0]
    x, ids = data[batch]
    assert x.dtype == torch.uint8 and x.shape == (12, 16, 16, 3) and ids.dtype == torch.int64
    assert np.array_equal(x.numpy(), np.asarray(images)[batch]) and np.array_equal(ids.numpy(), batch)
    blob = pickle.dumps(data)
    assert len(blob) < 2000 < images.nbytes  # the path, not the pixels
    x2, _ = pickle.loads(blob)[batch]
    assert torch.equal(x, x2)
    # an in-memory array is pickled as it is
    plain = pickle.loads(pickle.dumps(PKImages(np.asarray(images).copy())))
    assert torch.equal(plain[batch][0], x)


def test_triplet_images_unchanged_by_the_shared_base(tmp_path):
    images = cache_file(tmp_path)
    trip = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    data = TripletImages(images, trip)
    assert len(data) == 3 and isinstance(data, image_data.CachedImageRows)
    state = data.__getstate__()
    assert state["_rows"] is None and set(state) == {"triplets", "_rows", "_file", "_shape", "_offset"}
    x, order = pickle.loads(pickle.dumps(data))[np.array([2, 0])]
    assert order.tolist() == [6, 0, 7, 1, 8, 2] and np.array_equal(x.numpy(), np.asarray(images)[order.numpy()])


def test_data_loader_with_the_pk_sampler(tmp_path):
    images = cache_file(tmp_path)
    labels = balanced_labels(8, 5)
    sampler = PKBatchSampler(labels, 4, 2, seed=0)
    loader = torch.utils.data.DataLoader(PKImages(images), sampler=sampler, batch_size=None, num_workers=0)
    sampler.set_epoch(1, skip=2)
    got = [ids.numpy() for _, ids in loader]
    assert len(got) == len(sampler) and all(np.array_equal(a, b) for a, b in zip(got, sampler.batches()))
