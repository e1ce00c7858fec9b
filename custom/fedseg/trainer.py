"""The site executor: a FLARE Client API loop around a MONAI training and validation routine.

Each task from the server brings a model:
- train: validate the received global model on the local validation split, train E local epochs, send
  back the weight difference with the number of steps and the validation metrics;
- validate (cross-site evaluation): score the received model on the local validation split;
- submit_model (cross-site evaluation, sent without params): return this site's latest local model.
FedProx arrives as ``fedprox_mu`` in the model's meta and adds the proximal term here; FedRef needs
nothing from sites.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence

import torch
from monai.inferers import sliding_window_inference
from monai.losses import DiceCELoss, DiceFocalLoss

from fedseg.data import make_loaders, site_folder
from fedseg.metrics import RegionMetrics
from fedseg.network import FedSegUNet

logger = logging.getLogger("fedseg.trainer")

LOSSES = ("dice_ce", "dice_focal")


def build_loss(name: str) -> torch.nn.Module:
    if name == "dice_ce":
        return DiceCELoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    if name == "dice_focal":
        return DiceFocalLoss(sigmoid=True, smooth_nr=1e-5, smooth_dr=1e-5)
    raise ValueError(f"unknown loss {name!r}; choose one of {LOSSES}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="FedRef-Seg site trainer (FLARE Client API)")
    p.add_argument("--data_root", default=None, help="folder holding one prepared folder per site "
                   "(default: the site's FEDSEG_DATA_ROOT environment variable)")
    p.add_argument("--local_epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch_size", type=int, default=2)
    p.add_argument("--crop", type=int, nargs=3, default=[48, 48, 48], help="training crop size (voxels)")
    p.add_argument("--samples_per_case", type=int, default=2)
    p.add_argument("--loss", choices=LOSSES, default="dice_ce")
    p.add_argument("--channels", type=int, nargs="+", default=[16, 32, 64, 128])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    return p.parse_args(argv)


class SiteTrainer:
    """Local training and validation on one site's prepared data; knows nothing of FLARE."""

    def __init__(self, folder: str, args: argparse.Namespace, device: torch.device | None = None) -> None:
        self.args = args
        self.device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.manual_seed(args.seed)
        self.model = FedSegUNet(channels=args.channels, strides=[2] * (len(args.channels) - 1)).to(self.device)
        self.crop = list(args.crop)
        self.train_loader, self.val_loader = make_loaders(
            folder, self.crop, args.batch_size, args.samples_per_case, args.num_workers, seed=args.seed
        )
        self.loss_fn = build_loss(args.loss)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=args.lr, weight_decay=1e-5)
        self.use_amp = self.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)

    def load_params(self, params: dict) -> None:
        state = {k: torch.as_tensor(v) for k, v in params.items()}
        self.model.load_state_dict(state, strict=True)

    def state(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}

    def train(self, epochs: int, fedprox_mu: float = 0.0) -> dict:
        """E local epochs; returns the number of optimiser steps and the mean training loss."""
        global_params = [p.detach().clone() for p in self.model.parameters()] if fedprox_mu > 0 else None
        self.model.train()
        steps, total = 0, 0.0
        started = time.perf_counter()
        for _ in range(epochs):
            for batch in self.train_loader:
                image = batch["image"].to(self.device)
                label = batch["label"].to(self.device)
                self.optimizer.zero_grad(set_to_none=True)
                with torch.autocast(self.device.type, enabled=self.use_amp):
                    loss = self.loss_fn(self.model(image), label.float())
                if global_params is not None:
                    loss = loss + 0.5 * fedprox_mu * sum(
                        torch.sum((p - g) ** 2) for p, g in zip(self.model.parameters(), global_params)
                    )
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                steps += 1
                total += float(loss.detach())
        return {"num_steps": steps, "train_loss": total / max(steps, 1), "train_seconds": time.perf_counter() - started}

    @torch.no_grad()
    def validate(self) -> dict:
        """Dice/HD95 per region of the current model on the local validation split."""
        self.model.eval()
        metrics = RegionMetrics()
        started = time.perf_counter()
        for batch in self.val_loader:
            image = batch["image"].to(self.device)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                logits = sliding_window_inference(image, self.crop, sw_batch_size=4, predictor=self.model, overlap=0.25)
            prediction = torch.sigmoid(logits.float()) > 0.5
            spacing = [float(s) for s in batch["image"].pixdim[0]] if hasattr(batch["image"], "pixdim") else None
            metrics.add(prediction[0], batch["label"][0].to(prediction.device), spacing)
        summary = metrics.summary()
        summary["val_seconds"] = time.perf_counter() - started
        return summary


def main(argv: Sequence[str] | None = None) -> None:
    """The Client API loop; run by FLARE's ScriptRunner on every site."""
    import nvflare.client as flare
    from nvflare.apis.fl_constant import FLMetaKey

    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    flare.init()
    site = flare.get_site_name()
    trainer = SiteTrainer(site_folder(site, args.data_root), args)
    local_model: dict | None = None
    logger.info("%s: %d training batches, %d validation cases", site, len(trainer.train_loader), len(trainer.val_loader))

    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if flare.is_submit_model():
            flare.send(flare.FLModel(params=local_model if local_model is not None else trainer.state()))
            continue

        trainer.load_params(received.params)
        metrics = trainer.validate()
        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics=metrics))
            continue

        global_state = trainer.state()
        mu = float((received.meta or {}).get("fedprox_mu") or 0.0)
        result = trainer.train(args.local_epochs, fedprox_mu=mu)
        local_model = trainer.state()
        difference = {k: local_model[k] - global_state[k] for k in local_model}
        metrics.update({"train_loss": result["train_loss"], "train_seconds": result["train_seconds"]})
        round_no = received.current_round
        logger.info(
            "%s round %s: global model dice_mean %.3f on %d cases, local train loss %.4f (%d steps)",
            site, round_no, metrics["dice_mean"], metrics["n_cases"], result["train_loss"], result["num_steps"],
        )
        flare.send(
            flare.FLModel(
                params=difference,
                params_type="DIFF",
                metrics=metrics,
                meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: result["num_steps"]},
            )
        )
        del global_state


if __name__ == "__main__":
    main()
