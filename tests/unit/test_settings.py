"""Every training setting is defined once (``fedseg.settings``) and every command is built from it."""

from __future__ import annotations

import glob
import os
import re
from dataclasses import fields

import pytest

from fedseg.app.cli import build_parser
from fedseg.jobs.options import job_settings
from fedseg.jobs.recipes import REPO_ROOT
from fedseg.jobs.settings import JobSettings
from fedseg.settings import PROFILES, TrainingSettings, profile, settings_from_arguments
from fedseg.site_config import SiteConfig
from fedseg.trainer import parse_args

TRAINING_FIELDS = [f.name for f in fields(TrainingSettings)]


def test_trainer_defaults_are_the_settings_defaults():
    assert settings_from_arguments(parse_args([]), TrainingSettings()) == TrainingSettings().training_values()


def test_job_settings_start_from_the_demo_profile_and_any_profile_round_trips_through_the_job():
    assert JobSettings().training_values() == PROFILES["demo"].training_values()
    for name in PROFILES:
        job = JobSettings.for_profile(name, local_steps=7)
        trainer_args = parse_args(job.site_executor().script_arguments(SiteConfig()).split())
        assert settings_from_arguments(trainer_args, TrainingSettings()) == {
            **profile(name).training_values(),
            "local_steps": 7,
        }


@pytest.mark.parametrize("command", ["simulate", "poc", "demo", "compare"])
def test_commands_take_the_profile_and_override_single_values(command):
    extra = ["--data-root", "sites"] if command == "simulate" else []
    args = build_parser().parse_args([command, *extra, "--profile", "fets2022", "--local-steps", "3"])
    settings = job_settings(args, command, **_as_the_command_sets_them(command))
    assert settings.profile == "fets2022" and settings.local_steps == 3
    assert settings.crop == profile("fets2022").crop and settings.channels == profile("fets2022").channels
    plain = build_parser().parse_args([command, *extra])
    assert job_settings(plain, command, **_as_the_command_sets_them(command)).training_values() == (
        PROFILES["demo"].training_values()
    )


def _as_the_command_sets_them(command: str) -> dict:
    """compare runs one algorithm of --algorithms at a time; poc and demo fill in their sites themselves."""
    return {"compare": {"algorithm": "fedavg"}, "poc": {"sites": ["site-1"]}, "demo": {"sites": ["site-1"]}}.get(
        command, {}
    )


def test_no_second_definition_of_a_training_option():
    """Only fedseg.settings declares the training options; a hand-written copy elsewhere fails here."""
    names = (
        "|".join(re.escape(n) for n in TRAINING_FIELDS)
        + "|"
        + "|".join(re.escape(n.replace("_", "-")) for n in TRAINING_FIELDS)
    )
    pattern = re.compile(r"add_argument\(\s*[\"']--(" + names + r")[\"']")
    allowed = {  # options that share a name but not a meaning with a training setting
        os.path.join("app", "cli.py"): {"seed", "channels"},  # synth's data seed; infer's bare-checkpoint network
        os.path.join("data_prep", "cli.py"): {"seed"},  # the training/validation split's seed
        os.path.join("bench", "gpu_step.py"): {"channels"},  # a measurement's override, default from the profile
    }
    offenders = []
    for path in glob.glob(os.path.join(REPO_ROOT, "**", "*.py"), recursive=True):
        relative = os.path.relpath(path, REPO_ROOT)
        if relative.startswith((".venv", "jobs" + os.sep + "fed", "jobs" + os.sep + "scaffold", "build")):
            continue  # the environment and the exported job copies
        for match in pattern.finditer(open(path, encoding="utf-8").read()):
            if match.group(1).replace("-", "_") not in allowed.get(relative, set()):
                offenders.append(f"{relative}: --{match.group(1)}")
    assert offenders == []


def test_the_readmes_settings_table_is_the_generated_one():
    """`python -m fedseg.settings` writes it; edit settings.py and paste its output, never the table."""
    from fedseg.settings import settings_markdown

    readme = open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8").read()
    start = readme.index("<!-- settings table:")
    block = readme[readme.index("\n", start) + 1 : readme.index("<!-- end of settings table -->")]
    assert block == settings_markdown(), "README's settings table is stale: paste `python -m fedseg.settings`"
