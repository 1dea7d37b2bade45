"""Write a small synthetic run directory with a Glow-like scores table (no model needed).

The numbers are made up but obey the table's contracts: log_px is the sum of the model
terms, the totals log_pz / logdet are sums of their members, bpd follows from log_px by
bpd = -(log_px - D log 256) / (D log 2). Each OOD set is shifted from the in-distribution
test set by chosen amounts in log p(z) and log|det|, so a test knows the true gap.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from ood_audit.runs import RunDir
from ood_audit.scoring.parquet import arrow_schema
from ood_audit.scoring.schema import SCHEMA_VERSION, ScoresMeta, totals_for

D = 784
KINDS = ("actnorm", "invconv", "coupling")
#: set name -> (shift of log p(z), shift of log|det|) in nats, vs in-distribution test.
DEFAULT_OOD = {"mnist": (100.0, 300.0), "noise-uniform": (-3000.0, -200.0)}


def glow_terms(levels: int = 2) -> list[str]:
    terms = []
    for lv in range(levels):
        terms += [f"logdet_level{lv}_{k}" for k in KINDS]
        terms.append(f"log_pz_level{lv}")
    return terms


def bits_per_dim(log_px: np.ndarray, n_dims: int = D) -> np.ndarray:
    return -(log_px - n_dims * math.log(256)) / (n_dims * math.log(2))


def fake_meta(terms: list[str], **over) -> ScoresMeta:
    fields = dict(
        version="0.1.0", schema_version=SCHEMA_VERSION, model="glow", in_dataset="fashionmnist",
        terms=terms,
        run_config={"model": "glow", "preset": "tiny", "data": "fashionmnist",
                    "model_config": {"levels": 2}, "train": {"epochs": 3}},
        checkpoint_sha256="ab" * 32, dequant_seed=0, adaptations={"mnist": "none"},
    )
    fields.update(over)
    return ScoresMeta(**fields)


def fake_frame(n: int = 200, *, levels: int = 2, ood: dict | None = None, seed: int = 0,
               noise: float = 20.0) -> tuple[pd.DataFrame, list[str]]:
    """(scores DataFrame with totals, model term names)."""
    rng = np.random.default_rng(seed)
    terms = glow_terms(levels)
    ood = DEFAULT_OOD if ood is None else ood
    base = {t: (-900.0 / (i + 1) if t.startswith("log_pz") else 390.0 + 40 * i)
            for i, t in enumerate(terms)}
    sets = [("fashionmnist", "in", "train", (0.0, 0.0), 0.0),
            ("fashionmnist", "in", "test", (0.0, 0.0), 0.0)]
    sets += [(name, "ood", "test", shift, 0.0) for name, shift in ood.items()]
    pz_terms = [t for t in terms if t.startswith("log_pz")]
    ld_terms = [t for t in terms if t.startswith("logdet")]
    frames = []
    for dataset, role, split, (d_pz, d_ld), _ in sets:
        cols = {}
        for t in terms:
            # Spread each set's shift evenly over the members of its group.
            shift = d_pz / len(pz_terms) if t in pz_terms else d_ld / len(ld_terms)
            cols[t] = base[t] + shift + rng.normal(0, noise, n)
        f = pd.DataFrame(cols)
        f.insert(0, "dataset", dataset)
        f.insert(1, "role", role)
        f.insert(2, "split", split)
        f.insert(3, "transform", "none")
        f.insert(4, "index", np.arange(n, dtype=np.int64))
        f.insert(5, "label", rng.integers(0, 10, n).astype(np.int64))
        f.insert(6, "n_dims", np.int64(D))
        frames.append(f)
    df = pd.concat(frames, ignore_index=True)
    df["log_px"] = df[terms].sum(axis=1)
    df["bpd"] = bits_per_dim(df["log_px"].to_numpy())
    for total, members in totals_for(terms).items():
        df[total] = df[members].sum(axis=1)
    return df, terms


def write_scores(path: Path, df: pd.DataFrame, meta: ScoresMeta, scores: list[str] = ()) -> Path:
    """Write ``df`` as an ood-audit scores Parquet file with the real schema."""
    totals = list(totals_for(meta.terms))
    schema = arrow_schema(meta.terms, totals, list(scores), meta)
    table = pa.Table.from_pandas(df[schema.names], schema=schema, preserve_index=False)
    pq.write_table(table, path)
    return path


def write_fake_run(root: Path, *, n: int = 200, levels: int = 2, ood: dict | None = None,
                   seed: int = 0, model: str = "glow", metrics: bool = True) -> RunDir:
    """A run directory with config.yaml, scores.parquet and (optionally) metrics.parquet."""
    rd = RunDir(Path(root))
    rd.root.mkdir(parents=True, exist_ok=True)
    df, terms = fake_frame(n, levels=levels, ood=ood, seed=seed)
    meta = fake_meta(terms, model=model,
                     run_config={**fake_meta(terms).run_config, "model": model})
    rd.config.write_text(yaml.safe_dump(meta.run_config))
    write_scores(rd.scores, df, meta)
    if metrics:
        epochs = np.arange(1, 6)
        pd.DataFrame({"epoch": epochs, "train_bpd": 4.0 / epochs + 2.5,
                      "test_bpd": 4.0 / epochs + 2.6}).to_parquet(rd.metrics, index=False)
    return rd
