"""Registration uncertainty (diffreg.uncertainty) and the spread columns of evaluate, with known answers."""

import math

import numpy as np
import pytest
import torch

from diffreg.evaluate import evaluate
from diffreg.models.base import RegistrationModel, RegistrationResult
from diffreg.spatial import warp
from diffreg.uncertainty import (calibration, endpoint_error_map, ensemble_fields, field_statistics, mean_vs_single,
                                 sample_fields, spread_columns)
from tests.helpers import ShiftedBlobs


# ------------------------------------------------------------------------------------------------ calibration

def _spreads_and_errors(n=20_000, seed=0):
    g = np.random.default_rng(seed)
    s = g.uniform(0.2, 3.0, n)                 # predicted spread per voxel
    e = np.abs(g.normal(0.0, s))               # error drawn with that spread: E[e^2 | s] = s^2
    return s, e


def test_calibrated_spread_gives_diagonal_curve_small_ece_positive_rank_correlation():
    s, e = _spreads_and_errors()
    cal = calibration(torch.from_numpy(s), torch.from_numpy(e), bins=10)
    assert len(cal["curve"]) == 10 and sum(b["count"] for b in cal["curve"]) == s.size == cal["voxels"]
    for b in cal["curve"]:
        assert b["observed"] == pytest.approx(b["predicted"], rel=0.08), b
    assert [b["predicted"] for b in cal["curve"]] == sorted(b["predicted"] for b in cal["curve"])
    assert cal["ece"] < 0.06
    assert cal["spearman"] > 0.3 and cal["spearman_p"] < 1e-6


def test_shuffled_or_overconfident_spread_is_not_calibrated():
    s, e = _spreads_and_errors()
    shuffled = calibration(np.random.default_rng(1).permutation(s), e)
    assert abs(shuffled["spearman"]) < 0.03
    observed = [b["observed"] for b in shuffled["curve"]]
    assert max(observed) - min(observed) < 0.2       # the error no longer depends on the predicted spread
    assert shuffled["ece"] > 0.3
    over = calibration(s, 2 * e)                     # errors twice what the spread predicts
    assert over["ece"] == pytest.approx(float(np.sqrt(np.mean(s ** 2))) * 1.0, rel=0.1)
    assert all(b["observed"] > 1.8 * b["predicted"] for b in over["curve"])


def test_calibration_sample_factor_mask_ties_and_errors():
    s, e = _spreads_and_errors(4000)
    plain, scaled = calibration(s, e), calibration(s, e, n_samples=4)
    for a, b in zip(plain["curve"], scaled["curve"]):
        assert b["predicted"] == pytest.approx(a["predicted"] * math.sqrt(1.25))
    mask = s > 1.0
    masked = calibration(s, e, mask=mask)
    assert masked["voxels"] == int(mask.sum()) and min(b["spread_low"] for b in masked["curve"]) > 1.0
    ties = calibration(np.zeros(100), np.arange(100.0), bins=10)   # equal spreads still fill every bin
    assert all(b["count"] == 10 for b in ties["curve"]) and math.isnan(ties["spearman"])
    with pytest.raises(ValueError, match="same shape"):
        calibration(np.zeros(10), np.zeros(11))
    with pytest.raises(ValueError, match="bins"):
        calibration(np.zeros(5), np.zeros(5), bins=10)


# ------------------------------------------------------------------------------------------------ statistics

def test_field_statistics_of_known_covariance():
    g = torch.Generator().manual_seed(0)
    n, b, size = 400, 2, (8, 12)
    mean = 0.1 * torch.randn(b, 2, *size, generator=g)
    s = torch.linspace(0.05, 0.3, size[1]).expand(b, *size)          # spread varies along the last axis
    fields = mean + s[None, :, None] * torch.randn(n, b, 2, *size, generator=g)
    st = field_statistics(fields)
    assert st["mean"].shape == (b, 2, *size) and st["spread"].shape == (b, *size)
    assert st["jacobian_std"].shape == (b, *size) and st["fold_probability"].shape == (b, *size)
    assert int(st["n"]) == n
    assert torch.allclose(st["mean"], mean, atol=4 * 0.3 / math.sqrt(n))
    ratio = st["spread"] / (s * math.sqrt(2))                         # sqrt(trace) = s * sqrt(ndim)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.02) and float((ratio - 1).abs().max()) < 0.15
    fields3 = 0.2 * torch.randn(50, 1, 3, 4, 4, 4, generator=g)       # 3D: sqrt(3) * 0.2
    assert float(field_statistics(fields3)["spread"].mean()) == pytest.approx(0.2 * math.sqrt(3), rel=0.05)


def test_fold_probability_and_jacobian_spread_of_affine_samples():
    x = torch.arange(10.0).view(1, 10, 1).expand(1, 10, 10)
    a = torch.tensor([0.0, 0.5, -2.0, -3.0])                          # det J = 1 + a: 1, 1.5, -1, -2
    fields = torch.zeros(4, 1, 2, 10, 10)
    fields[:, 0, 0] = a.view(4, 1, 1) * x                             # u_0 = a * p_0: a stretch along axis 0
    st = field_statistics(fields)
    assert torch.allclose(st["fold_probability"], torch.full((1, 10, 10), 0.5, dtype=torch.float64))
    assert torch.allclose(st["jacobian_std"], torch.full((1, 10, 10), float(a.std()), dtype=torch.float64))
    assert float(field_statistics(fields[2:])["fold_probability"].min()) == 1.0   # both samples fold everywhere
    with pytest.raises(ValueError, match="two samples"):
        field_statistics(fields[:1])
    with pytest.raises(ValueError, match="ndim"):
        field_statistics(torch.zeros(2, 1, 2, 4))


def test_mean_vs_single_averaging_cancels_independent_noise():
    data = ShiftedBlobs(2, size=(24, 24))
    ml = torch.stack([d["moving_label"] for d in data.items])
    fl = torch.stack([d["fixed_label"] for d in data.items])
    true = torch.zeros(2, 2, 24, 24)
    g = torch.Generator().manual_seed(0)
    fields = true + 0.8 * torch.randn(12, 2, 2, 24, 24, generator=g)
    out = mean_vs_single(fields, true, ml, fl)
    for k in ("epe_mean_field", "epe_single", "dice_mean_field", "dice_single", "folding_mean_field",
              "folding_single"):
        assert out[k].shape == (2,), k
    # E|mean error| shrinks by sqrt(12); E|single| = 0.8 * sqrt(pi / 2) for a 2D Gaussian error
    assert torch.allclose(out["epe_single"], torch.full((2,), 0.8 * math.sqrt(math.pi / 2), dtype=torch.float64),
                          rtol=0.05)
    assert (out["epe_mean_field"] < out["epe_single"] / 3).all()
    assert (out["folding_mean_field"] < out["folding_single"]).all()
    assert (out["dice_mean_field"] >= out["dice_single"]).all()
    two = mean_vs_single(fields[:2], true)["epe_single"]
    assert torch.allclose(two, (endpoint_error_map(fields[0], true) + endpoint_error_map(fields[1], true))
                          .mean((1, 2)).double() / 2)
    with pytest.raises(ValueError, match="both"):
        mean_vs_single(fields, true, ml, None)


# ------------------------------------------------------------------------------------------------ sampling

class Noisy(RegistrationModel):
    """A stochastic stub: the field is ``base`` plus noise whose SD grows along the last axis (seeded draws)."""

    def __init__(self, base=None, sigma=0.5, deterministic=False):
        super().__init__()
        self.p = torch.nn.Parameter(torch.zeros(1))
        self.base, self.sigma, self.deterministic = base, sigma, deterministic

    def forward(self, moving, fixed):
        return self.register(moving, fixed).ddf

    @torch.no_grad()
    def register(self, moving, fixed, seed=0, scale=1.0):
        b, _, h, w = moving.shape
        g = torch.Generator().manual_seed(0 if self.deterministic else int(seed))
        sd = self.sigma * scale * torch.linspace(0.1, 1.0, w).expand(h, w)
        base = self.base(moving) if callable(self.base) else torch.zeros(b, 2, h, w)
        ddf = base + sd * torch.randn(b, 2, h, w, generator=g)
        return RegistrationResult(ddf=ddf, warped=warp(moving, ddf), extras={"seed": seed})


def test_sample_fields_shapes_seeds_and_options():
    m = torch.zeros(3, 1, 8, 8)
    model = Noisy()
    f = sample_fields(model, m, m, 5, seed=7)
    assert f.shape == (5, 3, 2, 8, 8)
    assert torch.equal(f[0], model.register(m, m, seed=7).ddf)       # draw k uses seed + k
    assert torch.equal(sample_fields(model, m, m, 5, seed=7), f)      # reproducible
    assert not torch.equal(f[0], f[1])
    wide = sample_fields(model, m, m, 40, scale=3.0)                  # options reach register
    assert float(field_statistics(wide)["spread"].mean()) > 2 * float(field_statistics(f)["spread"].mean())
    with pytest.raises(ValueError, match="deterministic"):
        sample_fields(Noisy(deterministic=True), m, m, 3)
    with pytest.raises(ValueError, match=">= 2"):
        sample_fields(model, m, m, 1)


def test_ensemble_fields_one_field_per_member():
    m = torch.zeros(2, 1, 8, 8)
    members = [Noisy(base=lambda x, k=k: torch.full((x.shape[0], 2, 8, 8), float(k)), sigma=0.0) for k in range(3)]
    f = ensemble_fields(members, m, m)
    assert f.shape == (3, 2, 2, 8, 8)
    assert torch.allclose(field_statistics(f)["spread"], torch.full((2, 8, 8), math.sqrt(2.0)))  # SD 1 per axis
    with pytest.raises(ValueError, match="two models"):
        ensemble_fields(members[:1], m, m)


def test_diffusereg_samples_with_either_eta_and_voxelmorph_is_deterministic():
    from diffreg.models import DiffuseReg, VoxelMorph

    torch.manual_seed(0)
    model = DiffuseReg(dims=2, feature_size=6, num_heads=(1, 2, 2, 4), timesteps=20, beta_start=1e-4,
                       beta_end=0.2, teacher_steps=3).eval()
    m, f = torch.rand(1, 1, 64, 64) * 2 - 1, torch.rand(1, 1, 64, 64) * 2 - 1
    for eta in (0.0, 1.0):   # eta = 0: deterministic given phi_T, but each seed draws its own phi_T
        fields = sample_fields(model, m, f, 2, sampler="ddim", steps=2, eta=eta)
        assert fields.shape == (2, 1, 2, 64, 64) and float(field_statistics(fields)["spread"].mean()) > 0
    with pytest.raises(ValueError, match="deterministic"):   # register takes no seed: called without one
        sample_fields(VoxelMorph(dims=2).eval(), m, f, 3)


# ------------------------------------------------------------------------------------------------ evaluate

class WithMotion(ShiftedBlobs):
    """ShiftedBlobs with a ``true_ddf``: the integer shift that maps fixed onto moving."""

    def __init__(self, n=3, size=(24, 24)):
        super().__init__(n, size)
        for item in self.items:
            shift = next((dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
                         if torch.equal(torch.roll(item["fixed"], (dy, dx), (1, 2)), item["moving"]))
            item["true_ddf"] = torch.tensor([-float(shift[0]), -float(shift[1])]).view(2, 1, 1).expand(2, *size)


def test_evaluate_samples_adds_spread_columns():
    data = WithMotion()

    def truth(moving):   # the stub's mean field is the true motion of the pair
        return next(d["true_ddf"] for d in data.items if torch.equal(d["moving"], moving[0]))[None]

    model = Noisy(base=truth)
    plain = evaluate(model, data)
    assert "spread_mean" not in plain.columns()
    table = evaluate(model, data, samples=6, scale=1.0)
    for col in ("samples", "spread_mean", "spread_max", "fold_probability_mean", "epe_mean_field", "epe_single",
                "spearman_spread_error", "ece_spread"):
        assert col in table.columns(), col
    assert table.values("samples").tolist() == [6.0] * 3
    assert table.values("dice") == pytest.approx(plain.values("dice"))  # the one registration is unchanged
    # the noise SD grows along the last axis, and so does the error of the mean: a clear rank correlation
    assert (table.values("spearman_spread_error") > 0.3).all()
    assert (table.values("epe_mean_field") < table.values("epe_single")).all()
    assert table.mean("spread_mean") == pytest.approx(0.5 * math.sqrt(2) * 0.57, rel=0.25)
    with pytest.raises(ValueError, match="deterministic"):
        evaluate(Noisy(deterministic=True), data, samples=3)


def test_spread_columns_without_truth_and_batch_check():
    m = torch.zeros(1, 1, 8, 8)
    row = spread_columns(Noisy(), m, m, 4, seed=None)
    assert set(row) == {"samples", "spread_mean", "spread_max", "fold_probability_mean"}
    with pytest.raises(ValueError, match="one pair"):
        spread_columns(Noisy(), torch.zeros(2, 1, 8, 8), torch.zeros(2, 1, 8, 8), 3)


def test_mean_vs_single_dice_matches_registration_report():
    from diffreg.metrics import registration_report

    data = ShiftedBlobs(2, size=(24, 24))
    ml = torch.stack([d["moving_label"] for d in data.items])
    fl = torch.stack([d["fixed_label"] for d in data.items])
    fields = 1.5 * torch.randn(2, 2, 2, 24, 24, generator=torch.Generator().manual_seed(3))
    for labels in ("acdc", (2, 3)):
        out = mean_vs_single(fields, moving_label=ml, fixed_label=fl, labels=labels)
        ref = [registration_report(fields[k], ml, fl, labels=labels)["dice"] for k in range(2)]
        assert torch.allclose(out["dice_single"].double(), (ref[0] + ref[1]).double() / 2)
        assert torch.allclose(out["dice_mean_field"].double(),
                              registration_report(fields.mean(0), ml, fl, labels=labels)["dice"].double())


def test_cli_evaluate_samples_writes_the_spread_columns(tmp_path, capsys):
    import csv

    from diffreg.cli import main

    run = tmp_path / "dr"
    assert main(["train", "--method", "diffusereg", "--data", "phantom", "--out", str(run), "--steps", "2",
                 "--stage-steps", "2", "--device", "cpu"]) == 0
    out = tmp_path / "eval.csv"
    assert main(["evaluate", "--run", str(run), "--limit", "1", "--out", str(out), "--device", "cpu",
                 "--option", "steps=2", "--option", "eta=1.0", "--option", "samples=3"]) == 0
    row = next(csv.DictReader(open(out)))
    assert float(row["samples"]) == 3 and float(row["spread_mean"]) > 0
    assert -1 <= float(row["spearman_spread_error"]) <= 1 and float(row["ece_spread"]) >= 0
    assert "spread_mean" in capsys.readouterr().out


def test_leave_one_out_and_coverage_of_a_calibrated_gaussian():
    """Known answers: samples and truth drawn from one isotropic Gaussian per voxel are calibrated. Coverage then
    follows chi2 (1 - exp(-k^2) in 2D) for the truth and for the leave-one-out pseudo-truth alike, the mean error is
    (sqrt(pi)/2) s sqrt(1 + 1/n), and the binned curve of a 5-sample spread is tilted (low bins above the diagonal,
    top bins below) although nothing is miscalibrated."""
    import math

    from diffreg.uncertainty import (calibrated_coverage, calibrated_mean_error, calibration, coverage,
                                     field_statistics, leave_one_out)

    g = torch.Generator().manual_seed(0)
    n, size = 5, (64, 64)
    sigma = 0.2 + 1.8 * torch.rand(1, 1, *size, generator=g)           # a different scale at every voxel
    fields = torch.randn(n, 1, 2, *size, generator=g) * sigma
    truth = torch.randn(1, 2, *size, generator=g) * sigma
    st = field_statistics(fields)
    err = (st["mean"] - truth).pow(2).sum(1).sqrt()
    ks = [0.5, 1.0, 1.5]
    ref = calibrated_coverage(np.array(ks), dims=2)
    assert ref == pytest.approx([1 - math.exp(-k * k) for k in ks])
    # with the true sigma the coverage is exact (up to sampling); with the estimated spread it is close
    exact = coverage(sigma[:, 0] * math.sqrt(2), err, ks, n_samples=n)
    assert exact == pytest.approx(ref, abs=0.02)
    spread_loo, err_loo = leave_one_out(fields)
    assert spread_loo.shape == (n, 1, *size) and err_loo.shape == (n, 1, *size)
    # leave-one-out of calibrated samples covers like the truth itself does
    assert coverage(spread_loo, err_loo, ks, n_samples=n - 1) == pytest.approx(
        coverage(st["spread"], err, ks, n_samples=n), abs=0.03)
    # mean error against the mean spread: (sqrt(pi) / 2) sqrt(1 + 1/n) with the true scale
    mean_s = float((sigma * math.sqrt(2)).mean())
    assert calibrated_mean_error(mean_s, 2, n) == pytest.approx(mean_s * math.sqrt(math.pi) / 2 * math.sqrt(1.2))
    assert float(err.mean()) == pytest.approx(calibrated_mean_error(mean_s, 2, n), rel=0.03)
    # the binning artefact: sorted by a 5-sample spread, a calibrated model's curve is tilted
    curve = calibration(st["spread"], err, bins=10, n_samples=n)["curve"]
    assert curve[0]["observed"] > 1.2 * curve[0]["predicted"] and curve[-1]["observed"] < curve[-1]["predicted"]
    with pytest.raises(ValueError, match="at least 3"):
        leave_one_out(fields[:2])
