"""Property-based CLI test (issue #8): random option values and malformed files.

Hypothesis throws option values (zero, negative and huge integers, NaN/inf floats, random
strings) and paths to malformed files (truncated Parquet and safetensors, random bytes
as .npy/.safetensors/.yaml/.png, arrays of the wrong dtype or rank, NaN in float
arrays, empty sets, mixed image sizes...) at each subcommand, in-process through the
console-script entry ``main``. Whatever it draws, the exit code is 0, 1 or 2, nothing but
SystemExit leaves ``main``, no traceback reaches the user, and an exit 2 says what is
wrong in one ``error:`` line.

The examples are derandomized (the same ones every run, so CI is stable); 115 in all,
20 s on an idle 2-core machine, up to about 100 s on a busy one. ``OOD_AUDIT_PROPERTY_LOG=FILE`` writes every
argv, exit code and first error line as JSON lines, to count what was tried.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from ood_audit.cli.app import main

# No shrinking: a failure prints its argv already, and shrinking costs minutes.
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))

# ----------------------------------------------------------------------------- files


def _write_png(path: Path, size: tuple[int, int], value: int = 100, mode: str = "L") -> None:
    from PIL import Image

    Image.new(mode, size, value if mode == "L" else (value,) * 3).save(path)


def make_workspace(root: Path, tiny_data: Path, tiny_run: Path) -> dict[str, list[str]]:
    """Good and malformed inputs of every kind, by role: data, config, run, scores..."""
    rng = np.random.default_rng(0)
    junk = rng.integers(0, 256, 4096, dtype=np.uint8).tobytes()
    d = root / "files"
    d.mkdir()
    good = np.load(tiny_data)
    data = {
        "good.npy": good,
        "rgb.npy": np.repeat(good[..., None], 3, axis=-1),
        "big.npy": np.kron(good[:40], np.ones((2, 2), np.uint8)),  # 16x16: resized
        "float.npy": good.astype(np.float32) / 255,
        "nan.npy": np.where(good > 100, np.nan, 1.0),
        "inf.npy": np.full((4, 8, 8), np.inf),
        "rank2.npy": good[0],
        "rank5.npy": good[:4, None, :, :, None],
        "chw.npy": good[:4, None],
        "empty.npy": good[:0],
        "zero_width.npy": np.zeros((4, 8, 0), np.uint8),
        "int16.npy": good.astype(np.int16) * 3 - 100,
        "bool.npy": good > 100,
        "complex.npy": good.astype(np.complex64),
        "str.npy": np.array([["a"] * 8] * 8),
    }
    for name, arr in data.items():
        np.save(d / name, arr)
    np.savez(d / "multi.npz", a=good, b=good)
    np.savez(d / "labels_bad.npz", images=good, labels=np.zeros(3))
    np.savez(d / "empty.npz")
    (d / "random.npy").write_bytes(junk)
    (d / "random.npz").write_bytes(junk)
    raw = (d / "good.npy").read_bytes()
    (d / "truncated.npy").write_bytes(raw[: len(raw) // 2])
    (d / "notes.txt").write_text("not data\n")
    folders = {
        "pngs": [("a.png", (8, 8)), ("b.png", (8, 8)), ("c.png", (8, 8))],
        "pngs_rgb": [("a.png", (8, 8), "RGB"), ("b.png", (8, 8), "L")],
        "pngs_mixed": [("a.png", (8, 8)), ("b.png", (9, 8))],
        "pngs_empty": [],
    }
    for folder, items in folders.items():
        (d / folder).mkdir()
        for name, size, *mode in items:
            _write_png(d / folder / name, size, mode=mode[0] if mode else "L")
    (d / "pngs_broken").mkdir()
    _write_png(d / "pngs_broken" / "a.png", (8, 8))
    (d / "pngs_broken" / "b.png").write_bytes(junk[:300])
    (d / "pngs_truncated").mkdir()
    _write_png(d / "pngs_truncated" / "a.png", (8, 8))
    full = (d / "pngs_truncated" / "a.png").read_bytes()
    (d / "pngs_truncated" / "b.png").write_bytes(full[: len(full) // 2])
    (d / "pngs_16bit").mkdir()
    from PIL import Image

    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(d / "pngs_16bit" / "a.png")
    (d / "random.png").write_bytes(junk[:500])

    yamls = {
        "ok.yaml": f"model: glow\npreset: tiny\ndata: {d / 'good.npy'}\n"
                   "train: {epochs: 1, limit: 16, batch_size: 8, device: cpu}\n",
        "unknown_key.yaml": "model: glow\ntrain: {epohcs: 2}\n",
        "wrong_type.yaml": "model: glow\ntrain: {epochs: two}\n",
        "float_epochs.yaml": "train: {epochs: 1.5}\n",
        "negative.yaml": "train: {batch_size: -4}\n",
        "zero.yaml": "train: {limit: 0}\n",
        "list.yaml": "- 1\n- 2\n",
        "scalar.yaml": "glow\n",
        "syntax.yaml": "model: [glow\n",
        "train_list.yaml": "train: [1, 2]\n",
        "model_config_bad.yaml": f"preset: tiny\ndata: {d / 'good.npy'}\n"
                                 "model_config: {levels: many}\n",
        "model_config_unknown.yaml": "preset: tiny\nmodel_config: {colour: red}\n",
        "model_config_negative.yaml": f"preset: tiny\ndata: {d / 'good.npy'}\n"
                                      "model_config: {hidden: -3}\n",
        "empty.yaml": "",
        "nan.yaml": "train: {lr: .nan}\n",
    }
    for name, text in yamls.items():
        (d / name).write_text(text)
    (d / "random.yaml").write_bytes(junk[:700])
    (d / "binary.yaml").write_bytes(b"\xff\xfe\x00model: glow")

    runs = root / "runs_fixture"
    runs.mkdir()

    def run_copy(name: str) -> Path:
        dst = runs / name
        shutil.copytree(tiny_run, dst)
        return dst

    run_copy("good")
    (run_copy("random_model") / "model.safetensors").write_bytes(junk)
    model = (runs / "good" / "model.safetensors").read_bytes()
    trunc = run_copy("truncated_model") / "model.safetensors"
    trunc.unlink()  # a hard link to the epoch checkpoint: replace, never write through
    trunc.write_bytes(model[: len(model) // 2])
    header = run_copy("header_only") / "model.safetensors"
    header.unlink()
    (n,) = struct.unpack("<Q", model[:8])
    header.write_bytes(model[: 8 + n])
    foreign = run_copy("foreign_model") / "model.safetensors"
    foreign.unlink()
    import torch
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(3)}, str(foreign), metadata={"format": "something-else"})
    other = run_copy("other_model_weights") / "model.safetensors"
    other.unlink()
    save_file({"w": torch.zeros(3)}, str(other),
              metadata={k: v for k, v in _metadata(model).items()})
    newer = run_copy("unknown_model_name") / "model.safetensors"
    newer.unlink()
    save_file({"w": torch.zeros(3)}, str(newer), metadata={**_metadata(model), "model": "flow9"})
    (run_copy("random_state") / "train_state.pt").write_bytes(junk)
    state = (runs / "good" / "train_state.pt").read_bytes()
    (run_copy("truncated_state") / "train_state.pt").write_bytes(state[: len(state) // 2])
    (run_copy("random_config") / "config.yaml").write_bytes(junk[:300])
    (run_copy("unknown_key_config") / "config.yaml").write_text("model: glow\nbogus: 1\n")
    (runs / "empty_dir").mkdir()
    return {
        "data_files": sorted(str(p) for p in d.iterdir()
                             if p.suffix in (".npy", ".npz", ".png", ".txt") or p.is_dir()),
        "yamls": sorted(str(d / n) for n in [*yamls, "random.yaml", "binary.yaml"]),
        "bad_runs": sorted(str(p) for p in runs.iterdir() if p.name != "good"),
        "good_run": [str(runs / "good")],
        "good_data": [str(d / "good.npy")],
    }


def _metadata(safetensors_bytes: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", safetensors_bytes[:8])
    return json.loads(safetensors_bytes[8:8 + n])["__metadata__"]


def break_scores(scored: Path, dst_root: Path) -> list[str]:
    """Copies of a scored run with scores.parquet truncated, foreign, missing columns..."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = []
    raw = (scored / "scores" / "part-0.parquet").read_bytes()
    table = pq.read_table(scored / "scores" / "part-0.parquet")

    def copy(name: str) -> Path:
        dst = dst_root / name
        shutil.copytree(scored, dst)
        out.append(str(dst))
        return dst / "scores" / "part-0.parquet"

    copy("scores_truncated").write_bytes(raw[: len(raw) // 2])
    copy("scores_random").write_bytes(bytes(range(256)) * 8)
    copy("scores_empty_file").write_bytes(b"")
    pd.DataFrame({"a": [1, 2]}).to_parquet(copy("scores_foreign"))
    pq.write_table(table.drop(["log_px", "bpd"]), copy("scores_missing_columns"))
    pq.write_table(table.slice(0, 0), copy("scores_no_rows"))
    meta = dict(table.schema.metadata)
    meta[b"ood_audit.schema_version"] = b"99"
    pq.write_table(table.replace_schema_metadata(meta), copy("scores_other_version"))
    meta = dict(table.schema.metadata)
    meta[b"ood_audit.terms"] = b"{not json"
    pq.write_table(table.replace_schema_metadata(meta), copy("scores_bad_metadata"))
    ood_only = table.filter(pa.compute.equal(table["role"], "ood"))
    pq.write_table(ood_only, copy("scores_no_in_rows"))
    p = copy("scores_as_folder")
    p.unlink()
    p.mkdir()
    (copy("scores_missing")).unlink()
    return out


# ----------------------------------------------------------------------------- harness

LOG: list[dict] = []


def invoke(argv: list[str], tried: list[str] | None = None) -> tuple[int, str, str]:
    """``main(argv)`` in-process: (exit code, stdout, stderr); any other exception fails."""
    out, err = io.StringIO(), io.StringIO()
    code: object = None
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(argv)
        except SystemExit as exc:
            code = exc.code
    text_out, text_err = out.getvalue(), err.getvalue()
    lines = [ln for ln in text_err.splitlines() if ln.strip()]
    first = next((ln for ln in lines if ln.startswith(("error:", "gate failed:"))), "")
    LOG.append({"command": argv[0], "tried": tried or [], "argv": argv, "code": code,
                "error": first, "seconds": round(time.perf_counter() - t0, 2)})
    return code, text_out, text_err  # type: ignore[return-value]


def check(argv: list[str], tried: list[str]) -> int:
    code, out, err = invoke(argv, tried)
    shown = f"argv={argv}\nexit={code}\nstderr:\n{err[-3000:]}"
    assert code in (0, 1, 2), shown
    assert "Traceback" not in err and "Traceback" not in out, shown
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    if code == 2:
        assert len(errors) == 1, shown  # exactly one line says what is wrong
        assert len(errors[0]) > len("error: ") + 5, shown
    else:
        assert not errors, shown
    return code


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_data, tiny_run):
    """The workspace: cwd for the module (runs/latest lands there), an empty data root."""
    root = tmp_path_factory.mktemp("props")
    files = make_workspace(root, tiny_data, tiny_run)
    (root / "no_data").mkdir()
    old_cwd, old_env = os.getcwd(), os.environ.get("OOD_AUDIT_DATA")
    os.chdir(root)
    os.environ["OOD_AUDIT_DATA"] = str(root / "no_data")  # named sets: missing, never fetched
    try:
        scored = root / "runs_fixture" / "scored"
        shutil.copytree(files["good_run"][0], scored)
        code, _, err = invoke(["score", "--run", str(scored), "--ood", "noise-uniform",
                               "--ood", str(root / "files" / "rgb.npy"), "--limit", "24",
                               "--train-limit", "24"])
        assert code == 0, err
        LOG.clear()
        files["scored_run"] = [str(scored)]
        files["bad_scores"] = break_scores(scored, root / "runs_fixture")
        files["counter"] = itertools.count()  # type: ignore[assignment]
        files["root"] = root  # type: ignore[assignment]
        yield files
    finally:
        os.chdir(old_cwd)
        if old_env is None:
            os.environ.pop("OOD_AUDIT_DATA", None)
        else:
            os.environ["OOD_AUDIT_DATA"] = old_env
        log = os.environ.get("OOD_AUDIT_PROPERTY_LOG")
        if log:
            with open(log, "a") as fh:
                for row in LOG:
                    fh.write(json.dumps(row, default=str) + "\n")


# ----------------------------------------------------------------------------- strategies
#
# Each example starts from an argv that succeeds quickly (tiny model, 16 images, one
# epoch) and applies 0-2 mutations: an option replaced by a bad value, a malformed file,
# a flag added, a stray argument. So most examples reach deep code, not only the parser.

INTS = st.one_of(
    st.sampled_from(["-1", "0", "1", "2", "3", "7", "-7", str(10**12), str(-10**12),
                     str(2**63), str(2**64 + 1), "1.5", "abc", "", "0x10", "1e3"]),
    st.integers(-5, 40).map(str),
)
SMALL_INTS = st.sampled_from(["-1", "0", "1", "2", "abc", "", "2.5", str(-10**12)])
FLOATS = st.sampled_from(["nan", "inf", "-inf", "-1", "0", "1e-3", "3e-3", "0.5", "1e308",
                          "-1e-9", "abc", "", "1e-320", "0.99", "1", "1e10"])
TEXT = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=10)
DEVICES = st.sampled_from(["cpu", "auto", "cuda", "cuda:3", "meta", "mps", "xla", "cpu:0",
                           "gpu", "", "cpu:-1", "cuda:x"])
JUNK = st.sampled_from([["--bogus"], ["stray"], ["--bogus", "1"], ["-x"]]) | TEXT.map(
    lambda t: [t])


def one_of_paths(ws, *keys: str, extra: tuple[str, ...] = ()) -> st.SearchStrategy[str]:
    return st.sampled_from([*(p for k in keys for p in ws[k]), *extra]) | TEXT


def short(value) -> str:
    """How a value shows in the log: a path by its name, long text cut."""
    if isinstance(value, list):
        return ",".join(map(short, value))
    p = Path(value)
    if value.startswith("/") and len(p.parts) > 2:
        return p.name
    return value[:20]


def mutate(data, base: dict, mutations: dict, weights: dict | None = None,
           max_mutations: int = 2):
    """Apply 0-``max_mutations`` named mutations to ``base`` ({flag: value | [values] |
    True}), drawn with ``weights`` (default 1); returns (argv, labels of what was tried)."""
    opts = {k: (list(v) if isinstance(v, list) else v) for k, v in base.items()}
    pool = [name for name in sorted(mutations) for _ in range((weights or {}).get(name, 1))]
    names = data.draw(st.lists(st.sampled_from(pool), max_size=max_mutations, unique=True),
                      label="mutations")
    tried, extra = [], []
    for name in names:
        value = data.draw(mutations[name], label=name)
        if isinstance(value, dict):  # several options at once; None drops one
            for key, v in value.items():
                if v is None:
                    opts.pop(key, None)
                else:
                    opts[key] = v
            tried.append(name + " " + " ".join(f"{k}={short(v)}" for k, v in value.items()
                                               if v not in (None, True)))
        elif name == "junk":
            extra += value
            tried.append("stray argument " + " ".join(map(short, value)))
        elif name.startswith("+"):  # a repeatable option: add one more
            opts.setdefault(name[1:], []).append(value)
            tried.append(f"{name[1:]} +{short(value)}")
        elif name.startswith("-no"):  # drop an option of the base
            opts.pop(name[3:], None)
            tried.append(f"without {name[3:]}")
        elif value is True:
            opts[name] = True
            tried.append(name)
        else:
            opts[name] = value
            tried.append(f"{name}={short(value)}")
    argv = []
    for key, value in opts.items():
        if key.startswith("_"):  # positional
            argv += value
        elif value is True:
            argv.append(key)
        elif isinstance(value, list):
            for v in value:
                argv += [key, v]
        else:
            argv += [key, value]
    return argv + extra, tried


# ----------------------------------------------------------------------------- tests


@settings(max_examples=35, **SETTINGS)
@given(data=st.data())
def test_train_never_leaks_a_traceback(ws, data):
    from ood_audit.models.registry import MODELS

    fresh = str(ws["root"] / "out" / f"t{next(ws['counter'])}")
    base = {"--data": ws["good_data"][0], "--preset": "tiny", "--epochs": "1",
            "--limit": "16", "--batch-size": "8", "--device": "cpu", "--out": fresh}
    argv, tried = mutate(data, base, {
        "--model": st.sampled_from([*MODELS, "nope"]) | TEXT,
        "--data": one_of_paths(ws, "data_files",
                               extra=("mnist", "noise-uniform", "fashionmnist", "")),
        "--preset": st.sampled_from(["huge", "", "Tiny"]) | TEXT,  # small/paper: too slow here
        "--config": one_of_paths(ws, "yamls"),
        "-no--data": st.just(None),
        "--epochs": st.sampled_from(["0", "-1", "x", "2", "1.0"]),
        "--batch-size": INTS,
        "--lr": FLOATS,
        "--seed": INTS,
        "--limit": INTS,
        "--keep-checkpoints": st.sampled_from(["all", "last", "every:2", "every:0",
                                               "every:x", "every:-1", "some"]) | TEXT,
        "--weight-decay": FLOATS,
        "--device": DEVICES,
        "--out": one_of_paths(ws, "bad_runs", "good_run", extra=(ws["good_data"][0],)),
        "--resume": st.just(True),
        "resume": one_of_paths(ws, "bad_runs", "good_run").map(
            lambda run: {"--resume": True, "--out": run, "--data": None, "--preset": None}),
        "--background": st.just(True),
        "background": st.fixed_dictionaries({
            "--background": st.just(True), "--run": one_of_paths(ws, "bad_runs", "good_run"),
            "--data": st.none(), "--preset": st.none(), "--out": st.none(),
            "--mu": st.sampled_from(["0.1", "0", "1", "nan", "-0.5", "0.999"])}),
        "--mu": FLOATS,
        "--run": one_of_paths(ws, "bad_runs", "good_run"),
        "--data-root": one_of_paths(ws, "data_files"),
        "junk": JUNK,
    }, weights={"--data": 6, "--config": 4, "resume": 3, "--out": 2, "background": 2})
    check(["train", *argv], tried)


@settings(max_examples=30, **SETTINGS)
@given(data=st.data())
def test_score_never_leaks_a_traceback(ws, data):
    from ood_audit.analysis.detectors import DETECTORS

    run = ws["root"] / "runs_fixture" / "score_target"
    if not run.exists():
        shutil.copytree(ws["good_run"][0], run)
    base = {"--run": str(run), "--ood": ["noise-uniform"], "--limit": "16",
            "--train-limit": "16", "--device": "cpu"}
    argv, tried = mutate(data, base, {
        "--run": one_of_paths(ws, "bad_runs", "good_run", extra=(ws["good_data"][0],)),
        "+--ood": one_of_paths(ws, "data_files", extra=(
            "noise-uniform", "constant", "noise-gaussian", "mnist", "")),
        "--ood": one_of_paths(ws, "data_files").map(lambda p: [p]),
        "-no--ood": st.just(None),
        # no huge --limit here: 10,000 noise images with PNG/JPEG 2000 features take 20 s
        "--limit": SMALL_INTS | st.integers(1, 40).map(str),
        "--train-limit": INTS,
        "--batch-size": INTS.filter(lambda v: v != "1"),
        "--seed": INTS,
        "--iw-samples": INTS,
        "+--detector": st.sampled_from(list(DETECTORS)) | TEXT,
        "+--member": one_of_paths(ws, "bad_runs", "good_run"),
        "--held-out": st.just(True),
        "--device": DEVICES,
        "--data-root": one_of_paths(ws, "data_files"),
        "junk": JUNK,
    }, weights={"+--ood": 4, "--ood": 3, "--run": 3})
    check(["score", *argv], tried)


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_decompose_never_leaks_a_traceback(ws, data):
    base = {"--run": ws["scored_run"][0], "--device": "cpu"}
    argv, tried = mutate(data, base, {
        "--run": one_of_paths(ws, "bad_scores", "bad_runs"),
        "--csv": st.just(True),
        "--over-training": st.just(True),
        "--over-training-limit": SMALL_INTS | st.just("8"),
        "--device": DEVICES,
        "junk": JUNK,
    }, weights={"--run": 4})
    check(["decompose", *argv], tried)


GATES = st.sampled_from([
    "noise-uniform:auroc>=0.5", "noise-uniform:auroc>=1.01", "noise-uniform:likelihood:fpr95<0.2",
    "mnist:auroc>=0.9", "noise-uniform:nope:auroc>=0.5", "noise-uniform:auroc=>0.5",
    "noise-uniform:auroc>=nan", "noise-uniform:auroc_ci_low>=0", ":auroc>=0.5", "auroc", "",
    "noise-uniform:complexity:aupr>0", "noise-uniform:auroc>=inf", "noise-uniform:auroc>=1e999",
]) | TEXT


@settings(max_examples=25, **SETTINGS)
@given(data=st.data())
def test_report_never_leaks_a_traceback(ws, data):
    fresh = str(ws["root"] / "reports" / f"r{next(ws['counter'])}")
    base = {"_runs": [ws["scored_run"][0]], "--out": fresh, "--n-boot": "0",
            "--format": "json"}  # md and html draw plots (seconds each): mutations add them
    argv, tried = mutate(data, base, {
        "_runs": st.lists(one_of_paths(ws, "bad_scores", "bad_runs", "scored_run"),
                          min_size=1, max_size=2),
        "--out": one_of_paths(ws, "data_files", extra=(ws["good_data"][0],)),
        "--format": st.sampled_from(["json", "md", "html", "html,md,json", "pdf", ",", ""]) | TEXT,
        "+--gate": GATES,
        "--junit": st.sampled_from([fresh + ".xml", str(ws["root"]), "/nonexistent/j.xml"]),
        "--n-boot": SMALL_INTS | st.just("20"),
        "--seed": INTS,
        "junk": JUNK,
    }, weights={"_runs": 4, "+--gate": 2})
    check(["report", *argv], tried)
