"""Model families from other packages (the entry-point group ``ood_audit.models``) and the
``ood-audit models`` listing. A tiny plugin package is installed into a folder put on the
path (its ``.dist-info`` with ``entry_points.txt``, as pip writes it) and trained end to end
by ``ood-audit train`` in a fresh process; ``--help`` lists it without importing it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from ood_audit.commands.models import list_models
from ood_audit.errors import UserError
from ood_audit.models import registry

ROOT = Path(__file__).resolve().parents[1]

PLUGIN = '''
"""A test plugin: a diagonal Gaussian per pixel, as an ood-audit model family."""
import math
from dataclasses import dataclass

import torch
from torch import nn

from ood_audit.models.base import DensityModel
from ood_audit.models.registry import ModelSpec


@dataclass
class GaussConfig:
    init_log_std: float = 0.0


class PixelGauss(DensityModel):
    def __init__(self, config, input_shape):
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.mean = nn.Parameter(torch.full(self.input_shape, 0.5))
        self.log_std = nn.Parameter(torch.full(self.input_shape, config.init_log_std))

    def log_prob_terms(self, x):
        z = (x - self.mean) / self.log_std.exp()
        per_pixel = -0.5 * z ** 2 - self.log_std - 0.5 * math.log(2 * math.pi)
        return {"log_p_pixels": per_pixel.flatten(1).sum(1)}


SPEC = ModelSpec(name="gauss", summary="a diagonal Gaussian per pixel (a test plugin)",
                 config_cls=GaussConfig, presets={"tiny": {"init_log_std": -1.0}, "small": {}},
                 build=lambda config, shape: PixelGauss(config, shape))
WRONG_NAME = SPEC


def not_a_spec():
    return GaussConfig()
'''

ENTRY_POINTS = """
[ood_audit.models]
gauss = oodplug_tiny:SPEC
broken = oodplug_missing:SPEC
glow = oodplug_tiny:SPEC
wrongname = oodplug_tiny:WRONG_NAME
notaspec = oodplug_tiny:not_a_spec
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """A folder holding the installed plugin: its package and its .dist-info."""
    root = tmp_path_factory.mktemp("site")
    (root / "oodplug_tiny").mkdir()
    (root / "oodplug_tiny" / "__init__.py").write_text(PLUGIN)
    info = root / "oodplug_tiny-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: oodplug-tiny\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(ENTRY_POINTS))
    return root


def ood_audit(*argv, site: Path | None = None, cwd: Path | None = None):
    """``python -m ood_audit ARGV`` in a fresh process, the plugin installed when ``site``."""
    paths = [str(ROOT), *([str(site)] if site else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "COLUMNS": "250"}
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "ood_audit", *map(str, argv)], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=600)


def test_a_plugin_family_is_listed_trained_and_scored(site, tiny_data, tmp_path):
    listed = ood_audit("models", site=site)
    assert listed.returncode == 0, listed.stderr
    assert "gauss" in listed.stdout and "plugin (oodplug-tiny)" in listed.stdout
    assert "log_p_pixels" in listed.stdout and "tiny, small" in listed.stdout
    assert "failed to load" in listed.stdout  # broken: listed with the reason
    train = ["train", "--model", "gauss", "--preset", "tiny", "--data", tiny_data, "--epochs", "1",
             "--limit", "64", "--batch-size", "32", "--device", "cpu", "--out", tmp_path / "run"]
    done = ood_audit(*train, site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "trained gauss" in done.stdout
    done = ood_audit("score", tmp_path / "run", "--ood", "noise-uniform", "--limit", "32",
                     "--train-limit", "16", site=site, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "log_p_pixels" in done.stdout
    # without the plugin installed, the run cannot be loaded: one line saying so
    done = ood_audit("score", tmp_path / "run", "--ood", "noise-uniform", cwd=tmp_path)
    assert done.returncode == 2 and "install the plugin" in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = ood_audit(*[a if a != "gauss" else "broken" for a in train[:-1]], tmp_path / "run2",
                     site=site, cwd=tmp_path)
    assert done.returncode == 2 and "failed to load: ModuleNotFoundError" in done.stderr, done.stderr


PROBE = """
import json, sys
from ood_audit.cli.app import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps([m for m in ("torch", "oodplug_tiny") if m in sys.modules]), file=sys.stderr)
"""


def test_train_help_names_a_plugin_without_importing_it(site):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(site)]), "COLUMNS": "250"}
    done = subprocess.run([sys.executable, "-c", PROBE, "train", "--help"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert "gauss: plugin from oodplug-tiny" in " ".join(done.stdout.split()), done.stdout
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []  # neither torch nor the plugin


def test_plugins_that_clash_or_are_not_specs_are_left_out_with_a_reason(site, monkeypatch):
    monkeypatch.syspath_prepend(str(site))
    specs, errors = registry.plugin_specs()
    assert list(specs) == ["gauss"] and specs["gauss"].summary.startswith("a diagonal Gaussian")
    assert "built-in" in errors["glow"] and registry.get_spec("glow") is registry.MODELS["glow"]
    assert "must have the same name" in errors["wrongname"]
    assert "not an ood_audit ModelSpec" in errors["notaspec"]
    with pytest.raises(UserError, match="failed to load"):
        registry.get_spec("broken")
    with pytest.raises(UserError, match="unknown model 'nope'.*gauss"):
        registry.get_spec("nope")
    assert "gauss" in registry.trainable_specs()


def test_models_lists_each_family_with_its_presets_and_terms():
    rows = {r.name: r for r in list_models()}
    assert set(registry.MODELS) <= set(rows) and "imported" in rows
    assert rows["glow"].presets == list(registry.MODELS["glow"].presets)
    assert rows["glow"].terms.startswith("log_pz_level{i}, logdet_level{i}_actnorm")
    assert "log_px_c{i}" in rows["pixelcnn"].terms and "extra" in rows["pixelcnn"].terms
    assert rows["vae"].terms.startswith("recon, neg_kl, iw_gain")
    assert rows["imported"].origin == "ood-audit import python"


def test_the_imported_family_is_not_trained(tmp_path):
    with pytest.raises(UserError, match="not trained by ood-audit"):
        registry.model_settings("imported", "small")
