"""Training and scoring throughput of Glow's exact path, its naive baseline and each fast
path, against a reference PyTorch Glow port, as JSON.

    python benchmarks/throughput.py                          # both reference configs, CPU
    python benchmarks/throughput.py --config small-ref --paths naive,exact,channels_last
    python benchmarks/throughput.py --reference-port rosinality=../glow-pytorch --reference-port y0ast=../Glow-PyTorch
    python benchmarks/throughput.py --device cuda --peak-tflops 989   # + FLOP rate (H100/H200 bf16 dense)

Every (config, path) runs in its own child process, so each gets a clean peak RSS and
the naive path its own (untuned) allocator. Paths: ``naive`` (library convolutions, no
caches, glibc's default allocator: the code before the fast-path work), ``exact`` (the
default: caches, GEMM convolutions, allocator tuning; same function, float32) and the
opt-in fast paths of ``ood_audit/models/fastpath.py`` (``channels_last``, ``bf16``,
``compile``, ``tf32``; combine with ``+``). Random inputs stand in for data (speed does
not depend on pixel values).

``--reference-port NAME=DIR`` (repeatable; NAME in ``reference_ports.PORTS``, DIR the
user's clone) measures that port in the same run, in its own child process with the same
batches, warmup, repeats and threads and glibc's default allocator (no tuning of ours):
a row with path ``port:NAME`` and, on every row of ours, ``score_vs_port_NAME`` /
``train_vs_port_NAME``. The issue's figures for "a reference port" stay as
``stated_reference`` (with ``*_vs_stated_reference``): they did not reproduce here.

Timings on shared machines are noisy: compare ratios measured in one run, read the load
average recorded before and after, and never assert on absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from reference_ports import PORTS, PortError, check_clone

#: stated_reference: the issue's figures for "a popular PyTorch Glow port" on 2 CPU cores
#: of the project's machines, batch 256 (score) and 64 (train), in images/s. Neither port
#: in reference_ports.py reproduces them here: measure one with --reference-port.
CONFIGS = {
    "small-ref": {"shape": (1, 32, 32), "model_config": {"levels": 2, "steps": 8, "hidden": 128},
                  "stated_reference": {"score": 630.0, "train": 180.0}},
    "standard-ref": {"shape": (3, 32, 32), "model_config": {"levels": 3, "steps": 32, "hidden": 512},
                     "stated_reference": {"score": 24.0, "train": 7.0},
                     # ~10 s per timed batch on 2 cores: one timed call keeps the CPU run short
                     "max_repeats": 1},
    # The model presets users train (ood-audit train --preset), on the data they were sized for.
    "preset-tiny": {"shape": (1, 28, 28), "preset": "tiny", "model_config": {}, "stated_reference": None},
    "preset-small": {"shape": (1, 28, 28), "preset": "small", "model_config": {}, "stated_reference": None},
    # Not listed in --help: seconds-long end-to-end runs for tests/test_benchmarks.py.
    "tiny-test": {"shape": (1, 8, 8), "model_config": {"levels": 1, "steps": 2, "hidden": 8},
                  "stated_reference": None, "hidden": True},
}
DEFAULT_PATHS = {"cpu": "naive,exact,channels_last",  # bf16 on AVX2 CPUs: ~10x slower
                 "cuda": "naive,exact,channels_last,tf32,bf16,channels_last+tf32+bf16,compile"}


def loadavg() -> list[float]:
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except OSError:
        return []


def measure(fn, warmup: int, repeats: int, sync) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def count_flops(model, shape, device) -> dict[str, float]:
    """FLOPs per image of one scoring forward and one training step (forward + backward),
    counted once by torch's FlopCounterMode (convolutions and matmuls) on the naive path."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model.set_fast_path("naive", True)
    x = torch.rand(2, *shape, device=device)
    with FlopCounterMode(display=False) as fc, torch.inference_mode():
        model.log_prob(x)
    score = fc.get_total_flops() / 2
    model.train()
    with FlopCounterMode(display=False) as fc:
        model.training_loss(x).mean().backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    model.set_fast_path("naive", False)
    return {"score": score, "train": fc.get_total_flops() / 2}


def parse_reference_port(spec: str) -> tuple[str, Path]:
    """``NAME=DIR`` -> (NAME, DIR); a PortError (one line) when malformed, unknown or not a clone."""
    name, sep, directory = spec.partition("=")
    name, directory = name.strip(), directory.strip()
    if not sep or not name or not directory:
        raise PortError(f"--reference-port wants NAME=DIR (e.g. rosinality=./glow-pytorch), got {spec!r}")
    if name not in PORTS:
        raise PortError(f"--reference-port: unknown port {name!r}; known: {', '.join(PORTS)}")
    check_clone(name, Path(directory))
    return name, Path(directory).resolve()


def _set_threads(args) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)


def port_child(args) -> dict:
    """Measure one reference port on one config in this process (nothing of ood_audit imported:
    the port gets glibc's default allocator, as it would in its own scripts)."""
    import torch

    _set_threads(args)
    spec = CONFIGS[args.config]
    shape = spec["shape"]
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else "cpu" if args.device == "auto" else args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    port = PORTS[args.port](Path(args.port_dir), shape, seed=0, device=str(device), **spec["model_config"])
    xt = port.prepare(torch.rand(args.train_batch, *shape))
    xs = port.prepare(torch.rand(args.score_batch, *shape))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    port.model.train()
    t_train = measure(lambda: port.train_step(xt), args.warmup, args.repeats, sync)
    port.model.eval()
    t_score = measure(lambda: port.score(xs), args.warmup, args.repeats, sync)
    return {
        "config": args.config, "path": f"port:{args.port}", "port_dir": args.port_dir,
        "threads": torch.get_num_threads(),
        "train_images_per_s": args.train_batch / t_train,
        "score_images_per_s": args.score_batch / t_score,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }


def child(args) -> dict:
    """Measure one (config, path) in this process."""
    import torch

    from ood_audit.device import pick_device
    from ood_audit.models.registry import build_model, resolve_model_config

    _set_threads(args)
    spec = CONFIGS[args.config]
    shape = spec["shape"]
    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config, _ = resolve_model_config("glow", spec.get("preset", "small"), dict(spec["model_config"]), shape)
    torch.manual_seed(0)
    model = build_model("glow", config, shape).to(device)
    model.data_init(torch.rand(16, *shape, device=device))
    flops = count_flops(model, shape, device) if args.flops else None
    for name in (n for n in args.path.split("+") if n != "exact"):
        model.set_fast_path(name, True)
    # As ood_audit/training/trainer.py builds it (fused); the naive baseline keeps the
    # per-tensor Adam of the code before the fast-path work.
    opt = torch.optim.Adam(model.parameters(), lr=1e-5, fused=args.path != "naive")
    xt = torch.rand(args.train_batch, *shape, device=device)
    xs = torch.rand(args.score_batch, *shape, device=device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model.training_loss(xt).mean().backward()
        opt.step()

    def score_step():
        with torch.inference_mode():
            model.log_prob(xs)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    t_train = measure(train_step, args.warmup, args.repeats, sync)
    model.eval()
    t_score = measure(score_step, args.warmup, args.repeats, sync)
    out = {
        "config": args.config, "path": args.path, "fast_path": model.fast.describe(),
        "threads": torch.get_num_threads(),
        "train_images_per_s": args.train_batch / t_train,
        "score_images_per_s": args.score_batch / t_score,
        # ru_maxrss is KiB on Linux: the process's peak, over both measurements
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    if flops:
        out["flops_per_image"] = flops
    return out


def sgemm_child(args) -> dict:
    """This machine's float32 GEMM rate with the same threads: what a convolution-bound
    model can reach at best (torch.mm of two 2048 x 2048 matrices, median of 5)."""
    import torch

    _set_threads(args)
    a, b = torch.rand(2048, 2048), torch.rand(2048, 2048)
    seconds = measure(lambda: torch.mm(a, b), warmup=2, repeats=5, sync=lambda: None)
    return {"sgemm_tflops": 2 * 2048**3 / seconds / 1e12, "threads": torch.get_num_threads()}


def _child_cmd(args, config: str) -> list[str]:
    """The options every child shares, so ours and the ports' are measured alike."""
    repeats = args.repeats
    if args.device == "cpu" and CONFIGS[config].get("max_repeats"):
        repeats = min(repeats, CONFIGS[config]["max_repeats"])
    return [sys.executable, __file__, "--child", "--config", config, "--device", args.device,
            "--train-batch", str(args.train_batch), "--score-batch", str(args.score_batch),
            "--repeats", str(repeats), "--warmup", str(args.warmup)] + (
        ["--threads", str(args.threads)] if args.threads else [])


def _run(args, cmd: list[str], env: dict, config: str, path: str) -> dict:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:
        return {"config": config, "path": path, "error": [f"timed out after {args.child_timeout:g} s"]}
    if proc.returncode != 0:
        return {"config": config, "path": path, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_child(args, config: str, path: str, flops: bool) -> dict:
    cmd = _child_cmd(args, config) + ["--path", path] + (["--flops"] if flops else [])
    env = dict(os.environ)
    if path == "naive":
        env["OOD_AUDIT_CPU_ALLOCATOR"] = "default"
    return _run(args, cmd, env, config, path)


def run_port_child(args, config: str, name: str, clone_dir: Path) -> dict:
    cmd = _child_cmd(args, config) + ["--port", name, "--port-dir", str(clone_dir)]
    # The port never loads ood_audit, so our allocator tuning cannot reach it; this makes
    # sure of it should that change.
    env = {**os.environ, "OOD_AUDIT_CPU_ALLOCATOR": "default"}
    return _run(args, cmd, env, config, f"port:{name}")


def add_ratios(rows: list[dict], stated: dict | None, flops: dict | None, peak_tflops: float | None) -> None:
    """Ratios on each row, in place: vs our naive path, vs each measured port (rows of ours
    only), vs the stated reference figures; achieved TFLOP/s from our FLOP count (the ports
    run the same convolutions, so it applies to them too)."""
    ok = [r for r in rows if "error" not in r]
    naive = next((r for r in ok if r["path"] == "naive"), None)
    ports = [r for r in ok if r["path"].startswith("port:")]
    for r in ok:
        ours = not r["path"].startswith("port:")
        for kind in ("score", "train"):
            speed = r[f"{kind}_images_per_s"]
            if stated:
                r[f"{kind}_vs_stated_reference"] = speed / stated[kind]
            if naive:
                r[f"{kind}_vs_naive"] = speed / naive[f"{kind}_images_per_s"]
            for p in ports if ours else ():
                r[f"{kind}_vs_port_{p['path'][len('port:'):]}"] = speed / p[f"{kind}_images_per_s"]
            if flops:  # the ports run the same convolutions: our count applies to them too
                r[f"{kind}_tflops"] = speed * flops[kind] / 1e12
                if peak_tflops:
                    r[f"{kind}_fraction_of_peak"] = r[f"{kind}_tflops"] / peak_tflops


def summary(config: str, rows: list[dict], stated: dict | None) -> str:
    """Readable lines for stderr: speeds, then each of our rows against ports and stated figures."""
    lines = [f"{config}: " + "; ".join(
        f"{r['path']} {r.get('score_images_per_s', float('nan')):.1f}/"
        f"{r.get('train_images_per_s', float('nan')):.1f} img/s" for r in rows) + " (score/train)"]
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['path']}: FAILED: {' '.join(r['error'])}")
            continue
        if r["path"].startswith("port:"):
            continue
        parts = [f"{r[f'score_vs_port_{p}']:.2f}x / {r[f'train_vs_port_{p}']:.2f}x port:{p}"
                 for p in (k[len("score_vs_port_"):] for k in r if k.startswith("score_vs_port_"))]
        if stated:
            parts.append(f"{r['score_vs_stated_reference']:.2f}x / {r['train_vs_stated_reference']:.2f}x "
                         f"stated reference ({stated['score']:g}/{stated['train']:g})")
        if parts:
            lines.append(f"  {r['path']}: " + "; ".join(parts))
    return "\n".join(lines)


def measure_config(args, config: str, paths: list[str], ports: dict[str, Path], peak: float | None) -> dict:
    """Every path of ours and every port on one config at the current batch sizes, with ratios."""
    rows = [run_child(args, config, path, flops=(path == "exact")) for path in paths]
    rows += [run_port_child(args, config, name, clone_dir) for name, clone_dir in ports.items()]
    exact = next((r for r in rows if r["path"] == "exact" and "error" not in r), None)
    stated = CONFIGS[config]["stated_reference"]
    flops = (exact or {}).get("flops_per_image")
    add_ratios(rows, stated, flops, peak)
    entry = {"config": config, **{k: v for k, v in CONFIGS[config].items() if k != "hidden"},
             "score_batch": args.score_batch, "train_batch": args.train_batch,
             "flops_per_image": flops, "paths": rows}
    if flops and stated:
        # The FLOP rate the stated figures imply for this model, and its share of the peak.
        entry["stated_reference_tflops"] = {k: stated[k] * flops[k] / 1e12 for k in ("score", "train")}
        if peak:
            entry["stated_reference_fraction_of_peak"] = {
                k: v / peak for k, v in entry["stated_reference_tflops"].items()}
    print(summary(f"{config} (batch {args.score_batch} score, {args.train_batch} train)", rows, stated),
          file=sys.stderr)
    if peak:
        print("  fraction of peak (score/train): " + "; ".join(
            f"{r['path']} {r['score_fraction_of_peak']:.2f}/{r['train_fraction_of_peak']:.2f}"
            for r in rows if "score_fraction_of_peak" in r) + "".join(
            f"; stated {v['score']:.2f}/{v['train']:.2f}" for v in [entry.get("stated_reference_fraction_of_peak")]
            if v), file=sys.stderr)
    return entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small-ref,standard-ref",
                    help=f"comma-separated: {', '.join(k for k, v in CONFIGS.items() if not v.get('hidden'))}")
    ap.add_argument("--paths", default=None, help="comma-separated paths (default: per device)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-batch", default="64",
                    help="training batch size; a comma list sweeps sizes, paired with --score-batch's")
    ap.add_argument("--score-batch", default="256",
                    help="scoring batch size; a comma list sweeps sizes (one value pairs with every "
                         "--train-batch value)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the chip's peak (TFLOP/s) for the achieved-FLOP-rate ratio "
                         "(default on CPU: this machine's float32 GEMM rate, measured first)")
    ap.add_argument("--child-timeout", type=float, default=900.0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in every child, ours and the ports' (default: torch's own)")
    ap.add_argument("--reference-port", action="append", default=[], metavar="NAME=DIR",
                    help=f"also measure a clone of a reference Glow port ({', '.join(PORTS)}) in the same "
                         "run, e.g. rosinality=./glow-pytorch (git clone https://github.com/rosinality/"
                         "glow-pytorch); repeatable")
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--port", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--port-dir", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--sgemm", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    try:
        train_bs = [int(v) for v in str(args.train_batch).split(",")]
        score_bs = [int(v) for v in str(args.score_batch).split(",")]
    except ValueError:
        ap.error("--train-batch and --score-batch take integers or comma lists of them")
    if min(train_bs + score_bs) < 1 or (len(train_bs) != len(score_bs) and 1 not in (len(train_bs), len(score_bs))):
        ap.error("--train-batch and --score-batch: positive sizes, lists of the same length (or one value)")
    n_pairs = max(len(train_bs), len(score_bs))
    batches = list(zip(train_bs * n_pairs if len(train_bs) == 1 else train_bs,
                       score_bs * n_pairs if len(score_bs) == 1 else score_bs, strict=True))
    args.train_batch, args.score_batch = batches[0]
    if args.child:
        try:
            print(json.dumps(sgemm_child(args) if args.sgemm else port_child(args) if args.port else child(args)))
        except PortError as exc:  # one line for the parent's error row
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        return
    unknown = [c for c in args.config.split(",") if c not in CONFIGS]
    if unknown:
        ap.error(f"unknown --config {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    ports: dict[str, Path] = {}
    for spec in args.reference_port:
        try:
            name, clone_dir = parse_reference_port(spec)
        except PortError as exc:
            ap.error(str(exc))
        if name in ports:
            ap.error(f"--reference-port {name} given twice")
        ports[name] = clone_dir

    import torch

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    paths = [p for p in (args.paths if args.paths is not None else DEFAULT_PATHS[device_type]).split(",") if p]
    report = {"device": args.device, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "batches": [{"train": t, "score": b} for t, b in batches],
              "repeats": args.repeats, "reference_ports": {k: str(v) for k, v in ports.items()},
              "loadavg_before": loadavg(), "results": []}
    peak = args.peak_tflops
    if peak is None and device_type == "cpu":
        # No stated peak on CPU: measure the GEMM rate, the ceiling of a conv-bound model.
        cmd = [sys.executable, __file__, "--child", "--sgemm"]
        cmd += ["--threads", str(args.threads)] if args.threads else []
        sgemm = _run(args, cmd, dict(os.environ), "sgemm", "sgemm")
        if "error" not in sgemm:
            peak = report["sgemm_tflops"] = sgemm["sgemm_tflops"]
            report["peak_tflops_source"] = "measured: torch.mm 2048x2048 float32, same threads"
    for config in args.config.split(","):
        for args.train_batch, args.score_batch in batches:
            report["results"].append(measure_config(args, config, paths, ports, peak))
    report["loadavg_after"] = loadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
