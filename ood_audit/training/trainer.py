"""The training loop: Adam with warm-up, gradient clipping, a NaN guard, per-epoch
checkpoints, and an exact resume.

Determinism: the data order of epoch ``e`` and the dequantization noise of batch ``b``
come from generators seeded by (seed, e) and (seed, e, b), not from a global RNG, so a
run resumed at (e, b) replays exactly the batches an uninterrupted run would have seen.
A background model (``perturb_mu > 0``) draws its pixel perturbations the same way,
from (seed, e, b, PERTURB_KEY).

Under ``torchrun`` (a :class:`~ood_audit.distributed.DistContext` with ``world > 1``) the
global batch stays the one above and each rank trains on its contiguous slice of it with
DistributedDataParallel (see :mod:`.ddp`); rank 0 alone writes files.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import signal
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ..checkpoint import link_or_copy, save_checkpoint
from ..config import RunConfig, keep_every
from ..data.images import ImageSet
from ..data.preprocess import bits_per_dim, dequantize
from ..distributed import DistContext
from ..errors import Interrupted, UserError
from ..models.base import DensityModel
from ..runs import RunDir, atomic_path
from ..seeds import seeded
from .ddp import rank_slice, step_stats, wrap_ddp
from .layout import align_optimizer_state

#: Extra seed part of the pixel-perturbation stream (kept apart from the dequantization noise).
PERTURB_KEY = 7_919
#: Extra seed part of a rank's global RNG under DDP, reseeded each step (VAE sampling, dropout).
RANK_RNG_KEY = 104_729


def perturb_pixels(images: torch.Tensor, mu: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 ``[B, C, H, W]`` with each pixel replaced, with probability ``mu``, by a value
    drawn uniformly from 0..255 (Ren et al. 2019's input perturbation for the background
    model of the likelihood ratio). Returns a new tensor; ``images`` is not modified."""
    replace = torch.rand(images.shape, generator=generator) < mu
    noise = torch.randint(0, 256, images.shape, generator=generator, dtype=torch.uint8)
    return torch.where(replace.to(images.device), noise.to(images.device), images)


class TrainingDiverged(UserError):
    """Too many consecutive non-finite steps: stop and keep the last good checkpoint."""


@dataclass
class EpochResult:
    epoch: int
    step: int
    train_bpd: float
    test_bpd: float
    seconds: float
    images_per_s: float
    nan_skips: int
    lr: float
    clipped_frac: float = 0.0  # share of this epoch's steps whose gradient norm was clipped


@dataclass
class TrainState:
    """Where training is: the next (epoch, batch) to run, and counters."""

    epoch: int = 0
    batch: int = 0
    step: int = 0
    nan_skips: int = 0
    bad_run: int = 0  # consecutive non-finite steps so far (across epoch ends)
    history: list[dict] = field(default_factory=list)


class TrainProgress:
    """Progress callbacks the CLI implements; the defaults stay silent."""

    def epoch_start(self, epoch: int, epochs: int, n_batches: int, start_batch: int) -> None:
        """Epoch ``epoch`` (0-based) starts at ``start_batch`` (non-zero after a resume)."""

    def batch(self, batch: int, train_bpd: float, images_per_s: float,
              clipped_frac: float = 0.0) -> None:
        """Batch ``batch`` (1-based) of the current epoch is done; ``clipped_frac`` is the
        share of the epoch's steps so far whose gradient was clipped."""

    def epoch_end(self, result: EpochResult) -> None:
        """An epoch finished and its checkpoint is on disk."""


class StopFlag:
    """Set by SIGINT/SIGTERM so the loop can save and stop between steps."""

    def __init__(self) -> None:
        self.signal: str | None = None
        self._old: dict[int, object] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no signal handling
                pass
        return self

    def _handle(self, signum, frame) -> None:  # noqa: ANN001
        if self.signal is not None:  # second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)  # type: ignore[arg-type]


@torch.no_grad()
def evaluate_bpd(model: DensityModel, images: torch.Tensor, batch_size: int,
                 device: torch.device, seed: int, dist: DistContext | None = None) -> float:
    """Mean bits/dim of ``images`` (uint8) with fixed dequantization noise.

    Under DDP rank r scores batches r, r + world, ... (same batches, same noise as one
    process) and the sums are all-reduced, so every rank gets the same number."""
    model.eval()
    n_dims = math.prod(images.shape[1:])
    rank, world = (dist.rank, dist.world) if dist is not None else (0, 1)
    total, count = 0.0, 0
    for b, start in enumerate(range(0, len(images), batch_size)):
        if b % world != rank:
            continue
        x = dequantize(images[start:start + batch_size], seeded(seed, 10**6, b)).to(device)
        total += float(bits_per_dim(model.log_prob(x), n_dims).double().sum())
        count += len(x)
    if world > 1:
        sums = dist.all_reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=dist.device))
        total, count = float(sums[0]), int(sums[1])
    return total / max(count, 1)


class Trainer:
    """Trains one model on one ImageSet, writing checkpoints into a run directory."""

    def __init__(self, model: DensityModel, model_name: str, model_config, run: RunConfig,
                 rd: RunDir, train_set: ImageSet, test_set: ImageSet, device: torch.device,
                 progress: TrainProgress | None = None, dist: DistContext | None = None):
        self.model, self.model_name, self.model_config = model, model_name, model_config
        self.run, self.cfg, self.rd = run, run.train, rd
        self.train_set, self.test_set, self.device = train_set, test_set, device
        self.dist = dist or DistContext(device=device)
        if self.cfg.batch_size % self.dist.world:
            raise UserError(f"--batch-size {self.cfg.batch_size} is the global batch and must be "
                            f"divisible by the {self.dist.world} ranks (torchrun --nproc_per_node "
                            "x nodes); pick a multiple")
        # Other ranks stay quiet: rank 0 shows progress and writes every file.
        self.progress = (progress if self.dist.is_main else None) or TrainProgress()
        self._ddp: torch.nn.Module | None = None  # built in fit(), after init or resume
        self.n_dims = math.prod(train_set.shape)
        # The loss is minimised and clipped on cfg.loss_scale; progress and metrics report
        # bits/dim whatever it is.
        self.loss_factor = (1.0 / (self.n_dims * math.log(2.0))
                            if self.cfg.loss_scale == "bits_per_dim" else 1.0)
        # fused: one kernel over all parameters instead of ~10 small ops per tensor (Adam's
        # step cost 2-4x less on CPU); the same update up to float rounding.
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=self.cfg.lr, weight_decay=self.cfg.weight_decay,
            fused=device.type in ("cpu", "cuda"),
        )
        warmup = max(self.cfg.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: min(1.0, (step + 1) / warmup)
        )
        self.state = TrainState()
        # Polyak averaging (openai/glow's optim.polyak): the averaged copy is what epochs
        # evaluate and checkpoints hold; the raw weights go on training.
        self.ema: AveragedModel | None = None
        if self.cfg.ema_decay > 0:
            self.ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(self.cfg.ema_decay))

    @property
    def averaged(self) -> DensityModel:
        """The model epochs evaluate and checkpoint: the Polyak average, or the model."""
        return self.ema.module if self.ema is not None else self.model

    # ----------------------------------------------------------------- state
    def save_state(self) -> None:
        """Weights, optimizer, scheduler, global RNG and loop position, atomically.

        With the (seed, epoch, batch)-seeded data order and noise, this is all a resume
        needs to continue the same trajectory; the global RNG matters to models that
        sample in their loss (the VAE's reparameterisation, PixelCNN++'s dropout). Only
        rank 0 writes; under DDP each rank reseeds its RNG per step, so no rank's is needed.
        """
        if not self.dist.is_main:
            return
        payload = {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "model": self.model.state_dict(),
            **({"ema": self.ema.state_dict()} if self.ema is not None else {}),
            "state": dataclasses.asdict(self.state),
            "rng": {"torch": torch.get_rng_state()},
        }
        if self.device.type == "cuda":
            payload["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        with atomic_path(self.rd.train_state) as tmp, open(tmp, "wb") as fh:
            torch.save(payload, fh)  # a file, not a path: a full disk's OSError stays in the chain

    def load_state(self) -> None:
        """Restore what :meth:`save_state` wrote; a damaged or foreign file is one UserError."""
        path = self.rd.train_state
        try:
            payload = torch.load(path, map_location=self.device, weights_only=True)
            if not isinstance(payload, dict):
                raise TypeError(f"holds a {type(payload).__name__}, not a training state")
            self.model.load_state_dict(payload["model"])
            if self.ema is not None:
                self.ema.load_state_dict(payload["ema"])
            self.optimizer.load_state_dict(payload["optimizer"])
            align_optimizer_state(self.optimizer)  # a DDP run saved channels-last moments
            self.scheduler.load_state_dict(payload["scheduler"])
            state = TrainState(**payload["state"])
            rng = payload.get("rng") or {}
            if "torch" in rng:
                torch.set_rng_state(rng["torch"].cpu())
            if "cuda" in rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, AttributeError,
                IndexError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as exc:
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise UserError(
                f"cannot resume from {path}: it is damaged or belongs to another model "
                f"({detail}); start a new run, or score the last checkpoint {self.rd.model}"
            ) from None
        self.state = state

    # ------------------------------------------------------------------ loop
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.train_set) / self.cfg.batch_size)

    def data_init(self) -> None:
        """Data-dependent init (ActNorm) on one batch, before the first step."""
        n = min(len(self.train_set), max(self.cfg.batch_size, 256))
        idx = torch.randperm(len(self.train_set), generator=seeded(self.cfg.seed, -1))[:n]
        x = dequantize(self.train_set.images[idx], seeded(self.cfg.seed, -2)).to(self.device)
        self.model.train()
        self.model.data_init(x)
        if self.ema is not None:  # the average starts from the initialised weights
            self.ema.load_state_dict(AveragedModel(self.model).state_dict())

    def fit(self) -> list[EpochResult]:
        cfg, st, d = self.cfg, self.state, self.dist
        n_batches = self.batches_per_epoch()
        results = []
        if d.distributed and self._ddp is None:
            self._ddp = wrap_ddp(self.model, d, self.optimizer)
        with StopFlag() as stop:
            while st.epoch < cfg.epochs:
                t0, seen, loss_sum, clipped, steps = time.perf_counter(), 0, 0.0, 0, 0
                perm = torch.randperm(len(self.train_set), generator=seeded(cfg.seed, st.epoch))
                self.progress.epoch_start(st.epoch, cfg.epochs, n_batches, st.batch)
                self.model.train()
                while st.batch < n_batches:
                    idx = perm[st.batch * cfg.batch_size:(st.batch + 1) * cfg.batch_size]
                    images = self.train_set.images[idx]
                    if cfg.perturb_mu > 0:  # a likelihood-ratio background model
                        images = perturb_pixels(images, cfg.perturb_mu,
                                                seeded(cfg.seed, st.epoch, st.batch, PERTURB_KEY))
                    x = dequantize(images, seeded(cfg.seed, st.epoch, st.batch))
                    n_global = len(x)
                    if d.distributed:  # this rank's slice of the same global batch and noise
                        x = x[rank_slice(n_global, d.world, d.rank)]
                        torch.manual_seed(seeded(cfg.seed, st.epoch, st.batch, RANK_RNG_KEY,
                                                 d.rank).initial_seed())
                    ok, loss, was_clipped, stopping = self._step(x.to(self.device), n_global,
                                                                 stop.signal is not None)
                    st.batch += 1
                    if ok:
                        st.bad_run = 0
                        st.step += 1
                        steps += 1
                        clipped += was_clipped
                        seen += n_global
                        loss_sum += loss * n_global
                    else:
                        st.bad_run += 1
                        st.nan_skips += 1
                        if st.bad_run >= cfg.max_bad_steps:
                            d.barrier()  # no rank leaves first: torchrun would kill the rest
                            raise self._diverged(f"{st.bad_run} non-finite steps in a row")
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    self.progress.batch(st.batch, self._bpd(loss_sum / max(seen, 1)), rate,
                                        clipped / max(steps, 1))
                    # one process also stops for a signal that came during the step; ranks
                    # of DDP only on the all-reduced flag, so they stop at the same step
                    stopping = stopping or (not d.distributed and stop.signal is not None)
                    if stopping:  # every rank agrees (all-reduced), so all stop at this step
                        self.save_state()
                        d.barrier()  # the state is on disk before any rank exits
                        message = (
                            f"stopped by {stop.signal or 'a signal to another rank'} at epoch "
                            f"{st.epoch + 1}, batch "
                            f"{st.batch}/{n_batches}; state saved: continue with "
                            f"ood-audit train --resume --out {self.rd.root}"
                        )
                        # Ctrl-C / SIGTERM: Interrupted (exit 130 / 143); another rank's: exit 2
                        if stop.signal in ("SIGINT", "SIGTERM"):
                            raise Interrupted(message, signal_name=stop.signal)
                        raise UserError(message)
                seconds = time.perf_counter() - t0
                if not self._weights_finite():  # never overwrite a good checkpoint with NaN
                    d.barrier()  # weights are equal on all ranks, so all raise here
                    raise self._diverged("the weights hold NaN or inf")
                test_bpd = evaluate_bpd(self.averaged, self.test_set.images, cfg.batch_size * 2,
                                        self.device, cfg.seed, d)
                result = EpochResult(
                    epoch=st.epoch + 1, step=st.step,
                    train_bpd=self._bpd(loss_sum / max(seen, 1)), test_bpd=test_bpd,
                    seconds=seconds, images_per_s=seen / max(seconds, 1e-9),
                    nan_skips=st.nan_skips, lr=self.optimizer.param_groups[0]["lr"],
                    clipped_frac=clipped / max(steps, 1),
                )
                st.history.append(dataclasses.asdict(result))
                st.epoch += 1
                st.batch = 0
                self._end_epoch(result)
                self.progress.epoch_end(result)
                results.append(result)
        return results

    def _step(self, x: torch.Tensor, n_global: int,
              stop: bool) -> tuple[bool, float, bool, bool]:
        """One optimizer step on ``x`` (this rank's share of a global batch of ``n_global``).

        Returns (ok, mean loss of the global batch in nats, clipped, stop). The gradient is
        that of the loss on ``cfg.loss_scale``, clipped at ``cfg.max_grad_norm`` on that
        scale. A non-finite loss or gradient skips the step (ok False); under DDP that
        decision and ``stop`` are all-reduced, so every rank takes the same one.
        """
        self.optimizer.zero_grad(set_to_none=True)
        if self._ddp is None:
            per = self.model.training_loss(x)  # [B] nats
            loss = per.mean() * self.loss_factor
            mean, finite = float(per.detach().mean()), bool(torch.isfinite(loss))
        else:
            per = self._ddp(x)  # [B_rank]
            # DDP averages gradients over ranks; weighting each rank's sum by world / n_global
            # makes that average the gradient of the global batch mean, also for the unequal
            # slices of a ragged last batch (weighted, not dropped: one process uses it too).
            loss = per.sum() * (self.dist.world / n_global * self.loss_factor)
            mean, _, finite, stop = step_stats(self.dist, per.detach().sum(), len(x), stop)
        if not finite:
            return False, float("nan"), False, stop
        loss.backward()
        # gradients are equal on every rank after DDP's all-reduce, so is this decision
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        if not torch.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False, float("nan"), False, stop
        self.optimizer.step()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.model)
        return True, mean, bool(grad_norm > self.cfg.max_grad_norm), stop

    def _weights_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for m in {self.model, self.averaged}
                   for t in m.state_dict().values() if t.is_floating_point())

    def _diverged(self, why: str) -> TrainingDiverged:
        """The error that stops training; nothing of the bad epoch is saved."""
        last = self.state.epoch
        kept = (f"the last good checkpoint {self.rd.model} (epoch {last}) is kept and can be "
                "scored" if last and self.rd.model.exists() else "no epoch finished, so no "
                "checkpoint was written")
        return TrainingDiverged(
            f"training diverged at epoch {last + 1} ({why}; {self.state.nan_skips} steps "
            f"skipped in all): {kept}; to train on, start a new run with a lower --lr (e.g. "
            f"half of {self.cfg.lr:g}) or a lower train.max_grad_norm")

    def _bpd(self, nll_nats: float) -> float:
        return float(bits_per_dim(-nll_nats, self.n_dims)) if math.isfinite(nll_nats) else math.nan

    def _end_epoch(self, result: EpochResult) -> None:
        """Checkpoint (epoch copy + model.safetensors), metrics table, train state (rank 0).
        Under DDP every rank stops with rank 0's line when its writes fail (a full disk)."""
        failure = None
        if self.dist.is_main:
            try:
                self._write_epoch(result)
            except Exception as exc:  # noqa: BLE001 - the other ranks learn of it, then it is raised
                failure = exc
        self.dist.agree(failure)

    def _write_epoch(self, result: EpochResult) -> None:
        every = keep_every(self.cfg.keep_checkpoints)
        epoch_path = self.rd.epoch_checkpoint(result.epoch)
        save_checkpoint(
            epoch_path, self.averaged, model_name=self.model_name, model_config=self.model_config,
            run_config=dataclasses.asdict(self.run), dataset=self.run.data, epoch=result.epoch,
        )
        link_or_copy(epoch_path, self.rd.model)
        keep = every is not None and result.epoch % every == 0
        if not keep:
            epoch_path.unlink()
        write_history(self.rd.metrics, self.state.history)
        self.save_state()


def write_history(path: Path, history: list[dict]) -> None:
    """metrics.parquet: one row per epoch (the report's training curve)."""
    with atomic_path(path) as tmp:
        pd.DataFrame(history).to_parquet(tmp, index=False)
