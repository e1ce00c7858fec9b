"""The segmentation network: MONAI's 3D U-Net, wrapped so that its settings survive job export.

NVFlare rebuilds server-side models from their class path and the constructor arguments it finds as
attributes of the same name; MONAI's ``UNet`` does not keep its arguments, so this thin wrapper does.
``init_seed`` travels the same way: the server's persistor builds the initial global model from the job
config, and with a seed every run of a job starts from the same weights.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import UNet

from fedseg.regions import MODALITIES, REGIONS
from fedseg.settings import TrainingSettings

DEFAULT_CHANNELS = TrainingSettings().channels  # the default profile's network


def strides_for(channels: Sequence[int]) -> list[int]:
    """The U-Net's strides for these channels: each level halves the resolution (the one place that says so)."""
    return [2] * (len(channels) - 1)


def network_config(channels: Sequence[int]) -> dict:
    """The constructor arguments of the network with these channels (what ``fedseg.checkpoint.load_network``
    takes beside a saved state dict)."""
    return {"channels": list(channels), "strides": strides_for(channels)}


class FedSegUNet(torch.nn.Module):
    """3D U-Net: four MRI modalities in, one logit channel per tumour region (TC, WT, ET) out."""

    def __init__(
        self,
        channels: Sequence[int] = DEFAULT_CHANNELS,
        strides: Sequence[int] | None = None,
        num_res_units: int = 1,
        dropout: float = 0.0,
        norm: str = "INSTANCE",
        init_seed: int | None = None,
    ) -> None:
        super().__init__()
        self.channels = list(channels)
        self.strides = list(strides) if strides is not None else strides_for(channels)
        self.num_res_units = num_res_units
        self.dropout = dropout
        self.norm = norm
        self.init_seed = init_seed
        with torch.random.fork_rng(enabled=init_seed is not None):
            if init_seed is not None:
                torch.manual_seed(init_seed)
            self.unet = UNet(
                spatial_dims=3,
                in_channels=len(MODALITIES),
                out_channels=len(REGIONS),
                channels=self.channels,
                strides=self.strides,
                num_res_units=num_res_units,
                dropout=dropout,
                norm=norm,
            )

    @classmethod
    def from_settings(cls, settings: TrainingSettings, init_seed: int | None = None) -> FedSegUNet:
        """The network of these training settings (its channels; strides from ``strides_for``)."""
        return cls(**network_config(settings.channels), init_seed=init_seed)

    @property
    def divisor(self) -> int:
        """Input sizes must be multiples of this (the product of the strides)."""
        d = 1
        for s in self.strides:
            d *= s
        return d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.unet(x)

    def config(self) -> dict:
        """The constructor arguments, e.g. to rebuild the network next to a saved state dict."""
        return {
            "channels": self.channels,
            "strides": self.strides,
            "num_res_units": self.num_res_units,
            "dropout": self.dropout,
            "norm": self.norm,
        }
