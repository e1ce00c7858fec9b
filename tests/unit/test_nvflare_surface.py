"""The private parts of NVFlare 2.9 that FedRef-Seg overrides or reads. NVFlare may change them in any
release without notice; this test fails first, and its message names what to re-check before upgrading."""

from __future__ import annotations

import inspect

import pytest
from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
from nvflare.job_config.api import FedJob

# (NVFlare class, member, its parameters as we rely on them, what of ours depends on it)
PRIVATE_SURFACE = [
    (
        FedAvgRecipe,
        "_create_controller",
        ["self", "persistor_id", "model_params", "model_aggregator"],
        "fedseg.jobs.recipes.FedSegRecipe._create_controller builds our controllers here",
    ),
    (
        FedAvgRecipe,
        "_prepare_client_apps",
        ["self"],
        "fedseg.jobs.recipes.FedSegRecipe._prepare_client_apps puts SiteExecutor on the sites instead of a script",
    ),
    (
        FedAvg,
        "_aggregate_one_result",
        ["self", "result"],
        "fedseg.controller.RecordingFedAvg holds results back to check them and sum them in site order",
    ),
    (FedAvg, "_get_aggregated_result", ["self"], "fedseg.controller.RecordingFedAvg sums the held results here"),
    (
        FedJob,
        "set_app_packages",
        ["self", "app_packages"],
        "fedseg.jobs.recipes.build_recipe keeps the installed fedseg package out of the job",
    ),
]


@pytest.mark.parametrize(
    "owner, member, parameters, ours", PRIVATE_SURFACE, ids=[f"{o.__name__}.{m}" for o, m, _, _ in PRIVATE_SURFACE]
)
def test_nvflare_members_we_override_keep_their_signature(owner, member, parameters, ours):
    assert hasattr(owner, member), f"NVFlare's {owner.__name__}.{member} is gone: re-check {ours}"
    found = list(inspect.signature(getattr(owner, member)).parameters)
    assert found == parameters, f"NVFlare's {owner.__name__}.{member} now takes {found}: re-check {ours}"


def test_the_recipe_still_keeps_its_job_where_we_read_it():
    source = inspect.getsource(FedAvgRecipe.__mro__[1].__init__)
    assert "Recipe.__init__(self, job)" in source, (
        "NVFlare's FedAvgRecipe no longer hands its job to Recipe.__init__: re-check fedseg.jobs.recipes, which "
        "adds components through recipe._job"
    )


def test_the_client_api_executor_still_reads_its_script_arguments_from_the_attribute_we_set():
    executor = ClientAPIExecutor(execution_mode="in_process", task_script_path="x.py", task_script_args="--a 1")
    assert executor._task_script_args == "--a 1", (
        "NVFlare's ClientAPIExecutor keeps its script arguments elsewhere: re-check "
        "fedseg.executor.SiteExecutor.handle_event, which sets them from the site's own settings at START_RUN"
    )
    assert "self._task_script_args" in inspect.getsource(ClientAPIExecutor), (
        "NVFlare's ClientAPIExecutor no longer reads _task_script_args: re-check fedseg.executor.SiteExecutor"
    )


def test_poc_deploy_still_provisions_then_starts_where_we_put_the_allow_list_between():
    from nvflare.recipe import poc_env

    source = inspect.getsource(poc_env.PocEnv.deploy)
    assert source.index("prepare_poc_provision(") < source.index("_start_poc("), (
        "NVFlare's PocEnv.deploy changed: re-check fedseg.app.poc.FedSegPocEnv.deploy, a copy of it that writes "
        "the class allow-list into the kits between provisioning and starting"
    )
    for name in ("prepare_poc_provision", "_start_poc", "SERVICE_START_TIMEOUT"):
        assert hasattr(poc_env, name), f"nvflare.recipe.poc_env.{name} is gone: re-check fedseg.app.poc.FedSegPocEnv"


def test_a_site_still_takes_its_job_process_exit_code_from_the_file_we_write():
    from nvflare.apis.fl_constant import FLMetaKey
    from nvflare.apis.job_launcher_spec import JobReturnCode
    from nvflare.private.fed.server.fed_server import FederatedServer
    from nvflare.private.fed.utils.fed_utils import get_return_code

    assert "FLMetaKey.PROCESS_RC_FILE" in inspect.getsource(get_return_code) and FLMetaKey.PROCESS_RC_FILE
    failing = inspect.getsource(FederatedServer.process_job_failure)
    assert "ProcessExitCode.EXCEPTION" in failing and "UNKNOWN" not in failing, (
        "NVFlare's server now judges other exit codes of a site's job process: re-check "
        "fedseg.executor.mark_unfinished_run, which leaves JobReturnCode.UNKNOWN for a killed one"
    )
    assert JobReturnCode.UNKNOWN == 127


def test_the_pt_persistor_still_saves_to_the_paths_our_seeded_persistor_sets():
    """fedseg.persistor.SeededModelPersistor replaces PTFileModelPersistor._initialize (which reads checkpoint
    paths from a job's environment.json) and sets the attributes the inherited save and inventory code read."""
    from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor

    initialize = inspect.getsource(PTFileModelPersistor._initialize)
    for attribute in ("self._ckpt_save_path", "self._best_ckpt_save_path", "self.log_dir", "self.ckpt_preload_path"):
        assert attribute in initialize, f"PTFileModelPersistor._initialize no longer sets {attribute}"
    assert "self._ckpt_save_path" in inspect.getsource(PTFileModelPersistor.save_model)
    assert "self._best_ckpt_save_path" in inspect.getsource(PTFileModelPersistor.handle_event)
    assert "self.log_dir" in inspect.getsource(PTFileModelPersistor.get_model_inventory)
    assert "self._initialize(fl_ctx)" in inspect.getsource(PTFileModelPersistor.handle_event)
    assert "self.ckpt_preload_path" in inspect.getsource(PTFileModelPersistor.load_model)
