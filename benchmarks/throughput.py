"""Training and scoring throughput of Glow's exact path, its naive baseline and each fast
path, against a reference PyTorch Glow port, as JSON.

    python benchmarks/throughput.py                          # both reference configs, CPU
    python benchmarks/throughput.py --config small-ref --paths naive,exact,channels_last
    python benchmarks/throughput.py --device cuda --peak-tflops 989   # + FLOP rate (H100/H200 bf16 dense)

Every (config, path) runs in its own child process, so each gets a clean peak RSS and
the naive path its own (untuned) allocator. Paths: ``naive`` (library convolutions, no
caches, glibc's default allocator: the code before the fast-path work), ``exact`` (the
default: caches, GEMM convolutions, allocator tuning; same function, float32) and the
opt-in fast paths of ``ood_audit/models/fastpath.py`` (``channels_last``, ``bf16``,
``compile``, ``tf32``; combine with ``+``). Random inputs stand in for data (speed does
not depend on pixel values).

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

#: The reference: a popular PyTorch Glow port on 2 CPU cores of the project's machines,
#: batch 256 (score) and 64 (train), in images/s.
CONFIGS = {
    "small-ref": {"shape": (1, 32, 32), "model_config": {"levels": 2, "steps": 8, "hidden": 128},
                  "reference": {"score": 630.0, "train": 180.0}},
    "standard-ref": {"shape": (3, 32, 32), "model_config": {"levels": 3, "steps": 32, "hidden": 512},
                     "reference": {"score": 24.0, "train": 7.0},
                     # ~10 s per timed batch on 2 cores: one timed call keeps the CPU run short
                     "max_repeats": 1},
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


def child(args) -> dict:
    """Measure one (config, path) in this process."""
    import torch

    from ood_audit.models.registry import build_model, resolve_model_config
    from ood_audit.training.trainer import pick_device

    spec = CONFIGS[args.config]
    shape = spec["shape"]
    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config, _ = resolve_model_config("glow", "small", dict(spec["model_config"]), shape)
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
        "train_images_per_s": args.train_batch / t_train,
        "score_images_per_s": args.score_batch / t_score,
        # ru_maxrss is KiB on Linux: the process's peak, over both measurements
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None,
    }
    if flops:
        out["flops_per_image"] = flops
    return out


def run_child(args, config: str, path: str, flops: bool) -> dict:
    repeats = args.repeats
    if args.device == "cpu" and CONFIGS[config].get("max_repeats"):
        repeats = min(repeats, CONFIGS[config]["max_repeats"])
    cmd = [sys.executable, __file__, "--child", "--config", config, "--path", path,
           "--device", args.device, "--train-batch", str(args.train_batch),
           "--score-batch", str(args.score_batch), "--repeats", str(repeats),
           "--warmup", str(args.warmup)] + (["--flops"] if flops else [])
    env = dict(os.environ)
    if path == "naive":
        env["OOD_AUDIT_CPU_ALLOCATOR"] = "default"
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.child_timeout)
    if proc.returncode != 0:
        return {"config": config, "path": path, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="small-ref,standard-ref",
                    help=f"comma-separated: {', '.join(CONFIGS)}")
    ap.add_argument("--paths", default=None, help="comma-separated paths (default: per device)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--score-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the chip's peak (TFLOP/s) for the achieved-FLOP-rate ratio")
    ap.add_argument("--child-timeout", type=float, default=900.0)
    ap.add_argument("--out", default=None, help="also write the JSON to this file")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--path", default="exact", help=argparse.SUPPRESS)
    ap.add_argument("--flops", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)))
        return

    import torch

    device_type = "cuda" if args.device.startswith("cuda") else "cpu"
    paths = (args.paths or DEFAULT_PATHS[device_type]).split(",")
    report = {"device": args.device, "torch": torch.__version__, "machine": platform.machine(),
              "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
              "train_batch": args.train_batch, "score_batch": args.score_batch,
              "repeats": args.repeats, "loadavg_before": loadavg(), "results": []}
    for config in args.config.split(","):
        rows = [run_child(args, config, path, flops=(path == "exact")) for path in paths]
        naive = next((r for r in rows if r["path"] == "naive" and "error" not in r), None)
        exact = next((r for r in rows if r["path"] == "exact" and "error" not in r), None)
        ref = CONFIGS[config]["reference"]
        flops = (exact or {}).get("flops_per_image")
        for r in rows:
            if "error" in r:
                continue
            for kind in ("score", "train"):
                speed = r[f"{kind}_images_per_s"]
                r[f"{kind}_vs_reference"] = speed / ref[kind]
                if naive:
                    r[f"{kind}_vs_naive"] = speed / naive[f"{kind}_images_per_s"]
                if flops:
                    r[f"{kind}_tflops"] = speed * flops[kind] / 1e12
                    if args.peak_tflops:
                        r[f"{kind}_fraction_of_peak"] = r[f"{kind}_tflops"] / args.peak_tflops
        report["results"].append({"config": config, **CONFIGS[config],
                                  "flops_per_image": flops, "paths": rows})
        print(f"{config}: " + "; ".join(
            f"{r['path']} {r.get('score_images_per_s', float('nan')):.1f}/"
            f"{r.get('train_images_per_s', float('nan')):.1f} img/s" for r in rows),
            file=sys.stderr)
    report["loadavg_after"] = loadavg()
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
