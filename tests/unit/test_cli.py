"""The ``fedseg`` commands: every job setting is an option made from its field, the options land in the settings,
the options that existed before keep their names, ``fedseg --help`` lists every command, and ``python -m
fedseg.data_prep fets2022`` is ``fedseg prepare``."""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
from dataclasses import fields

import pytest

from fedseg.app.cli import COMMANDS, RUN_COMMANDS, build_parser, main
from fedseg.jobs import export
from fedseg.jobs.options import COMMANDS as JOB_COMMANDS
from fedseg.jobs.options import job_settings
from fedseg.jobs.settings import EXPORT, INTERNAL, JOB, LOCAL, JobSettings, job_fields
from fedseg.settings import DEFAULT_SITES, PROFILES, TrainingSettings, option_name


def command_parser(command: str, run_options: bool = True) -> argparse.ArgumentParser:
    if command == "export":
        return export.build_parser()
    (commands,) = [a for a in build_parser(run_options)._actions if isinstance(a, argparse._SubParsersAction)]
    return commands.choices[command]


def options(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """dest -> option strings of every option of a parser."""
    return {a.dest: a.option_strings for a in parser._actions if a.option_strings}


def test_every_job_setting_is_an_option_of_a_run_command_or_of_the_exporter():
    offered = set()
    for command in (*RUN_COMMANDS, "export"):
        offered |= set(options(command_parser(command)))
    missing = [f.name for f in fields(JobSettings) if f.name not in offered and f.metadata.get("scope") != INTERNAL]
    assert missing == []
    # what no command offers is set by the commands themselves, and says so
    assert [(f.name, "set by" in f.metadata["help"]) for f in job_fields(INTERNAL)] == [
        ("clock_cases", True),
        ("checkpoint_store", True),
    ]
    assert all(f.metadata["help"] and f.metadata["group"] for f in job_fields())


@pytest.mark.parametrize("command", [*RUN_COMMANDS, "export"])
def test_a_command_offers_every_job_field_but_those_it_sets_itself_and_no_other_machine_s_path(command):
    spec, given = JOB_COMMANDS[command], options(command_parser(command))
    for f in job_fields(JOB):
        assert (f.name in given) != (f.name in spec.leave_out + spec.plural), f.name
    for f in job_fields(LOCAL):
        assert (f.name in given) == (f.name in spec.local), f.name
    for f in job_fields(EXPORT):
        assert (f.name in given) == (command == "export"), f.name
    for f in fields(TrainingSettings):
        assert given[f.name] == [option_name(f.name, dashes=True)]
    if command == "export":  # the exported job names no path of this machine
        assert not {"data_root", "cache_dir", "resume_from", "checkpoint_store"} & set(given)


# the options each command had before they were made from the fields (tests, docs and the Makefile use them)
TRAINING_OPTIONS = [option_name(f.name, dashes=True) for f in fields(TrainingSettings)]
RUN_OPTIONS = shlex.split(
    "--algorithm --rounds --profile --cache-dir --p --lambda1 --lambda2 --reference-weighting --fedref-variant "
    "--fedref-momentum --clients-per-round --no-cross-site-eval --min-clients --wait-after-min-seconds "
    "--dead-site-seconds --quantization"
)
EARLIER_OPTIONS = {
    "simulate": ["--data-root", "--sites", "--workspace", *RUN_OPTIONS],
    "compare": ["--data-root", "--runs", "--algorithms", "--sites", "--workspace", "--out", "--target", "--seeds"]
    + [o for o in RUN_OPTIONS if o != "--algorithm"],  # compare's --algorithm did nothing: --algorithms picks
    "poc": ["--data-root", "--sites", "--out", "--demo-dir", "--resume-from", *RUN_OPTIONS],
    "demo": ["--out", *RUN_OPTIONS],
    "export": shlex.split(
        "--out --rounds --sites --algorithms --quantization --profile --byoc --resume-job --planned-rounds"
    ),
}


@pytest.mark.parametrize("command", EARLIER_OPTIONS)
def test_the_options_a_command_had_keep_their_names(command):
    given = {o for strings in options(command_parser(command)).values() for o in strings}
    expected = EARLIER_OPTIONS[command] + (TRAINING_OPTIONS if command != "export" else [])
    assert sorted(set(expected) - given) == []


def test_the_new_options_reach_the_settings():
    args = build_parser().parse_args(
        shlex.split(
            "simulate --data-root sites --sites a b c d --fedprox-mu 0.05 --server-lr 0.2 --server-momentum 0.5 "
            "--lambda2-factor 1.5 --lambda2-every 2 --lambda2-max 0.9 --fedref-alpha-max 0.3 "
            "--no-validate-absent-sites --fault a:nan:1 --fault b:die:3 --byoc --name trial --rounds 4 --p 5 "
            "--local-steps 6 --amp false"
        )
    )
    settings = job_settings(args, "simulate")
    assert (settings.fedprox_mu, settings.server_lr, settings.server_momentum) == (0.05, 0.2, 0.5)
    assert (settings.lambda2_factor, settings.lambda2_every, settings.lambda2_max) == (1.5, 2, 0.9)
    assert (settings.fedref_alpha_max, settings.validate_absent_sites, settings.byoc) == (0.3, False, True)
    assert settings.faults == ["a:nan:1", "b:die:3"] and settings.sites == ["a", "b", "c", "d"]
    assert (settings.name, settings.num_rounds, settings.buffer_size) == ("trial", 4, 5)
    assert (settings.local_steps, settings.amp, settings.data_root) == (6, False, os.path.abspath("sites"))


def test_options_not_given_take_the_command_s_defaults_then_the_fields():
    """The demo's settings are what they were: the demo profile, 20 rounds, the default sites, every other field
    at its default; POC runs 5 rounds, the simulator the field's 10; an exported job uses torch's threads."""
    out = os.path.abspath("demo_output")
    demo = job_settings(
        build_parser().parse_args(["demo"]), "demo", data_root=os.path.join(out, "sites"), sites=list(DEFAULT_SITES)
    )
    assert demo == JobSettings(num_rounds=20, data_root=os.path.join(out, "sites"))
    assert demo.training_values() == PROFILES["demo"].training_values() and demo.sites == ["site-1", "site-2", "site-3"]
    assert job_settings(build_parser().parse_args(["poc"]), "poc").num_rounds == 5
    assert job_settings(build_parser().parse_args(["simulate", "--data-root", "s"]), "simulate").num_rounds == 10
    assert job_settings(export.build_parser().parse_args([]), "export", algorithm="fedavg").threads == 0


def test_a_flag_turns_its_setting_round_and_the_help_says_the_default():
    parser = command_parser("simulate")
    text = parser.format_help()
    assert "--no-cross-site-eval" in text and "--byoc" in text and "--no-validate-absent-sites" in text
    assert re.search(r"--rounds ROUNDS\s+federated rounds \(default: 10\)", text)
    assert re.search(r"--rounds ROUNDS\s+federated rounds \(default: 5\)", command_parser("poc").format_help())
    with pytest.raises(SystemExit):
        parser.parse_args(["--quantization", "int3"])  # the choices are the field's


def test_fedseg_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    listed = [name for name, *_ in COMMANDS if re.search(rf"^\s+{re.escape(name)}(\s|$)", text, re.M)]
    assert listed == [name for name, *_ in COMMANDS] and len(listed) == 12
    full, light = command_parser, lambda name: command_parser(name, run_options=False)
    for name, *_ in COMMANDS:  # the light parser has every command too; only the run options are left out
        assert set(options(light(name))) <= set(options(full(name)))


def test_the_other_commands_parse_without_importing_nvflare_and_the_run_commands_without_torch():
    code = (
        "import sys\n"
        "from fedseg.app.cli import build_parser\n"
        "build_parser(run_options=False).parse_args(['report', 'x'])\n"
        "light = 'nvflare' in sys.modules\n"
        "build_parser().parse_args(['simulate', '--data-root', 'x'])\n"
        "print(light, 'torch' in sys.modules, 'monai' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert done.stdout.split() == ["False", "False", "False"]


def test_data_prep_fets2022_is_an_alias_of_fedseg_prepare(tmp_path, capsys):
    from fedseg.data_prep.cli import main as data_prep_main

    missing = str(tmp_path / "no_such_folder")
    outputs = []
    for run in (
        lambda: main(["prepare", missing, "--out", str(tmp_path / "o")]),
        lambda: data_prep_main(["fets2022", missing, "--out", str(tmp_path / "o")]),
    ):
        code = run()
        outputs.append((code, capsys.readouterr()))
    assert outputs[0] == outputs[1] and outputs[0][0] == 1
    with pytest.raises(SystemExit):
        data_prep_main(["--help"])
    assert "alias of `fedseg prepare`" in capsys.readouterr().out
