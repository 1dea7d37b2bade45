"""Transforms (``score --transform``): shape and dtype kept, contrast=1 is the identity,
the documented arithmetic, tags, the scored Parquet rows, the CLI and the report's
contrast sweep."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from ood_audit.data import TRANSFORMS, ImageSet, parse_transform, parse_transforms
from ood_audit.data.transforms import contrast_factor
from ood_audit.errors import UserError


def _set(images: torch.Tensor) -> ImageSet:
    return ImageSet("t", "test", images, torch.arange(len(images), dtype=torch.int64),
                    adaptation="gray->RGB (replicate channel)")


def _random(c: int, n: int = 5, size: int = 6, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, size, size), dtype=torch.uint8, generator=g)


ALL_TAGS = ["grayscale", "contrast=0", "contrast=0.5", "contrast=1", "contrast=2.5", "invert"]


def test_registry_entries():
    assert list(TRANSFORMS) == ["grayscale", "contrast", "invert"]
    for name, spec in TRANSFORMS.items():
        assert spec.name == name and spec.summary and "\n" not in spec.summary
    assert TRANSFORMS["contrast"].usage == "contrast=ALPHA"


@pytest.mark.parametrize("tag", ALL_TAGS)
@pytest.mark.parametrize("channels", [1, 3])
def test_shape_dtype_and_tags_kept(tag, channels):
    s = _set(_random(channels))
    out = parse_transform(tag)(s)
    assert out.images.shape == s.images.shape and out.images.dtype == torch.uint8
    assert out.images.is_contiguous() and out is not s
    assert (out.name, out.split, out.adaptation) == (s.name, s.split, s.adaptation)
    assert torch.equal(out.labels, s.labels)
    assert s.images.shape == (5, channels, 6, 6)  # the input is not modified in place


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_one_is_the_identity(channels):
    images = _random(channels, n=64, size=8, seed=1)
    images[0] = 0
    images[1] = 255
    assert torch.equal(parse_transform("contrast=1")(_set(images)).images, images)
    assert torch.equal(parse_transform("contrast=1.0")(_set(images)).images, images)


def test_contrast_arithmetic_per_image_mean():
    x = torch.tensor([0, 100, 200, 100], dtype=torch.uint8).view(1, 1, 2, 2)  # mean 100
    out = parse_transform("contrast=0.5")(_set(x)).images
    assert out.flatten().tolist() == [50, 100, 150, 100]
    # the mean is one number per image, over all channels: RGB mean here is 100
    rgb = torch.tensor([40, 100, 160], dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    flat = parse_transform("contrast=0")(_set(rgb.contiguous())).images
    assert flat.unique().tolist() == [100]
    # each image its own mean
    two = torch.stack([torch.full((1, 2, 2), 10), torch.full((1, 2, 2), 240)]).to(torch.uint8)
    assert torch.equal(parse_transform("contrast=0.3")(_set(two)).images, two)


def test_contrast_clips_and_rounds():
    x = torch.tensor([0, 50, 200, 250], dtype=torch.uint8).view(1, 1, 2, 2)  # mean 125
    out = parse_transform("contrast=3")(_set(x)).images.flatten().tolist()
    assert out == [0, 0, 255, 255]
    y = torch.tensor([0, 1, 2, 1], dtype=torch.uint8).view(1, 1, 2, 2)  # mean 1
    # 1 + 0.5 * (0 - 1) = 0.5 -> 0 (half to even); 1.5 -> 2
    assert parse_transform("contrast=0.5")(_set(y)).images.flatten().tolist() == [0, 1, 2, 1]


def test_contrast_scales_within_image_variance():
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(200, 1, 16, 16, generator=g) * 20 + 128).round().clamp(0, 255)
    s = _set(x.to(torch.uint8))
    out = parse_transform("contrast=0.5")(s).images.double()
    ratio = out.var(dim=(1, 2, 3)).mean() / s.images.double().var(dim=(1, 2, 3)).mean()
    assert ratio.item() == pytest.approx(0.25, abs=0.01)


def test_grayscale():
    gray = _random(1)
    assert torch.equal(parse_transform("grayscale")(_set(gray)).images, gray)
    rgb = torch.tensor([200, 100, 50], dtype=torch.uint8).view(1, 3, 1, 1).repeat(2, 1, 3, 3)
    out = parse_transform("grayscale")(_set(rgb)).images
    # 0.299*200 + 0.587*100 + 0.114*50 = 124.2 -> 124, in every channel
    assert out.unique().tolist() == [124] and out.shape == rgb.shape
    with pytest.raises(UserError, match="1- or 3-channel"):
        parse_transform("grayscale")(_set(_random(2)))


def test_invert():
    x = _random(3)
    inv = parse_transform("invert")(_set(x))
    assert torch.equal(inv.images, 255 - x)
    assert torch.equal(parse_transform("invert")(inv).images, x)


def test_many_images_in_chunks():
    x = _random(1, n=2100, size=4)  # more than one 1024-image chunk
    out = parse_transform("contrast=0.5")(_set(x)).images
    expected = torch.cat([parse_transform("contrast=0.5")(_set(x[i:i + 7])).images
                          for i in range(0, 2100, 7)])
    assert torch.equal(out, expected)


@pytest.mark.parametrize("text,tag", [
    ("grayscale", "grayscale"), (" Grayscale ", "grayscale"), ("invert", "invert"),
    ("contrast=0.5", "contrast=0.5"), ("contrast=.50", "contrast=0.5"),
    ("contrast=2.0", "contrast=2"), ("contrast=1e-3", "contrast=0.001"), ("contrast=0", "contrast=0"),
])
def test_canonical_tags(text, tag):
    t = parse_transform(text)
    assert t.tag == tag
    assert parse_transform(t.tag).tag == tag  # tags read back as themselves


@pytest.mark.parametrize("text,match", [
    ("blur", "unknown transform 'blur'.*grayscale, contrast=ALPHA, invert"),
    ("contrast", "needs an argument"), ("contrast=", "needs an argument"),
    ("contrast=-1", ">= 0"), ("contrast=abc", ">= 0"), ("contrast=nan", ">= 0"),
    ("contrast=inf", ">= 0"), ("invert=2", "takes no argument"),
])
def test_bad_transform_is_one_line_user_error(text, match):
    with pytest.raises(UserError, match=match) as err:
        parse_transform(text)
    assert "\n" not in str(err.value)


def test_duplicate_tags_refused():
    with pytest.raises(UserError, match="given twice"):
        parse_transforms(["contrast=0.5", "contrast=0.50"])
    assert [t.tag for t in parse_transforms(["invert", "contrast=2"])] == ["invert", "contrast=2"]


def test_contrast_factor_of_tags():
    assert contrast_factor("none") == 1.0
    assert contrast_factor("contrast=0.25") == 0.25
    assert contrast_factor("grayscale") is None and contrast_factor("invert") is None


# --- scoring and report on the tiny run --------------------------------------------------

TAGS = ["contrast=0.5", "grayscale", "contrast=2"]


def untrained_run(root, data) -> object:
    """A run directory holding an untrained Glow ``tiny`` checkpoint for ``data`` (8x8
    gray, ActNorm initialised on it): scoring and tagging need a model with finite
    scores, not a good one, and training costs time."""
    import yaml

    from ood_audit.checkpoint import save_checkpoint
    from ood_audit.models.registry import build_model, config_dict, resolve_model_config
    from ood_audit.runs import RunDir

    rd = RunDir(root)
    rd.root.mkdir(parents=True)
    config, _ = resolve_model_config("glow", "tiny", {}, (1, 8, 8))
    torch.manual_seed(0)
    model = build_model("glow", config, (1, 8, 8))
    from ood_audit.data import dequantize, load_dataset

    images = load_dataset(str(data), limit=64).images
    model.data_init(dequantize(images, torch.Generator().manual_seed(0)))
    run_config = {"model": "glow", "preset": "tiny", "data": str(data),
                  "model_config": config_dict(config), "train": {"epochs": 0}}
    rd.config.write_text(yaml.safe_dump(run_config))
    save_checkpoint(rd.model, model, model_name="glow", model_config=config,
                    run_config=run_config, dataset=str(data), epoch=0)
    return rd


@pytest.fixture(scope="module")
def transformed_run(tiny_data, tiny_ood, tmp_path_factory):
    from ood_audit.commands.score import score_run

    rd = untrained_run(tmp_path_factory.mktemp("transformed") / "run", tiny_data)
    messages = []
    summaries = score_run(rd, [str(tiny_ood)], limit=24, train_limit=16, batch_size=24,
                          device="cpu", notify=messages.append, transforms=TAGS,
                          detectors=["likelihood"])
    return rd, summaries, messages


def test_scored_rows_are_tagged(transformed_run, tiny_ood):
    from ood_audit.scoring.parquet import read_scores

    rd, summaries, messages = transformed_run
    df, meta = read_scores(rd.scores)
    counts = df.groupby(["dataset", "role", "split", "transform"]).size()
    in_name = meta.in_dataset
    for tag in ["none", *TAGS]:
        assert counts[(in_name, "in", "test", tag)] == 24
        assert counts[(str(tiny_ood), "ood", "test", tag)] == 24
    assert counts[(in_name, "in", "train", "none")] == 16
    assert len(counts) == 1 + 2 * (1 + len(TAGS))  # train rows are never transformed
    described = json.loads(meta.extra["transforms"])
    assert list(described) == TAGS and "per-image mean" in described["contrast=0.5"]
    assert [(s.dataset, s.transform) for s in summaries][:3] == [
        (in_name, "none"), (in_name, "none"), (str(tiny_ood), "none")]
    assert any("contrast=0.5, grayscale, contrast=2" in m for m in messages)
    # gray input: grayscale scores the same pixels, with its own dequantization noise
    gray = df[df["transform"] == "grayscale"].sort_values(["dataset", "index"])
    plain = df[(df["transform"] == "none") & (df["split"] == "test")].sort_values(["dataset", "index"])
    assert not np.allclose(gray["log_px"].to_numpy(), plain["log_px"].to_numpy())
    assert np.allclose(gray["log_px"].to_numpy(), plain["log_px"].to_numpy(), atol=5.0)


def test_report_draws_the_contrast_sweep(transformed_run, tmp_path):
    from ood_audit.report.build import build_report

    rd, _, _ = transformed_run
    result = build_report([rd], tmp_path / "rep", n_boot=20)
    sweep = result.summary["runs"][0]["contrast_sweep"]
    assert [r["role"] for r in sweep] == ["in", "ood"]
    for r in sweep:
        assert r["alphas"] == [0.5, 1.0, 2.0] and len(r["mean_bpd"]) == 3
        assert r["monotone"] in ("increasing", "decreasing", "flat", "no")
    html = result.files["html"].read_text()
    md = result.files["md"].read_text()
    assert "Contrast sweep" in html and "mean bits/dim vs contrast factor" in html
    assert "Contrast sweep" in md and "ALPHA=0.5" in md
    assert (tmp_path / "rep" / "figures").glob("*contrast*.png")
    assert any("contrast" in p.name for p in (tmp_path / "rep" / "figures").iterdir())


def test_report_without_contrast_rows_has_no_sweep(tmp_path):
    from fake_scores import write_fake_run

    from ood_audit.report.build import build_report

    result = build_report([write_fake_run(tmp_path / "r", n=40)], tmp_path / "rep",
                          formats=["md", "json"], n_boot=10)
    assert result.summary["runs"][0]["contrast_sweep"] is None
    assert "Contrast sweep" not in result.files["md"].read_text()


def test_contrast_sweep_trend():
    from ood_audit.report.sweep import contrast_sweep

    rows = []
    for dataset, role, bpds in (("a", "in", {"none": 3.0, "contrast=0.5": 2.0,
                                             "contrast=2": 4.0}),
                                ("b", "ood", {"none": 3.0, "contrast=0.5": 3.5,
                                              "contrast=2": 2.0, "grayscale": 1.0})):
        for tag, bpd in bpds.items():
            rows += [{"dataset": dataset, "role": role, "split": "test", "transform": tag,
                      "bpd": bpd}] * 2
    rows.append({"dataset": "a", "role": "in", "split": "train", "transform": "none",
                 "bpd": 9.0})
    out = contrast_sweep(pd.DataFrame(rows))
    assert [(r["set"], r["alphas"], r["mean_bpd"], r["monotone"], r["as_predicted"])
            for r in out] == [("a test", [0.5, 1.0, 2.0], [2.0, 3.0, 4.0], "increasing", True),
                              ("b test", [0.5, 1.0, 2.0], [3.5, 3.0, 2.0], "decreasing", False)]
    assert contrast_sweep(pd.DataFrame(rows).query("transform != 'contrast=0.5' and "
                                                   "transform != 'contrast=2'")) is None


# --- CLI ------------------------------------------------------------------------------------


def test_cli_help_lists_transforms():
    from typer.testing import CliRunner

    from ood_audit.cli.app import app

    result = CliRunner().invoke(app, ["score", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for spec in TRANSFORMS.values():
        assert spec.usage in result.output


def test_cli_score_with_transforms(tiny_data, tmp_path, capsys):
    from ood_audit.cli.app import main
    from ood_audit.scoring.parquet import read_scores

    run = untrained_run(tmp_path / "run", tiny_data).root

    def call(*argv):
        with pytest.raises(SystemExit) as exc:
            main(["score", "--run", str(run), "--ood", "noise-uniform", "--limit", "16",
                  "--train-limit", "0", "--detector", "likelihood", *argv])
        return exc.value.code, capsys.readouterr()

    code, cap = call("--transform", "blur")
    assert code == 2 and "unknown transform 'blur'" in cap.err and "Traceback" not in cap.err
    code, cap = call("--transform", "invert", "--transform", "contrast=0.50")
    assert code == 0, cap.err
    for label in ("noise-uniform[contrast=0.5]", "noise-uniform[invert]"):
        assert cap.out.count(label) == 2  # the scores table and the detectors' AUROC table
    df, _ = read_scores(run / "scores")
    assert set(df["transform"]) == {"none", "invert", "contrast=0.5"}
    assert set(df.loc[df["transform"] != "none", "role"]) == {"in", "ood"}
