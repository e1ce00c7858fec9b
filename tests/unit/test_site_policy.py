"""What a hospital controls: its own folders (``fedseg_site.json``), the job's version, drills, and the
policy files `fedseg install-policy` writes into a kit that `make provision` made."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from helpers.commands import fedseg, make, ok

import fedseg as package
from fedseg.app.kit_policy import BACKUP_SUFFIX, PolicyError, install_policy
from fedseg.executor import SiteExecutor, VersionMismatch
from fedseg.policy import allow_list
from fedseg.site_config import ALLOW_DRILLS_ENV, SITE_CONFIG_FILE, SiteConfig
from fedseg.trainer import parse_args


def write_site_config(folder, **values) -> str:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, SITE_CONFIG_FILE), "w") as f:
        json.dump(values, f)
    return str(folder)


def test_the_site_file_wins_over_the_environment_and_the_environment_fills_the_rest(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSEG_DATA_ROOT", "/from/env")
    monkeypatch.setenv("FEDSEG_CACHE_DIR", "/cache/env")
    local = write_site_config(tmp_path / "local", data_root="/hospital/data")
    config = SiteConfig.load(local)
    assert (config.data_root, config.cache_dir, config.allow_drills) == ("/hospital/data", "/cache/env", False)
    assert config.source.endswith(SITE_CONFIG_FILE)
    assert SiteConfig.load(str(tmp_path / "no_such_folder")).data_root == "/from/env"


def test_a_bad_site_file_is_named_with_its_reason(tmp_path):
    local = write_site_config(tmp_path / "a", data_root="/d", data_rot="/typo")
    with pytest.raises(ValueError, match=r"fedseg_site.json: unknown setting\(s\) \['data_rot'\]"):
        SiteConfig.load(local)
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / SITE_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SiteConfig.load(str(tmp_path / "b"))


def test_the_trainer_gets_the_sites_folders_and_the_jobs_training_settings():
    executor = SiteExecutor(package_version=package.__version__, training={"local_epochs": 3, "crop": [32, 32, 24]})
    line = executor.script_arguments(SiteConfig(data_root="/hospital/data", cache_dir="/scratch/cache"))
    args = parse_args(line.split())
    assert (args.data_root, args.cache_dir, args.local_epochs, args.crop) == (
        "/hospital/data",
        "/scratch/cache",
        3,
        [32, 32, 24],
    )
    assert args.fault == []


def test_a_job_built_for_another_version_is_refused_naming_both():
    with pytest.raises(
        VersionMismatch,
        match=rf"built for fedref-seg 9\.9\.9 and this machine has fedref-seg "
        rf"{package.__version__}",
    ):
        SiteExecutor(package_version="9.9.9")


def test_an_unknown_training_setting_is_refused_not_ignored():
    executor = SiteExecutor(package_version=package.__version__, training={"local_epoch": 3})
    with pytest.raises(ValueError, match=r"site-1 refuses the job: unknown training setting\(s\) \['local_epoch'\]"):
        executor.script_arguments(SiteConfig(), "site-1")


def test_drills_run_only_where_the_site_allows_them(tmp_path, monkeypatch):
    executor = SiteExecutor(package_version=package.__version__, drills=["site-1:nan:1"])
    with pytest.raises(PermissionError, match="site-1 refuses the job: it asks for resilience drills"):
        executor.script_arguments(SiteConfig(allow_drills=False), "site-1")
    assert "--fault site-1:nan:1" in executor.script_arguments(SiteConfig(allow_drills=True), "site-1")
    monkeypatch.setenv(ALLOW_DRILLS_ENV, "1")  # the simulator and POC set this for their local sites
    assert SiteConfig.load(None).allow_drills
    # a hospital's file says no, whatever the environment says
    assert not SiteConfig.load(write_site_config(tmp_path, allow_drills=False)).allow_drills


def test_a_folder_with_spaces_is_refused_clearly():
    executor = SiteExecutor(package_version=package.__version__)
    with pytest.raises(ValueError, match="with whitespace"):
        executor.script_arguments(SiteConfig(data_root="/my data"), "site-1")


@pytest.fixture(scope="module")
def kits(tmp_path_factory) -> str:
    """The kits `make provision` writes from the committed project.yml (fresh copies per test below)."""
    workspace = tmp_path_factory.mktemp("provision")
    output = ok(make("provision", PROVISION_DIR=str(workspace), timeout=120))
    (kits,) = [line.split(": ", 1)[1] for line in output.splitlines() if line.startswith("startup kits: ")]
    return kits.rstrip("/")


@pytest.fixture
def kit(kits, tmp_path):
    def copy(name: str) -> str:
        return shutil.copytree(os.path.join(kits, name), tmp_path / "kits" / name)

    return copy


def test_install_policy_on_a_site_kit_as_the_operator_guide_writes_it(kit, tmp_path, tiny_fets):
    site = kit("site-1")
    (tmp_path / "sites" / "site-1").mkdir(parents=True)
    (tmp_path / "sites" / "site-1" / "datalist.json").write_text("{}")
    output = ok(
        fedseg(
            "install-policy",
            str(site),
            "--data-root",
            str(tmp_path / "sites"),
            "--cache-dir",
            str(tmp_path / "cache"),
            cwd=str(tmp_path),
        )
    )
    local = os.path.join(site, "local")
    assert sorted(line.split("/")[-1] for line in output.splitlines()) == sorted(
        ["authorization.json", "privacy.json", "resources.json", SITE_CONFIG_FILE]
    )
    authorization = json.load(open(os.path.join(local, "authorization.json")))
    assert {
        role: rights.get("byoc", "none") if isinstance(rights, dict) else rights
        for role, rights in authorization["permissions"].items()
    } == dict.fromkeys(["project_admin", "org_admin", "lead", "member"], "none")
    resources = json.load(open(os.path.join(local, "resources.json")))
    default = json.load(open(os.path.join(local, "resources.json.default")))
    assert resources["class_allow_list"] == allow_list("site")
    assert resources["class_list_enforcement_mode"] == "enforce"
    assert resources["components"] == default["components"]  # the kit's own resources are kept
    assert not any("ClientAPIExecutor" in c for c in resources["class_allow_list"])
    (scope,) = json.load(open(os.path.join(local, "privacy.json")))["scopes"]
    (filter_,) = scope["task_result_filters"]
    # ours, whose clip does not grow with the job's steps (fedseg.privacy), and only on weight differences
    assert filter_["path"] == "fedseg.privacy.PercentilePrivacy" and filter_["args"]["data_kinds"] == ["WEIGHT_DIFF"]
    assert filter_["path"] in resources["class_allow_list"]
    assert resources["allow_log_streaming"] is False  # job logs stay on the site
    assert SiteConfig.load(local) == SiteConfig(
        data_root=str(tmp_path / "sites"),
        cache_dir=str(tmp_path / "cache"),
        allow_drills=False,
        source=os.path.join(local, SITE_CONFIG_FILE),
    )
    written = json.load(open(os.path.join(local, SITE_CONFIG_FILE)))
    assert set(written) == set(SiteConfig.keys())  # every cap and switch, with its default, for IT to edit
    assert (written["share_local_model"], written["allow_scaffold"], written["min_val_cases"]) == (False, False, 8)


def test_install_policy_on_the_server_kit_moves_the_job_store_out_of_tmp(kit, tmp_path):
    server = kit("server")
    install_policy(server, store=str(tmp_path / "store"))
    text = open(os.path.join(server, "local", "resources.json")).read()
    assert "/tmp/nvflare" not in text
    resources = json.loads(text)
    (job_manager,) = [c for c in resources["components"] if c["id"] == "job_manager"]
    assert job_manager["args"]["uri_root"] == str(tmp_path / "store" / "jobs-storage")
    assert resources["class_allow_list"] == allow_list("server")
    # a server started again marks the jobs it was running when it died FINISHED:ABANDONED (fedseg.stale_jobs)
    assert {"id": "fedseg_abandon_stale_jobs", "path": "fedseg.stale_jobs.AbandonStaleJobs", "args": {}} in resources[
        "components"
    ]


def test_a_hospitals_own_policy_is_kept_unless_forced(kit, tmp_path):
    site = kit("site-2")
    own = os.path.join(site, "local", "privacy.json")
    with open(own, "w") as f:
        json.dump({"scopes": [], "default_scope": ""}, f)
    with pytest.raises(PolicyError, match="privacy.json already exist with other content"):
        install_policy(site)
    install_policy(site, force=True)
    assert json.load(open(own + BACKUP_SUFFIX)) == {"scopes": [], "default_scope": ""}
    assert json.load(open(own))["default_scope"] == "hospital"
    install_policy(site)  # the same files again: nothing to refuse


def test_a_data_root_without_this_sites_folder_is_refused_before_any_job(kit, tmp_path):
    site = kit("site-3")
    (tmp_path / "empty").mkdir()
    result = fedseg("install-policy", str(site), "--data-root", str(tmp_path / "empty"), cwd=str(tmp_path))
    assert result.returncode == 1
    assert "no prepared folder site-3/ with a datalist.json" in result.stdout
    assert not os.path.exists(os.path.join(site, "local", SITE_CONFIG_FILE))
