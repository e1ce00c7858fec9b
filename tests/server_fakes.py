"""A server workspace and engine just real enough to start a controller's checks without a FLARE run."""

from __future__ import annotations

import os

from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext

from fedseg.persistor import SeededModelPersistor
from fedseg.server_config import ServerConfig


class FakeWorkspace:
    """FLARE's ``Workspace`` surface our server code uses: the root (earlier runs), local/ and a run folder."""

    def __init__(self, root) -> None:
        self.root = str(root)

    def get_root_dir(self) -> str:
        return self.root

    def get_site_config_dir(self) -> str:
        return os.path.join(self.root, "local")

    def get_run_dir(self, job_id) -> str:
        return os.path.join(self.root, str(job_id))


class FakeEngine:
    def __init__(self, root) -> None:
        self.workspace = FakeWorkspace(root)

    def get_workspace(self) -> FakeWorkspace:
        return self.workspace


def start(controller, root, persistor: SeededModelPersistor | None = None, job_id: str = "this-job"):
    """What ``start_controller`` does after FLARE's part: the server config of ``root`` and the job checks."""
    os.makedirs(root, exist_ok=True)
    controller.engine = FakeEngine(root)
    controller.fl_ctx = FLContext()
    controller.fl_ctx.set_prop(ReservedKey.RUN_NUM, job_id, private=False, sticky=True)
    controller.persistor = persistor or SeededModelPersistor(channels=[8, 16])
    controller.check_job(ServerConfig.for_workspace(controller.engine.get_workspace()))
    return controller
