"""What the server decides for itself, not the job: its caps and where earlier runs' checkpoints are kept.

A job is submitted by a researcher the server does not fully trust, so a job is data: every number in it is
checked against a type, a range and the server's caps before anything runs, every file name in it is a plain
name inside the run folder, and a run to continue is named by its job id, never by a path. The caps live in
the server kit's ``local/fedseg_server.json`` (written by ``fedseg install-policy server``, edited by the
project admin); without that file (simulator, POC) the defaults below apply.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

from fedseg.atomic import read_json_object

SERVER_CONFIG_FILE = "fedseg_server.json"  # in the server kit's local/ folder, beside FLARE's resources.json
ALGORITHMS = ("fedref", "fedavg", "fedprox", "fedadam", "fedavgm", "scaffold", "fedpidavg")
# a job id or a file name a job may give: one plain path component, never "..", never a folder
PLAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
MAX_PULL = 10.0  # lambda1, lambda2, FedProx mu: a larger pull freezes the model (a query oracle on site data)
MAX_SERVER_LR = 10.0
MAX_WAIT_SECONDS = 86400
MAX_BUFFER_SIZE = 64  # FedRef holds p model copies in memory and on disk

# FedOpt's server optimisers and schedule: the classes on the server allow-list and the arguments each may take
OPTIMIZER_ARGS = {
    "torch.optim.Adam": ("lr", "betas", "eps", "weight_decay", "amsgrad"),
    "torch.optim.SGD": ("lr", "momentum", "dampening", "weight_decay", "nesterov"),
}
SCHEDULER_ARGS = {"torch.optim.lr_scheduler.ConstantLR": ("factor", "total_iters")}


class JobRefused(ValueError):
    """A job setting the server does not allow; the message is one line: setting, value, bound, where it is set."""


@dataclass(frozen=True)
class ServerConfig:
    """The server's own settings; ``source`` names where they were read, for the refusal messages."""

    checkpoint_store: str | None = None  # holds <job id>/ run folders; None: the server workspace root
    max_rounds: int = 1000
    max_channels: int = 512  # feature maps per U-Net level
    max_levels: int = 6  # U-Net levels (len(channels))
    algorithms: tuple[str, ...] = field(default=ALGORITHMS)
    source: str = "the server defaults"

    @classmethod
    def load(cls, local_dir: str | None) -> ServerConfig:
        """``<local_dir>/fedseg_server.json`` where it exists, the defaults otherwise (each key may be left out)."""
        path = os.path.join(local_dir, SERVER_CONFIG_FILE) if local_dir else None
        if not path or not os.path.isfile(path):
            return cls()
        try:
            values = read_json_object(path)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        known = {"checkpoint_store", "max_rounds", "max_channels", "max_levels", "algorithms"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"{path}: unknown setting(s) {unknown}; expected {sorted(known)}")
        store = values.get("checkpoint_store")
        if store is not None and not (isinstance(store, str) and os.path.isabs(store)):
            raise ValueError(f"{path}: checkpoint_store = {store!r}: must be an absolute folder or null")
        for key in ("max_rounds", "max_channels", "max_levels"):
            if key in values:
                integer(f"{path}: {key}", values[key], 1, None)
        algorithms = values.get("algorithms", list(ALGORITHMS))
        if not isinstance(algorithms, list) or not set(algorithms) <= set(ALGORITHMS):
            raise ValueError(f"{path}: algorithms = {algorithms!r}: a list drawn from {list(ALGORITHMS)}")
        return cls(
            checkpoint_store=store,
            max_rounds=values.get("max_rounds", cls.max_rounds),
            max_channels=values.get("max_channels", cls.max_channels),
            max_levels=values.get("max_levels", cls.max_levels),
            algorithms=tuple(algorithms),
            source=path,
        )

    @classmethod
    def for_workspace(cls, workspace) -> ServerConfig:
        """The config of the server whose FLARE ``Workspace`` this is (its kit's ``local/`` folder)."""
        return cls.load(workspace.get_site_config_dir())

    def store(self, workspace_root: str) -> str:
        """The folder that holds earlier runs' ``<job id>/`` folders."""
        return self.checkpoint_store or workspace_root

    def cap(self, setting: str, value, limit: int, cap_name: str) -> None:
        if value > limit:
            raise JobRefused(f"{setting} = {value!r} exceeds the server's cap {cap_name} = {limit} ({self.source})")

    def check_rounds(self, num_rounds) -> None:
        integer("num_rounds", num_rounds, 1, None)
        self.cap("num_rounds", num_rounds, self.max_rounds, "max_rounds")

    def check_network(self, channels) -> None:
        network_channels(channels)
        self.cap("channels (levels)", len(channels), self.max_levels, "max_levels")
        self.cap("channels", max(channels), self.max_channels, "max_channels")

    def check_algorithm(self, algorithm: str) -> None:
        if algorithm not in self.algorithms:
            raise JobRefused(
                f"algorithm {algorithm!r} is not allowed on this server: allowed {list(self.algorithms)} ({self.source})"
            )

    def to_json(self) -> dict:
        values = asdict(self)
        values.pop("source")
        values["algorithms"] = list(self.algorithms)
        return values


# -- checks of single values (each raises JobRefused naming the setting, the value and the bound) ----------------
def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(name: str, value, low: int | None, high: int | None) -> int:
    if not _is_int(value):
        raise JobRefused(f"{name} = {value!r}: must be an integer")
    if (low is not None and value < low) or (high is not None and value > high):
        raise JobRefused(f"{name} = {value!r}: must be in [{low}, {'inf' if high is None else high}]")
    return value


def number(name: str, value, low: float, high: float, low_open: bool = False, high_open: bool = False) -> float:
    if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
        raise JobRefused(f"{name} = {value!r}: must be a finite number")
    if value < low or value > high or (low_open and value == low) or (high_open and value == high):
        raise JobRefused(
            f"{name} = {value!r}: must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        )
    return value


def boolean(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise JobRefused(f"{name} = {value!r}: must be true or false")
    return value


def choice(name: str, value, options: Iterable) -> None:
    options = list(options)
    if value not in options:
        raise JobRefused(f"{name} = {value!r}: must be one of {options}")


def plain_name(name: str, value) -> str:
    """A file name or job id a job gives: one path component inside the folder the server chose."""
    if not isinstance(value, str) or not PLAIN_NAME.match(value):
        raise JobRefused(
            f"{name} = {value!r}: must be a plain name (letters, digits, '_', '.', '-'; no folder, no '..', "
            "at most 128 characters)"
        )
    return value


def network_channels(channels) -> list[int]:
    if not isinstance(channels, (list, tuple)) or len(channels) < 2 or not all(_is_int(c) and c >= 1 for c in channels):
        raise JobRefused(f"channels = {channels!r}: must be a list of at least 2 positive integers")
    return list(channels)


def torch_component(name: str, spec, allowed: dict[str, tuple[str, ...]]) -> dict:
    """A FedOpt optimiser/scheduler spec: one of ``allowed``'s classes with only its known arguments."""
    if not isinstance(spec, dict) or not set(spec) <= {"path", "args", "config_type"}:
        raise JobRefused(f"{name} = {spec!r}: must be {{'path': ..., 'args': {{...}}}}")
    choice(f"{name}.path", spec.get("path"), allowed)
    if spec.get("config_type", "dict") != "dict":
        raise JobRefused(f"{name}.config_type = {spec.get('config_type')!r}: must be 'dict'")
    args = spec.get("args", {})
    if not isinstance(args, dict):
        raise JobRefused(f"{name}.args = {args!r}: must be an object")
    unknown = sorted(set(args) - set(allowed[spec["path"]]))
    if unknown:
        raise JobRefused(
            f"{name}.args: unknown argument(s) {unknown} for {spec['path']}; allowed {list(allowed[spec['path']])}"
        )
    return args


def check_optimizer(spec) -> str:
    """FedOpt's ``optimizer_args``; returns its class path."""
    args = torch_component("optimizer_args", spec, OPTIMIZER_ARGS)
    number("optimizer_args.args.lr", args.get("lr"), 0.0, MAX_SERVER_LR, low_open=True)
    for key in ("momentum", "dampening", "weight_decay"):
        if key in args:
            number(f"optimizer_args.args.{key}", args[key], 0.0, 1.0, high_open=True)
    for key in ("nesterov", "amsgrad"):
        if key in args:
            boolean(f"optimizer_args.args.{key}", args[key])
    if "eps" in args:
        number("optimizer_args.args.eps", args["eps"], 0.0, 1.0, low_open=True)
    if "betas" in args:
        betas = args["betas"]
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise JobRefused(f"optimizer_args.args.betas = {betas!r}: must be two numbers in [0, 1)")
        for beta in betas:
            number("optimizer_args.args.betas", beta, 0.0, 1.0, high_open=True)
    return spec["path"]


def check_scheduler(spec) -> None:
    """FedOpt's ``lr_scheduler_args``: a constant schedule that never takes the learning rate to 0."""
    args = torch_component("lr_scheduler_args", spec, SCHEDULER_ARGS)
    if "factor" in args:
        number("lr_scheduler_args.args.factor", args["factor"], 0.0, 1.0, low_open=True)
    if "total_iters" in args:
        integer("lr_scheduler_args.args.total_iters", args["total_iters"], 0, None)


JOB_MANAGER_ID = "job_manager"  # FLARE's job store component in a server kit's resources.json


def job_store(local_dir: str | None) -> str | None:
    """Where this server's FLARE keeps finished jobs (its job manager's ``uri_root``; ``fedseg install-policy
    server --store`` sets it), read from the kit's own ``resources.json`` (or ``.default``); None if not given.

    FLARE moves a finished job's server workspace there (``<store>/<job id>/workspace``, a zip) and removes
    the run folder, so a job that names a finished run is continued from there.
    """
    for name in ("resources.json", "resources.json.default"):
        path = os.path.join(local_dir or "", name)
        if local_dir and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                resources = json.load(f)
            for component in resources.get("components", []):
                if component.get("id") == JOB_MANAGER_ID:
                    root = component.get("args", {}).get("uri_root")
                    return root if isinstance(root, str) and os.path.isabs(root) else None
            return None
    return None
