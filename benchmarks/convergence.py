"""Time to quality: test bits/dim against training wall time, ours vs Glow and PixelCNN++ ports.

    python benchmarks/convergence.py --port y0ast=../Glow-PyTorch --port rosinality=../glow-pytorch
    python benchmarks/convergence.py --family pixelcnn --port pclucas14=../pixel-cnn-pp
    python benchmarks/convergence.py --seeds 0 --epochs 1 --limit 3000        # a quick look

The family is the ``--config``'s model (``glow``/``glow-cv`` or ``pixelcnn``); ``--family``
alone picks its default config: ``examples/demo.yaml`` (the ``make demo`` budget) for
Glow, ``benchmarks/pixelcnn_tiny.yaml`` (the README's PixelCNN++ budget) for PixelCNN++.
Ports of another family than the config's are refused.

Every implementation trains on the same images, in the same batches, with the same
dequantization noise, the same ActNorm init batch (Glow), optimiser (Adam), learning
rate, warm-up and gradient clip (on the bits/dim loss), for each seed, each
(implementation, seed) in its own child process with the same threads. Ours trains
through the library's own :class:`~ood_audit.training.trainer.Trainer` with the options
of ``--config`` as shipped; the ports get the same hyper-parameters and sizes in a plain
loop around their own modules (``reference_ports.py``; their code is never part of this
repository). PixelCNN++ ports see the pixels k of the same images on their own scale
(2k/255 - 1) and train on their own loss (a batch sum of -log P(k) in nats) divided by
B D ln 2: bits/dim.

Test bits/dim (the first ``--test-limit`` test images, fixed noise) is measured every
``--eval-every`` steps; the clock counts training steps only, never evaluation. Reported:
(a) the final bits/dim, mean +- sd over seeds, and (b) the wall time ours needs to reach
each port's final mean (linear between evaluations), as a fraction of the port's time.
The last step is always evaluated. Also a parity line per port: its trained weights
converted to ours (Glow: ``ood_audit/models/glow_convert.py``; PixelCNN++:
``reference_ports.pixelcnn_state_from_pclucas14``) give the same log p(x) on the same
images, which checks that both compute the same function (architecture and likelihood).

Output: JSON (``--out``), a PNG of bits/dim against wall time (``--png``), a table on
stdout. Timings on shared machines are noisy: compare within one run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from reference_ports import PORTS_BY_FAMILY, PortError, check_clone, pixelcnn_state_from_pclucas14  # noqa: E402

#: model (a config's ``model``) -> the family whose ports it is compared with
FAMILY_OF_MODEL = {"glow": "glow", "glow-cv": "glow", "pixelcnn": "pixelcnn"}
#: family -> the config a bare ``--family`` trains (the README's budget for it)
DEFAULT_CONFIG = {"glow": ROOT / "examples" / "demo.yaml",
                  "pixelcnn": ROOT / "benchmarks" / "pixelcnn_tiny.yaml"}


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


# ---------------------------------------------------------------- child processes
class Clock:
    """Training wall time: running only between ``start`` and ``stop``."""

    def __init__(self) -> None:
        self.total, self._t0 = 0.0, None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        if self._t0 is not None:
            self.total += time.perf_counter() - self._t0
            self._t0 = None


def _setup(args):
    """Threads, the run config as shipped (seed set), the data sets."""
    import torch

    from ood_audit.data import load_dataset
    from ood_audit.training.run import load_run_config

    torch.set_num_threads(args.threads)
    config = load_run_config(Path(args.config))
    config.train.seed = args.seed
    config.train.device = "cpu"
    for key in ("epochs", "limit", "test_limit"):
        value = getattr(args, key)
        if value is not None:
            setattr(config.train, key, value)
    train = load_dataset(config.data, "train", limit=config.train.limit)
    test = load_dataset(config.data, "test", limit=config.train.test_limit)
    return config, train, test


def ours_child(args) -> dict:
    """Our Trainer, as ``ood-audit train`` runs it; evaluation every ``eval_every`` steps
    from the progress callback, off the clock."""
    import tempfile

    import torch

    from ood_audit.models.registry import build_model, resolve_model_config
    from ood_audit.runs import RunDir
    from ood_audit.training.run import apply_fast_paths
    from ood_audit.training.trainer import Trainer, TrainProgress, evaluate_bpd

    config, train, test = _setup(args)
    model_config, _ = resolve_model_config(config.model, config.preset, config.model_config, train.shape)
    torch.manual_seed(config.train.seed)
    model = build_model(config.model, model_config, train.shape)
    apply_fast_paths(model, config.model, config.train.fast_path)
    clock, curve = Clock(), []
    device = torch.device("cpu")
    total_steps = math.ceil(len(train) / config.train.batch_size) * config.train.epochs
    eval_every = args.eval_every or default_eval_every(total_steps)

    class Progress(TrainProgress):
        step = 0

        def epoch_start(self, epoch, epochs, n_batches, start_batch):
            clock.start()

        def batch(self, batch, train_bpd, images_per_s, clipped_frac=0.0):
            clock.stop()
            self.step += 1
            if self.step % eval_every == 0 or self.step == total_steps:
                bpd = evaluate_bpd(trainer.averaged, test.images, config.train.batch_size * 2,
                                   device, config.train.seed)
                trainer.model.train()
                curve.append({"step": self.step, "seconds": clock.total, "test_bpd": bpd})
            clock.start()

        def epoch_end(self, result):
            pass

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model, config.model, model_config, config, RunDir(Path(tmp)), train, test,
                          device, progress=Progress())
        trainer.data_init()
        results = trainer.fit()
    clipped = [r.clipped_frac for r in results]
    return {"impl": "ours", "seed": args.seed, "curve": curve, "train_seconds": clock.total,
            "clipped_frac": clipped, "model_config": {**vars(model_config)},
            "n_params": sum(p.numel() for p in model.parameters()),
            "train": {k: v for k, v in vars(config.train).items() if k != "fast_path"}}


def default_eval_every(total_steps: int) -> int:
    """About eight evaluations over the run (the last step is always one)."""
    return max(1, math.ceil(total_steps / 8))


def port_child(args) -> dict:
    """A port trained with our batches, noise, init batch, Adam, warm-up and clip."""
    import torch

    from ood_audit.data import dequantize
    from ood_audit.errors import UserError
    from ood_audit.seeds import seeded

    config, train, test = _setup(args)
    cfg = config.train
    family = FAMILY_OF_MODEL[config.model]
    model_config = _model_sizes(config, train.shape)
    torch.manual_seed(cfg.seed)
    port = PORTS_BY_FAMILY[family][args.port](Path(args.port_dir), train.shape, seed=cfg.seed, **model_config)
    model, dims = port.model, math.prod(train.shape)
    model.train()
    if family == "glow":
        # The same data-dependent init batch as Trainer.data_init (the adapter's own random
        # init batch is overwritten: ActNorm initialises once, on the first forward).
        _reset_actnorm(model)
        n = min(len(train), max(cfg.batch_size, 256))
        idx = torch.randperm(len(train), generator=seeded(cfg.seed, -1))[:n]
        with torch.no_grad():
            port.log_px(port.prepare(dequantize(train.images[idx], seeded(cfg.seed, -2))))
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    warmup = max(cfg.warmup_steps, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warmup))

    def test_bpd() -> float:
        model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for b, start in enumerate(range(0, len(test), cfg.batch_size * 2)):
                x = dequantize(test.images[start:start + cfg.batch_size * 2], seeded(cfg.seed, 10**6, b))
                log_px = port.log_px(port.prepare(x))
                total += float((-(log_px - dims * math.log(256)) / (dims * math.log(2))).double().sum())
                count += len(x)
        model.train()
        return total / count

    clock, curve, step, clipped = Clock(), [], 0, []
    n_batches = math.ceil(len(train) / cfg.batch_size)
    total_steps = n_batches * cfg.epochs
    eval_every = args.eval_every or default_eval_every(total_steps)
    for epoch in range(cfg.epochs):
        perm = torch.randperm(len(train), generator=seeded(cfg.seed, epoch))
        clipped_steps = 0
        clock.start()
        for b in range(n_batches):
            x = dequantize(train.images[perm[b * cfg.batch_size:(b + 1) * cfg.batch_size]],
                           seeded(cfg.seed, epoch, b))
            opt.zero_grad(set_to_none=True)
            loss = port.train_loss_bpd(port.prepare(x))
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            clipped_steps += bool(norm > cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            if step % eval_every == 0 or step == total_steps:
                clock.stop()
                curve.append({"step": step, "seconds": clock.total, "test_bpd": test_bpd()})
                clock.start()
        clock.stop()
        clipped.append(clipped_steps / n_batches)
    row = {"impl": args.port, "seed": args.seed, "curve": curve, "train_seconds": clock.total,
           "clipped_frac": clipped, "n_params": sum(p.numel() for p in model.parameters())}
    try:
        row["parity_max_rel"] = _parity(args.port, port, model_config, train.shape, test, cfg.seed)
    except (KeyError, RuntimeError, ValueError, UserError) as exc:  # a state dict we cannot convert
        row["parity_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    return row


def _model_sizes(config, shape) -> dict:
    """The port's size arguments from our resolved model config (preset, overrides, fitted
    to the input shape), so both build the same network."""
    from ood_audit.models.registry import resolve_model_config

    sizes, _ = resolve_model_config(config.model, config.preset, config.model_config, shape)
    if FAMILY_OF_MODEL[config.model] == "glow":
        return {"levels": sizes.levels, "steps": sizes.steps, "hidden": sizes.hidden}
    if sizes.resolutions != 3:  # the port's three resolutions are fixed
        raise PortError(f"the PixelCNN++ ports have 3 resolutions, {config.model} has "
                        f"{sizes.resolutions} for {tuple(shape)}: use H, W divisible by 4")
    return {"filters": sizes.filters, "n_resnet": sizes.n_resnet, "n_mix": sizes.n_mix,
            "dropout": sizes.dropout}


def _reset_actnorm(model) -> None:
    """Mark every ActNorm of a port uninitialised, so its next forward initialises it."""
    import torch

    for module in model.modules():
        if hasattr(module, "inited"):  # y0ast
            module.inited = False
        init = getattr(module, "initialized", None)  # rosinality (a uint8 buffer)
        if isinstance(init, torch.Tensor) and hasattr(module, "loc"):
            init.fill_(0)


def _parity(name: str, port, sizes: dict, shape, test, seed: int) -> float:
    """Max relative |log p(x) ours - port| on 128 test images, the port's trained weights
    converted to our model."""
    import torch

    from ood_audit.data import dequantize
    from ood_audit.seeds import seeded

    model = _converted(name, port.model.state_dict(), sizes, shape)
    model.eval()
    port.model.eval()
    x = dequantize(test.images[:128], seeded(seed, 123))
    with torch.no_grad():
        ref, got = port.log_px(port.prepare(x)).double(), model.log_prob(x).double()
    return float(((got - ref).abs() / ref.abs()).max())


def _converted(name: str, state: dict, sizes: dict, shape):
    """Our model holding a port's weights (the port's state dict converted)."""
    if name == "pclucas14":
        from ood_audit.models.pixelcnn import PixelCNN, PixelCNNConfig

        model = PixelCNN(PixelCNNConfig(**sizes, resolutions=3), shape)
        model.load_state_dict(pixelcnn_state_from_pclucas14(state))
        return model
    from ood_audit.models.glow import Glow
    from ood_audit.models.glow_convert import from_rosinality, from_y0ast

    if name == "y0ast":
        hparams = {"K": sizes["steps"], "L": sizes["levels"], "hidden_channels": sizes["hidden"],
                   "flow_coupling": "affine", "flow_permutation": "invconv", "LU_decomposed": True,
                   "learn_top": True, "y_condition": False}
        config, ours = from_y0ast(state, hparams, shape)
    else:
        config, ours = from_rosinality(state, n_flow=sizes["steps"], n_block=sizes["levels"],
                                       affine=True, lu=True, input_shape=shape)
    model = Glow(config, shape)
    model.load_state_dict(ours)
    return model


# ------------------------------------------------------------------------ parent
def run_child(args, impl: str, seed: int, port_dir: Path | None) -> dict:
    cmd = [sys.executable, __file__, "--child", impl, "--seed", str(seed), "--config", args.config,
           "--threads", str(args.threads)]
    if args.eval_every:
        cmd += ["--eval-every", str(args.eval_every)]
    for key in ("epochs", "limit", "test_limit"):
        if getattr(args, key) is not None:
            cmd += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
    if port_dir is not None:
        cmd += ["--port-dir", str(port_dir)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-3:]
        raise SystemExit(f"{impl} seed {seed} failed: {' | '.join(tail)}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    row["process_seconds"] = time.perf_counter() - t0
    return row


def mean_curve(rows: list[dict]) -> list[dict]:
    """Mean (and sd) over seeds of bits/dim and seconds at each evaluated step."""
    steps = sorted({p["step"] for r in rows for p in r["curve"]})
    out = []
    for step in steps:
        pts = [p for r in rows for p in r["curve"] if p["step"] == step]
        if len(pts) != len(rows):
            continue
        bpd = [p["test_bpd"] for p in pts]
        out.append({"step": step, "seconds": statistics.fmean(p["seconds"] for p in pts),
                    "test_bpd": statistics.fmean(bpd),
                    "test_bpd_sd": statistics.stdev(bpd) if len(bpd) > 1 else 0.0})
    return out


def time_to_reach(curve: list[dict], target: float) -> float | None:
    """Seconds at which a mean curve first reaches ``target`` bits/dim (linear between
    evaluations, from (0 s, the first value)); None if it never does."""
    prev_t, prev_b = 0.0, None
    for p in curve:
        if p["test_bpd"] <= target:
            if prev_b is None or prev_b == p["test_bpd"]:
                return p["seconds"]
            frac = (prev_b - target) / (prev_b - p["test_bpd"])
            return prev_t + frac * (p["seconds"] - prev_t)
        prev_t, prev_b = p["seconds"], p["test_bpd"]
    return None


def summarise(by_impl: dict[str, list[dict]]) -> dict:
    summary = {}
    for impl, rows in by_impl.items():
        finals = [r["curve"][-1]["test_bpd"] for r in rows]
        summary[impl] = {
            "final_bpd_mean": statistics.fmean(finals),
            "final_bpd_sd": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "final_bpd": finals,
            "train_seconds_mean": statistics.fmean(r["train_seconds"] for r in rows),
            "curve": mean_curve(rows),
        }
        parity = [r["parity_max_rel"] for r in rows if "parity_max_rel" in r]
        if parity:
            summary[impl]["parity_max_rel"] = max(parity)
        errors = [r["parity_error"] for r in rows if "parity_error" in r]
        if errors:
            summary[impl]["parity_error"] = errors[0]
    ours = summary.get("ours")
    for impl, s in summary.items():
        if impl == "ours" or ours is None:
            continue
        t = time_to_reach(ours["curve"], s["final_bpd_mean"])
        s["ours_seconds_to_port_final"] = t
        s["time_to_quality_ratio"] = None if t is None else t / s["train_seconds_mean"]
        s["ours_minus_port_bpd"] = ours["final_bpd_mean"] - s["final_bpd_mean"]
    return summary


def plot(summary: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for impl, s in summary.items():
        t = [p["seconds"] for p in s["curve"]]
        m = [p["test_bpd"] for p in s["curve"]]
        sd = [p["test_bpd_sd"] for p in s["curve"]]
        line, = ax.plot(t, m, marker="o", ms=3, label=f"{impl}: {s['final_bpd_mean']:.3f}")
        ax.fill_between(t, [a - b for a, b in zip(m, sd, strict=True)], [a + b for a, b in zip(m, sd, strict=True)],
                        color=line.get_color(), alpha=0.15)
    ax.set_xlabel("training wall time (s, evaluation excluded)")
    ax.set_ylabel("test bits/dim (mean +- sd over seeds)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(summary: dict) -> str:
    lines = ["| implementation | test bits/dim (mean +- sd) | per seed | training s | "
             "ours reaches its final in | parity |", "|---|---|---|---|---|---|"]
    for impl, s in summary.items():
        ratio = s.get("time_to_quality_ratio")
        reach = ("" if impl == "ours" else "never" if ratio is None
                 else f"{s['ours_seconds_to_port_final']:.0f} s = **{ratio:.2f}x** its time")
        parity = (f"failed: {s['parity_error']}" if "parity_error" in s
                  else f"{s['parity_max_rel']:.1e}" if "parity_max_rel" in s else "")
        per_seed = " / ".join(f"{b:.3f}" for b in s["final_bpd"])
        lines.append(f"| {impl} | {s['final_bpd_mean']:.3f} +- {s['final_bpd_sd']:.3f} | {per_seed} | "
                     f"{s['train_seconds_mean']:.0f} | {reach} | {parity} |")
    return "\n".join(lines)


def resolve_family(config: str | None, family: str | None) -> tuple[str, str]:
    """(config path, family): the config's model decides; ``family`` alone picks its default
    config; both must agree. A PortError (one line) otherwise."""
    if config is None:
        family = family or "glow"
        return str(DEFAULT_CONFIG[family]), family
    from ood_audit.errors import UserError
    from ood_audit.training.run import load_run_config

    try:
        model = load_run_config(Path(config)).model
    except UserError as exc:
        raise PortError(str(exc)) from None
    if model not in FAMILY_OF_MODEL:
        raise PortError(f"{config} trains {model!r}: no reference ports for it; convergence.py "
                        f"compares {', '.join(FAMILY_OF_MODEL)}")
    if family is not None and FAMILY_OF_MODEL[model] != family:
        raise PortError(f"--family {family}, but {config} trains {model!r} "
                        f"({FAMILY_OF_MODEL[model]}): drop one of them")
    return config, FAMILY_OF_MODEL[model]


def parse_ports(specs: list[str], family: str) -> dict[str, Path]:
    """``NAME=DIR`` specs -> {name: clone dir}; each a port of ``family`` whose clone exists."""
    ports = {}
    for spec in specs:
        name, _, directory = spec.partition("=")
        if not directory:
            raise PortError(f"--port wants NAME=DIR, got {spec!r}")
        if name not in PORTS_BY_FAMILY[family]:
            other = [f for f, p in PORTS_BY_FAMILY.items() if name in p]
            why = f"a {other[0]} port" if other else "unknown"
            raise PortError(f"--port {name}: {why}; the config trains {family}, whose ports are "
                            f"{', '.join(PORTS_BY_FAMILY[family])}")
        check_clone(name, Path(directory))
        ports[name] = Path(directory).resolve()
    return ports


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", help="ood-audit train config; its model gives the family (default: the "
                    "family's, " + ", ".join(f"{f}: {p.relative_to(ROOT)}" for f, p in DEFAULT_CONFIG.items())
                    + ")")
    ap.add_argument("--family", choices=list(DEFAULT_CONFIG),
                    help="the model family to compare (default: the --config's model's, else glow)")
    ports_help = "; ".join(f"{f}: {', '.join(p)}" for f, p in PORTS_BY_FAMILY.items())
    ap.add_argument("--port", action="append", default=[], metavar="NAME=DIR",
                    help=f"a clone of a port of the family to train alike; NAME in {ports_help}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, help="override the config's epochs")
    ap.add_argument("--limit", type=int, help="override the config's training images")
    ap.add_argument("--test-limit", type=int, help="override the config's test images")
    ap.add_argument("--eval-every", type=int, help="steps between test evaluations (default: about 8 "
                    "per run; the last step is always evaluated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="JSON (default: benchmarks/convergence[_FAMILY].json)")
    ap.add_argument("--png", help="plot (default: the --out name with .png)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port-dir", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child:
        args.port = args.child
        row = ours_child(args) if args.child == "ours" else port_child(args)
        print(json.dumps(row))
        return

    try:
        args.config, family = resolve_family(args.config, args.family)
        ports = parse_ports(args.port, family)
    except PortError as exc:
        raise SystemExit(f"error: {exc}") from None
    suffix = "" if family == "glow" else f"_{family}"
    args.out = args.out or str(ROOT / "benchmarks" / f"convergence{suffix}.json")
    args.png = args.png or str(Path(args.out).with_suffix(".png"))
    seeds = [int(s) for s in args.seeds.split(",")]
    load_before = loadavg()
    by_impl: dict[str, list[dict]] = {"ours": [], **{name: [] for name in ports}}
    # Seed-major order: each seed runs every implementation back to back, so a change in
    # the machine's load during the benchmark falls on all of them alike.
    for seed in seeds:
        for impl, directory in [("ours", None), *ports.items()]:
            row = run_child(args, impl, seed, directory)
            by_impl[impl].append(row)
            print(f"{impl} seed {seed}: test bits/dim {row['curve'][-1]['test_bpd']:.4f} after "
                  f"{row['train_seconds']:.0f} s of training", file=sys.stderr, flush=True)
    summary = summarise(by_impl)
    result = {"config": args.config, "family": family, "seeds": seeds, "threads": args.threads,
              "eval_every": args.eval_every, "loadavg_before": load_before, "loadavg_after": loadavg(),
              "summary": summary, "runs": by_impl}
    Path(args.out).write_text(json.dumps(result, indent=1))
    plot(summary, Path(args.png), f"{Path(args.config).name}, seeds {args.seeds}, {args.threads} threads")
    print(table(summary))


if __name__ == "__main__":
    main()
