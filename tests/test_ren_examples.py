"""examples/ren: Ren et al. 2019's likelihood-ratio setup parses, and its L2 grid maps
their ``reg_weight`` lambda (lambda * sum w^2 on a loss in nats per image) onto our
coupled weight decay on a bits/dim loss: equal gradients, wd = 2 lambda / (D ln 2)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from ood_audit.training.run import load_run_config

REN = Path(__file__).resolve().parents[1] / "examples" / "ren"


@pytest.mark.parametrize("path", sorted(REN.glob("*.yaml")), ids=lambda p: p.name)
def test_configs_parse_as_pixelcnn_runs(path):
    cfg = load_run_config(path)
    assert cfg.model == "pixelcnn" and cfg.data == "fashionmnist"
    assert cfg.train.perturb_mu == 0.0  # the foreground; backgrounds come from --background


def test_grid_weight_decays_match_their_l2_weights():
    text = (REN / "README.md").read_text()
    loop = re.search(r"for MU in ([\d. ]+); do for WD in ([\d. ]+); do", text)
    assert loop, "the README's grid loop moved"
    assert [float(m) for m in loop.group(1).split()] == [0.1, 0.2, 0.3]
    dims = 28 * 28
    # the gradient of lambda * |w|^2 on nats/image, rescaled to bits/dim, is wd * w
    expected = [2 * lam / (dims * math.log(2)) for lam in (0, 10, 100)]
    assert [float(w) for w in loop.group(2).split()] == pytest.approx(expected, rel=2e-3)
