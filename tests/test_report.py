"""The report on tiny synthetic runs: files, self-contained HTML, summary numbers, gates."""

from __future__ import annotations

import base64
import json
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import numpy as np
import pyarrow.parquet as pq
import pytest
import typer
from fake_scores import fake_frame, fake_meta, write_fake_run, write_scores
from typer.testing import CliRunner

from ood_audit.analysis.detectors.table import detector_scores
from ood_audit.analysis.metrics import ood_metrics
from ood_audit.cli.report_cmd import report as report_cmd
from ood_audit.errors import GateFailed, UserError
from ood_audit.report.build import analyse_run, append_step_summary, build_report
from ood_audit.report.gates import evaluate_gates, parse_gate, write_junit
from ood_audit.report.plots import OVERVIEW_CLASSES, draw_auroc_overview, draw_roc_grid

N_BOOT = 200


@pytest.fixture
def run(tmp_path):
    return write_fake_run(tmp_path / "glow", n=120)


@pytest.fixture
def run_cv(tmp_path):
    # A second run in which MNIST's advantage comes from log p(z) only (like CV-Glow).
    return write_fake_run(tmp_path / "glow-cv", n=120, seed=1, model="glow-cv",
                          ood={"mnist": (250.0, 0.0), "noise-uniform": (-2000.0, 0.0)})


def _cli():
    app = typer.Typer()
    app.command()(report_cmd)
    app.command("noop")(lambda: None)
    return app


def invoke(args, **kw):
    return CliRunner().invoke(_cli(), ["report", *args], terminal_width=200, **kw)


@pytest.fixture
def run3(tmp_path):
    """A run with three detectors: likelihood and two precomputed score columns."""
    df, terms = fake_frame(120)
    rng = np.random.default_rng(5)
    df["score_typicality"] = -np.abs(df["log_px"] - df["log_px"].mean())
    df["score_complexity"] = df["log_px"] + rng.normal(0, 400, len(df))
    rd = write_fake_run(tmp_path / "three", n=120)
    write_scores(rd.scores, df, fake_meta(terms), scores=["score_typicality", "score_complexity"])
    return rd


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.urls, self.tags, self.meta = [], [], [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        if tag == "meta":
            self.meta.append(a)
        for key in ("src", "href"):
            if key in a and not a[key].startswith("data:"):
                self.urls.append(a[key])


# ------------------------------------------------------------------ files and numbers

def test_report_files_html_is_self_contained(run, tmp_path):
    res = build_report([run], tmp_path / "out", n_boot=N_BOOT)
    assert {p.name for p in res.files.values()} == {"report.html", "report.md", "summary.json"}
    page = _Page()
    page.feed(res.files["html"].read_text())
    assert any(m.get("name") == "viewport" for m in page.meta)
    assert page.urls == []  # nothing fetched: no external src/href
    assert "script" not in page.tags and "link" not in page.tags
    # AUROC overview + hist + ROC grid + decomposition + training curve, each a real PNG.
    assert len(page.imgs) == 5
    for src in page.imgs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    md = res.files["md"].read_text()
    links = [ln.split("](")[1].rstrip(")") for ln in md.splitlines() if ln.startswith("![")]
    assert len(links) == 5
    for link in links:
        assert (tmp_path / "out" / link).read_bytes()[:4] == b"\x89PNG"


def test_summary_numbers_equal_the_metric_functions(run, tmp_path):
    res = build_report([run], tmp_path / "out", n_boot=N_BOOT, seed=3)
    summary = json.loads(res.files["json"].read_text(),
                         parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    raw = pq.read_table(run.scores).to_pandas()
    ref = raw[(raw["role"] == "in") & (raw["split"] == "test") & (raw["transform"] == "none")]
    rows = {(r["detector"], r["ood_set"]): r for r in summary["metrics"]}
    assert set(rows) == {("likelihood", "mnist"), ("likelihood", "noise-uniform")}
    for name in ["mnist", "noise-uniform"]:
        ood = raw[raw.dataset == name]
        want = ood_metrics(ref["log_px"], ood["log_px"], n_boot=N_BOOT, seed=3)
        got = rows[("likelihood", name)]
        for key, value in want.items():
            assert got[key] == pytest.approx(value, abs=1e-12), key
        assert got["mean_bpd_ood"] == pytest.approx(ood["bpd"].mean())
        assert got["bpd_gap"] == pytest.approx(ood["bpd"].mean() - ref["bpd"].mean())
    # The paper's paradox is named where the model prefers the OOD set.
    assert rows[("likelihood", "mnist")]["auroc"] < 0.5
    assert "paradox: model prefers OOD" in rows[("likelihood", "mnist")]["verdict"]
    assert "paradox: model prefers OOD" in res.files["html"].read_text()
    section = summary["runs"][0]
    assert section["model"] == "glow" and section["in_dataset"] == "fashionmnist"
    assert section["checkpoint_sha256"] == "ab" * 32
    sets = {s["label"]: s for s in section["sets"]}
    assert sets["fashionmnist train"]["n"] == 120
    mnist_mean = raw[raw["dataset"] == "mnist"]["log_px"].mean()
    assert sets["mnist test"]["mean_log_px"] == pytest.approx(mnist_mean)
    assert [g["carrier"] for g in section["gaps"]] == ["logdet", "log_pz"]
    assert [r["epoch"] for r in section["training_curve"]] == [1, 2, 3, 4, 5]


def test_two_runs_side_by_side(run, run_cv, tmp_path):
    res = build_report([run, run_cv], tmp_path / "out", formats=["html", "json"], n_boot=N_BOOT)
    assert "md" not in res.files
    assert {(r["run"], r["ood_set"]) for r in res.rows} == {
        (a, b) for a in ("glow", "glow-cv") for b in ("mnist", "noise-uniform")}
    html = res.files["html"].read_text()
    assert html.count('<section class="run">') == 2
    cv = res.summary["runs"][1]
    assert cv["model"] == "glow-cv"
    assert {g["label"]: g["carrier"] for g in cv["gaps"]}["mnist test"] == "log_pz"


def test_precomputed_and_unknown_detector_columns_appear(tmp_path):
    """A scorer-written score_<name> column is used, and a detector this version does
    not know still gets its rows: the report needs no change for a new detector."""
    df, terms = fake_frame(80)
    df["score_likelihood"] = df["log_px"] * 2.0  # precomputed: must be used as is
    df["score_typicality"] = -np.abs(df["log_px"] - df["log_px"].mean())
    meta = fake_meta(terms)
    rd = write_fake_run(tmp_path / "r", n=80)
    write_scores(rd.scores, df, meta, scores=["score_likelihood", "score_typicality"])
    scores = detector_scores(df, meta)
    assert list(scores) == ["likelihood", "typicality"]
    assert np.allclose(scores["likelihood"], df["log_px"] * 2.0)
    res = build_report([rd], tmp_path / "out", formats=["json"], n_boot=0)
    assert {r["detector"] for r in res.rows} == {"likelihood", "typicality"}
    with pytest.raises(UserError, match="unknown detector"):
        detector_scores(df, meta, ["no-such-detector"])
    # likelihood-ratio is registered now: without a background model it says what to do
    with pytest.raises(UserError, match="train --background"):
        detector_scores(df, meta, ["likelihood-ratio"])


# ------------------------------------------------------------------ gates

def test_gate_parsing():
    g = parse_gate("mnist:auroc>=0.9")
    assert (g.dataset, g.detector, g.metric, g.op, g.bound) == (
        "mnist", "likelihood", "auroc", ">=", 0.9)
    g = parse_gate(" svhn[grayscale] : likelihood-ratio : FPR95 < 0.2 ")
    assert (g.dataset, g.detector, g.metric, g.op, g.bound) == (
        "svhn[grayscale]", "likelihood-ratio", "fpr95", "<", 0.2)
    assert parse_gate("noise:auroc_ci_low>1e-1").bound == 0.1
    for bad in ["mnist auroc>=0.9", "mnist:auroc=0.9", "mnist:auroc>=high", "a:b:c:auroc>1",
                ":auroc>1", "mnist:auroc>=", "mnist:auroc>=nan"]:
        with pytest.raises(UserError, match="gate"):
            parse_gate(bad)
    with pytest.raises(UserError, match="unknown metric 'accuracy'; choose from auroc"):
        parse_gate("mnist:accuracy>0.5")


def test_gate_evaluation_and_junit(tmp_path):
    rows = [{"run": "r", "detector": "likelihood", "ood_set": "mnist", "auroc": 0.2, "fpr95": 0.9},
            {"run": "r", "detector": "likelihood", "ood_set": "noise", "auroc": 1.0,
             "fpr95": float("nan")}]
    gates = [parse_gate(e) for e in ["mnist:auroc>=0.9", "noise:auroc>0.99", "MNIST:fpr95<=0.9",
                                     "noise:fpr95<0.5"]]
    results = evaluate_gates(gates, rows)
    assert [r.passed for r in results] == [False, True, True, False]  # NaN fails
    with pytest.raises(UserError, match="no OOD set 'svhn'.*mnist, noise"):
        evaluate_gates([parse_gate("svhn:auroc>0.5")], rows)
    with pytest.raises(UserError, match="unknown detector 'ratio'.*likelihood"):
        evaluate_gates([parse_gate("mnist:ratio:auroc>0.5")], rows)
    root = ET.parse(write_junit(tmp_path / "j.xml", results)).getroot()
    cases = root.findall(".//testcase")
    assert [c.get("name") for c in cases] == [g.expr for g in gates]
    assert [c.find("failure") is not None for c in cases] == [True, False, False, True]
    assert root.get("failures") == "2"


def test_cli_gate_exit_codes(run, tmp_path):
    out = tmp_path / "out"
    ok = invoke([str(run.root), "--out", str(out), "--n-boot", "50", "--format", "json",
                 "--gate", "noise-uniform:auroc>=0.9", "--junit", str(tmp_path / "j.xml")])
    assert ok.exit_code == 0, ok.output
    assert "PASS" in ok.output and (tmp_path / "j.xml").exists()

    fail = invoke([str(run.root), "--out", str(out), "--n-boot", "50", "--format", "html,json",
                   "--gate", "mnist:auroc>=0.9", "--gate", "noise-uniform:auroc>=0.9"])
    assert isinstance(fail.exception, GateFailed) and "1 of 2 gate(s) failed" in str(fail.exception)
    summary = json.loads((out / "summary.json").read_text())  # written despite the failure
    assert summary["gates_passed"] is False
    assert [g["passed"] for g in summary["gates"]] == [False, True]
    assert "FAIL" in (out / "report.html").read_text()

    other = tmp_path / "other"
    bad = invoke([str(run.root), "--out", str(other), "--gate", "mnist:auroc=0.9"])
    assert isinstance(bad.exception, UserError) and not other.exists()
    unknown = invoke([str(run.root), "--out", str(other), "--gate", "svhn:auroc>0.9"])
    assert isinstance(unknown.exception, UserError) and not other.exists()
    missing = invoke([str(tmp_path / "nope")])
    assert isinstance(missing.exception, UserError)


def test_cli_through_app_main_exit_codes(run, tmp_path, capsys):
    app = pytest.importorskip("ood_audit.cli.app")
    base = ["report", str(run.root), "--out", str(tmp_path / "o"), "--n-boot", "20",
            "--format", "json"]
    cases = [("noise-uniform:auroc>0.9", 0), ("mnist:auroc>0.9", 1), ("mnist:auroc~1", 2)]
    for gate, code in cases:
        with pytest.raises(SystemExit) as exc:
            app.main([*base, "--gate", gate])
        assert exc.value.code == code, gate
    assert "bad gate 'mnist:auroc~1'" in capsys.readouterr().err


def test_default_run_is_latest_and_default_out(run, tmp_path, monkeypatch):
    from ood_audit.runs import set_latest

    monkeypatch.chdir(tmp_path)
    set_latest(run.root)
    res = invoke(["--n-boot", "20", "--format", "json"])
    assert res.exit_code == 0, res.output
    assert (run.report / "summary.json").exists() and not (run.report / "report.html").exists()
    assert isinstance(invoke(["--format", "pdf"]).exception, UserError)


# ------------------------------------------------------------------ CI summary

def test_github_step_summary_appended(run, tmp_path, monkeypatch):
    target = tmp_path / "step.md"
    target.write_text("previous step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(target))
    res = invoke([str(run.root), "--out", str(tmp_path / "o"), "--n-boot", "20",
                  "--format", "json", "--gate", "noise-uniform:auroc>0.9"])
    assert res.exit_code == 0, res.output
    text = target.read_text()
    assert text.startswith("previous step\n") and "| noise-uniform:auroc>0.9 |" in text
    assert "data:image" not in text  # text only: images are links in report.md


def test_step_summary_stays_under_the_limit(tmp_path):
    path = tmp_path / "s.md"
    path.write_text("x" * 300 + "\n")
    body = "".join(f"| row {i} | {'y' * 50} |\n" for i in range(200))
    append_step_summary(path, body, limit=2000)
    data = path.read_bytes()
    assert len(data) < 2000
    assert b"truncated" in data and data.startswith(b"x" * 300)


# ------------------------------------------------------------------ bad input

def test_bad_runs_are_user_errors(tmp_path, run):
    no_scores = tmp_path / "empty"
    no_scores.mkdir()
    with pytest.raises(UserError, match="no scores.parquet"):
        build_report([type(run)(no_scores)], tmp_path / "o")
    df, terms = fake_frame(30, ood={})
    rd = write_fake_run(tmp_path / "in-only", n=30)
    write_scores(rd.scores, df, fake_meta(terms))
    with pytest.raises(UserError, match="no OOD set"):
        build_report([rd], tmp_path / "o")
    df, terms = fake_frame(30)
    df.loc[df["dataset"] == "mnist", "log_px"] = np.nan
    write_scores(rd.scores, df, fake_meta(terms))
    with pytest.raises(UserError, match="mnist has no usable likelihood scores"):
        build_report([rd], tmp_path / "o")


def test_over_training_table_when_present(run, tmp_path):
    import pandas as pd

    rows = [dict(epoch=e, dataset=d, role="in" if d == "fashionmnist" else "ood", split="test",
                 term=t, mean=float(e * 10 + i), n=50)
            for e in (1, 2) for d in ("fashionmnist", "mnist")
            for i, t in enumerate(("log_px", "bpd", "log_pz", "logdet"))]
    pd.DataFrame(rows).to_parquet(run.root / "over_training.parquet", index=False)
    res = build_report([run], tmp_path / "out", formats=["html", "md"], n_boot=0)
    section = res.summary["runs"][0]
    assert [r["mean"] for r in section["over_training"]] == [r["mean"] for r in rows]
    md = res.files["md"].read_text()
    assert "### Over training" in md
    # epoch 2, mnist, log|det| (i = 3): 23.0, in the epoch-2 row of the pivoted table
    header = next(ln for ln in md.splitlines() if ln.startswith("| epoch |"))
    cells = [c.strip() for c in header.strip("|").split(" | ")]
    epoch2 = next(ln for ln in md.splitlines() if ln.startswith("| 2 |"))
    values = [c.strip() for c in epoch2.strip("|").split(" | ")]
    assert values[cells.index("mnist log\\|det\\|")] == "23.0"
    assert "Over training" in res.files["html"].read_text()


# ------------------------------------------------------------------ figures and layout

def test_roc_curves_are_one_grid_with_a_panel_per_detector(run3, tmp_path):
    a = analyse_run(run3, "three", n_boot=0)
    assert list(a.roc) == ["likelihood", "typicality", "complexity"]
    fig = draw_roc_grid(a.roc, "t")
    assert len(fig.axes) == 3  # the grid's spare cells are removed
    aurocs = {(r["detector"], r["ood_set"]): r["auroc"] for r in a.section["metrics"]}
    for ax, det in zip(fig.axes, a.roc, strict=True):
        assert ax.get_title() == det
        # shared unit scales
        assert ax.get_xlim() == ax.get_ylim() == fig.axes[0].get_xlim()
        assert ax.get_xlim()[0] <= 0 and ax.get_xlim()[1] >= 1
        # chance diagonal first, then one curve per OOD set
        diagonal = ax.lines[0]
        assert list(diagonal.get_xdata()) == list(diagonal.get_ydata()) == [0, 1]
        assert len(ax.lines) == 1 + len(a.roc[det])
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert legend == [f"{s}  AUROC {aurocs[(det, s)]:.3f}" for s, *_ in a.roc[det]]
    res = build_report([run3], tmp_path / "out", n_boot=0)
    pngs = sorted(p.name for p in (tmp_path / "out" / "figures").glob("*.png"))
    assert [p for p in pngs if "roc" in p] == ["three-roc.png"]
    page = res.files["html"].read_text()
    assert page.count('alt="ROC curves, one panel per detector: likelihood, typicality, '
                      'complexity"') == 1


def _overview_texts(fig) -> dict[tuple[str, str], list[str]]:
    """(panel title, row label) -> the value texts beside that row's dot."""
    out: dict[tuple[str, str], list[str]] = {}
    for ax in fig.axes:
        names = [t.get_text() for t in ax.get_yticklabels()]
        for t in ax.texts:
            if (t.get_gid() or "").startswith("value:"):
                out.setdefault((ax.get_title(), names[int(t.get_position()[1])]), []).append(t)
    return out


def test_overview_shows_every_detector_and_set_with_auroc_and_interval(run3):
    rows = analyse_run(run3, "three", n_boot=N_BOOT, seed=1).section["metrics"]
    fig = draw_auroc_overview(rows, "t")
    sets = list(dict.fromkeys(r["ood_set"] for r in rows))
    assert [ax.get_title() for ax in fig.axes] == [f"OOD set: {s}" for s in sets]
    texts = _overview_texts(fig)
    for ax in fig.axes:
        assert [t.get_text() for t in ax.get_yticklabels()] == [
            "likelihood", "typicality", "complexity"]
        assert any(list(ln.get_xdata()) == [0.5, 0.5] for ln in ax.lines)  # chance marked
    for r in rows:
        want = f"{r['auroc']:.3f} [{r['auroc_ci_low']:.3f}, {r['auroc_ci_high']:.3f}]"
        cell = texts[(f"OOD set: {r['ood_set']}", r["detector"])]
        assert len(cell) == 1 and cell[0].get_text().startswith(want), (r["ood_set"], want)
        assert cell[0].get_text().endswith("(best)") == bool(r["best"])
        assert (cell[0].get_fontweight() == "bold") == bool(r["best"])
    for s in sets:  # each set marks exactly the detector(s) with its top AUROC
        top = max(r["auroc"] for r in rows if r["ood_set"] == s)
        best = [r["detector"] for r in rows if r["ood_set"] == s and r["best"]]
        assert best == [r["detector"] for r in rows if r["ood_set"] == s and r["auroc"] == top]
    colours = {c for _, c in OVERVIEW_CLASSES.values()}
    dots = [ln for ax in fig.axes for ln in ax.lines if ln.get_marker() == "o"]
    assert len(dots) == len(rows) and {d.get_color() for d in dots} <= colours


def test_overview_names_runs_when_there_are_several(run, run_cv, tmp_path):
    res = build_report([run, run_cv], tmp_path / "out", formats=["json"], n_boot=0)
    fig = draw_auroc_overview(res.rows, "t")
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["glow: likelihood", "glow-cv: likelihood"]
    # n_boot=0 leaves no interval: the value alone, no "nan"
    texts = _overview_texts(fig)
    assert len(texts) == len(res.rows)
    assert all("nan" not in t.get_text() and "[" not in t.get_text()
               for ts in texts.values() for t in ts)


class _Tables(HTMLParser):
    """Each <table>: its class, whether a scrolling <div> holds it, headers, cells."""

    def __init__(self):
        super().__init__()
        self.tables, self.divs, self.cell = [], [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div":
            self.divs.append(a.get("class", ""))
        elif tag == "table":
            self.tables.append({"class": a.get("class", ""), "in_scroll": self.divs[-1:] == ["scroll"],
                                "headers": [], "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append([])
        elif tag in ("td", "th"):
            self.cell = {"tag": tag, "text": "", "ci": ""}
        elif tag == "span" and a.get("class") == "ci" and self.cell is not None:
            self.cell["in_ci"] = True

    def handle_endtag(self, tag):
        if tag == "div":
            self.divs.pop()
        elif tag in ("td", "th") and self.cell is not None:
            t = self.tables[-1]
            if self.cell["tag"] == "th":
                t["headers"].append(self.cell["text"])
            else:
                t["rows"][-1].append((self.cell["text"], self.cell["ci"]))
            self.cell = None
        elif tag == "span" and self.cell is not None:
            self.cell.pop("in_ci", None)

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["ci" if self.cell.get("in_ci") else "text"] += data


def test_html_metrics_fit_the_page_one_scrolling_table_per_ood_set(run3, tmp_path):
    res = build_report([run3], tmp_path / "out", n_boot=N_BOOT)
    page = res.files["html"].read_text()
    css = page[page.index("<style>"):page.index("</style>")]
    assert "overflow-x:auto" in css and "position:sticky" in css
    parsed = _Tables()
    parsed.feed(page)
    assert all(t["in_scroll"] for t in parsed.tables)  # every table scrolls in its own box
    metrics = [t for t in parsed.tables if t["class"] == "metrics"]
    sets = list(dict.fromkeys(r["ood_set"] for r in res.rows))
    assert len(metrics) == len(sets) == 2  # one run: the top tables only
    for label, table in zip(sets, metrics, strict=True):
        assert "OOD set" not in table["headers"] and "n in / OOD" not in table["headers"]
        auroc = table["headers"].index("AUROC")
        body = [r for r in table["rows"] if r]
        rows = [r for r in res.rows if r["ood_set"] == label]
        assert [c[0][0].removesuffix(" (best)") for c in body] == [r["detector"] for r in rows]
        for cells, r in zip(body, rows, strict=True):
            # the estimate, with its interval set apart beneath it
            assert cells[auroc] == (f"{r['auroc']:.3f}",
                                    f"{r['auroc_ci_low']:.3f}–{r['auroc_ci_high']:.3f}")
        assert f"<h4>OOD set: {label}</h4>" in page
        assert f"n = {rows[0]['n_in']:,} in-distribution, {rows[0]['n_ood']:,} OOD" in page


def test_markdown_metrics_split_by_ood_set(run3, tmp_path):
    res = build_report([run3], tmp_path / "out", formats=["md"], n_boot=N_BOOT)
    md = res.files["md"].read_text()
    assert "![AUROC with 95% interval per detector and OOD set](figures/overview.png)" in md
    for label in ("mnist", "noise-uniform"):
        section = md.split(f"### OOD set: {label}\n", 1)[1].split("\n#", 1)[0]
        lines = [ln for ln in section.splitlines() if ln.startswith("| ")]
        assert lines[0].startswith("| detector | AUROC |")
        rows = [r for r in res.rows if r["ood_set"] == label]
        assert len(lines) == 1 + len(rows)  # header + a row per detector
        for line, r in zip(lines[1:], rows, strict=True):
            assert f"| {r['auroc']:.3f} [{r['auroc_ci_low']:.3f}, {r['auroc_ci_high']:.3f}] |" in line


def test_several_runs_keep_per_run_metrics_and_a_run_column(run, run_cv, tmp_path):
    res = build_report([run, run_cv], tmp_path / "out", formats=["html"], n_boot=0)
    parsed = _Tables()
    parsed.feed(res.files["html"].read_text())
    metrics = [t for t in parsed.tables if t["class"] == "metrics"]
    # the top tables (with a run column), then each run's own, per OOD set
    assert [t["headers"][0] for t in metrics] == ["run", "run", "detector", "detector",
                                                  "detector", "detector"]


def test_published_auroc_beside_ours_for_the_same_pairing(run, tmp_path, monkeypatch):
    """A detector's published AUROC appears in the metric row of the same pairing (here
    fashionmnist -> mnist) with its citation, and nowhere else."""
    import dataclasses

    from ood_audit.analysis import detectors
    from ood_audit.analysis.detectors import Published

    paper = Published("fashionmnist", "mnist", 0.123, "glow", "Someone et al. 2099, table 9")
    other = Published("cifar10", "svhn", 0.456, "glow", "Someone et al. 2099, table 9")
    monkeypatch.setitem(detectors.DETECTORS, "likelihood", dataclasses.replace(
        detectors.DETECTORS["likelihood"], published=(paper, other)))
    res = build_report([run], tmp_path / "rep", formats=["md", "json"], n_boot=0)
    by_set = {r["ood_set"]: r["published"] for r in res.rows if r["detector"] == "likelihood"}
    assert by_set["mnist"] == [dataclasses.asdict(paper)]
    assert by_set["noise-uniform"] == []
    md = res.files["md"].read_text()
    mnist = md[md.index("### OOD set: mnist"):md.index("### OOD set: noise-uniform")]
    assert "published AUROC" in mnist and "0.12 (Someone et al. 2099, table 9; glow)" in mnist
    noise = md[md.index("### OOD set: noise-uniform"):]
    noise = noise[:noise.index("\n## ")]
    assert "AUROC" in noise and "published AUROC" not in noise
    assert "0.46" not in mnist
