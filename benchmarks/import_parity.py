"""Does ``ood-audit import`` give a Glow port's own bits/dim? Train the port briefly with its
own code, save its checkpoint as its train.py does, import it with the CLI, score it, and
compare with the port's own evaluation of the same test images.

    python benchmarks/import_parity.py y0ast --port-dir ../Glow-PyTorch --data fashionmnist --out /tmp/p-y0
    python benchmarks/import_parity.py rosinality --port-dir ../glow-pytorch --data fashionmnist --out /tmp/p-ro

Measuring only: the port's ``model.py`` is imported from the clone (no port code lives here,
:mod:`reference_ports`). Its train.py is not run as a script (y0ast's needs ignite and
takes only cifar10/svhn; rosinality's reads an image folder at 64x64, RGB); its training
step is repeated here with the port's model, loss, optimiser and input convention
(k/256 - 0.5 plus U(0, 1/256), --n_bits 8), on the data set's own images (FashionMNIST's
28x28 fits both ports with 2 levels: 28 -> 14 -> 7). Printed, as JSON: the port's mean
bits/dim (its own forward, with its own uniform noise), the same on the exact images
``score`` dequantized, ours from the scores, and the differences.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import zlib
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_ports import load_model_module  # noqa: E402

from ood_audit.analysis.tables import load_run_scores  # noqa: E402
from ood_audit.data.registry import load_dataset  # noqa: E402
from ood_audit.runs import RunDir  # noqa: E402
from ood_audit.scoring.noise import dequantized_chunks  # noqa: E402


def _batches(images: torch.Tensor, batch: int, steps: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield images[torch.randint(len(images), (batch,), generator=g)]


def _port_input(k: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> the ports' k / 256 - 0.5 (their n_bits = 8 preprocessing)."""
    return k.float() / 256 - 0.5


def train_y0ast(m, images, out: Path, args) -> tuple[torch.nn.Module, list[str]]:
    """As y0ast's train.py: Glow(image_shape, hidden, K, L, ...), ActNorm init on
    n_init_batches, Adamax(lr, weight_decay=5e-5) at its first warm-up epoch's lr (lr / 5),
    loss = mean bits/dim; saves ``glow_model_N.pth`` and ``hparams.json``."""
    c, h, w = images.shape[1:]
    hp = {"K": args.K, "L": args.L, "hidden_channels": args.hidden, "actnorm_scale": 1.0,
          "flow_permutation": "invconv", "flow_coupling": "affine", "LU_decomposed": True,
          "learn_top": True, "y_condition": False, "y_weight": 0.01, "batch_size": args.batch,
          "lr": 5e-4, "warmup": 5, "n_init_batches": 8, "epochs": 1, "seed": args.seed,
          "dataset": args.data, "dataroot": "./", "download": False, "augment": False,
          "max_grad_clip": 0, "max_grad_norm": 0, "n_workers": 0, "eval_batch_size": 512,
          "cuda": False, "output_dir": str(out), "saved_model": "", "saved_optimizer": ""}
    torch.manual_seed(args.seed)
    net = m.Glow((h, w, c), hp["hidden_channels"], hp["K"], hp["L"], 1.0, "invconv", "affine",
                 True, 10, True, False)
    ckpt = out / f"glow_model_{args.steps}.pth"
    argv = ["y0ast", str(ckpt), "--hparams", str(out / "hparams.json")]
    if args.reuse and ckpt.exists():
        net.load_state_dict(torch.load(ckpt, weights_only=True))
        net.set_actnorm_init()  # its "inited" flag is not in the state dict
        return net.eval(), argv
    batches = _batches(images, args.batch, args.steps + 8, args.seed)
    net.train()
    with torch.no_grad():
        net(_port_input(torch.cat([next(batches) for _ in range(8)])), None)
    opt = torch.optim.Adamax(net.parameters(), lr=hp["lr"] / hp["warmup"], weight_decay=5e-5)
    losses = []
    for i, k in enumerate(batches):
        opt.zero_grad()
        _, nll, _ = net(_port_input(k), None)
        nll.mean().backward()
        opt.step()
        losses.append(float(nll.mean()))
        if i % 20 == 0:
            print(f"y0ast step {i}: {losses[-1]:.3f} bits/dim", file=sys.stderr)
    net.eval()
    torch.save(net.state_dict(), ckpt)
    (out / "hparams.json").write_text(json.dumps(hp, sort_keys=True, indent=4))
    return net, argv


def train_rosinality(m, images, out: Path, args) -> tuple[torch.nn.Module, list[str]]:
    """As rosinality's train.py (--n_bits 8, --affine): Glow(C, n_flow, n_block), the
    first batch for ActNorm init, Adam(lr=1e-4), its calc_loss; saves ``model_N.pt`` (the
    DataParallel state dict, ``module.`` keys). Its coupling width (512, not a flag) is set
    to --hidden through the class default, so a CPU can train it."""
    c = images.shape[1]
    m.AffineCoupling.__init__.__defaults__ = (args.hidden, True)
    torch.manual_seed(args.seed)
    net = torch.nn.DataParallel(m.Glow(c, args.K, args.L, affine=True, conv_lu=True))
    ckpt = out / f"model_{args.steps:06d}.pt"
    argv = ["rosinality", str(ckpt), "--n-flow", str(args.K), "--n-block", str(args.L), "--affine"]
    if args.reuse and ckpt.exists():
        net.load_state_dict(torch.load(ckpt, weights_only=True))
        return net.eval(), argv
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    losses = []
    d = math.prod(images.shape[1:])
    for i, k in enumerate(_batches(images, args.batch, args.steps + 1, args.seed)):
        x = _port_input(k) + torch.rand(k.shape) / 256
        if i == 0:
            with torch.no_grad():
                net.module(x)
            continue
        log_p, logdet, _ = net(x)
        loss = -(log_p + logdet.mean() - d * math.log(256)).mean() / (d * math.log(2))
        net.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        if i % 20 == 1:
            print(f"rosinality step {i}: {losses[-1]:.3f} bits/dim", file=sys.stderr)
    net.eval()
    torch.save(net.state_dict(), ckpt)
    return net, argv


@torch.no_grad()
def port_bpd(port: str, net, m, x: torch.Tensor, own_noise: bool) -> torch.Tensor:
    """The port's per-image bits/dim of ``x`` (dequantized, [0, 1)); ``own_noise``: of
    the pixels floor(256 x), through its own forward and its own U(0, 1/256) noise."""
    d = math.prod(x.shape[1:])
    out = []
    for chunk in x.split(500):
        if own_noise:
            k = torch.floor(chunk * 256)
            if port == "y0ast":
                out.append(net(_port_input(k), None)[1].double())
                continue
            chunk = (k + torch.rand(k.shape)) / 256
        if port == "y0ast":
            z, objective = net.flow(chunk - 0.5, logdet=torch.zeros(len(chunk)))
            mean, logs = net.prior(chunk)
            log_px = objective + m.gaussian_likelihood(mean, logs, z)
        else:
            log_p, logdet, _ = net.module(chunk - 0.5)
            log_px = log_p + logdet
        out.append(-(log_px.double() - d * math.log(256)) / (d * math.log(2)))
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("port", choices=("y0ast", "rosinality"))
    p.add_argument("--port-dir", type=Path, required=True)
    p.add_argument("--data", default="fashionmnist")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--K", type=int, default=4)
    p.add_argument("--L", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--limit", type=int, default=2000, help="test images scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reuse", action="store_true",
                   help="use the checkpoint and scores already in --out (compare again only)")
    args = p.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=args.reuse)
    m = load_model_module(args.port, args.port_dir)
    train = load_dataset(args.data, "train", limit=20000).images
    net, argv = (train_y0ast if args.port == "y0ast" else train_rosinality)(m, train, args.out, args)
    run = args.out / "run"
    cli = [sys.executable, "-m", "ood_audit"]
    if not (args.reuse and (run / "scores").is_dir()):
        subprocess.run([*cli, "import", *argv, "--data", args.data, "--out", str(run)], check=True)
        subprocess.run([*cli, "score", str(run), "--ood", "noise-uniform", "--limit",
                        str(args.limit), "--train-limit", "0"], check=True)
    df, _ = load_run_scores(RunDir(run))
    ours = df[(df["dataset"] == args.data) & (df["split"] == "test") & (df["transform"] == "none")]
    ours = torch.tensor(ours.sort_values("index")["bpd"].to_numpy())
    images = load_dataset(args.data, "test", limit=args.limit).images
    key = zlib.crc32(f"{args.data}|test|none".encode())
    x = torch.cat([c for _, c in dequantized_chunks(images, 0, key)])
    torch.manual_seed(args.seed)
    same = port_bpd(args.port, net, m, x, own_noise=False)
    own = port_bpd(args.port, net, m, x, own_noise=True)
    print(json.dumps({
        "port": args.port, "data": args.data, "images": len(x), "train_steps": args.steps,
        "ours_mean_bpd": round(float(ours.mean()), 5),
        "port_mean_bpd_own_noise": round(float(own.mean()), 5),
        "port_mean_bpd_same_x": round(float(same.mean()), 5),
        "mean_diff_own_noise": round(float(ours.mean() - own.mean()), 5),
        "max_abs_diff_same_x": float((ours - same).abs().max()),
    }, indent=2))


if __name__ == "__main__":
    main()
