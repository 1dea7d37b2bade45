"""Images per second of likelihood regret (a VAE's encoder re-fit to each image, 100 Adam
steps as Xiao et al.'s code), the cost ``score --detector likelihood-regret`` adds.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/regret.py --batch 1,16,64 \\
        --run runs/vae --out benchmarks/regret_cpu.json

Times :func:`ood_audit.models.regret.likelihood_regret` on ``--images`` dequantized
FashionMNIST-shaped images (uniform pixels: the cost does not depend on them) in batches
of each size, with the VAE of ``--run`` (else a fresh ``--preset`` VAE: the same cost),
after one warm-up batch. Prints JSON (images/s per batch size, threads, load average
before and after, peak RSS); never assert on it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", default="1,16,64", help="comma list of batch sizes")
    ap.add_argument("--images", type=int, default=64, help="images timed per batch size")
    ap.add_argument("--run", default=None, help="a trained vae run (else a fresh model)")
    ap.add_argument("--preset", default="small")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from ood_audit.checkpoint import load_checkpoint
    from ood_audit.models.registry import build_model, resolve_model_config
    from ood_audit.models.regret import RefitSettings, likelihood_regret

    shape = (1, 28, 28)
    if args.run:
        model, _ = load_checkpoint(os.path.join(args.run, "model.safetensors"))
    else:
        config, _ = resolve_model_config("vae", args.preset, {}, shape)
        model = build_model("vae", config, shape)
    model.eval()
    settings = RefitSettings(steps=args.steps)
    x = torch.rand(args.images, *shape, generator=torch.Generator().manual_seed(0))
    load_before = os.getloadavg()
    rows = []
    for b in (int(s) for s in args.batch.split(",")):
        with torch.inference_mode():
            likelihood_regret(model, x[:b], list(range(b)), settings)  # warm-up
            t0 = time.perf_counter()
            for start in range(0, args.images, b):
                chunk = x[start:start + b]
                likelihood_regret(model, chunk, list(range(start, start + len(chunk))), settings)
            seconds = time.perf_counter() - t0
        rows.append({"batch": b, "images": args.images, "seconds": round(seconds, 2),
                     "images_per_s": round(args.images / seconds, 3)})
        print(json.dumps(rows[-1]), flush=True)
    out = {"model": args.run or f"vae {args.preset} (fresh)", "steps": args.steps,
           "threads": torch.get_num_threads(), "load_before": load_before,
           "load_after": os.getloadavg(),
           "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
           "rows": rows}
    text = json.dumps(out, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")


if __name__ == "__main__":
    main()
