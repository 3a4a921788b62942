"""The phantom generator: true motion, anatomy, determinism (diffreg.data.phantom)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from diffreg.data import PhantomPairs, make_echo_2d, make_sax_2d, make_sax_3d
from diffreg.data.phantom import PhantomSequence, pair_ddf

SMALL = {"sax": dict(size=64), "echo": dict(size=96), "sax3d": dict(size=(12, 48, 48))}
MAKERS = {"sax": make_sax_2d, "echo": make_echo_2d, "sax3d": make_sax_3d}


def pull(image: np.ndarray, ddf: np.ndarray, order: int) -> np.ndarray:
    """Independent scipy warp: image(p + ddf(p)), border padding."""
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in image.shape], indexing="ij")).astype(np.float64)
    return ndimage.map_coordinates(image, grid + ddf, order=order, mode="nearest")


def dice(a: np.ndarray, b: np.ndarray, label: int) -> float:
    a, b = a == label, b == label
    return 2.0 * float((a & b).sum()) / max(float(a.sum() + b.sum()), 1.0)


def _seq(kind: str, seed: int = 0, noise: bool = True, n_frames: int = 4) -> PhantomSequence:
    return MAKERS[kind](n_frames=n_frames, seed=seed, noise=noise, **SMALL[kind])


@pytest.fixture(scope="module")
def seqs() -> dict[tuple[str, bool], PhantomSequence]:
    return {(k, noise): _seq(k, seed=3, noise=noise) for k in MAKERS for noise in (False, True)}


@pytest.mark.parametrize("kind", ["sax", "echo", "sax3d"])
@pytest.mark.parametrize("noise", [False, True])
def test_true_ddf_reproduces_fixed(seqs, kind, noise):
    seq = seqs[(kind, noise)]
    p = seq.pair(seq.es, seq.ed)
    warped = pull(p["moving"], p["true_ddf"], order=1)
    before = np.abs(p["moving"] - p["fixed"]).mean()
    after = np.abs(warped - p["fixed"]).mean()
    # thick slices (sax3d): linear interpolation across 8 mm between slices limits the match at the base
    factor = (0.3 if kind != "sax3d" else 0.5) + (0.3 if noise else 0.0)
    assert after < factor * before, (before, after)
    warped_label = pull(p["moving_label"], p["true_ddf"], order=0)
    fg = [dice(warped_label, p["fixed_label"], lab) for lab in (1, 2, 3)]
    init = [dice(p["moving_label"], p["fixed_label"], lab) for lab in (1, 2, 3)]
    if kind == "sax3d":  # thick slices: nearest interpolation across 8 mm slices blurs the base and the apex
        assert np.mean(fg) > 0.85 and min(fg) > 0.8, fg
    else:
        assert np.mean(fg) > 0.95 and min(fg) > 0.9, fg
    assert np.mean(fg) > np.mean(init) + 0.1, (init, fg)


@pytest.mark.parametrize("kind", ["sax", "echo"])
def test_true_ddf_between_intermediate_frames(seqs, kind):
    seq = seqs[(kind, False)]
    for a, b in ((1, seq.es), (seq.es, 1), (seq.ed, seq.es)):
        p = seq.pair(a, b)
        warped = pull(p["moving"], p["true_ddf"], order=1)
        assert np.abs(warped - p["fixed"]).mean() < 0.35 * max(np.abs(p["moving"] - p["fixed"]).mean(), 1e-3)
        wl = pull(p["moving_label"], p["true_ddf"], order=0)
        assert np.mean([dice(wl, p["fixed_label"], lab) for lab in (1, 2, 3)]) > 0.95


def test_pair_ddf_is_inverse_of_motion():
    seq = _seq("sax", noise=False)
    u = seq.motion[seq.es].astype(np.float64)
    d = pair_ddf(u, np.zeros_like(u))  # moving = ES, fixed = ED: d(p) = -u(p + d(p))
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in u.shape[1:]], indexing="ij")).astype(np.float64)
    u_at = np.stack([ndimage.map_coordinates(c, grid + d, order=1, mode="nearest") for c in u])
    assert np.abs(d + u_at).max() < 1e-3
    assert np.allclose(pair_ddf(np.zeros_like(u), u), u, atol=1e-6)  # moving = ED: d = u


def test_true_ddf_matches_diffreg_spatial_warp(seqs):
    try:
        from diffreg.spatial import warp
    except (ImportError, AttributeError):
        pytest.skip("diffreg.spatial.warp not available")
    for kind in ("sax", "sax3d"):
        seq = seqs[(kind, False)]
        p = seq.pair(seq.es, seq.ed)
        ours = pull(p["moving"], p["true_ddf"], order=1)
        theirs = warp(torch.from_numpy(p["moving"])[None, None], torch.from_numpy(p["true_ddf"])[None])[0, 0]
        assert np.abs(theirs.numpy() - ours).max() < 1e-4


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_es_lv_smaller_than_ed(seed):
    sax = make_sax_2d(seed=seed, n_frames=5)
    ratio = (sax.labels[sax.es] == 3).sum() / (sax.labels[sax.ed] == 3).sum()
    assert 0.35 < ratio < 0.7, ratio
    assert (sax.labels[sax.es] == 2).sum() > 0.9 * (sax.labels[sax.ed] == 2).sum()  # myocardium thickens
    echo = make_echo_2d(size=96, seed=seed, n_frames=3)
    ratio = (echo.labels[echo.es] == 1).sum() / (echo.labels[echo.ed] == 1).sum()
    assert 0.4 < ratio < 0.8, ratio
    assert (echo.labels[echo.es] == 3).sum() > (echo.labels[echo.ed] == 3).sum()  # the LA fills in systole


def test_sax3d_volume_and_through_plane_motion(seqs):
    seq = seqs[("sax3d", True)]
    assert seq.spacing[0] > 2 * seq.spacing[1]  # anisotropic slices
    assert (seq.labels[seq.es] == 3).sum() < 0.7 * (seq.labels[seq.ed] == 3).sum()
    assert np.abs(seq.motion[seq.es, 0]).max() > 0.5  # base descent, in slices
    per_slice = (seq.labels[seq.ed] == 3).reshape(seq.labels.shape[1], -1).sum(1)
    assert per_slice[:4].max() > 2 * per_slice[-3:].max()  # tapering from base to apex


@pytest.mark.parametrize("kind", ["sax", "echo", "sax3d"])
def test_arrays_and_labels(seqs, kind):
    seq = seqs[(kind, True)]
    T, nd = seq.n_frames, seq.ndim
    assert seq.frames.dtype == np.float32 and seq.frames.min() >= 0 and seq.frames.max() <= 1
    assert seq.labels.dtype == np.uint8 and set(np.unique(seq.labels)) == {0, 1, 2, 3}
    assert seq.motion.shape == (T, nd, *seq.frames.shape[1:]) and seq.motion.dtype == np.float32
    assert not seq.motion[seq.ed].any() and seq.ed == 0 and 0 < seq.es < T
    assert len(seq.spacing) == nd
    assert seq.label_set == ("camus" if kind == "echo" else "acdc")
    # every motion field is a diffeomorphism on the grid: det(I + grad u) > 0
    for u in seq.motion[1:]:
        grads = [np.gradient(u[i]) for i in range(nd)]
        J = np.stack([np.stack([grads[i][j] + (i == j) for j in range(nd)]) for i in range(nd)])
        assert np.linalg.det(np.moveaxis(J, (0, 1), (-2, -1))).min() > 0.2


def test_determinism_by_seed():
    a, b, c = make_sax_2d(seed=5), make_sax_2d(seed=5), make_sax_2d(seed=6)
    assert np.array_equal(a.frames, b.frames) and np.array_equal(a.labels, b.labels)
    assert np.array_equal(a.motion, b.motion)
    assert not np.array_equal(a.frames, c.frames)
    e1, e2 = make_echo_2d(size=64, seed=1), make_echo_2d(size=64, seed=1)
    assert np.array_equal(e1.frames, e2.frames)


def test_phantom_pairs_items_and_direction():
    ds = PhantomPairs("sax", n_subjects=6, split="all")
    assert len(ds) == 6 and ds.labels == "acdc" and ds.direction == "es->ed" and ds.dims == 2
    assert ds.structures == {"rv": 1, "myo": 2, "lv": 3}
    item = ds[0]
    assert item["moving"].shape == (1, 64, 64) and item["moving"].dtype == torch.float32
    assert item["moving_label"].dtype == torch.int64 and item["true_ddf"].shape == (2, 64, 64)
    assert item["spacing"].shape == (2,) and item["case"] == "phantom000"
    assert -1.0 <= float(item["moving"].min()) and float(item["moving"].max()) <= 1.0
    assert (item["moving_label"] == 3).sum() < (item["fixed_label"] == 3).sum()  # moving = ES
    for direction in ("es->ed", "ed->es"):
        it = PhantomPairs("echo", n_subjects=3, split="all", direction=direction)[1]
        wl = pull(it["moving_label"][0].numpy(), it["true_ddf"].numpy(), order=0)
        assert np.mean([dice(wl, it["fixed_label"][0].numpy(), lab) for lab in (1, 2, 3)]) > 0.93
    echo = PhantomPairs("echo", n_subjects=3, split="all")
    assert echo.direction == "ed->es" and echo.labels == "camus"
    assert (echo[0]["moving_label"] == 1).sum() > (echo[0]["fixed_label"] == 1).sum()  # moving = ED


def test_phantom_pairs_all_frames_and_3d():
    ds = PhantomPairs("sax", n_subjects=3, split="all", frames="all", n_frames=4)
    assert len(ds) == 9 and ds[0]["case"] == "phantom000_t01"
    d3 = PhantomPairs("sax3d", n_subjects=2, split="all", size=(8, 32, 32))
    it = d3[0]
    assert it["moving"].shape == (1, 8, 32, 32) and it["true_ddf"].shape == (3, 8, 32, 32) and d3.dims == 3


def test_phantom_pairs_sequence_matches_the_pairs():
    """``sequence`` regenerates a subject's cycle: its ED/ES frames are the pair's images, with frames in between."""
    pairs = PhantomPairs("sax", n_subjects=10, split="test", noise=False)
    subject = pairs.subjects[0]
    seq = pairs.sequence(subject, n_frames=10)
    lo, hi = pairs.intensity
    assert seq.n_frames == 10 and 0 < seq.es < 10
    np.testing.assert_allclose(seq.frames[seq.es] * (hi - lo) + lo, pairs[0]["moving"][0].numpy(), atol=1e-5)
    np.testing.assert_allclose(seq.frames[seq.ed] * (hi - lo) + lo, pairs[0]["fixed"][0].numpy(), atol=1e-5)
    # the motion grows from ED to ES through the intermediate frames
    mag = [np.abs(seq.motion[k]).mean() for k in range(seq.es + 1)]
    assert all(a < b for a, b in zip(mag, mag[1:]))
    with pytest.raises(ValueError, match="not in the 'test' split"):
        pairs.sequence(max(set(range(10)) - set(pairs.subjects)))
