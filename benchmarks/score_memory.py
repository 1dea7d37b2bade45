"""Peak memory of ``ood-audit score`` as the scored set grows: does it stay flat?

Trains a tiny Glow on 8x8 blobs once, then for each size N scores an OOD ``.npy`` set of
N random 8x8 images in a fresh process (``--limit N --train-limit 0``) and records the
child's peak RSS (``ru_maxrss``) and wall time. Writes JSON to ``--out`` (and stdout).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/score_memory.py --sizes 10000,100000 \\
        --out benchmarks/score_memory.json

The images themselves are held in memory by the data loader (N * 64 bytes here: 6.4 MB
at 100k); everything else the scorer holds should not grow with N.
``--pythonpath DIR`` runs the children against another checkout (e.g. an export of an
older commit) for a before/after comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_mb() -> float:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Sampler:
    """The highest RSS seen since ``reset``, sampled every 5 ms by a thread."""

    def __init__(self) -> None:
        import threading

        self.base = self.high = _rss_mb()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.005):
            self.high = max(self.high, _rss_mb())

    def reset(self) -> None:
        self.base = self.high = _rss_mb()

    def growth(self) -> float:
        return max(self.high, _rss_mb()) - self.base

    def stop(self) -> None:
        self.done.set()
        self.thread.join()


def child(run: str, data: str, n: int, detectors: list[str], workers: int = 0,
          held_out: bool = False) -> None:
    """Score in this process and print peak RSS, its growth during scoring and seconds.

    ``peak_rss_mb`` (ru_maxrss) is dominated by importing torch (~500 MB for the CPU
    build), so a thread also samples the current RSS every 5 ms: ``growth_mb`` is its
    maximum minus the RSS just before scoring (imports done), what scoring itself adds.
    ``held_out``: also score the run's 128 held-out train images (so the detectors fitted
    on them, dose..., apply), then read the table back as a reader does and report
    ``detectors_growth_mb``: what computing every detector adds above the loaded table.
    """
    from ood_audit.commands.score import score_run
    from ood_audit.runs import RunDir

    sampler = _Sampler()
    before = sampler.base
    t0 = time.perf_counter()
    score_run(RunDir(run), [data], limit=n, train_limit=128 if held_out else 0,
              batch_size=512, device="cpu", notify=lambda m: None, detectors=detectors or None,
              **({"workers": workers} if workers else {}),  # older checkouts lack it
              **({"held_out": True} if held_out else {}))
    seconds = time.perf_counter() - t0
    out = {"rss_before_mb": before, "growth_mb": sampler.growth(), "seconds": seconds}
    if held_out:
        from ood_audit.analysis.detectors.table import with_detector_scores
        from ood_audit.analysis.tables import scores_location
        from ood_audit.scoring.parquet import read_scores

        df, meta = read_scores(scores_location(RunDir(run)))  # the table, no detector yet
        table_mb = float(df.memory_usage(deep=True).sum()) / 2**20
        sampler.reset()
        t0 = time.perf_counter()
        df, meta = with_detector_scores(df, meta)  # what every reader does next
        out.update(detectors_seconds=time.perf_counter() - t0, table_mb=table_mb,
                   detectors_growth_mb=sampler.growth(),
                   detector_columns_mb=float(df.filter(like="score_").memory_usage().sum())
                   / 2**20)
    sampler.stop()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    print(json.dumps({"peak_rss_mb": peak_kb / 1024, **out}))


def train_tiny(root: Path) -> Path:
    from ood_audit.config import RunConfig, TrainConfig
    from ood_audit.training.run import train_run

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:8, :8]
    imgs = np.empty((256, 8, 8), np.uint8)
    for i in range(256):
        cy, cx = rng.uniform(2, 6, 2)
        img = 200 * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 4.0) + rng.normal(20, 8, (8, 8))
        imgs[i] = np.clip(img, 0, 255)
    np.save(root / "blobs.npy", imgs)
    cfg = RunConfig(model="glow", preset="tiny", data=str(root / "blobs.npy"),
                    train=TrainConfig(epochs=1, batch_size=32, limit=128, test_limit=64,
                                      warmup_steps=5, device="cpu"))
    return train_run(cfg, root / "run", runs_root=root, log=lambda m: None).run_dir


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000", help="comma-separated set sizes N")
    ap.add_argument("--detector", action="append", default=[],
                    help="detectors to score (default: every one that applies)")
    ap.add_argument("--out", type=Path, default=None, help="JSON file to write")
    ap.add_argument("--workers", type=int, default=0,
                    help="score --workers (worker processes' RSS is not counted; default 0)")
    ap.add_argument("--held-out", action="store_true",
                    help="also score 128 held-out train images and measure what computing "
                         "the detectors at read time adds (the density of states fits on them)")
    ap.add_argument("--pythonpath", default=None, help="run the children against this checkout")
    ap.add_argument("--child", nargs=3, metavar=("RUN", "DATA", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), args.detector, args.workers,
              args.held_out)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        run = train_tiny(root)
        data = root / "noise.npy"
        rng = np.random.default_rng(1)
        np.save(data, rng.integers(0, 256, (max(sizes), 8, 8), dtype=np.uint8))
        env = {**os.environ}
        if args.pythonpath:
            env["PYTHONPATH"] = args.pythonpath
        results = []
        for n in sizes:
            cmd = [sys.executable, __file__, "--child", str(run), str(data), str(n),
                   *[f"--detector={d}" for d in args.detector], f"--workers={args.workers}",
                   *(["--held-out"] if args.held_out else [])]
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if res.returncode != 0:
                sys.exit(f"child for N={n} failed:\n{res.stderr[-2000:]}")
            results.append({"n_images": n, **json.loads(res.stdout.strip().splitlines()[-1])})
    report = {"benchmark": "score_memory", "model": "glow tiny, 1x8x8",
              "detectors": args.detector or "all that apply", "workers": args.workers,
              "held_out": args.held_out,
              "checkout": args.pythonpath or "this one", "results": results,
              "peak_rss_increase_mb": results[-1]["peak_rss_mb"] - results[0]["peak_rss_mb"],
              "growth_increase_mb": results[-1]["growth_mb"] - results[0]["growth_mb"]}
    if args.held_out:
        report["detectors_growth_increase_mb"] = (results[-1]["detectors_growth_mb"]
                                                  - results[0]["detectors_growth_mb"])
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
