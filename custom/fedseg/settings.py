"""How a site trains and validates: every default written once, and the named profiles built from it.

``TrainingSettings`` is the one definition. The site trainer's command line (``fedseg.trainer``), the job
builder (``JobSettings`` extends it), the ``fedseg`` commands and the report's settings table are all
made from its fields, so a new option is one line here.

Profiles are named sets of values for a kind of data:
- ``demo``: the synthetic 64x64x48 demo, learns on a CPU in minutes (the class defaults);
- ``fets2022``: full-size FeTS2022 (240x240x155); the values were chosen from measurements reported in
  the benchmark docs (``bench.site_scale``, ``bench.gpu_step``): 128^3 crops, a wider U-Net, one case x two
  crops per step, bounded local work and bounded per-round validation.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_origin, get_type_hints

LOSSES = ("dice_ce", "dice_focal")


def _setting(default: Any, help_text: str):
    """A field with its help text (shown by every command that offers it)."""
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainingSettings:
    """A site's local work per round, its data pipeline and its network (see the fields' comments)."""

    local_epochs: int = _setting(2, "passes over the site's training cases per round (when local_steps is 0)")
    local_steps: int = _setting(0, "optimiser steps per round, whatever the site's size (0: use local_epochs)")
    lr: float = _setting(3e-3, "Adam learning rate of the local training")
    batch_size: int = _setting(2, "cases per step; each gives samples_per_case crops")
    samples_per_case: int = _setting(2, "random crops per case (half around tumour, half around background)")
    crop: tuple[int, ...] = _setting((48, 48, 48), "training crop in voxels; also the sliding-window size")
    loss: str = _setting(
        "dice_focal", "dice_focal leaves the all-background start within a few epochs; dice_ce can sit there for 10+"
    )
    channels: tuple[int, ...] = _setting((16, 32, 64, 128), "U-Net channels per level")
    sw_batch_size: int = _setting(4, "sliding windows per forward pass in validation")
    val_max_cases: int = _setting(
        8,
        "per-round validation on a fixed, seeded subset of at most this many cases "
        "(0: all); cross-site evaluation scores every case",
    )
    cache_ram_mb: int = _setting(
        0,
        "decoded cases kept in the site's memory (MiB); the rest are read from its "
        "disk cache, which the OS keeps in its page cache",
    )
    amp: bool = _setting(True, "automatic mixed precision (CUDA only)")
    seed: int = _setting(0, "seed of the network's initial weights, the augmentation and the validation subset")
    threads: int = _setting(
        1, "torch CPU threads per site: 1 where sites share a machine (simulator, POC); 0: torch's default (every core)"
    )
    num_workers: int = _setting(0, "DataLoader worker processes")

    def __post_init__(self) -> None:
        self.crop = tuple(int(c) for c in self.crop)
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.crop) != 3:
            raise ValueError(f"crop needs three sizes, got {self.crop}")
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; choose one of {LOSSES}")
        if self.local_steps < 0 or self.local_epochs < 0 or (self.local_steps == 0 and self.local_epochs == 0):
            raise ValueError("local work must be local_steps > 0 or local_epochs > 0")
        if self.val_max_cases < 0 or self.cache_ram_mb < 0:
            raise ValueError("val_max_cases and cache_ram_mb must be >= 0")

    def training_values(self) -> dict[str, Any]:
        """This object's values of the training fields only (also for a subclass such as JobSettings)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainingSettings)}


PROFILES: dict[str, TrainingSettings] = {
    "demo": TrainingSettings(),
    "fets2022": TrainingSettings(
        local_steps=50,
        batch_size=1,
        samples_per_case=2,
        crop=(128, 128, 128),
        channels=(32, 64, 128, 256),
        sw_batch_size=2,
        threads=0,
    ),
}
DEFAULT_PROFILE = "demo"


def profile(name: str) -> TrainingSettings:
    """A copy of a named profile's settings."""
    if name not in PROFILES:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PROFILES)}")
    return replace(PROFILES[name])


def option_name(field_name: str, dashes: bool) -> str:
    return "--" + (field_name.replace("_", "-") if dashes else field_name)


def add_training_arguments(parser: argparse.ArgumentParser, defaults: TrainingSettings | None, dashes: bool) -> None:
    """One command-line option per training field.

    ``defaults`` given: each option defaults to its value (the site trainer). ``None``: options default to
    ``None`` so that the caller can tell what was given and fill the rest from a profile (the CLI).
    """
    for f in fields(TrainingSettings):
        default = getattr(defaults, f.name) if defaults is not None else None
        kind = _type_of(f)
        shown = getattr(PROFILES[DEFAULT_PROFILE], f.name)
        help_text = (
            f"{f.metadata.get('help', '')} (demo: {' '.join(map(str, shown)) if isinstance(shown, tuple) else shown})"
        )
        name = option_name(f.name, dashes)
        if kind is bool:
            parser.add_argument(name, type=_boolean, default=default, metavar="{true,false}", help=help_text)
        elif kind is tuple:
            parser.add_argument(name, type=int, nargs=3 if f.name == "crop" else "+", default=default, help=help_text)
        elif f.name == "loss":
            parser.add_argument(name, choices=LOSSES, default=default, help=help_text)
        else:
            parser.add_argument(name, type=kind, default=default, help=help_text)


def _type_of(f) -> type:
    """The Python type of a field: ``tuple[int, ...]`` -> tuple (annotations are strings in this module)."""
    hint = get_type_hints(TrainingSettings)[f.name]
    return get_origin(hint) or hint


def _boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def settings_from_arguments(args: argparse.Namespace, base: TrainingSettings) -> dict[str, Any]:
    """The training values of ``base`` with every option given on the command line applied over it."""
    values = base.training_values()
    for f in fields(TrainingSettings):
        given = getattr(args, f.name, None)
        if given is not None:
            values[f.name] = tuple(given) if isinstance(given, list) else given
    return values


def training_arguments(settings: TrainingSettings) -> list[str]:
    """The site trainer's command line for these settings (every training field, explicitly)."""
    out: list[str] = []
    for f in fields(TrainingSettings):
        value = getattr(settings, f.name)
        out.append(option_name(f.name, dashes=False))
        if isinstance(value, tuple):
            out.extend(str(v) for v in value)
        else:
            out.append(str(value).lower() if isinstance(value, bool) else str(value))
    return out


def settings_markdown() -> str:
    """The README's settings table: every training setting, its value in each profile and what it does."""
    names = sorted(PROFILES, key=lambda name: name != DEFAULT_PROFILE)
    rows = [
        "| setting | " + " | ".join(f"`{name}`" for name in names) + " | what it does |",
        "| --- | " + " | ".join("---" for _ in names) + " | --- |",
    ]
    for f in fields(TrainingSettings):
        values = [getattr(PROFILES[name], f.name) for name in names]
        shown = [" ".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values]
        rows.append(f"| `{option_name(f.name, dashes=True)}` | " + " | ".join(shown) + f" | {f.metadata['help']} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    print(settings_markdown(), end="")
