"""The site executor: a FLARE Client API loop around a MONAI training and validation routine.

Each task from the server brings a model:
- train: validate the received global model on the per-round subset of the local validation split, do
  the round's local work (``local_steps`` steps, or ``local_epochs`` epochs), send back the weight
  difference with the number of steps taken and the metrics;
- validate (cross-site evaluation): score the received model on every local validation case;
- submit_model (cross-site evaluation, sent without params): return this site's latest local model (only
  where the site shares it: ``SiteExecutor`` answers the task itself otherwise).
What leaves the site is aggregate: means over at least ``--min_val_cases`` cases (or all the site has), a
spread (sd) only over that many, no per-case value and nothing that measures the anatomy (the cache's size
stays in the site's log). Log lines carry counts, never subject ids or paths.
FedProx arrives as ``fedprox_mu`` in the model's meta and adds the proximal term here; FedRef needs
nothing from sites.
"""

from __future__ import annotations

import argparse
import copy
import functools
import logging
import os
import time
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceFocalLoss

from fedseg.cache import CACHE_DIR_ENV
from fedseg.data import DATA_ROOT_ENV, DEFAULT_CACHE_NAME, cache_folder, make_site_data, prefetched, site_folder
from fedseg.metrics import RegionMetrics
from fedseg.network import FedSegUNet
from fedseg.regions import MODALITIES
from fedseg.settings import LOSSES, TrainingSettings, add_training_arguments, settings_from_arguments
from fedseg.site_config import SiteConfig
from fedseg.wire import RECEIVED_WIRE_BYTES_KEY, WIRE_BYTES_KEY

logger = logging.getLogger("fedseg.trainer")

FAULTS = ("nan", "shape", "die")
PREFETCH_DEPTH = 2  # training batches the loader's thread keeps ready


def warm_up(model: torch.nn.Module, settings: TrainingSettings, device: torch.device, amp: bool) -> float:
    """Run every shape a round will run once, on a copy of ``model`` (weights and random streams untouched); seconds.

    On a GPU the first pass of each shape pays for CUDA's lazy loading and cuDNN's autotuning (a first validation
    took 13.9 s against 0.9 s later on an H200). Training batches have one shape per number of cases, validation's
    sliding windows are crop-sized in batches of 1 to ``sw_batch_size``: done here once, no round pays for them.
    """
    started = time.perf_counter()
    probe = copy.deepcopy(model).train()
    for cases in range(1, settings.batch_size + 1):
        image = torch.zeros(cases * settings.samples_per_case, len(MODALITIES), *settings.crop, device=device)
        with torch.autocast(device.type, enabled=amp):
            logits = probe(image)
        logits.float().mean().backward()
        probe.zero_grad(set_to_none=True)
    probe.eval()
    with torch.no_grad(), torch.autocast(device.type, enabled=amp):
        for windows in range(1, settings.sw_batch_size + 1):
            probe(torch.zeros(windows, len(MODALITIES), *settings.crop, device=device))
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def build_loss(name: str) -> torch.nn.Module:
    if name == "dice_ce":
        return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    if name == "dice_focal":
        return DiceFocalLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The trainer's command line: every ``TrainingSettings`` field, plus where the site's data and cache are."""
    p = argparse.ArgumentParser(description="FedRef-Seg site trainer (FLARE Client API)")
    p.add_argument(
        "--data_root",
        default=None,
        help=f"folder holding one prepared folder per site (default: the site's {DATA_ROOT_ENV} environment variable)",
    )
    p.add_argument(
        "--cache_dir",
        default=None,
        help="folder for the sites' decoded-case caches (default: the site's "
        f"{CACHE_DIR_ENV} environment variable, else ./{DEFAULT_CACHE_NAME} in the site's workspace)",
    )
    p.add_argument(
        "--min_val_cases",
        type=int,
        default=SiteConfig.min_val_cases,
        help="the site's minimum of validation cases behind a sent score (min_val_cases in its fedseg_site.json)",
    )
    add_training_arguments(p, TrainingSettings(), dashes=False)
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SITE:KIND:ROUND",
        help="resilience drill: at ROUND, SITE sends an update with NaN (nan), a wrong shape (shape), "
        "or stops (die). For testing the server's defences only.",
    )
    return p.parse_args(argv)


class SiteTrainer:
    """Local training and validation on one site's prepared data; knows nothing of FLARE."""

    def __init__(
        self, folder: str, args: argparse.Namespace, device: torch.device | None = None, site: str | None = None
    ) -> None:
        self.settings = TrainingSettings(**settings_from_arguments(args, TrainingSettings()))
        s = self.settings
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(s.seed)
        self.model = FedSegUNet.from_settings(s).to(self.device)
        self.crop = list(s.crop)
        site = site or os.path.basename(os.path.normpath(folder))
        cache = cache_folder(site, folder, getattr(args, "cache_dir", None))
        started = time.perf_counter()
        self.min_val_cases = int(getattr(args, "min_val_cases", 0) or 0)
        self.data = make_site_data(folder, s, cache, label=site, min_val_cases=self.min_val_cases)
        self.cache_seconds = time.perf_counter() - started
        self.train_loader, self.val_loader = self.data.train_loader, self.data.val_loader
        self.loss_fn = build_loss(s.loss)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr, weight_decay=1e-5)
        self.use_amp = s.amp and self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.prefetch = True  # the loader works in a thread, a batch ahead (same batches, same order)
        self.warmup_seconds = 0.0
        if self.device.type == "cuda":  # deliberate: a few fixed, crop-sized shapes, autotuned once (warm_up)
            torch.backends.cudnn.benchmark = True
            self.warmup_seconds = warm_up(self.model, s, self.device, self.use_amp)

    def load_params(self, params: dict) -> None:
        state = {k: torch.as_tensor(v) for k, v in params.items()}
        self.model.load_state_dict(state, strict=True)

    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def batches(self, epochs: int, steps: int):
        """``steps`` batches when > 0 (the loader restarts, reshuffled, as often as needed), else ``epochs`` passes."""
        if steps <= 0:
            for _ in range(epochs):
                yield from self.train_loader
            return
        taken = 0
        while taken < steps:
            for batch in self.train_loader:
                yield batch
                taken += 1
                if taken == steps:
                    return

    def train(
        self, epochs: int | None = None, fedprox_mu: float = 0.0, after_step=None, steps: int | None = None
    ) -> dict:
        """Local work of one round; returns the number of optimiser steps taken and the mean training loss.

        By default the settings' ``local_steps`` (when > 0) or ``local_epochs``. ``fedprox_mu`` adds
        FedProx's proximal term to the loaded (global) weights; ``after_step`` is called after every
        optimiser step (Scaffold's control correction). Timed: ``data_seconds`` (waiting for batches), ``compute_seconds``.
        """
        if steps is None:
            steps = self.settings.local_steps if epochs is None else 0
        epochs = self.settings.local_epochs if epochs is None else epochs
        global_params = [p.detach().clone() for p in self.model.parameters()] if fedprox_mu > 0 else None
        self.model.train()
        # the device stage of each batch, in the loader's thread when prefetching
        prepare = functools.partial(self.data.device_batch, device=self.device, non_blocking=self.device.type == "cuda")
        batches = self.batches(epochs, steps)
        batches = prefetched(batches, prepare, self.device, PREFETCH_DEPTH) if self.prefetch else map(prepare, batches)
        taken, skipped, total, data_seconds, compute_seconds = 0, 0, 0.0, 0.0, 0.0
        started = mark = time.perf_counter()
        for batch in batches:
            ready = time.perf_counter()
            data_seconds += ready - mark
            loss = self.step(batch["image"], batch["label"], fedprox_mu, global_params)
            if loss is None:  # a step on a non-finite loss would poison the weights: not taken
                skipped += 1
            else:
                if after_step is not None:
                    after_step()
                taken += 1
                total += loss
            mark = time.perf_counter()
            compute_seconds += mark - ready
        if skipped:
            logger.warning("%d of %d local steps skipped: non-finite training loss", skipped, skipped + taken)
        return {
            "num_steps": taken,
            "train_loss": total / max(taken, 1),
            "train_seconds": time.perf_counter() - started,
            "skipped_steps": skipped,
            "data_seconds": data_seconds,
            "compute_seconds": compute_seconds,
        }

    def step(
        self, image: torch.Tensor, label: torch.Tensor, fedprox_mu: float = 0.0, global_params: list | None = None
    ) -> float | None:
        """One optimiser step on a batch on the device (FedProx's term to ``global_params``); the loss, or None."""
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=self.use_amp):
            logits = self.model(image)
        # the loss in float32: Dice+Focal in float16 overflowed to NaN now and then on a GPU (seen on an H200)
        loss = self.loss_fn(logits.float(), label.float())
        if global_params is not None:
            loss = loss + 0.5 * fedprox_mu * sum(
                torch.sum((p - g) ** 2) for p, g in zip(self.model.parameters(), global_params)
            )
        if not torch.isfinite(loss):
            return None
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    @torch.no_grad()
    def validate(self, every_case: bool = False) -> dict:
        """Dice/HD95 per region of the current model: the per-round subset, or every validation case."""
        self.model.eval()
        metrics = RegionMetrics()
        started = time.perf_counter()
        loader = self.data.val_loader if every_case else self.data.round_val_loader
        for batch in loader:
            image = batch["image"].to(self.device)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                logits = sliding_window_inference(
                    image, self.crop, sw_batch_size=self.settings.sw_batch_size, predictor=self.model, overlap=0.25
                )
            prediction = torch.sigmoid(logits.float()) > 0.5
            spacing = [float(s) for s in batch["spacing"][0]]
            metrics.add(prediction[0], batch["label"][0].to(prediction.device), spacing)
        summary = metrics.summary(min_cases=self.min_val_cases)
        summary["val_seconds"] = time.perf_counter() - started
        summary["val_all_cases"] = float(every_case or len(loader) == len(self.data.val_cases))
        summary["n_val_cases_site"] = len(self.data.val_cases)
        return summary


def parse_faults(specs: Sequence[str]) -> dict[tuple[str, int], str]:
    """``SITE:KIND:ROUND`` drills -> {(site, round): kind}."""
    faults = {}
    for spec in specs:
        try:
            site, kind, round_no = spec.rsplit(":", 2)
            if kind not in FAULTS:
                raise ValueError
            faults[(site, int(round_no))] = kind
        except ValueError:
            raise SystemExit(f"--fault {spec!r}: expected SITE:KIND:ROUND with KIND one of {FAULTS}") from None
    return faults


def poison(update: dict, kind: str) -> dict:
    """A drill's bad update: NaN in the first tensor, or the first tensor cut to a wrong shape."""
    first = next(iter(update))
    poisoned = dict(update)
    if kind == "nan":
        poisoned[first] = update[first].clone().fill_(float("nan"))
    elif kind == "shape":
        poisoned[first] = update[first].reshape(-1)[:1].clone()
    return poisoned


class ScaffoldState:
    """The site's side of Scaffold (NVFlare's PTScaffoldHelper): corrected steps and control deltas."""

    def __init__(self, trainer: SiteTrainer) -> None:
        from nvflare.app_opt.pt.scaffold import PTScaffoldHelper

        self.trainer = trainer
        self.helper = PTScaffoldHelper()
        self.helper.init(trainer.model)

    def train(self, global_controls: dict) -> tuple[dict, dict]:
        from nvflare.app_opt.pt.scaffold import get_lr_values

        self.helper.load_global_controls(global_controls)
        c_global, c_local = self.helper.get_params()
        global_model = copy.deepcopy(self.trainer.model)
        lr = get_lr_values(self.trainer.optimizer)[0]

        def correct() -> None:
            self.helper.model_update(self.trainer.model, lr, c_global, c_local)

        result = self.trainer.train(after_step=correct)
        self.helper.terms_update(self.trainer.model, lr, c_global, c_local, global_model)
        return result, self.helper.get_delta_controls()


class SiteLoop:
    """One site's answers to the server's tasks: the trainer, the drills, Scaffold's state and the last local model."""

    def __init__(self, flare, trainer: SiteTrainer, site: str, faults: dict[tuple[str, int], str]) -> None:
        from nvflare.client.tracking import SummaryWriter

        self.flare, self.trainer, self.site, self.faults = flare, trainer, site, faults
        self.writer = SummaryWriter()  # streamed to the server's TensorBoard
        self.scaffold: ScaffoldState | None = None
        self.local_model: dict | None = None

    def run(self) -> None:
        flare = self.flare
        while flare.is_running():
            received = flare.receive()
            if received is None:
                break
            flare.send(self.answer(received))

    def answer(self, received):
        """The reply to one task: this site's model (submit_model), scores (validate) or an update (train)."""
        flare, trainer = self.flare, self.trainer
        if flare.is_submit_model():
            return flare.FLModel(params=self.local_model if self.local_model is not None else trainer.state())
        trainer.load_params(received.params)
        if flare.is_evaluate():  # cross-site evaluation: every validation case
            return flare.FLModel(metrics=trainer.validate(every_case=True))
        return self.train_round(received)

    def train_round(self, received):
        """Validate the received global model on the per-round subset, do the round's local work, and return the
        weight difference with the steps taken and the metrics."""
        from nvflare.apis.fl_constant import FLMetaKey
        from nvflare.app_common.app_constant import AlgorithmConstants

        trainer, site = self.trainer, self.site
        metrics = trainer.validate()  # the per-round subset
        round_no = int(received.current_round or 0)
        fault = self.faults.get((site, round_no))
        if fault == "die":
            logger.error("%s round %s: resilience drill, this site stops now", site, round_no)
            raise SystemExit(f"{site}: stopped by --fault drill at round {round_no}")
        global_state = trainer.state()
        meta = received.meta or {}
        mu = float(meta.get("fedprox_mu") or 0.0)
        out_meta = {}
        if meta.get(WIRE_BYTES_KEY):  # the compressed size of the model this site received (fedseg.wire)
            out_meta[RECEIVED_WIRE_BYTES_KEY] = int(meta[WIRE_BYTES_KEY])
        scaffold = AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL in meta
        if scaffold:
            self.scaffold = self.scaffold or ScaffoldState(trainer)
            result, deltas = self.scaffold.train(meta[AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL])
            out_meta[AlgorithmConstants.SCAFFOLD_CTRL_DIFF] = deltas
        else:
            result = trainer.train(fedprox_mu=mu)
        self.local_model = trainer.state()
        difference = {k: self.local_model[k] - global_state[k] for k in self.local_model}
        if fault in ("nan", "shape"):
            logger.error("%s round %s: resilience drill, sending a %s update", site, round_no, fault)
            difference = poison(difference, fault)
        self.report(metrics, result, round_no, mu=mu, scaffold=scaffold)
        out_meta[FLMetaKey.NUM_STEPS_CURRENT_ROUND] = result["num_steps"]
        return self.flare.FLModel(params=difference, params_type="DIFF", metrics=metrics, meta=out_meta)

    def report(self, metrics: dict, result: dict, round_no: int, mu: float, scaffold: bool) -> None:
        """Add the round's training figures to ``metrics`` (what is sent), the TensorBoard and the site's log."""
        data = self.trainer.data
        metrics.update(
            {
                "train_loss": result["train_loss"],
                "train_seconds": result["train_seconds"],
                "skipped_steps": result["skipped_steps"],
                "fedprox_mu": mu,
                "n_train_cases": len(data.train_cases),
                "cache_seconds": self.trainer.cache_seconds,
                "scaffold": float(scaffold),
                # where the round's steps went (timings only: no result depends on them)
                "data_seconds": result["data_seconds"],
                "compute_seconds": result["compute_seconds"],
                "warmup_seconds": self.trainer.warmup_seconds,
            }
        )
        if self.trainer.device.type == "cuda":  # the site process's peak, torch's allocator (not its cache)
            metrics["peak_gpu_mib"] = torch.cuda.max_memory_allocated(self.trainer.device) / 2**20
        for key in ("dice_tc", "dice_wt", "dice_et", "dice_mean", "train_loss"):
            self.writer.add_scalar(key, metrics[key], global_step=round_no)
        logger.info(
            "%s round %s: global model dice_mean %.3f on %d cases, local train loss %.4f (%d steps)",
            self.site,
            round_no,
            metrics["dice_mean"],
            metrics["n_cases"],
            result["train_loss"],
            result["num_steps"],
        )


def main(argv: Sequence[str] | None = None) -> None:
    """The Client API loop; run by FLARE's ScriptRunner on every site."""
    import nvflare.client as flare

    args = parse_args(argv)
    faults = parse_faults(args.fault)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    trainer = SiteTrainer(site_folder(site, args.data_root), args, site=site)
    data = trainer.data
    logger.info(
        "%s: %d training / %d validation cases (per-round validation on %d), cache ready in %.0f s (%.0f MB)",
        site,
        len(data.train_cases),
        len(data.val_cases),
        len(data.round_val_indices),
        trainer.cache_seconds,
        data.cache_bytes() / 1e6,  # the brain volumes' sum: in this log only, never in the metrics sent
    )
    SiteLoop(flare, trainer, site, faults).run()


if __name__ == "__main__":
    main()
