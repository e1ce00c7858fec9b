"""The commands' options for the job settings, made from the fields of ``fedseg.jobs.settings.JobSettings``.

``add_job_arguments(parser, command)`` adds one option per field the command offers, in the fields' groups, then
one per training field (``fedseg.settings``); ``job_settings(args, command)`` builds the settings back from what
was given: the profile's training values, then the command's own defaults, then the options given. ``COMMANDS``
says what each command makes of the fields: the machine-local ones it takes, those it takes as a list (one run
per value, e.g. ``--algorithms``), those it sets itself, and its defaults.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from fedseg.jobs.settings import EXPORT, GROUPS, INTERNAL, JOB, LOCAL, JobSettings, job_fields
from fedseg.settings import DEFAULT_PROFILE, TrainingSettings, add_training_arguments, option_name

TRAINING_GROUP = "the sites' training (fedseg.settings): the profile's value unless given"


@dataclass(frozen=True)
class Command:
    """What a command makes of the job fields: the ``local`` ones it takes too, the ``plural`` ones it takes as a
    list (one run per value), those it sets itself (``leave_out``), its own ``defaults`` over the fields', the
    ``required`` ones, and ``notes`` that replace a field's default in its help."""

    local: tuple[str, ...] = ()
    plural: tuple[str, ...] = ()
    leave_out: tuple[str, ...] = ()
    defaults: Mapping[str, Any] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    notes: Mapping[str, str] = field(default_factory=dict)
    export: bool = False  # the exporter: the export-only fields too

    def offers(self, f) -> bool:
        scope = f.metadata["scope"]
        if f.name in self.leave_out or f.name in self.plural or scope == INTERNAL:
            return False
        return scope == JOB or (scope == LOCAL and f.name in self.local) or (scope == EXPORT and self.export)

    def default(self, name: str) -> Any:
        if name in self.defaults:
            return self.defaults[name]
        f = JobSettings.__dataclass_fields__[name]
        return f.default_factory() if f.default_factory is not MISSING else f.default


DEMO_ROUNDS = 20  # the demo's and the comparison's: enough rounds for the curves to separate
COMMANDS = {
    "simulate": Command(local=("data_root", "cache_dir", "challenge_clock"), required=("data_root",)),
    "compare": Command(
        local=("data_root", "cache_dir", "challenge_clock"),
        plural=("algorithm",),
        leave_out=("name",),  # one run folder per algorithm (and seed): compare names them
        defaults={"num_rounds": DEMO_ROUNDS},
        notes={"data_root": "runs every algorithm; or give --runs"},
    ),
    "poc": Command(
        local=("data_root", "cache_dir", "resume_from", "challenge_clock"),
        defaults={"num_rounds": 5},
        notes={
            "data_root": "default: the demo's sites, see --demo-dir",
            "sites": "default: every prepared site folder",
        },
    ),
    "demo": Command(local=("cache_dir",), leave_out=("sites",), defaults={"num_rounds": DEMO_ROUNDS}),
    # the committed jobs: no path of this machine; the sites' own machines, so torch's default threads
    "export": Command(plural=("algorithm",), defaults={"threads": 0}, export=True),
}


def _value_type(name: str) -> type:
    """``int | None`` -> int, ``list[str]`` -> list (the annotations are strings in this module)."""
    hint = get_type_hints(JobSettings)[name]
    if get_origin(hint) in (Union, types.UnionType):
        (hint,) = [a for a in get_args(hint) if a is not type(None)]
    return get_origin(hint) or hint


def _shown(value: Any) -> str:
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def _add_option(group, f, command: Command) -> None:
    meta, kind, default = f.metadata, _value_type(f.name), command.default(f.name)
    note = command.notes.get(f.name)
    if note:
        shown = f" ({note})"
    elif kind is bool:
        shown = " (on; this flag turns it off)" if default else " (off unless given)"
    else:
        shown = "" if default is None or default == [] else f" (default: {_shown(default)})"
    help_text = meta["help"] + shown
    name = meta["option"] or option_name(f.name, dashes=True)
    metavar = meta["metavar"] or name[2:].replace("-", "_").upper()
    extra = {"required": True} if f.name in command.required else {}
    if kind is bool:  # a flag that turns the default round: --byoc, --no-cross-site-eval
        flag = name if not default else "--no-" + name[2:]
        group.add_argument(flag, dest=f.name, action="store_const", const=not default, help=help_text)
    elif meta["append"]:
        group.add_argument(name, dest=f.name, action="append", metavar=metavar, help=help_text)
    elif kind is list:
        group.add_argument(name, dest=f.name, nargs="+", metavar=metavar, help=help_text, **extra)
    else:
        kwargs = {"choices": meta["choices"]} if meta["choices"] else {"type": kind, "metavar": metavar}
        group.add_argument(name, dest=f.name, help=help_text, **kwargs, **extra)


def add_job_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """The options ``command`` takes for the job fields it offers, by group, then one per training field.

    Every option defaults to ``None`` (not given): ``job_settings`` fills the rest from the command's defaults,
    the profile and the fields. A plural field is one list option (``--algorithms``), defaulting to every choice.
    """
    spec = COMMANDS[command]
    groups = {key: parser.add_argument_group(title) for key, title in GROUPS.items()}
    for f in job_fields():
        if f.name in spec.plural:
            choices = list(f.metadata["choices"])
            groups[f.metadata["group"]].add_argument(
                f.metadata["plural"],
                dest=f.metadata["plural"][2:],
                nargs="+",
                choices=choices,
                default=choices,
                metavar=f.name.upper(),
                help=f"{f.metadata['help']}s, one run each, of {', '.join(choices)} (default: all)",
            )
        elif spec.offers(f):
            _add_option(groups[f.metadata["group"]], f, spec)
    add_training_arguments(parser.add_argument_group(TRAINING_GROUP), None, dashes=True)


def offered_fields(command: str) -> list[str]:
    """The fields ``command`` has one option each for (training fields included)."""
    spec = COMMANDS[command]
    return [f.name for f in fields(TrainingSettings)] + [f.name for f in job_fields() if spec.offers(f)]


def job_settings(args: argparse.Namespace, command: str, **fixed) -> JobSettings:
    """The settings of a run of ``command``: the profile's training values, then the command's defaults, then
    every option given, then ``fixed`` (what the command decides itself, e.g. one algorithm of ``--algorithms``)."""
    name = fixed.pop("profile", None) or getattr(args, "profile", None) or DEFAULT_PROFILE
    given = {key: getattr(args, key) for key in offered_fields(command) if getattr(args, key, None) is not None}
    return JobSettings.for_profile(name, **{**COMMANDS[command].defaults, **given, **fixed})
