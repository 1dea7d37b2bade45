"""The detector registry: each formula on hand-built rows, what each needs, and one shared
check over every entry (a score per row, finite, higher = more in-distribution)."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from fake_scores import D, fake_frame, fake_meta

from ood_audit.analysis import typicality
from ood_audit.analysis.detectors import DETECTORS, LEVEL_DIMS_KEY, level_ratio_score, waic_score
from ood_audit.analysis.detectors.table import (
    applicable_detectors,
    available_detectors,
    compute_detector,
    detector_scores,
    with_detector_scores,
)
from ood_audit.errors import UserError
from ood_audit.scoring.features import FEATURES, compute_feature
from ood_audit.scoring.schema import TRAIN_ROWS_HELD_OUT_KEY
from ood_audit.seeds import seeded
from ood_audit.training.trainer import perturb_pixels


def rows(log_px, split="test", role="in", dataset="fashionmnist", **cols) -> pd.DataFrame:
    n = len(log_px)
    df = pd.DataFrame({"dataset": dataset, "role": role, "split": split, "transform": "none",
                       "index": np.arange(n), "label": -1, "n_dims": D,
                       "log_px": np.asarray(log_px, float)})
    for k, v in cols.items():
        df[k] = np.asarray(v, float)
    return df


def full_frame(n: int = 60) -> tuple[pd.DataFrame, object]:
    """A fake Glow table with every detector's inputs: background, two members, features."""
    df, terms = fake_frame(n)
    rng = np.random.default_rng(3)
    df["log_px_background"] = df["log_px"] - rng.normal(50, 5, len(df))
    df["log_px_member1"] = df["log_px"] + rng.normal(0, 3, len(df))
    df["log_px_member2"] = df["log_px"] + rng.normal(0, 3, len(df))
    members = df[["log_px", "log_px_member1", "log_px_member2"]].to_numpy()
    top = members.max(axis=1, keepdims=True)  # per row, so exp does not underflow
    df["log_px_ensemble"] = (np.log(np.exp(members - top).mean(axis=1, keepdims=True)) + top)[:, 0]
    df["png_bits"] = rng.normal(4000, 300, len(df))
    df["jp2_bits"] = rng.normal(6000, 300, len(df))
    df["log_px_skip1"] = df["log_px"] - rng.gamma(4.0, 5.0, len(df))  # an hvae's L^>k
    df["log_px_skip2"] = df["log_px_skip1"] - rng.gamma(4.0, 5.0, len(df))
    df["likelihood_regret"] = rng.gamma(2.0, 10.0, len(df))  # a VAE's regret
    meta = fake_meta(terms, extra={LEVEL_DIMS_KEY: json.dumps([D // 2, D // 2]),
                                   TRAIN_ROWS_HELD_OUT_KEY: "true"})  # unseen train rows
    return df, meta


# ------------------------------------------------------------- every entry

def test_every_detector_scores_every_row_finite():
    df, meta = full_frame()
    assert applicable_detectors(df, meta) == list(DETECTORS)
    for name in DETECTORS:
        s = compute_detector(name, df, meta)
        assert isinstance(s, pd.Series) and s.index.equals(df.index), name
        assert np.isfinite(s.to_numpy()).all(), name


def test_each_detector_names_what_it_misses():
    """Named without its inputs, a detector is one UserError saying what to supply."""
    df, terms = fake_frame(20)
    meta = fake_meta(terms)  # no level sizes, no background, no members, no features
    expect = {"likelihood-ratio": "train --background", "complexity": "png_bits",
              "complexity-jp2": "jp2_bits", "waic": "--member", "level-ratio": "level",
              "llr-k": "hierarchical VAE.*--model hvae",
              "likelihood-regret": "VAE's likelihood regret.*--detector likelihood-regret"}
    for name, words in expect.items():
        with pytest.raises(UserError, match=words) as exc:
            detector_scores(df, meta, [name])
        assert "\n" not in str(exc.value) and name in str(exc.value)
    no_train = df[df["split"] != "train"]
    with pytest.raises(UserError, match="train rows.*--train-limit"):
        detector_scores(no_train, meta, ["typicality"])
    with pytest.raises(UserError, match="unknown detector 'nope'"):
        detector_scores(df, meta, ["nope"])
    # all-by-default skips what cannot be had instead of failing
    assert applicable_detectors(df, meta) == ["likelihood", "typicality"]
    # a report shows log p(x) and the detectors score wrote, nothing recomputed
    assert available_detectors(df, meta) == ["likelihood"]
    df["score_typicality"] = 0.0
    assert available_detectors(df, meta) == ["likelihood", "typicality"]


def test_level_ratio_needs_two_levels():
    df, terms = fake_frame(10, levels=1)
    meta = fake_meta(terms, extra={LEVEL_DIMS_KEY: json.dumps([D])})
    with pytest.raises(UserError, match="two or more levels"):
        detector_scores(df, meta, ["level-ratio"])


# ------------------------------------------------------------- formulas

def test_likelihood_is_log_px():
    df = rows([-3.0, 5.0])
    assert compute_detector("likelihood", df, None).tolist() == [-3.0, 5.0]


def test_typicality_per_sample_formula():
    train = rows([-10.0, -12.0], split="train")  # H_hat = mean(-log p) = 11
    test = rows([-11.0, -5.0, -17.0])  # -log p = 11, 5, 17 -> distance 0, 6, 6
    df = pd.concat([train, test], ignore_index=True)
    s = compute_detector("typicality", df, None)
    assert s.tolist() == [-1.0, -1.0, 0.0, -6.0, -6.0]
    # the most likely input is not the most typical one
    assert s.iloc[3] < s.iloc[2]


def test_typicality_ignores_ood_and_transformed_train_rows():
    df = pd.concat([rows([-10.0, -12.0], split="train"),
                    rows([-100.0, -100.0], split="train", role="ood", dataset="mnist"),
                    rows([-11.0])], ignore_index=True)
    assert typicality.entropy_estimate(typicality.entropy_rows(df)) == 11.0


def test_batch_statistic_and_bootstrap_threshold():
    assert typicality.batch_statistic([[-10.0, -14.0], [-1.0, -1.0]], 11.0).tolist() == [1.0, 10.0]
    # held-out values all equal to H: every bootstrap batch has eps = 0
    assert typicality.bootstrap_threshold(np.full(50, -11.0), 11.0, 5) == 0.0
    # the threshold shrinks with the batch size (averaging), as in Nalisnick et al. 2019b
    held = np.random.default_rng(0).normal(-11.0, 2.0, 500)
    t1, t10 = (typicality.bootstrap_threshold(held, 11.0, m) for m in (1, 10))
    assert t10 < t1
    assert t1 == typicality.bootstrap_threshold(held, 11.0, 1)  # seeded


def test_batch_table_flags_atypical_batches():
    rng = np.random.default_rng(1)
    train, test = rng.normal(-11, 2, 400), rng.normal(-11, 2, 400)
    ood = {"far": rng.normal(-5, 2, 400), "same": rng.normal(-11, 2, 400)}
    tab = {(r["ood_set"], r["batch_size"]): r for r in typicality.batch_table(train, test, ood)}
    assert tab[("far", 10)]["ood_flagged"] == 1.0 and tab[("far", 10)]["auroc"] > 0.99
    assert tab[("far", 1)]["ood_flagged"] < tab[("far", 10)]["ood_flagged"]
    assert tab[("same", 5)]["ood_flagged"] < 0.1 and tab[("same", 5)]["in_flagged"] < 0.1


def test_llr_k_formula_and_its_k_chosen_on_train_rows_only():
    """-LLR^>k = L^>k - L; k* maximises mean / sd of LLR^>k on in-distribution train rows
    (the OOD rows, however they look, do not move it)."""
    train_llr1, train_llr2 = [1.0, 3.0, 5.0], [10.0, 11.0, 12.0]  # mean/sd 1.5 vs 11
    train = rows([-100.0] * 3, split="train", log_px_skip1=[-101.0, -103.0, -105.0],
                 log_px_skip2=[-110.0, -111.0, -112.0])
    test = rows([-50.0, -60.0], log_px_skip1=[-52.0, -70.0], log_px_skip2=[-56.0, -90.0])
    ood = rows([-40.0, -40.0], role="ood", dataset="mnist", log_px_skip1=[-40.0, -40.0],
               log_px_skip2=[-400.0, -41.0])
    df = pd.concat([train, test, ood], ignore_index=True)
    s = compute_detector("llr-k", df, None)
    assert s.tolist() == [-10.0, -11.0, -12.0, -6.0, -30.0, -360.0, -1.0]
    from ood_audit.analysis.detectors.llr_k import choose_k

    assert choose_k({"log_px": np.full(3, -100.0), "log_px_skip1": -100 - np.array(train_llr1),
                     "log_px_skip2": -100 - np.array(train_llr2)}) == 2
    # a flat LLR^>1 on the train rows (mean 2, sd 0.01) wins over LLR^>2
    flat = df.copy()
    flat.loc[:2, "log_px_skip1"] = [-102.0, -102.01, -101.99]
    assert compute_detector("llr-k", flat, None).tolist()[3:5] == [-2.0, -10.0]
    _, meta = with_detector_scores(*_scored(flat))
    assert meta.extra["llr_k"] == "1"


def _scored(df):
    from fake_scores import fake_meta

    return df, fake_meta([], extra={"detectors": json.dumps(["llr-k"])})


def test_likelihood_regret_is_minus_the_regret():
    df = rows([-3.0, 7.5, 1.0], likelihood_regret=[0.0, 12.5, 3.0])
    assert compute_detector("likelihood-regret", df, None).tolist() == [0.0, -12.5, -3.0]


def test_likelihood_ratio_formula_and_identical_background():
    df = rows([-3.0, 7.5], log_px_background=[-5.0, 10.0])
    assert compute_detector("likelihood-ratio", df, None).tolist() == [2.0, -2.5]
    same = rows([-3.0, 7.5, 100.0], log_px_background=[-3.0, 7.5, 100.0])
    assert compute_detector("likelihood-ratio", same, None).tolist() == [0.0, 0.0, 0.0]


def test_complexity_formula():
    # bits_model = bpd * D; score = L - bits_model = -S (Serra et al. 2020)
    df = rows([0.0, 0.0], bpd=[2.0, 5.0], png_bits=[3000.0, 3000.0])
    s = compute_detector("complexity", df, None)
    assert s.tolist() == [3000.0 - 2.0 * D, 3000.0 - 5.0 * D]
    # bpd * D is the discrete code length -log2 P(k) >= -(log p(x) - D log 256) / log 2
    log_px = 123.0
    bpd = -(log_px - D * math.log(256)) / (D * math.log(2))
    assert bpd * D == pytest.approx(-(log_px - D * math.log(256)) / math.log(2))


def test_waic_formula():
    members = np.array([[1.0, 3.0], [2.0, 2.0], [0.0, 3.0]])
    assert waic_score(members).tolist() == [2.0 - 2.0, 2.0, 1.5 - 4.5]
    df = rows([1.0, 2.0], log_px_member1=[3.0, 2.0], log_px_member2=[5.0, 2.0])
    # mean 3, sample variance 4 -> -1; identical members -> the mean
    assert compute_detector("waic", df, None).tolist() == [-1.0, 2.0]


def test_level_ratio_formula():
    c = np.array([[-400.0, -100.0, -50.0], [-200.0, -200.0, -100.0]])
    dims = [200, 100, 100]  # last level 100 dims; early levels 300 dims
    expected = [-50.0 / 100 - (-500.0) / 300, -100.0 / 100 - (-400.0) / 300]
    np.testing.assert_allclose(level_ratio_score(c, dims), expected)
    # from the table: level i's contribution is log p(z_i) + its log-dets
    terms = ["log_pz_level0", "logdet_level0_coupling", "log_pz_level1", "logdet_level1_coupling"]
    df = rows([0.0], log_pz_level0=[-300.0], logdet_level0_coupling=[100.0],
              log_pz_level1=[-90.0], logdet_level1_coupling=[30.0])
    meta = fake_meta(terms, extra={LEVEL_DIMS_KEY: json.dumps([500, 284])})
    got = compute_detector("level-ratio", df, meta).iloc[0]
    assert got == pytest.approx(-60.0 / 284 - (-200.0) / 500)


# ------------------------------------------------------------- features, perturbation

def test_compressed_length_noise_costs_more_than_constant():
    rng = np.random.default_rng(0)
    constant = torch.full((3, 1, 28, 28), 117, dtype=torch.uint8)
    noise = torch.from_numpy(rng.integers(0, 256, (3, 1, 28, 28), dtype=np.uint8))
    for name, feature in FEATURES.items():
        if not feature.available():
            continue
        c, z = compute_feature(name, constant), compute_feature(name, noise)
        assert c.shape == (3,) and z.shape == (3,)
        assert (z > 2 * c).all(), name
        assert z.min() > 0.9 * 8 * 784  # uniform noise does not compress
    rgb = torch.from_numpy(rng.integers(0, 256, (2, 3, 8, 8), dtype=np.uint8))
    assert (compute_feature("png_bits", rgb) > compute_feature("png_bits", rgb // 64 * 64)).all()
    with pytest.raises(UserError, match="unknown data feature"):
        compute_feature("gif_bits", constant)


def test_perturb_pixels_rate_and_determinism():
    images = torch.full((64, 1, 28, 28), 7, dtype=torch.uint8)
    assert torch.equal(perturb_pixels(images, 0.0, seeded(1)), images)
    out = perturb_pixels(images, 0.2, seeded(1))
    assert torch.equal(out, perturb_pixels(images, 0.2, seeded(1)))
    changed = (out != images).float().mean().item()
    assert 0.18 < changed < 0.21  # 0.2 * 255/256 of pixels change value
    assert out.dtype == torch.uint8 and torch.equal(images, torch.full_like(images, 7))
    all_noise = perturb_pixels(images, 0.999999, seeded(2)).float()
    assert 120 < all_noise.mean().item() < 135  # uniform on 0..255
