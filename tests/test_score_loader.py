"""Scoring through the DataLoader (``score --workers``) and its bounded memory.

The scores must not depend on the number of workers (noise seeded per chunk of
NOISE_CHUNK images, the global RNG seeded per chunk for models that sample), must equal
an independent computation of the documented x, and the writer must put rows on disk a
row group at a time; the summaries summed while writing equal the table read back.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from ood_audit.checkpoint import load_checkpoint
from ood_audit.data import dequantize, load_dataset
from ood_audit.errors import UserError
from ood_audit.models.registry import build_model, resolve_model_config
from ood_audit.runs import RunDir
from ood_audit.scoring import writer
from ood_audit.scoring.batches import score_images
from ood_audit.scoring.jobs import ScoreJob, build_jobs
from ood_audit.scoring.loader import dequantized_batches
from ood_audit.scoring.noise import NOISE_CHUNK, Shard
from ood_audit.scoring.parquet import read_scores
from ood_audit.scoring.scorer import score_jobs
from ood_audit.scoring.writer import summarize
from ood_audit.seeds import seeded

CPU = torch.device("cpu")
N = NOISE_CHUNK + 76  # two noise chunks, the second one short


@pytest.fixture(scope="module")
def glow(tiny_run):
    model, info = load_checkpoint(RunDir(tiny_run).model)
    model.eval()
    return model, info


def noise_job(info, n=N) -> ScoreJob:
    return ScoreJob(load_dataset("noise-uniform", "test", limit=n, shape=info.input_shape), "ood")


def columns(model, job, **kw) -> pd.DataFrame:
    return pd.DataFrame({k: np.concatenate(v) for k, v in _stack(
        score_images(model, job, kw.pop("batch_size", 100), CPU, 3, **kw)).items()})


def _stack(batches):
    out: dict[str, list] = {}
    for cols in batches:
        for k, v in cols.items():
            out.setdefault(k, []).append(np.asarray(v))
    return out


def test_loader_yields_the_documented_x_in_order():
    images = torch.randint(0, 256, (N, 1, 4, 4), dtype=torch.uint8)
    got = list(dequantized_batches(images, Shard().chunks(N), batch_size=300, seed=5, key=9,
                                   device=CPU, workers=2))
    # batches never straddle a chunk: 1024 = 300 + 300 + 300 + 124, then 76
    assert [(c, s, len(x)) for c, s, x in got] == [
        (0, 0, 300), (0, 300, 300), (0, 600, 300), (0, 900, 124), (1, 1024, 76)]
    x = torch.cat([x for _, _, x in got])
    # independent: x = (k + u) / 256 with u from the chunk's own seeded generator (within
    # one float32 ulp: dequantize keeps 255 + u from rounding up to 256)
    u = torch.cat([torch.rand(images[s:s + NOISE_CHUNK].shape, generator=seeded(5, 9, c))
                   for c, s in Shard().chunks(N)])
    torch.testing.assert_close(x, (images.float() + u) / 256, rtol=0, atol=6e-8)
    assert ((x * 256).floor() == images.float()).all()


def test_workers_do_not_change_a_score(glow):
    model, info = glow
    job = noise_job(info)
    a = columns(model, job, workers=0)
    b = columns(model, job, workers=2)
    assert len(a) == N and a["index"].tolist() == list(range(N))
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_default_path_scores_the_documented_x(glow):
    """log_px equals log p(x) of x = dequantize(chunk, seeded(seed, key, c)) computed here
    directly, image by image position: the noise semantics did not change."""
    model, info = glow
    job = noise_job(info)
    got = columns(model, job, batch_size=256)["log_px"].to_numpy()
    with torch.inference_mode():
        want = np.concatenate([
            model.log_prob(dequantize(job.images.images[s:s + NOISE_CHUNK], seeded(3, job.key, c)))
            .double().numpy() for c, s in Shard().chunks(N)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)


def test_a_sampling_model_is_seeded_per_chunk_whatever_the_workers(tiny_run):
    """The VAE's IWAE bound draws from the global RNG, seeded per chunk: workers change
    nothing, and a chunk's scores do not depend on the chunks before it."""
    torch.manual_seed(0)
    config, _ = resolve_model_config("vae", "tiny", {}, (1, 8, 8))
    vae = build_model("vae", config, (1, 8, 8)).eval()
    vae.set_score_option("iw_samples", 2)
    _, info = load_checkpoint(RunDir(tiny_run).model)
    job = noise_job(info)
    a = columns(vae, job, workers=0)
    b = columns(vae, job, workers=2)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    second = columns(vae, job, shard=Shard(1, 2), workers=0)  # chunk 1 alone
    pd.testing.assert_frame_equal(second, a.iloc[NOISE_CHUNK:].reset_index(drop=True),
                                  check_exact=True)


def test_negative_workers_is_a_user_error(glow):
    model, info = glow
    with pytest.raises(UserError, match="--workers"):
        columns(model, noise_job(info, 10), workers=-1)


def test_writer_streams_row_groups_and_summaries_match_the_table(glow, tmp_path, monkeypatch):
    model, info = glow
    jobs = build_jobs(info, ["noise-uniform"], root=None, download=False, limit=300,
                      train_limit=0, seed=0, notify=lambda m: None)
    ref = score_jobs(model, info, jobs, tmp_path / "ref", batch_size=32, device=CPU, seed=0)
    monkeypatch.setattr(writer, "ROW_GROUP", 100)
    summaries = score_jobs(model, info, jobs, tmp_path / "small", batch_size=32, device=CPU,
                           seed=0, workers=2)
    meta = pq.ParquetFile(tmp_path / "small" / "part-0.parquet").metadata
    sizes = [meta.row_group(i).num_rows for i in range(meta.num_row_groups)]
    assert sum(sizes) == 256 + 300 and len(sizes) >= 3, sizes  # flushed as it went (256 in-dist. rows)
    assert max(sizes) < 100 + 32, sizes  # never more than the buffer plus one batch
    # float columns are written plain (no per-row-group dictionary), the set names dictionary-encoded
    names = meta.schema.names
    chunk = meta.row_group(0)
    assert "DICTIONARY" not in " ".join(chunk.column(names.index("log_px")).encodings)
    assert "DICTIONARY" in " ".join(chunk.column(names.index("dataset")).encodings)
    a, _ = read_scores(tmp_path / "ref")
    b, _ = read_scores(tmp_path / "small")
    pd.testing.assert_frame_equal(a, b, check_exact=True)

    # summed while writing == read back from the table (summarize) == pandas on the table
    back = summarize(tmp_path / "small", list(summaries[0].means))
    for s, r, t in zip(summaries, back, ref, strict=True):
        assert (s.dataset, s.role, s.split, s.transform, s.n) == (r.dataset, r.role, r.split,
                                                                 r.transform, r.n)
        rows = b[(b.dataset == s.dataset) & (b.split == s.split)]
        np.testing.assert_array_equal(s.log_px, rows["log_px"].to_numpy())
        np.testing.assert_array_equal(r.log_px, s.log_px)
        np.testing.assert_array_equal(t.log_px, s.log_px)
        for k, v in s.means.items():
            assert v == pytest.approx(rows[k].mean(), rel=1e-12) == pytest.approx(r.means[k], rel=1e-12)
