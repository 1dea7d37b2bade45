"""Sharded scoring: ``torchrun --nproc_per_node 2 -m ood_audit score`` writes the same
table, row for row and bit for bit, as one process; the folder layout and its readers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from ood_audit.analysis.tables import load_run_scores, scores_location
from ood_audit.commands.score import score_run
from ood_audit.runs import RunDir
from ood_audit.scoring.noise import NOISE_CHUNK, Shard
from ood_audit.scoring.parquet import canonical_order, read_scores

# 2100 images = chunks of 1024, 1024, 52: rank 0 takes chunks 0 and 2, rank 1 chunk 1.
N_OOD = 2 * NOISE_CHUNK + 52
ARGS = ["--ood", "noise-uniform", "--ood", "constant", "--limit", str(N_OOD),
        "--train-limit", "40", "--batch-size", "200", "--device", "cpu"]


def copy_run(src, dst) -> RunDir:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock", "scores*"))
    return RunDir(dst)


def test_shard_takes_every_chunk_once():
    n = 5 * NOISE_CHUNK + 3
    shards = [Shard(r, 3) for r in range(3)]
    chunks = sorted(c for s in shards for c in s.chunks(n))
    assert chunks == Shard().chunks(n)
    assert [c for c, _ in shards[1].chunks(n)] == [1, 4]
    assert sum(s.size(n) for s in shards) == n
    assert Shard(1, 2).chunks(NOISE_CHUNK) == []  # one chunk: rank 1 has nothing to do


def test_torchrun_two_ranks_equal_one_process(tiny_run, tmp_path):
    single, sharded = copy_run(tiny_run, tmp_path / "one"), copy_run(tiny_run, tmp_path / "two")
    member = copy_run(tiny_run, tmp_path / "member")  # an ensemble member scored on each shard
    shutil.copyfile(member.epoch_checkpoint(1), member.model)
    opts = dict(limit=N_OOD, train_limit=40, batch_size=200, device="cpu", notify=lambda m: None)
    score_run(single, ["noise-uniform", "constant"], members=[member.root], **opts)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    # the natural command (torchrun's own parser took score's old --run for its --run-path:
    # "ambiguous option"): RUN is score's argument
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "ood_audit", "score", str(sharded.root), *ARGS, "--member", str(member.root)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("wrote ") == 1, res.stdout  # only rank 0 prints

    parts = sorted(p.name for p in sharded.scores.iterdir())
    assert parts == ["part-0.parquet", "part-1.parquet"]
    assert [p.name for p in single.scores.iterdir()] == ["part-0.parquet"]
    rank1 = pq.read_table(sharded.scores / "part-1.parquet").to_pandas()
    # rank 1 scored exactly chunk 1 of each 2100-image set
    for name in ("noise-uniform", "constant"):
        idx = rank1.loc[rank1.dataset == name, "index"]
        assert sorted(idx) == list(range(NOISE_CHUNK, 2 * NOISE_CHUNK))

    a, meta_a = read_scores(single.scores)
    b, meta_b = read_scores(sharded.scores)
    pd.testing.assert_frame_equal(a, b, check_exact=True)
    assert "log_px_member1" in a.columns and "log_px_ensemble" in a.columns
    assert meta_a.extra.pop("processes") == "1" and meta_b.extra.pop("processes") == "2"
    meta_b.extra = {k: v.replace(str(sharded.root), str(single.root)) for k, v in meta_b.extra.items()}
    assert meta_a.extra == meta_b.extra and meta_a.extra_columns == meta_b.extra_columns
    # read-time detector scores agree too
    da, _ = load_run_scores(single)
    db, _ = load_run_scores(sharded)
    pd.testing.assert_frame_equal(da, db, check_exact=True)
    assert not list(tmp_path.glob("*/.scores.tmp-*"))  # no temporary folder left behind


def test_readers_order_rows_and_accept_the_old_file(tiny_run, tmp_path):
    rd = copy_run(tiny_run, tmp_path / "run")
    score_run(rd, ["noise-uniform"], limit=30, train_limit=10, device="cpu",
              notify=lambda m: None, detectors=["likelihood"])
    df, meta = read_scores(rd.scores)
    sets = json.loads(meta.extra["sets"])
    pairs = zip(df["dataset"], df["split"], strict=True)
    assert [(s[0], s[2]) for s in sets] == list(dict.fromkeys(pairs))
    assert [s[2] for s in sets] == ["test", "train", "test"]
    # parts holding shuffled rows read back in canonical order
    table = pq.read_table(rd.scores / "part-0.parquet")
    perm = np.random.default_rng(0).permutation(table.num_rows)
    shutil.rmtree(rd.scores)
    rd.scores.mkdir()
    pq.write_table(table.take(perm[: len(perm) // 2]), rd.scores / "part-0.parquet")
    pq.write_table(table.take(perm[len(perm) // 2:]), rd.scores / "part-1.parquet")
    again, _ = read_scores(rd.scores)
    pd.testing.assert_frame_equal(again, df, check_exact=True)
    assert canonical_order(again, meta) is not None
    # an older run: a single scores.parquet, read when there is no scores/ folder
    shutil.rmtree(rd.scores)
    pq.write_table(table, rd.legacy_scores)
    assert scores_location(rd) == rd.legacy_scores
    old, _ = load_run_scores(rd)
    pd.testing.assert_frame_equal(old, df, check_exact=True)
    # rescoring replaces it with the folder
    score_run(rd, ["noise-uniform"], limit=30, train_limit=10, device="cpu",
              notify=lambda m: None, detectors=["likelihood"])
    assert rd.scores.is_dir() and not rd.legacy_scores.exists()


def test_failed_scoring_leaves_the_old_table(tiny_run, tmp_path):
    rd = copy_run(tiny_run, tmp_path / "run")
    score_run(rd, ["noise-uniform"], limit=20, train_limit=0, device="cpu", notify=lambda m: None)
    before = (rd.scores / "part-0.parquet").read_bytes()

    class Boom(Exception):
        pass

    class Progress:
        def set_start(self, job, n):
            if job.images.name == "constant":
                raise Boom

        def advance(self, n, rate):
            pass

    with pytest.raises(Boom):
        score_run(rd, ["noise-uniform", "constant"], limit=20, train_limit=0, device="cpu",
                  notify=lambda m: None, progress=Progress())
    assert (rd.scores / "part-0.parquet").read_bytes() == before
    assert not list(rd.root.glob(".scores.tmp-*"))
