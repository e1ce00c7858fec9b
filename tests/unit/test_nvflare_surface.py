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
        FedAvgRecipe,
        "_get_controller_kwargs",
        ["self"],
        "fedseg.jobs.recipes.FedSegRecipe._fedavg_arguments passes what it returns to every controller",
    ),
    (
        FedAvgRecipe,
        "_apply_per_site_config",
        ["self", "config"],
        "fedseg.jobs.recipes.FedSegRecipe._apply_per_site_config refuses per_site_config (one executor for all)",
    ),
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


# -- the server's controllers: public NVFlare calls only ----------------------------------------------------------

# Private NVFlare names (methods, attributes, module functions) that the controller modules use, each with what
# of ours depends on it: none. The round loop, the update checks and the records use public calls only.
CONTROLLER_PRIVATE_NAMES: dict[str, str] = {}
CONTROLLER_SOURCES = (
    "custom/fedseg/controller.py",
    "custom/fedseg/workflow.py",
    "custom/fedseg/aggregation.py",
    "custom/fedseg/rounds.py",
    "custom/fedseg/fedref_run.py",
    "custom/fedseg/pidavg.py",
)
# NVFlare methods our controllers override on purpose (all public): NVFlare's code calls them
CONTROLLER_OVERRIDES = {
    "start_controller": "the job checks run here, before any model is built or sent",
    "run": "FedAvg family: our round loop (fedseg.workflow.FedAvgRounds); RecordingFedOpt: FedOpt's setup first",
    "sample_clients": "every site, or clients_per_round of them from (seed, round) (fedseg.rounds.participants)",
    "send_model_and_wait": "Scaffold: the blocking training task with min_responses and wait_after_min_seconds",
    "aggregate": "Scaffold: the update checks, then NVFlare's aggregation of the accepted updates in site order",
    "update_model": "Scaffold: the global model kept with too few updates, republished, the round recorded",
    "save_model": "Scaffold: the checkpoint without the control variates",
    "accept_model": "SiteOrderedAggregator (a ModelAggregator)",
    "aggregate_model": "SiteOrderedAggregator (a ModelAggregator)",
    "reset_stats": "SiteOrderedAggregator (a ModelAggregator)",
}


def _nvflare_classes():
    from fedseg.aggregation import SiteOrderedAggregator
    from fedseg.controller import FedRefController, RecordingFedOpt, RecordingScaffold

    classes = {
        c for k in (FedRefController, RecordingFedOpt, RecordingScaffold, SiteOrderedAggregator) for c in k.__mro__
    }
    return sorted((c for c in classes if c.__module__.startswith("nvflare.")), key=lambda c: c.__qualname__)


def _nvflare_private_names() -> set[str]:
    """Every ``_name`` (not dunder) NVFlare's classes behind our controllers define or set on ``self``."""
    import ast
    import textwrap

    names = set()
    for cls in _nvflare_classes():
        names |= {n for n in vars(cls) if n.startswith("_") and not n.startswith("__")}
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        except (OSError, TypeError):
            continue
        for node in ast.walk(tree):
            on_self = isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
            if on_self and node.attr.startswith("_") and not node.attr.startswith("__"):
                names.add(node.attr)
    return names


def _private_uses(source: str, nvflare_names: set[str]) -> dict[str, int]:
    """NVFlare private names a module uses: ``x._name`` or the string ``"_name"`` (``getattr``) of a name NVFlare's
    classes define, any ``super()._name``, and any ``from nvflare... import _name`` (name -> first line)."""
    import ast

    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(source)):
        name = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            via_super = isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "super"
            name = node.attr if via_super or node.attr in nvflare_names else None
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in nvflare_names:
            name = node.value  # getattr(self, "_name"), or a list of names to read
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nvflare"):
            private = [a.name for a in node.names if a.name.startswith("_")]
            name = private[0] if private else None
        if name:
            found.setdefault(name, node.lineno)
    return found


def test_the_controllers_use_no_private_nvflare_name_that_is_not_listed():
    import os

    from helpers.commands import REPO_ROOT

    nvflare_names = _nvflare_private_names()
    # the scan knows what it looks for: the private names the controllers used before (nvflare 2.9)
    assert {"_aggregate_one_result", "_current_min_responses", "_persistor_id", "_task_check_period"} <= nvflare_names
    used = {}
    for relative in CONTROLLER_SOURCES:
        with open(os.path.join(REPO_ROOT, relative), encoding="utf-8") as f:
            for name, line in _private_uses(f.read(), nvflare_names).items():
                used.setdefault(name, f"{relative}:{line}")
    unlisted = {n: where for n, where in used.items() if n not in CONTROLLER_PRIVATE_NAMES}
    assert not unlisted, f"private NVFlare names the controllers use: {unlisted}; use a public call or list each"
    stale = sorted(set(CONTROLLER_PRIVATE_NAMES) - set(used))
    assert not stale, f"CONTROLLER_PRIVATE_NAMES lists {stale}, which the controllers no longer use"


def test_our_controller_methods_neither_shadow_nor_are_shadowed_by_nvflare_s():
    """A method of ours that an NVFlare class behind it also defines is an override: only the listed ones."""
    from fedseg import aggregation, controller, pidavg, rounds, workflow

    ours = {
        name
        for module in (controller, workflow, aggregation, rounds, pidavg)
        for cls in vars(module).values()
        if isinstance(cls, type) and cls.__module__ == module.__name__
        for name, value in vars(cls).items()
        if callable(value) and not name.startswith("__")
    }
    theirs = {name for cls in _nvflare_classes() for name in vars(cls)}
    assert sorted(ours & theirs) == sorted(CONTROLLER_OVERRIDES), (
        "our controllers override these NVFlare members: list each in CONTROLLER_OVERRIDES with why, or rename ours"
    )


def test_every_keyword_of_nvflare_s_fedavg_is_used_by_our_round_loop_or_refused():
    from fedseg.workflow import FEDAVG_KEYWORDS, FEDAVG_KEYWORDS_REFUSED

    upstream = set()
    for cls in FedAvg.__mro__:
        if cls.__module__.startswith("nvflare.app_common.workflows") and "__init__" in vars(cls):
            upstream |= {
                name
                for name, p in inspect.signature(cls.__init__).parameters.items()
                if name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
            }
    handled = set(FEDAVG_KEYWORDS) | set(FEDAVG_KEYWORDS_REFUSED)
    assert upstream <= handled, (
        f"NVFlare's FedAvg now takes {sorted(upstream - handled)}: pass each through fedseg.workflow.FedAvgRounds.run "
        "(FEDAVG_KEYWORDS) or refuse it with a reason (FEDAVG_KEYWORDS_REFUSED)"
    )
    assert handled <= upstream, f"FedAvg no longer takes {sorted(handled - upstream)}: drop them from our lists"
    assert not set(FEDAVG_KEYWORDS) & set(FEDAVG_KEYWORDS_REFUSED)
    assert all(isinstance(why, str) and why for why in {**FEDAVG_KEYWORDS, **FEDAVG_KEYWORDS_REFUSED}.values())


def test_the_keywords_we_refuse_are_refused(tmp_path):
    from helpers.server_fakes import start

    from fedseg.aggregation import SiteOrderedAggregator
    from fedseg.controller import RecordingFedAvg
    from fedseg.server_config import JobRefused
    from fedseg.workflow import FEDAVG_KEYWORDS_REFUSED

    values = {"model": {"w": [1.0]}, "aggregator": SiteOrderedAggregator(), "enable_tensor_disk_offload": True}
    assert sorted(values) == sorted(FEDAVG_KEYWORDS_REFUSED)
    for keyword, value in values.items():
        with pytest.raises(JobRefused, match=rf"^{keyword}\b"):
            start(RecordingFedAvg(num_clients=2, num_rounds=1, **{keyword: value}), tmp_path)


def test_nvflare_s_fedopt_and_scaffold_loops_still_call_what_we_override():
    from nvflare.app_common.workflows.scaffold import Scaffold
    from nvflare.app_opt.pt.fedopt_ctl import FedOpt

    from fedseg.controller import RecordingFedOpt
    from fedseg.workflow import FedAvgRounds

    # FedOpt.run sets up its torch model and optimiser, then runs the next run in the MRO: our loop
    assert inspect.getsource(FedOpt.run).rstrip().endswith("super().run()"), (
        "re-check fedseg.controller.RecordingFedOpt"
    )
    mro = RecordingFedOpt.__mro__
    assert mro.index(FedOpt) < mro.index(FedAvgRounds) < mro.index(FedAvg)
    assert RecordingFedOpt.update_model is FedOpt.update_model  # the update our finish_round applies
    loop = "".join(inspect.getsource(getattr(Scaffold, name)) for name in vars(Scaffold) if "run" in name)
    for call in (
        "self.sample_clients(",
        "self.send_model_and_wait(",
        "self.aggregate(",
        "self.update_model(",
        "self.save_model(",
    ):
        assert call in loop, (
            f"NVFlare's Scaffold loop no longer calls {call}: re-check fedseg.controller.RecordingScaffold"
        )


def test_the_recipe_still_keeps_its_job_where_we_read_it():
    source = inspect.getsource(FedAvgRecipe.__mro__[1].__init__)
    assert "Recipe.__init__(self, job)" in source, (
        "NVFlare's FedAvgRecipe no longer hands its job to Recipe.__init__: re-check fedseg.jobs.recipes, which "
        "adds components through recipe._job"
    )


RECIPE_ALGORITHMS = ("fedref", "fedavg", "fedprox", "fedadam", "fedavgm", "scaffold", "fedpidavg")


@pytest.mark.parametrize("algorithm", RECIPE_ALGORITHMS)
def test_our_recipe_passes_its_controller_every_keyword_nvflare_s_recipe_passes_or_refuses_it(algorithm, monkeypatch):
    """NVFlare's FedAvgRecipe._create_controller, called on our recipe with its FedAvg replaced by a stub, gives a
    set of keywords (a probe in _get_controller_kwargs included); ours must pass each with the same value, but
    num_clients (ours: the whole federation), or be one its controller does not take (recipes.NOT_TAKEN)."""
    from nvflare.recipe import fedavg as upstream

    from fedseg.jobs import recipes
    from fedseg.jobs.settings import JobSettings

    recipe = recipes.FedSegRecipe(JobSettings(algorithm=algorithm, sites=["site-1", "site-2"]))
    recipe.enable_tensor_disk_offload = True  # not its default: it must travel, not be dropped
    theirs, ours = {}, {}
    monkeypatch.setattr(recipes.FedSegRecipe, "_get_controller_kwargs", lambda self: {"probe_keyword": 7})
    monkeypatch.setattr(upstream, "FedAvg", lambda **keywords: theirs.update(keywords))
    upstream.FedAvgRecipe._create_controller(recipe, persistor_id="persistor", model_params=None, model_aggregator=None)
    controller = recipes.CONTROLLERS[algorithm]
    monkeypatch.setitem(
        recipes.CONTROLLERS, algorithm, controller._replace(cls=lambda **keywords: ours.update(keywords))
    )
    recipe._create_controller(persistor_id="persistor", model_params=None, model_aggregator=None)
    refused = set(recipes.NOT_TAKEN.get(algorithm, ("", {}))[1])
    assert {"probe_keyword", "enable_tensor_disk_offload"} <= set(theirs)
    assert set(theirs) <= set(ours) | refused, f"dropped: {sorted(set(theirs) - set(ours) - refused)}"
    shared = (set(theirs) & set(ours)) - {"num_clients"}
    assert {k: ours[k] for k in shared} == {k: theirs[k] for k in shared}
    assert (theirs["num_clients"], ours["num_clients"]) == (recipe.min_clients, 2)


def test_a_keyword_the_controller_does_not_take_is_refused_unless_at_the_value_it_stands_for():
    from fedseg.jobs.recipes import FedSegRecipe
    from fedseg.jobs.settings import JobSettings

    recipe = FedSegRecipe(JobSettings(algorithm="scaffold"))
    recipe.stop_cond = "dice_mean >= 0.9"
    with pytest.raises(ValueError, match=r"^scaffold: stop_cond = 'dice_mean >= 0.9' is refused: NVFlare's Scaffold"):
        recipe._create_controller(persistor_id="persistor", model_params=None, model_aggregator=None)


def test_per_site_config_given_to_our_recipe_is_refused_loudly():
    """NVFlare's _prepare_client_apps makes one ScriptRunner per site of per_site_config; ours has one SiteExecutor
    for every site, so per-site script settings would be silently ignored: refused instead, naming the argument."""
    from nvflare.recipe.utils import set_per_site_config

    from fedseg.jobs.recipes import FedSegRecipe
    from fedseg.jobs.settings import JobSettings

    recipe = FedSegRecipe(JobSettings(algorithm="fedavg"))
    with pytest.raises(ValueError, match=r"^per_site_config \(site-1, site-2\) is refused: every site runs the same"):
        set_per_site_config(recipe, {"site-1": {"train_args": "--lr 1"}, "site-2": {}})
    recipe.per_site_config = {"site-1": {}}  # set around the setter: the client apps are not made from it either
    with pytest.raises(ValueError, match=r"^per_site_config \(site-1\) is refused"):
        recipe._prepare_client_apps()


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


# -- POC: fedseg.app.poc_federation.FedSegPocEnv.deploy is a copy of NVFlare's PocEnv.deploy ----------------

# Calls of NVFlare's PocEnv.deploy that ours leaves out on purpose, each with the reason: none today (its check
# that the job's scripts are on this machine runs too, although our configuration-only jobs carry no script).
POC_DEPLOY_REFUSED: dict[str, str] = {}

# Private names of NVFlare's POC code that app/poc*.py and app/testbed*.py use:
# (NVFlare module, member in it, the parameters we pass it by name, what of ours depends on it)
POC_PRIVATE_NAMES = [
    (
        "nvflare.recipe.poc_env",
        "PocEnv._check_poc_running",
        [],
        "fedseg.app.poc_federation.FedSegPocEnv.deploy, which stops a running POC before provisioning a new one",
    ),
    (
        "nvflare.recipe.poc_env",
        "_start_poc",
        ["poc_workspace", "gpu_ids", "excluded", "services_list"],
        "fedseg.app.poc_federation.FedSegPocEnv.deploy, which starts the federation once the kits allow our classes",
    ),
    (
        "nvflare.recipe.poc_env",
        "PocEnv._get_session_manager",
        [],
        "fedseg.app.poc_federation.FedSegPocEnv.deploy (submits the job) and .wait_for_sites (logs in)",
    ),
    (
        "nvflare.recipe.session_mgr",
        "SessionManager._get_session",
        [],
        "fedseg.app.poc_federation.FedSegPocEnv.wait_for_sites, which asks the server which sites are connected",
    ),
]
POC_SOURCES = (
    "app/poc.py",
    "app/poc_federation.py",
    "app/testbed.py",
    "app/testbed_net.py",
    "app/testbed_federation.py",
)


def _calls(function) -> list[str]:
    """The calls ``function`` makes, in the order they run (a call's inner calls first), ``poc_env.`` dropped."""
    import ast
    import textwrap

    def name(node) -> str:
        if isinstance(node, ast.Name):
            return node.id
        if isinstance(node, ast.Attribute):
            return f"{name(node.value)}.{node.attr}"
        if isinstance(node, ast.Call):
            return f"{name(node.func)}()"
        return type(node).__name__

    found: list[str] = []

    class Calls(ast.NodeVisitor):
        def visit_Call(self, node):
            self.generic_visit(node)
            found.append(name(node.func).removeprefix("poc_env."))

    Calls().visit(ast.parse(textwrap.dedent(inspect.getsource(function))))
    return found


def test_our_poc_deploy_makes_every_call_nvflare_s_deploy_makes_in_the_same_order():
    from nvflare.recipe.poc_env import PocEnv

    from fedseg.app.poc_federation import FedSegPocEnv

    theirs, ours = _calls(PocEnv.deploy), _calls(FedSegPocEnv.deploy)
    for call in POC_DEPLOY_REFUSED:
        assert call in theirs, f"POC_DEPLOY_REFUSED lists {call}, which NVFlare's PocEnv.deploy no longer makes"
    position = 0
    for call in (c for c in theirs if c not in POC_DEPLOY_REFUSED):
        assert call in ours[position:], (
            f"NVFlare's PocEnv.deploy now makes the calls {theirs}; fedseg.app.poc_federation.FedSegPocEnv.deploy, "
            f"a copy of it, lacks {call} after {ours[:position]}: copy it there, or list it in POC_DEPLOY_REFUSED "
            "with the reason"
        )
        position = ours.index(call, position) + 1


def test_what_our_poc_deploy_reads_of_nvflare_s_poc_env_is_still_there(monkeypatch, tmp_path):
    import ast
    import os
    import textwrap

    from nvflare.recipe import poc_env

    from fedseg.app.poc_federation import FedSegPocEnv

    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    theirs = poc_env.PocEnv(clients=["site-1"], num_clients=1)
    for node in ast.walk(ast.parse(textwrap.dedent(inspect.getsource(FedSegPocEnv.deploy)))):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if node.value.id == "poc_env":
                assert hasattr(poc_env, node.attr), (
                    f"nvflare.recipe.poc_env.{node.attr} is gone: re-check "
                    "fedseg.app.poc_federation.FedSegPocEnv.deploy"
                )
            elif node.value.id == "self" and node.attr not in vars(FedSegPocEnv):
                assert hasattr(theirs, node.attr), (
                    f"NVFlare's PocEnv no longer has {node.attr}: re-check "
                    "fedseg.app.poc_federation.FedSegPocEnv.deploy"
                )
    assert not os.path.exists(tmp_path / "poc")


def test_our_poc_deploy_refuses_a_job_whose_scripts_are_not_on_this_machine_as_nvflare_s_does(monkeypatch, tmp_path):
    import os
    from types import SimpleNamespace

    from nvflare.recipe.utils import collect_non_local_scripts

    from fedseg.app.poc_federation import FedSegPocEnv
    from fedseg.jobs.recipes import JobSettings, build_recipe

    monkeypatch.setenv("NVFLARE_POC_WORKSPACE", str(tmp_path / "poc"))
    env = FedSegPocEnv(clients=["site-1"], num_clients=1)
    gone = str(tmp_path / "gone.py")
    job = SimpleNamespace(_deploy_map={"app": SimpleNamespace(app_config=SimpleNamespace(ext_scripts=[gone]))})
    with pytest.raises(ValueError, match=r"scripts do not exist locally: \[.*gone\.py'\]"):
        env.deploy(job)
    assert not os.path.exists(tmp_path / "poc")  # refused before anything was provisioned
    assert collect_non_local_scripts(build_recipe(JobSettings(sites=["site-1", "site-2"]))._job) == []  # ours pass


@pytest.mark.parametrize(
    "module, member, keywords, ours", POC_PRIVATE_NAMES, ids=[m for _, m, _, _ in POC_PRIVATE_NAMES]
)
def test_the_private_poc_names_we_use_are_still_there(module, member, keywords, ours):
    import importlib

    found = importlib.import_module(module)
    for part in member.split("."):
        found = getattr(found, part, None)
        assert found is not None, f"NVFlare's {module}.{member} is gone (renamed?): re-check {ours}"
    missing = [k for k in keywords if k not in inspect.signature(found).parameters]
    assert not missing, f"NVFlare's {module}.{member} no longer takes {missing}: re-check {ours}"


def test_every_private_name_our_poc_and_testbed_code_uses_is_listed():
    """A ``._name`` that our code reads and does not define itself is NVFlare's: it belongs in POC_PRIVATE_NAMES."""
    import ast
    import os

    from helpers.commands import REPO_ROOT

    used, own = {}, set()
    for relative in POC_SOURCES:
        with open(os.path.join(REPO_ROOT, relative), encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                own.add(node.name)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                own.add(node.attr)
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                used.setdefault(node.attr, f"{relative}:{node.lineno}")
    unlisted = {name: where for name, where in used.items() if name not in own}
    listed = sorted(m.rsplit(".", 1)[-1] for _, m, _, _ in POC_PRIVATE_NAMES)
    assert sorted(unlisted) == listed, (
        f"private names our code uses: {unlisted}; POC_PRIVATE_NAMES lists {listed}: list each one used with what "
        "of ours depends on it, and drop one no longer used"
    )


# private names of other libraries the package reads, that are no NVFlare surface
NOT_NVFLARE_PRIVATE = {"_exit": "os._exit: fedseg.app.flare_agent ends its process without cleanup handlers"}


def test_every_private_name_the_package_reads_and_does_not_define_is_listed_here():
    """Across the whole installed package (fedseg, .app, .jobs, .data_prep): a ``._name`` it reads, or a ``_name``
    it imports from nvflare, that none of its modules defines is another library's private name, so it must be in
    one of this file's lists (which say what of ours depends on it). Private attributes our code sets on NVFlare
    objects are pinned one by one above (the persistor's paths, the executor's script arguments)."""
    import ast
    import glob
    import os

    from helpers.commands import REPO_ROOT

    used, own = {}, set()
    for folder in ("custom/fedseg", "app", "jobs", "data_prep"):
        for path in sorted(glob.glob(os.path.join(REPO_ROOT, folder, "*.py"))):
            with open(path, encoding="utf-8") as f:
                tree = ast.parse(f.read())
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    own.add(node.name)
                elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                    own.add(node.attr)
                elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                    own.add(node.id)
                elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                    used.setdefault(node.attr, f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}")
                elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nvflare"):
                    for alias in node.names:
                        if alias.name.startswith("_"):
                            used.setdefault(alias.name, f"{os.path.relpath(path, REPO_ROOT)}:{node.lineno}")
    listed = (
        {member for _, member, _, _ in PRIVATE_SURFACE}
        | {member.rsplit(".", 1)[-1] for _, member, _, _ in POC_PRIVATE_NAMES}
        | set(CONTROLLER_PRIVATE_NAMES)
        | set(NOT_NVFLARE_PRIVATE)
    )
    unlisted = {name: where for name, where in used.items() if name not in own and name not in listed}
    assert not unlisted, f"private names of other libraries the package reads, listed nowhere here: {unlisted}"
