"""The server's model persistor: the initial global model comes from the network's seed, never from a file a job names.

``SeededModelPersistor`` is NVFlare's ``PTFileModelPersistor`` (so ``PTFileModelLocator`` and cross-site
evaluation keep working) without its job-given paths: no source checkpoint, no file names, no
``environment.json`` checkpoint folder, weights-only loading. It builds ``fedseg.network.FedSegUNet`` from the
job's network settings (channels, init seed; strides derived) once the run starts and the server's caps are
known, and saves under FLARE's fixed names in the app folder of the run. A FedRef job that continues a stopped
run gets its global model through ``start_from``, which the controller calls with a file the server found in
its own store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.abstract.model import ModelLearnable
from nvflare.app_common.app_constant import DefaultCheckpointFileName
from nvflare.app_opt.pt.decomposers import TensorDecomposer
from nvflare.app_opt.pt.file_model_persistor import PTFileModelPersistor
from nvflare.app_opt.pt.model_persistence_format_manager import PTModelPersistenceFormatManager
from nvflare.fuel.utils import fobs

from fedseg.checkpoint import load_file
from fedseg.network import DEFAULT_CHANNELS, FedSegUNet
from fedseg.server_config import JobRefused, ServerConfig, integer, network_channels


class SeededModelPersistor(PTFileModelPersistor):
    """The global model's persistor: built from (channels, init_seed), saved as FL_global_model.pt in the run."""

    def __init__(self, channels: Sequence[int] = DEFAULT_CHANNELS, init_seed: int = 0) -> None:
        super().__init__(
            model=None,
            global_model_file_name=DefaultCheckpointFileName.GLOBAL_MODEL,
            best_global_model_file_name=DefaultCheckpointFileName.BEST_GLOBAL_MODEL,
            source_ckpt_file_full_name=None,
            load_weights_only=True,
        )
        self.channels = network_channels(channels)
        self.init_seed = integer("init_seed", init_seed, 0, 2**32 - 1)
        self._start_from: str | None = None

    def network(self) -> FedSegUNet:
        """The seeded initial network (the same settings always give the same weights)."""
        return FedSegUNet(channels=self.channels, init_seed=self.init_seed)  # strides: fedseg.network.strides_for

    def start_from(self, checkpoint: str) -> None:
        """Start from a global model the server found itself (resuming a stopped run), instead of the seed."""
        self._start_from = checkpoint

    def handle_event(self, event: str, fl_ctx: FLContext) -> None:
        if event != EventType.START_RUN:
            return super().handle_event(event, fl_ctx)
        # instead of PTFileModelPersistor._initialize, which reads checkpoint paths from the job's environment.json
        try:
            ServerConfig.for_workspace(fl_ctx.get_engine().get_workspace()).check_network(self.channels)
        except (JobRefused, ValueError) as exc:
            self.system_panic(reason=str(exc), fl_ctx=fl_ctx)
            return
        app_root = fl_ctx.get_prop(FLContextKey.APP_ROOT)
        self.model = self.network()
        self.log_dir = app_root
        self.ckpt_preload_path = None
        # the save paths PTFileModelPersistor.save_model / its best-model event use (pinned in test_nvflare_surface)
        self._ckpt_save_path = os.path.join(app_root, self.global_model_file_name)
        self._best_ckpt_save_path = os.path.join(app_root, self.best_global_model_file_name)
        fobs.register(TensorDecomposer)

    def load_model(self, fl_ctx: FLContext) -> ModelLearnable:
        if not self._start_from:
            return super().load_model(fl_ctx)  # no source file and no preload path: the seeded network's weights
        data = load_file(self._start_from)
        state = data.get("model", data) if isinstance(data, dict) else {}
        expected = {k: tuple(v.shape) for k, v in self.model.state_dict().items()}
        found = {k: tuple(getattr(v, "shape", ())) for k, v in state.items()}
        if found != expected:
            raise JobRefused(
                f"the global model to continue from does not fit channels = {self.channels} "
                f"({len(found)} tensors, the network has {len(expected)} or other shapes)"
            )
        self.default_train_conf = {"train": {"model": type(self.model).__name__}}
        self.persistence_manager = PTModelPersistenceFormatManager(data, default_train_conf=self.default_train_conf)
        self.log_info(fl_ctx, f"initial global model: the stopped run's {os.path.basename(self._start_from)}")
        return self.persistence_manager.to_model_learnable(self.exclude_vars)
