"""The density-of-states detectors (dose, dose-svm, dose-complexity, dose-minp): known
answers on synthetic statistics, the leak refusal, the fixed min-p rule, chunked scoring,
and the whole path through ``score --held-out`` on a tiny trained run."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from ood_audit.analysis import density_of_states as dos
from ood_audit.analysis.detectors import DETECTORS
from ood_audit.analysis.detectors.table import applicable_detectors, compute_detector, planned
from ood_audit.analysis.tables import load_run_scores
from ood_audit.commands.score import score_run
from ood_audit.errors import UserError
from ood_audit.runs import RunDir
from ood_audit.scoring.schema import SCHEMA_VERSION, TRAIN_ROWS_HELD_OUT_KEY, ScoresMeta

DOSE = ["dose", "dose-svm", "dose-complexity", "dose-minp"]


def meta_for(terms, held_out: bool = True) -> ScoresMeta:
    return ScoresMeta(version="0", schema_version=SCHEMA_VERSION, model="glow",
                      in_dataset="fashionmnist", terms=list(terms), run_config={},
                      checkpoint_sha256="ab" * 32, dequant_seed=0,
                      extra={TRAIN_ROWS_HELD_OUT_KEY: "true" if held_out else "false"})


def table(sets: dict[str, np.ndarray], terms=("a", "b")) -> pd.DataFrame:
    """Rows per set from [n, 2] statistics: two model terms, log_px their sum, plus a
    constant term (a flow's ActNorm log|det|) and PNG bits equal to 100 * bpd * D, so
    input complexity is a fixed multiple of the model's bits."""
    frames = []
    for name, values in sets.items():
        role, split = {"train": ("in", "train"), "test": ("in", "test")}.get(name, ("ood", "test"))
        f = pd.DataFrame({"dataset": "fashionmnist" if role == "in" else name, "role": role,
                          "split": split, "transform": "none", "index": np.arange(len(values)),
                          "label": -1, "n_dims": 4})
        for j, t in enumerate(terms):
            f[t] = values[:, j]
        f["actnorm"] = 7.0
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    df["log_px"] = df[list(terms)].sum(axis=1) + df["actnorm"]
    df["bpd"] = -(df["log_px"] - 4 * math.log(256)) / (4 * math.log(2))
    df["png_bits"] = 101.0 * df["bpd"] * 4  # input complexity = 100 * bits_model
    return df


def gaussian_table(n: int = 400, seed: int = 0) -> tuple[pd.DataFrame, ScoresMeta]:
    rng = np.random.default_rng(seed)
    df = table({"train": rng.normal(0, 1, (n, 2)), "test": rng.normal(0, 1, (n, 2)),
                "far": rng.normal(0, 1, (n, 2)) + [6.0, -6.0]})
    return df, meta_for(["a", "b", "actnorm"])


# ------------------------------------------------------------- known answers

def test_dose_is_the_sum_of_scotts_gaussian_kdes_per_statistic(monkeypatch):
    df, meta = gaussian_table()
    s = compute_detector("dose", df, meta).to_numpy()
    train = df[df.split == "train"]
    fitted = DETECTORS["dose"].prepare(train, meta)
    # log_px = a + b + 7 varies; actnorm (constant) is left out
    assert fitted.names == ("log_px", "a", "b")
    expect = sum(sps.gaussian_kde(train[c].to_numpy()).logpdf(df[c].to_numpy())
                 for c in fitted.names)
    # interpolated on the grid: within GRID_TOL nats per statistic
    assert np.abs(s - expect).max() <= len(fitted.names) * dos.GRID_TOL
    monkeypatch.setattr(dos, "GRID_STEP", 1e-4)  # a grid larger than the rows: exact
    exact = compute_detector("dose", df, meta).to_numpy()
    np.testing.assert_allclose(exact, expect, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("kind", ["heavy tails", "outliers", "two modes"])
def test_the_grid_holds_its_tolerance_where_the_log_density_curves_sharply(kind, monkeypatch):
    """Between distant train rows a KDE's log-density curves far more than one kernel's
    -d^2 / 2 (a fixed grid of 1/16 bandwidth missed scipy by 0.1 nats here): the grid is
    refined there, and stays within GRID_TOL of scipy's gaussian_kde everywhere."""
    rng = np.random.default_rng(5)
    train = {"heavy tails": rng.standard_t(1.5, 400),
             "outliers": np.r_[rng.normal(0, 1, 398), 15.0, 40.0],
             "two modes": np.r_[rng.normal(0, 1, 200), rng.normal(8, 1, 200)]}[kind]
    fitted = dos.fit_statistics({"x": train}, ["x"])
    query = np.linspace(train.min() - 3, train.max() + 3, 20000)
    exact_rows = []
    real_exact = dos._exact
    monkeypatch.setattr(dos, "_exact", lambda t, *a: (exact_rows.append(len(t)),
                                                        real_exact(t, *a))[1])
    got = dos.kde_log_density(fitted, {"x": query})
    assert sum(exact_rows) < len(query) / 2  # the grid, not every row
    expect = sps.gaussian_kde(train).logpdf(query)
    assert np.abs(got - expect).max() <= dos.GRID_TOL
    h = dos.scott_bandwidth(len(train))
    d = ((query - train.mean()) / train.std(ddof=1))[:, None] - fitted.train[None, :, 0]
    log_tails = [np.logaddexp.reduce(sps.norm.logcdf(sign * d / h), axis=1) - np.log(len(train))
                 for sign in (1, -1)]
    expect_p = np.minimum(0.0, np.log(2) + np.minimum(*log_tails))
    got_p = dos.kde_log_two_sided_p(fitted, {"x": query})[:, 0]
    assert np.abs(got_p - expect_p).max() <= dos.GRID_TOL


def test_dose_kde_approaches_the_true_density_with_many_rows():
    rng = np.random.default_rng(1)
    train = {"log_px": rng.normal(3.0, 2.0, 20000)}
    fitted = dos.fit_statistics(train, ["log_px"])
    grid = {"log_px": np.linspace(-1.0, 7.0, 9)}
    got = dos.kde_log_density(fitted, grid)
    true = sps.norm(3.0, 2.0).logpdf(grid["log_px"])
    # Scott's bandwidth widens N(3, 4) to N(3, 4 (1 + h^2)), h = n^(-1/5)
    h = 20000 ** -0.2
    widened = sps.norm(3.0, 2.0 * math.sqrt(1 + h * h)).logpdf(grid["log_px"])
    np.testing.assert_allclose(got, widened, atol=0.1)  # sampling noise in the tails
    np.testing.assert_allclose(got[3:6], widened[3:6], atol=0.03)
    assert np.abs(got - true).max() < 0.15


def test_far_rows_keep_their_order_instead_of_tying():
    """Beyond every train row the log-density keeps falling (log-sum-exp, no underflow)."""
    fitted = dos.fit_statistics({"x": np.random.default_rng(2).normal(0, 1, 500)}, ["x"])
    far = dos.kde_log_density(fitted, {"x": np.array([50.0, 100.0, -200.0, np.inf, np.nan])})
    assert np.isfinite(far[:3]).all() and far[0] > far[1] > far[2]
    assert far[3] == -np.inf and np.isnan(far[4])


def test_chunked_scoring_equals_one_chunk(monkeypatch):
    """Scores do not depend on how many rows are scored at once (the memory bound)."""
    df, meta = gaussian_table(n=300)
    whole = {name: compute_detector(name, df, meta).to_numpy() for name in DOSE}
    monkeypatch.setattr(dos, "CHUNK_ENTRIES", 7 * 300)  # 7 rows per chunk
    for name in DOSE:
        np.testing.assert_allclose(compute_detector(name, df, meta).to_numpy(), whole[name],
                                   rtol=1e-12, atol=1e-12, err_msg=name)


def test_every_dose_detector_ranks_far_rows_below_held_out_ones():
    df, meta = gaussian_table()
    test, far = df.split.eq("test") & df.role.eq("in"), df.dataset.eq("far")
    for name in DOSE:
        s = compute_detector(name, df, meta)
        assert s[far].max() < s[test].median(), name


def test_one_class_svm_is_deterministic_and_inside_is_higher():
    df, meta = gaussian_table()
    a = compute_detector("dose-svm", df, meta)
    b = compute_detector("dose-svm", df, meta)
    np.testing.assert_array_equal(a, b)
    centre = df.copy()
    centre.loc[:, ["a", "b"]] = 0.0
    centre["log_px"] = 7.0
    inside = compute_detector("dose-svm", pd.concat([df[df.split == "train"], centre]), meta)
    assert inside.iloc[-1] > 0 > a[df.dataset.eq("far")].max()


def test_one_class_svm_keeps_its_nu_bounds_and_ignores_units():
    """Schoelkopf et al. 2001 (Prop. 4): nu bounds the share of train rows outside the
    boundary from above and the share of support vectors from below. The statistics are
    standardised first, so a change of units leaves the scores as they were."""
    df, meta = gaussian_table(n=1000)
    train = df.split.eq("train")
    s = compute_detector("dose-svm", df, meta).to_numpy()
    assert (s[train] < -1e-6).mean() <= dos.SVM_NU
    svm = DETECTORS["dose-svm"].prepare(df[train], meta)
    assert len(svm.model.support_) >= dos.SVM_NU * train.sum() - 1
    rescaled = df.assign(a=1000.0 * df["a"] - 3.0)
    np.testing.assert_allclose(compute_detector("dose-svm", rescaled, meta).to_numpy(), s,
                               rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------- the min-p rule

def test_two_sided_p_of_the_kde_has_the_closed_form():
    """p = 2 min(F, 1 - F), F the mean of the kernels' normal CDFs."""
    rng = np.random.default_rng(3)
    train = rng.normal(0, 1, 300)
    fitted = dos.fit_statistics({"x": train}, ["x"])
    query = np.array([-3.0, -0.5, 0.0, 0.7, 4.0])
    z_train = (train - train.mean()) / train.std(ddof=1)
    z = (query - train.mean()) / train.std(ddof=1)
    h = 300 ** -0.2
    cdf = sps.norm.cdf((z[:, None] - z_train[None, :]) / h).mean(axis=1)
    expect = np.log(np.minimum(1.0, 2 * np.minimum(cdf, 1 - cdf)))
    got = dos.kde_log_two_sided_p(fitted, {"x": query})[:, 0]
    np.testing.assert_allclose(got, expect, rtol=1e-9, atol=1e-12)
    deep = dos.kde_log_two_sided_p(fitted, {"x": np.array([60.0, 80.0])})[:, 0]
    assert np.isfinite(deep).all() and deep[0] > deep[1]  # no tie at log 0
    # many rows: interpolated on the grid, within GRID_TOL
    many = np.linspace(-5.0, 5.0, 4001)
    z = (many - train.mean()) / train.std(ddof=1)
    cdf = sps.norm.cdf((z[:, None] - z_train[None, :]) / h).mean(axis=1)
    expect = np.log(np.minimum(1.0, 2 * np.minimum(cdf, 1 - cdf)))
    got = dos.kde_log_two_sided_p(fitted, {"x": many})[:, 0]
    assert np.abs(got - expect).max() <= dos.GRID_TOL


def test_min_p_catches_a_set_that_one_statistic_of_many_carries():
    """Six statistics in-distribution, the seventh far out: the sum of log-densities
    (dose) lets the six typical ones dilute the seventh, the minimum p (dose-minp's rule)
    does not."""
    rng = np.random.default_rng(4)
    n, d = 2000, 7
    train = rng.normal(0, 1, (n, d))
    test = rng.normal(0, 1, (n, d))
    ood = rng.normal(0, 1, (n, d))
    ood[:, -1] = rng.normal(3.2, 0.3, n)  # carried by the last statistic alone
    names = [f"t{j}" for j in range(d)]
    fitted = dos.fit_statistics(dict(zip(names, train.T, strict=True)), names)

    def auroc(score):
        a = score(dict(zip(names, test.T, strict=True)))
        b = score(dict(zip(names, ood.T, strict=True)))
        return (a[:, None] > b[None, :]).mean()

    by_sum = auroc(lambda rows: dos.kde_log_density(fitted, rows))
    by_min = auroc(lambda rows: dos.min_p(dos.kde_log_two_sided_p(fitted, rows)))
    assert by_min > 0.97 and by_min > by_sum + 0.02


def test_dose_complexity_and_minp_match_scipys_kde_per_statistic():
    """Known answers from scipy's gaussian_kde, statistic by statistic: dose-complexity is
    the sum of the log-densities of log_px, the varying terms and input complexity
    (png_bits - bpd * n_dims, computed here); dose-minp the smallest log two-sided tail
    probability log 2 min(F, 1 - F), F the KDE's CDF (integrate_box_1d)."""
    df, meta = gaussian_table()
    df["png_bits"] = np.random.default_rng(7).normal(500.0, 20.0, len(df))  # independent
    df["ic"] = df["png_bits"] - df["bpd"] * df["n_dims"]
    train = df[df.split.eq("train")]
    kdes = {c: sps.gaussian_kde(train[c].to_numpy()) for c in ("log_px", "a", "b", "ic")}
    expect = sum(k.logpdf(df[c].to_numpy()) for c, k in kdes.items())
    got = compute_detector("dose-complexity", df, meta).to_numpy()
    assert np.abs(got - expect).max() <= len(kdes) * dos.GRID_TOL

    log_p = []
    for c, k in kdes.items():
        cdf = np.clip([k.integrate_box_1d(-np.inf, t) for t in df[c].to_numpy()], 0.0, 1.0)
        with np.errstate(divide="ignore"):
            log_p.append(np.minimum(0.0, np.log(2 * np.minimum(cdf, 1 - cdf))))
    expect = np.min(log_p, axis=0)
    got = compute_detector("dose-minp", df, meta).to_numpy()
    shallow = expect > math.log(1e-10)  # where scipy's 1 - F still has its digits
    assert shallow.sum() > len(df) / 2
    assert np.abs(got[shallow] - expect[shallow]).max() <= dos.GRID_TOL
    assert (got[~shallow] < math.log(1e-9)).all()


def test_dose_complexity_and_minp_add_input_complexity():
    df, meta = gaussian_table()
    train = df[df.split == "train"]
    for name in ("dose-complexity", "dose-minp"):
        fitted = DETECTORS[name].prepare(train, meta)
        assert fitted.names[-1] == "input_complexity", name
    assert "input_complexity" not in DETECTORS["dose"].prepare(train, meta).names


# ------------------------------------------------------------- the leak

def test_fit_on_the_models_training_images_is_refused_in_one_line():
    df, _ = gaussian_table()
    leaky = meta_for(["a", "b", "actnorm"], held_out=False)
    for name in DOSE:
        assert name not in applicable_detectors(df, leaky)
        with pytest.raises(UserError, match="--held-out") as exc:
            compute_detector(name, df, leaky)
        assert "leak" in str(exc.value) and "\n" not in str(exc.value)
        with pytest.raises(UserError, match="leak"):  # the fit itself refuses too
            DETECTORS[name].prepare(df[df.split == "train"], leaky)
    sets = [("fashionmnist", "in", "test", "none"), ("fashionmnist", "in", "train", "none")]
    columns = ["a", "b", "actnorm", "png_bits"]
    with pytest.raises(UserError, match="dose.*leak.*--held-out"):  # before scoring
        planned(["dose"], columns, sets, leaky)
    assert "dose" not in planned(None, columns, sets, leaky)  # by default: skipped
    assert "dose" in planned(None, columns, sets, meta_for(["a", "b", "actnorm"]))


def test_constant_or_missing_statistics_are_a_one_line_error():
    df, meta = gaussian_table()
    flat = df.copy()
    for c in ("a", "b", "log_px"):
        flat[c] = 1.0
    with pytest.raises(UserError, match="no statistic varies") as exc:
        compute_detector("dose", flat, meta)
    assert "\n" not in str(exc.value)


# ------------------------------------------------------------- through score

def test_score_held_out_writes_the_dose_detectors(tiny_run, tmp_path):
    rd = RunDir(tmp_path / "run")
    shutil.copytree(tiny_run, rd.root, ignore=shutil.ignore_patterns(".lock", "scores*"))
    opts = dict(limit=40, train_limit=48, batch_size=16, device="cpu", notify=lambda m: None)
    with pytest.raises(UserError, match="dose.*leak.*--held-out"):
        score_run(rd, ["noise-uniform"], detectors=["dose"], **opts)
    assert not rd.scores.exists()
    score_run(rd, ["noise-uniform", "constant"], held_out=True, **opts)
    df, meta = load_run_scores(rd)
    assert set(DOSE) <= set(json.loads(meta.extra["detectors"]))
    assert meta.extra[TRAIN_ROWS_HELD_OUT_KEY] == "true"
    stats = json.loads(meta.extra["dose_statistics"])
    assert stats[0] == "log_px" and not any("actnorm" in s or "invconv" in s for s in stats)
    assert meta.extra["dose_fit_rows"] == "48"
    assert json.loads(meta.extra["dose_minp_statistics"])[-1] == "input_complexity"
    for name in DOSE:
        s = df[f"score_{name}"]
        assert s.notna().all(), name
        noise, test = s[df.dataset == "noise-uniform"], s[(df.role == "in") & (df.split == "test")]
        assert noise.max() < test.median(), name
