"""Likelihood regret (Xiao et al. 2020) on a linear-Gaussian VAE whose log p(x) and exact
posterior are known: zero regret when the encoder already is the posterior, a re-fit that
reaches log p(x) exactly from a wrong encoder, regret >= 0, draws seeded per image; then
the real VAE through ``ood-audit score --detector likelihood-regret``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from ood_audit.models.regret import RefitSettings, likelihood_regret, refit_bounds

D, L, SIGMA = 6, 3, 0.5


class LinearGaussianVAE(nn.Module):
    """p(z) = N(0, I), p(x | z) = N(W z + b, SIGMA^2 I) with orthogonal columns of W, so the
    posterior N(A (x - b), S) has a diagonal S = (I + W^T W / SIGMA^2)^-1, A = S W^T / SIGMA^2:
    a linear encoder can be exact."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, L, generator=g, dtype=torch.float64))
        self.w = q * torch.tensor([2.0, 1.0, 0.5], dtype=torch.float64)  # W^T W diagonal
        self.b = torch.randn(D, generator=g, dtype=torch.float64)
        self.encoder = nn.Linear(D, 2 * L).double()
        s = 1 / (1 + (self.w**2).sum(0) / SIGMA**2)  # diag(S)
        a = s[:, None] * self.w.T / SIGMA**2
        with torch.no_grad():
            self.encoder.weight.zero_()
            self.encoder.weight[:L] = a
            self.encoder.bias[:L] = -a @ self.b
            self.encoder.bias[L:] = 0.5 * torch.log(s)

    def encoder_input(self, x):
        return x

    def posterior(self, h):
        mean, log_std = h.chunk(2, dim=-1)
        return mean, log_std

    def decoder_log_prob(self, v, z):
        mean = z @ self.w.T + self.b
        return torch.distributions.Normal(mean, SIGMA).log_prob(v).sum(-1)

    def log_px(self, x):
        cov = self.w @ self.w.T + SIGMA**2 * torch.eye(D, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)


def _data(n, seed=1):
    model = LinearGaussianVAE()
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, L, generator=g, dtype=torch.float64)
    return model, z @ model.w.T + model.b + SIGMA * torch.randn(n, D, generator=g,
                                                                 dtype=torch.float64)


def test_exact_encoder_bound_is_log_px_and_regret_is_zero():
    model, x = _data(5)
    before, after = refit_bounds(model, x, list(range(5)))
    torch.testing.assert_close(before, model.log_px(x), rtol=0, atol=1e-9)  # every weight = p(x)
    regret = likelihood_regret(model, x, list(range(5)))
    assert (regret >= 0).all() and float(regret.max()) < 1e-2


def test_refit_from_a_wrong_encoder_reaches_log_px():
    model, x = _data(4)
    with torch.no_grad():
        model.encoder.bias[:L] += 1.5  # posterior means off by 1.5 in every latent
        model.encoder.bias[L:] -= 1.0  # and too narrow
    # a small constant rate settles near the optimum; many draws make the bound of the
    # near-exact posterior tight (a K-sample bound of a wrong q can exceed log p(x))
    fast = RefitSettings(steps=1000, lr=0.005, weight_decay=0.0, iw_samples=256)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    before, after = refit_bounds(model, x, [3, 4, 5, 6], fast)
    exact = model.log_px(x)
    assert (before < exact - 10).all()
    torch.testing.assert_close(after, exact, rtol=0, atol=0.05)  # the posterior is found
    regret = likelihood_regret(model, x, [3, 4, 5, 6], fast)
    torch.testing.assert_close(regret, after - before)
    for k, v in model.state_dict().items():  # the model's own encoder is untouched
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)


def test_regret_is_nonnegative_zero_without_steps_and_seeded_per_image():
    model, x = _data(4)
    with torch.no_grad():
        model.encoder.weight.normal_(0, 0.3)
    assert torch.equal(likelihood_regret(model, x, [0, 1, 2, 3], RefitSettings(steps=0)),
                       torch.zeros(4, dtype=torch.float64))
    settings = RefitSettings(steps=20, lr=0.01, iw_samples=4)
    together = likelihood_regret(model, x, [7, 8, 9, 10], settings)
    alone = torch.cat([likelihood_regret(model, x[i:i + 1], [7 + i], settings) for i in range(4)])
    assert (together >= 0).all() and float(together.max()) > 0
    torch.testing.assert_close(together, alone, rtol=1e-6, atol=1e-8)


def test_regret_detector_through_score(tmp_path, tiny_data, tiny_ood):
    """Named, it is scored into likelihood_regret with its settings in the metadata;
    by default (every detector) it is not, since it costs an optimisation per image."""
    from ood_audit.commands.score import score_run
    from ood_audit.config import RunConfig, TrainConfig
    from ood_audit.runs import RunDir
    from ood_audit.scoring.parquet import read_scores
    from ood_audit.training.run import train_run

    cfg = RunConfig(model="vae", preset="tiny", data=str(tiny_data),
                    train=TrainConfig(epochs=1, batch_size=32, limit=96, test_limit=16,
                                      device="cpu"))
    rd = RunDir(train_run(cfg, tmp_path / "vae", runs_root=tmp_path, log=lambda m: None).run_dir)
    score_run(rd, [str(tiny_ood)], limit=6, train_limit=0, notify=lambda m: None)
    df, meta = read_scores(rd.scores)
    assert "likelihood_regret" not in df.columns
    assert "likelihood-regret" not in json.loads(meta.extra["detectors"])
    score_run(rd, [str(tiny_ood)], limit=6, train_limit=0, batch_size=4,
              detectors=["likelihood-regret"], notify=lambda m: None)
    df, meta = read_scores(rd.scores)
    assert "likelihood_regret" in meta.extra_columns
    assert json.loads(meta.extra["likelihood_regret"]) == {"steps": 100, "lr": 2e-4,
                                                           "weight_decay": 5e-5,
                                                           "iw_samples": 16}
    assert np.isfinite(df["likelihood_regret"]).all() and (df["likelihood_regret"] >= 0).all()
    assert json.loads(meta.extra["detectors"]) == ["likelihood-regret"]


def test_regret_refuses_a_model_without_an_encoder(tiny_run, tiny_ood):
    from ood_audit.commands.score import score_run
    from ood_audit.errors import UserError
    from ood_audit.runs import RunDir

    with pytest.raises(UserError, match="likelihood-regret.*VAE") as exc:
        score_run(RunDir(tiny_run), [str(tiny_ood)], limit=4, train_limit=0,
                  detectors=["likelihood-regret"], notify=lambda m: None)
    assert "\n" not in str(exc.value)
