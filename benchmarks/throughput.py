"""Training and scoring throughput (images/s) of a model preset, as JSON.

    python benchmarks/throughput.py --model glow --preset small --shape 1,28,28 \
        --train-batch 64 --score-batch 256 --device cpu

Timings are noisy on shared machines: compare ratios measured in one run, never assert
on absolute numbers. Random uniform inputs stand in for data (speed does not depend on
pixel values).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch

from ood_audit.models.registry import build_model, resolve_model_config
from ood_audit.training.trainer import pick_device


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
    times.sort()
    return times[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="glow")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--shape", default="1,28,28", help="C,H,W")
    ap.add_argument("--train-batch", type=int, default=64)
    ap.add_argument("--score-batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--override", default="", help="model_config overrides: k=v,k=v")
    args = ap.parse_args()

    shape = tuple(int(v) for v in args.shape.split(","))
    overrides = {}
    for item in filter(None, args.override.split(",")):
        k, v = item.split("=")
        overrides[k] = int(v) if v.isdigit() else v
    device = pick_device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config, _ = resolve_model_config(args.model, args.preset, overrides, shape)
    torch.manual_seed(0)
    model = build_model(args.model, config, shape).to(device)
    model.data_init(torch.rand(args.train_batch, *shape, device=device))
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xt = torch.rand(args.train_batch, *shape, device=device)
    xs = torch.rand(args.score_batch, *shape, device=device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        model.training_loss(xt).mean().backward()
        opt.step()

    def score_step():
        with torch.inference_mode():
            model.log_prob(xs)

    model.train()
    t_train = measure(train_step, 2, args.repeats, sync)
    model.eval()
    t_score = measure(score_step, 1, args.repeats, sync)
    print(json.dumps({
        "model": args.model, "preset": args.preset, "config": config.__dict__,
        "shape": list(shape), "device": str(device), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "machine": platform.machine(),
        "params": sum(p.numel() for p in model.parameters()),
        "train_batch": args.train_batch, "train_images_per_s": args.train_batch / t_train,
        "score_batch": args.score_batch, "score_images_per_s": args.score_batch / t_score,
        "peak_cuda_mb": (torch.cuda.max_memory_allocated() / 2**20) if device.type == "cuda" else None,
    }, indent=2))


if __name__ == "__main__":
    main()
