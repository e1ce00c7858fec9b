"""A server workspace and engine just real enough to start a controller's checks without a FLARE run."""

from __future__ import annotations

import json
import os

from nvflare.apis.fl_constant import ReservedKey
from nvflare.apis.fl_context import FLContext

from fedseg.checkpoint import to_tensors
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


def stopped_run(root, job="stopped-job", capacity=2, round_number=4, channels=(8, 16), rounds=()) -> str:
    """A stopped FedRef run's folder as the server leaves it: the buffer of ``round_number``, the global model
    saved beside it and, for each of ``rounds``, a line of ``round_metrics.jsonl``."""
    import torch

    run = os.path.join(root, job)
    os.makedirs(os.path.join(run, "app_server"), exist_ok=True)
    params = {k: v.numpy() for k, v in SeededModelPersistor(channels=list(channels)).network().state_dict().items()}
    torch.save(
        to_tensors({"capacity": capacity, "models": [params], "round": round_number, "velocity": None}),
        os.path.join(run, "fedref_reference_buffer.pt"),
    )
    torch.save({"model": to_tensors(params)}, os.path.join(run, "app_server", "FL_global_model.pt"))
    if rounds:
        write_records(os.path.join(run, "round_metrics.jsonl"), rounds)
    return run


def write_records(path, rounds, job="") -> str:
    """Round records of ``rounds`` (each names ``job`` in its aggregate, to tell the parts apart)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rounds:
            f.write(json.dumps({"round": r, "algorithm": "fedref", "sites": {}, "aggregate": {"job": job}}) + "\n")
    return str(path)
