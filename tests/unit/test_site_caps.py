"""What a hospital's site refuses of a job it does not trust: settings of the wrong JSON type or range, text
NVFlare would expand, settings over the site's caps, narrow validation, Scaffold, sending its local model;
and what its privacy filter bounds whatever the job's step count."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import fields, replace

import numpy as np
import pytest
import torch
from nvflare.apis.dxo import DXO, DataKind, MetaKey
from nvflare.apis.fl_constant import ReservedKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import UnsafeJobError
from nvflare.apis.shareable import Shareable, make_reply
from nvflare.apis.signal import Signal
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.filters.percentile_privacy import PercentilePrivacy as NVFlarePercentilePrivacy

import fedseg as package
from fedseg.executor import SiteExecutor
from fedseg.privacy import PercentilePrivacy
from fedseg.settings import PROFILES, TrainingSettings, check_setting, checked_settings
from fedseg.site_config import ALLOW_SCAFFOLD_ENV, SITE_CONFIG_FILE, SiteConfig, site_environment
from fedseg.trainer import parse_args

DEMO = PROFILES["demo"].training_values()


def executor(**training) -> SiteExecutor:
    return SiteExecutor(package_version=package.__version__, training={**DEMO, **training})


def refusal(site: SiteConfig, **training) -> str:
    with pytest.raises((ValueError, PermissionError)) as caught:
        executor(**training).script_arguments(site, "site-1")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("site-1 refuses the job: "), message
    return message


def site_file(tmp_path, **values) -> SiteConfig:
    (tmp_path / SITE_CONFIG_FILE).write_text(json.dumps(values))
    return SiteConfig.load(str(tmp_path))


HOSTILE = [
    ("local_steps", True),  # a bool where an int goes
    ("local_steps", 1e9),  # a JSON float for an int
    ("local_steps", "10"),
    ("local_steps", -1),
    ("local_epochs", 2.0),
    ("seed", -1),
    ("seed", 2**31),
    ("lr", "${secret:file:/etc/hostname}"),
    ("lr", "${secret:HOME}"),
    ("lr", 0),
    ("lr", -0.1),
    ("lr", 1.5),
    ("lr", True),
    ("lr", float("nan")),
    ("lr", float("inf")),
    ("batch_size", 0),
    ("samples_per_case", 0),
    ("sw_batch_size", 0),
    ("crop", [0, 0, 0]),
    ("crop", [48, 48]),
    ("crop", [[48, 48], 48, 48]),
    ("crop", [48.0, 48, 48]),
    ("crop", [True, 48, 48]),
    ("crop", "48 48 48"),
    ("crop", "${secret:X}"),
    ("channels", [16]),
    ("channels", [16] * 9),
    ("channels", [16, -32]),
    ("channels", {"a": 1}),
    ("loss", "dice"),
    ("loss", "${secret:X}"),
    ("amp", 1),
    ("amp", "true"),
    ("threads", -1),
    ("num_workers", 1.5),
    ("val_max_cases", -1),
    ("cache_ram_mb", None),
]


@pytest.mark.parametrize(("name", "value"), HOSTILE)
def test_a_setting_of_the_wrong_type_or_out_of_range_is_refused_naming_it(name, value):
    message = refusal(SiteConfig(), **{name: value})
    assert f"training setting {name} " in message and "expected" in message


def test_every_training_field_is_checked_and_the_profiles_pass():
    for profile in PROFILES.values():
        for f in fields(TrainingSettings):
            assert check_setting(f.name, getattr(profile, f.name)) == getattr(profile, f.name)
            with pytest.raises(ValueError, match=f"training setting {f.name} "):
                check_setting(f.name, object())  # nothing of no JSON type passes any field
    # what JSON gives: lists for tuples, an int for a float; val_max_cases 0 (every case) stays allowed
    settings = checked_settings({"crop": [32, 32, 24], "lr": 1, "val_max_cases": 0})
    assert settings.crop == (32, 32, 24) and settings.lr == 1.0 and isinstance(settings.lr, float)
    with pytest.raises(ValueError, match="local_steps > 0 or local_epochs > 0"):
        checked_settings({"local_steps": 0, "local_epochs": 0})
    with pytest.raises(ValueError, match="expected a JSON object"):
        checked_settings(["lr", 1])


def test_the_default_caps_take_the_demo_and_fets2022_profiles_and_the_tiny_test_job():
    for name, profile in PROFILES.items():
        assert SiteConfig().refusal(profile) is None, name
    tiny = replace(PROFILES["demo"], local_epochs=1, crop=(32, 32, 24), channels=(8, 16, 32), threads=1)
    assert SiteConfig().refusal(tiny) is None


def over_one(cap: str, settings: TrainingSettings) -> dict:
    """A site file whose ``cap`` is one below what ``settings`` ask (threads: 0 means every core)."""
    measure = SiteConfig.__dataclass_fields__[cap].metadata["cap"][1]
    return {cap: measure(settings) - 1}


CAPS = [f.name for f in fields(SiteConfig) if "cap" in f.metadata]


@pytest.mark.parametrize("cap", CAPS)
def test_each_cap_refuses_a_job_one_over_it_with_setting_value_cap_and_file(cap, tmp_path):
    job = {**DEMO, "local_steps": 5, "threads": 3, "num_workers": 2, "cache_ram_mb": 64}
    settings = checked_settings(job)
    limit = over_one(cap, settings)[cap]
    others = {"max_threads": 64}  # this machine's cores may be fewer than the job's 3 threads
    site = site_file(tmp_path, **{**others, cap: limit})
    message = refusal(site, **job)
    setting = SiteConfig.__dataclass_fields__[cap].metadata["cap"][0]
    assert f"{setting} {limit + 1} is over this site's cap {cap} {limit} ({tmp_path / SITE_CONFIG_FILE})" in message
    at_cap = site_file(tmp_path, **{**others, cap: limit + 1})
    assert executor(**job).script_arguments(at_cap, "site-1")  # at the cap: runs


def test_the_caps_hold_against_the_issues_jobs(tmp_path):
    defaults = SiteConfig()
    assert "local_steps 1000000000 is over this site's cap max_local_steps 500" in refusal(
        defaults, local_steps=1000000000
    )
    assert "num_workers 512 is over this site's cap max_num_workers 4" in refusal(defaults, num_workers=512)
    assert "crop 512 is over this site's cap max_crop 192" in refusal(defaults, crop=[512, 512, 512])
    assert "channels 4096 is over this site's cap max_channels 256" in refusal(defaults, channels=[16, 4096])
    assert "max_levels 5" in refusal(defaults, channels=[8] * 6)
    assert "batch_size x samples_per_case 9 is over" in refusal(defaults, batch_size=3, samples_per_case=3)
    assert f"threads {os.cpu_count() + 1} is over this site's cap max_threads {os.cpu_count()}" in refusal(
        defaults, threads=os.cpu_count() + 1
    )
    assert "this site's default; no local/fedseg_site.json" in refusal(defaults, local_steps=501)


def test_validation_below_the_sites_minimum_is_refused_and_every_case_stays_allowed(tmp_path):
    for narrow in range(1, 8):
        message = refusal(SiteConfig(), val_max_cases=narrow)
        assert f"val_max_cases {narrow} is under this site's minimum min_val_cases 8" in message
    for allowed in (0, 8, 50):
        line = executor(val_max_cases=allowed).script_arguments(SiteConfig(), "site-1")
        assert parse_args(line.split()).min_val_cases == 8  # the trainer gets the minimum too
    assert executor(val_max_cases=2).script_arguments(site_file(tmp_path, min_val_cases=2), "site-1")


def test_nothing_that_nvflare_would_expand_reaches_the_trainer():
    for site in (SiteConfig(data_root="/data/${secret:HOME}"), SiteConfig(cache_dir="/c/{x}")):
        assert "holds $, { or }" in refusal(site)
    drills = SiteExecutor(package_version=package.__version__, drills=["${secret:file:/etc/hostname}"])
    with pytest.raises(ValueError, match=r"holds \$, \{ or \}"):
        drills.script_arguments(SiteConfig(allow_drills=True), "site-1")
    line = executor().script_arguments(SiteConfig(data_root="/data", cache_dir="/cache"), "site-1")
    assert not any(c in line for c in "${}")


def test_a_bad_site_file_value_is_refused_with_the_file(tmp_path):
    for key, value in (("max_local_steps", "500"), ("max_local_steps", True), ("min_val_cases", -1)):
        with pytest.raises(ValueError, match=f"{SITE_CONFIG_FILE}: {key} "):
            site_file(tmp_path, **{key: value})
    with pytest.raises(ValueError, match="share_local_model 1 is not true or false"):
        site_file(tmp_path, share_local_model=1)


def context(name: str = "site-1") -> FLContext:
    fl_ctx = FLContext()
    fl_ctx.set_prop(ReservedKey.IDENTITY_NAME, name, private=False, sticky=True)
    return fl_ctx


def scaffold_task() -> Shareable:
    meta = {AlgorithmConstants.SCAFFOLD_CTRL_GLOBAL: {"w": np.zeros(2)}}
    return DXO(data_kind=DataKind.WEIGHTS, data={"w": np.zeros(2)}, meta=meta).to_shareable()


def test_a_scaffold_job_is_refused_unless_the_site_allows_it(caplog):
    refusing = executor()
    refusing._site = SiteConfig()
    with (
        caplog.at_level(logging.ERROR),
        pytest.raises(UnsafeJobError, match="site-1 refuses the job: it is a Scaffold"),
    ):
        refusing.execute("train", scaffold_task(), context(), Signal())
    assert "allow_scaffold" in caplog.text
    allowing = executor()
    allowing._site = SiteConfig(allow_scaffold=True)
    reply = allowing.execute("train", scaffold_task(), context(), Signal())  # on to the trainer (none here)
    assert reply.get_return_code() == ReturnCode.EXECUTION_EXCEPTION
    plain = DXO(data_kind=DataKind.WEIGHTS, data={"w": np.zeros(2)}).to_shareable()
    assert refusing.execute("train", plain, context(), Signal()).get_return_code() == ReturnCode.EXECUTION_EXCEPTION


def test_the_simulator_and_poc_allow_scaffold_for_their_local_sites_only_when_asked(monkeypatch):
    monkeypatch.delenv(ALLOW_SCAFFOLD_ENV, raising=False)
    with site_environment(allow_scaffold=True):
        assert SiteConfig.load(None).allow_scaffold
    assert not SiteConfig.load(None).allow_scaffold
    with site_environment():
        assert not SiteConfig.load(None).allow_scaffold


def test_the_local_model_is_not_sent_unless_the_site_shares_it():
    private = executor()
    private._site = SiteConfig()
    reply = private.execute(AppConstants.TASK_SUBMIT_MODEL, Shareable(), context(), Signal())
    assert reply.get_return_code() == ReturnCode.TASK_UNSUPPORTED and not reply.get("DXO")
    sharing = executor()
    sharing._site = SiteConfig(share_local_model=True)
    reply = sharing.execute(AppConstants.TASK_SUBMIT_MODEL, Shareable(), context(), Signal())
    assert reply.get_return_code() != ReturnCode.TASK_UNSUPPORTED  # on to the trainer


def test_cross_site_evaluation_goes_on_without_a_refused_local_model(monkeypatch):
    """What CrossSiteModelEval does with the site's TASK_UNSUPPORTED: logs it, keeps and forwards nothing."""
    from nvflare.app_common.workflows.cross_site_model_eval import CrossSiteModelEval

    evaluation = CrossSiteModelEval()
    sent, errors = [], []
    monkeypatch.setattr(evaluation, "fire_event", lambda *a: None)
    monkeypatch.setattr(evaluation, "_send_validation_task", lambda name, fl_ctx: sent.append(name))
    monkeypatch.setattr(evaluation, "log_error", lambda fl_ctx, msg: errors.append(msg))
    evaluation._accept_local_model("site-1", make_reply(ReturnCode.TASK_UNSUPPORTED), context("server"))
    assert (
        sent == []
        and evaluation._client_models == {}
        and errors == ["Return code set. Model submission from client will be ignored."]
    )


def test_our_jobs_ask_for_the_global_model_only(tmp_path):
    from fedseg.jobs.export import export_job
    from fedseg.jobs.recipes import JobSettings

    job = export_job(JobSettings(algorithm="fedavg", name="cse", sites=["site-1"]), str(tmp_path))
    (config,) = [os.path.join(d, "config_fed_server.json") for d, _, f in os.walk(job) if "config_fed_server.json" in f]
    (evaluation,) = [w for w in json.load(open(config))["workflows"] if w["path"].endswith("CrossSiteModelEval")]
    assert evaluation["args"] == {"model_locator_id": "locator", "submit_model_task_name": ""}


def update(steps: int) -> DXO:
    generator = torch.Generator().manual_seed(0)
    data = {"a": torch.randn(50, 40, generator=generator) * 0.05 * steps, "b": torch.randn(30, generator=generator)}
    return DXO(data_kind=DataKind.WEIGHT_DIFF, data=data, meta={MetaKey.NUM_STEPS_CURRENT_ROUND: steps})


def test_the_privacy_clip_does_not_grow_with_the_jobs_step_count():
    ours = PercentilePrivacy(percentile=10, gamma=0.01, data_kinds=["WEIGHT_DIFF"])
    theirs = NVFlarePercentilePrivacy(percentile=10, gamma=0.01, data_kinds=["WEIGHT_DIFF"])
    for steps in (1, 1000, 10**6):
        filtered = ours.process_dxo(update(steps), Shareable(), context())
        values = torch.cat([v.ravel() for v in filtered.data.values()])
        assert isinstance(filtered.data["a"], torch.Tensor) and filtered.data["a"].dtype == torch.float32
        assert float(values.abs().max()) <= 0.01  # whatever the steps
        assert 0.095 <= float((values == 0).float().mean()) <= 0.11  # the 10% smallest zeroed
    # NVFlare's own filter: the bound is gamma x steps, so a job with many steps sends what it likes
    bypassed = theirs.process_dxo(update(10**6), Shareable(), context())
    assert max(float(np.abs(np.asarray(v)).max()) for v in bypassed.data.values()) > 1000


def test_the_privacy_filter_refuses_bad_arguments():
    for args in ({"gamma": 0}, {"gamma": "0.1"}, {"percentile": 101}, {"percentile": True}, {"gamma": float("nan")}):
        with pytest.raises(ValueError, match="PercentilePrivacy"):
            PercentilePrivacy(**args)
