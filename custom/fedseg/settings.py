"""How a site trains and validates: every default written once, and the named profiles built from it.

``TrainingSettings`` is the one definition. The site trainer's command line (``fedseg.trainer``), the job
builder (``fedseg.jobs.settings.JobSettings`` extends it), the ``fedseg`` commands, the network
(``fedseg.network.FedSegUNet.from_settings``) and the README's settings table are all made from its fields, so a
new option is one line here.

Profiles are named sets of values for a kind of data:
- ``demo``: the synthetic 64x64x48 demo, learns on a CPU in minutes (the class defaults);
- ``fets2022``: full-size FeTS2022 (240x240x155); the values were chosen from measurements reported in
  the benchmark docs (``bench.site_scale``, ``bench.gpu_step``): 128^3 crops, a wider U-Net, one case x two
  crops per step, bounded local work and bounded per-round validation.
"""

from __future__ import annotations

import argparse
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, get_origin, get_type_hints

LOSSES = ("dice_ce", "dice_focal")
INT_MAX = 2**31 - 1  # the largest count or seed any setting takes (what a C int holds)


class SettingError(ValueError):
    """A training setting of the wrong JSON type or out of its range (one line: the setting, value, rule)."""


def _setting(
    default: Any,
    help_text: str,
    *,
    low: float = 0,
    high: float = INT_MAX,
    above: float | None = None,
    length: tuple[int, int] | None = None,
    choices: tuple[str, ...] | None = None,
):
    """A field with its help text (shown by every command that offers it) and its intrinsic range.

    ``low``/``high``: inclusive bounds of a number (of each element of a list setting); ``above``: an
    exclusive lower bound instead of ``low``; ``length``: (fewest, most) elements of a list setting;
    ``choices``: the allowed strings. ``check_setting`` enforces them; site caps (fedseg.site_config) come on top.
    """
    bounds = {"low": low, "high": high, "above": above, "length": length, "choices": choices}
    return field(default=default, metadata={"help": help_text, **bounds})


@dataclass
class TrainingSettings:
    """A site's local work per round, its data pipeline and its network (see the fields' comments)."""

    local_epochs: int = _setting(2, "passes over the site's training cases per round (when local_steps is 0)")
    local_steps: int = _setting(0, "optimiser steps per round, whatever the site's size (0: use local_epochs)")
    lr: float = _setting(3e-3, "Adam learning rate of the local training", above=0, high=1)
    batch_size: int = _setting(2, "cases per step; each gives samples_per_case crops", low=1)
    samples_per_case: int = _setting(2, "random crops per case (half around tumour, half around background)", low=1)
    crop: tuple[int, ...] = _setting(
        (48, 48, 48), "training crop in voxels; also the sliding-window size", low=1, length=(3, 3)
    )
    loss: str = _setting(
        "dice_focal",
        "dice_focal leaves the all-background start within a few epochs; dice_ce can sit there for 10+",
        choices=LOSSES,
    )
    channels: tuple[int, ...] = _setting((16, 32, 64, 128), "U-Net channels per level", low=1, length=(2, 8))
    sw_batch_size: int = _setting(4, "sliding windows per forward pass in validation", low=1)
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
        # every field's JSON type and range, from its declaration (a job's values arrive as JSON)
        for f in fields(TrainingSettings):
            setattr(self, f.name, check_setting(f.name, getattr(self, f.name)))
        if self.local_steps == 0 and self.local_epochs == 0:
            raise SettingError("local work must be local_steps > 0 or local_epochs > 0, got both 0")

    def training_values(self) -> dict[str, Any]:
        """This object's values of the training fields only (also for a subclass such as JobSettings)."""
        return {f.name: getattr(self, f.name) for f in fields(TrainingSettings)}


def _type_of(f) -> type:
    """The Python type of a field: ``tuple[int, ...]`` -> tuple (annotations are strings in this module)."""
    hint = get_type_hints(TrainingSettings)[f.name]
    return get_origin(hint) or hint


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_setting(name: str, value: Any) -> Any:
    """``value`` of training setting ``name`` if it has the field's exact JSON type and lies in its range.

    int: an integer, never a bool or a float (1e9 is a float in JSON); float: an integer or a finite float,
    never a bool; bool: true or false only; a list setting: a JSON list (or tuple) of such integers, of the
    declared length; a string: one of the choices. Returns the value in the field's form (lists as tuples).
    Anything else is a ``SettingError`` naming the setting, the value and the rule.
    """
    f = TrainingSettings.__dataclass_fields__.get(name)
    if f is None:
        raise SettingError(f"unknown training setting {name!r}")
    kind, rule = _type_of(f), f.metadata

    def refuse(expected: str) -> SettingError:
        return SettingError(f"training setting {name} {_shown(value)}: expected {expected}")

    def number(v: Any, integer: bool) -> float:
        ok = isinstance(v, numbers.Integral) or (not integer and isinstance(v, numbers.Real) and math.isfinite(v))
        if isinstance(v, bool) or not ok:
            raise refuse(_expected(kind, rule))
        low_ok = v > rule["above"] if rule["above"] is not None else v >= rule["low"]
        if not (low_ok and v <= rule["high"]):
            raise refuse(_expected(kind, rule))
        return v

    if kind is bool:
        if not isinstance(value, bool):
            raise refuse("true or false")
        return value
    if kind is str:
        if not isinstance(value, str) or value not in rule["choices"]:
            raise refuse(f"one of {list(rule['choices'])}")
        return value
    if kind is tuple:
        fewest, most = rule["length"]
        if not isinstance(value, (list, tuple)) or not fewest <= len(value) <= most:
            raise refuse(_expected(kind, rule))
        return tuple(int(number(v, integer=True)) for v in value)
    if kind is int:
        return int(number(value, integer=True))
    return float(number(value, integer=False))


def _expected(kind: type, rule: Mapping) -> str:
    """The rule of a numeric or list setting in words, for its error message."""
    low = f"> {rule['above']}" if rule["above"] is not None else f">= {rule['low']}"
    if kind is tuple:
        fewest, most = rule["length"]
        count = str(fewest) if fewest == most else f"{fewest} to {most}"
        return f"a list of {count} integers, each {low} and <= {rule['high']}"
    what = "an integer" if kind is int else "a number"
    return f"{what} {low} and <= {rule['high']}"


def checked_settings(values: Mapping[str, Any] | None) -> TrainingSettings:
    """A job's training dict as ``TrainingSettings``: unknown names refused, every value checked by its field."""
    known = {f.name for f in fields(TrainingSettings)}
    if values is not None and not isinstance(values, Mapping):
        raise SettingError(f"training settings {_shown(values)}: expected a JSON object")
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise SettingError(f"unknown training setting(s) {unknown}; known: {sorted(known)}")
    return TrainingSettings(**(values or {}))


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
# the federation of the simulator, the committed jobs, the demo and the testbed: FLARE client names, which are
# also the names of the sites' prepared folders (``fedseg prepare``'s default name template gives them)
DEFAULT_SITES = ("site-1", "site-2", "site-3")


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
