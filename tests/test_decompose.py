"""The log p(x) decomposition: checked against sums and means computed here, from the raw
Parquet file, without the package's code."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import typer
from fake_scores import bits_per_dim, fake_frame, fake_meta, write_fake_run, write_scores
from typer.testing import CliRunner

from ood_audit.analysis.decomposition import carrier, decompose, gaps, write_decomposition
from ood_audit.analysis.tables import load_run_scores
from ood_audit.cli.decompose_cmd import decompose as decompose_cmd
from ood_audit.errors import UserError
from ood_audit.scoring.schema import ScoresMeta


@pytest.fixture
def run(tmp_path):
    return write_fake_run(tmp_path / "run", n=150)


def _cli():
    app = typer.Typer()
    app.command()(decompose_cmd)
    app.command("noop")(lambda: None)  # two commands: typer then keeps the subcommand name
    return app


def _raw(rd) -> pd.DataFrame:
    return pq.read_table(rd.scores).to_pandas()


def _row(table, label, term):
    hit = table[(table["label"] == label) & (table["term"] == term)]
    assert len(hit) == 1, (label, term)
    return hit.iloc[0]


def test_means_std_and_diffs_match_direct_computation(run):
    df, meta = load_run_scores(run)
    table = decompose(df, meta)
    raw = _raw(run)
    ref = raw[(raw.dataset == "fashionmnist") & (raw.split == "test")]
    mnist = raw[raw.dataset == "mnist"]
    for term in ["log_px", "bpd", "log_pz", "logdet", "log_pz_level1", "logdet_level0_coupling"]:
        r = _row(table, "mnist test", term)
        assert r["mean"] == pytest.approx(mnist[term].mean())
        assert r["std"] == pytest.approx(mnist[term].std(ddof=1))
        assert r["n"] == len(mnist)
        assert r["diff_vs_in"] == pytest.approx(mnist[term].mean() - ref[term].mean())
    gap = mnist["log_px"].mean() - ref["log_px"].mean()
    share = (mnist["logdet"].mean() - ref["logdet"].mean()) / gap
    assert _row(table, "mnist test", "logdet")["share_of_gap"] == pytest.approx(share)
    assert math.isnan(_row(table, "mnist test", "bpd")["share_of_gap"])


def test_per_level_and_per_kind_sums(run):
    df, meta = load_run_scores(run)
    table = decompose(df, meta)
    raw = _raw(run)
    noise = raw[raw.dataset == "noise-uniform"]
    level0 = noise[[f"logdet_level0_{k}" for k in ("actnorm", "invconv", "coupling")]].sum(axis=1)
    coupling = noise[["logdet_level0_coupling", "logdet_level1_coupling"]].sum(axis=1)
    r0 = _row(table, "noise-uniform test", "logdet_level0")
    rc = _row(table, "noise-uniform test", "logdet_coupling")
    assert (r0["aggregate"], r0["group"], r0["level"]) == ("level", "logdet", 0)
    assert (rc["aggregate"], rc["layer_kind"]) == ("layer_kind", "coupling")
    assert r0["mean"] == pytest.approx(level0.mean())
    assert rc["mean"] == pytest.approx(coupling.mean())
    # log p(z) members have no kind: no derived per-level rows duplicate them.
    assert not ((table["group"] == "log_pz") & (table["aggregate"] == "level")).any()


def test_top_level_terms_partition_the_gap(run):
    df, meta = load_run_scores(run)
    table = decompose(df, meta)
    for label in ["mnist test", "noise-uniform test", "fashionmnist train"]:
        rows = table[(table["label"] == label) & table["top_level"]]
        assert set(rows["term"]) == {"log_pz", "logdet"}
        assert rows["diff_vs_in"].sum() == pytest.approx(_row(table, label, "log_px")["diff_vs_in"])
        assert rows["share_of_gap"].sum() == pytest.approx(1.0)


def test_gaps_name_the_carrier(run):
    df, meta = load_run_scores(run)
    found = {g.label: g for g in gaps(decompose(df, meta))}
    assert set(found) == {"mnist test", "noise-uniform test"}
    # The fake shifts MNIST by +100 nats in log p(z) and +300 in log|det|: 75% log|det|.
    assert found["mnist test"].carrier == "logdet"
    assert found["mnist test"].share == pytest.approx(0.75, abs=0.05)
    assert found["noise-uniform test"].carrier == "log_pz"
    text = found["mnist test"].sentence()
    assert text.startswith("mnist test vs fashionmnist test: log p(x) higher by")
    assert f"log|det| carries {found['mnist test'].share:.0%} of the gap" in text


def test_carrier_rule():
    assert carrier({"a": 300.0, "b": 100.0}, 400.0) == ("a", 0.75)
    assert carrier({"a": -50.0, "b": -150.0}, -200.0) == ("b", 0.75)
    name, share = carrier({"a": 500.0, "b": -100.0}, 400.0)  # b works against the gap
    assert (name, share) == ("a", 1.25)
    name, share = carrier({"a": 3.0, "b": -3.5}, 0.0)
    assert name == "b" and math.isnan(share)
    assert carrier({}, 1.0)[0] == ""


def test_model_without_term_groups(tmp_path):
    """A VAE-like model: terms named freely, no group totals; each term is top level."""
    df, _ = fake_frame(60, seed=2)
    rng = np.random.default_rng(0)
    df["recon"] = rng.normal(-500, 10, len(df)) + np.where(df["dataset"] == "mnist", 80.0, 0.0)
    df["neg_kl"] = rng.normal(-20, 2, len(df)) + np.where(df["dataset"] == "mnist", 20.0, 0.0)
    df["log_px"] = df["recon"] + df["neg_kl"]
    df["bpd"] = bits_per_dim(df["log_px"].to_numpy())
    meta = fake_meta(["recon", "neg_kl"], model="vae")
    path = write_scores(tmp_path / "scores.parquet", df, meta)
    table = decompose(*_read(path))
    assert set(table.loc[table["top_level"], "term"]) == {"recon", "neg_kl"}
    gap = {g.label: g for g in gaps(table)}["mnist test"]
    assert gap.carrier == "recon" and gap.share == pytest.approx(0.8, abs=0.05)


def _read(path):
    from ood_audit.scoring.parquet import read_scores
    return read_scores(path)


def test_missing_reference_is_a_user_error(run):
    df, meta = load_run_scores(run)
    with pytest.raises(UserError, match="in-distribution test"):
        decompose(df[df["split"] != "test"], meta)


def test_write_parquet_and_csv_round_trip(run, tmp_path):
    df, meta = load_run_scores(run)
    table = decompose(df, meta)
    back = pd.read_parquet(write_decomposition(table, tmp_path / "d.parquet"))
    pd.testing.assert_frame_equal(back, table, check_dtype=False)
    csv = pd.read_csv(write_decomposition(table, tmp_path / "d.csv"))
    assert list(csv.columns) == list(table.columns) and len(csv) == len(table)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporaries


# ------------------------------------------------------------------ CLI

def test_cli_prints_tables_and_carrier_and_writes_file(run):
    res = CliRunner().invoke(_cli(), ["decompose", "--run", str(run.root)], terminal_width=200)
    assert res.exit_code == 0, res.output
    assert "log|det| carries" in res.output
    assert "noise-uniform test vs fashionmnist test" in res.output
    assert run.decomposition.exists()
    assert len(pd.read_parquet(run.decomposition)) > 0


def test_cli_csv_and_latest_pointer(run, tmp_path, monkeypatch):
    from ood_audit.runs import set_latest

    monkeypatch.chdir(tmp_path)
    set_latest(run.root)  # runs/latest under the cwd, the default
    res = CliRunner().invoke(_cli(), ["decompose", "--csv"])
    assert res.exit_code == 0, res.output
    assert (run.root / "decomposition.csv").exists()


def test_cli_bad_inputs_are_user_errors(tmp_path, run):
    app = _cli()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(app, ["decompose", "--run", str(empty)])
    assert isinstance(res.exception, UserError) and "no scores.parquet" in str(res.exception)
    # A truncated Parquet file.
    data = run.scores.read_bytes()
    run.scores.write_bytes(data[: len(data) // 2])
    res = CliRunner().invoke(app, ["decompose", "--run", str(run.root)])
    assert isinstance(res.exception, UserError) and "rescore" in str(res.exception)


def test_other_schema_version_is_a_user_error(tmp_path):
    df, terms = fake_frame(20)
    meta = fake_meta(terms)
    meta = ScoresMeta(**{**meta.__dict__, "schema_version": "999"})
    rd = write_fake_run(tmp_path / "r", n=20)
    write_scores(rd.scores, df, meta)
    res = CliRunner().invoke(_cli(), ["decompose", "--run", str(rd.root)])
    assert isinstance(res.exception, UserError) and "version" in str(res.exception)


def test_gap_sentence_names_the_transform():
    """Transformed OOD sets are compared with the untransformed test split: say which."""
    from ood_audit.analysis.decomposition import Gap

    plain = Gap("mnist test", "mnist", "test", "none", "fashionmnist test", 10.0, -0.1)
    swept = Gap("mnist test", "mnist", "test", "contrast=0.5", "fashionmnist test", 10.0, -0.1)
    assert plain.sentence().startswith("mnist test vs fashionmnist test:")
    assert swept.sentence().startswith("mnist test [contrast=0.5] vs fashionmnist test:")
