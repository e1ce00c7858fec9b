"""What crosses the wire: tensor byte counts, and the NVFlare filters that compress and measure a transfer.

Compressed transfer uses NVFlare's own ``ModelQuantizer`` / ``ModelDequantizer`` filters: the server
quantises the global model it sends and dequantises the updates it receives; each site does the mirror
image. The controller only ever sees full-precision tensors, so it cannot tell how many bytes travelled.
``WireSizeMeter`` sits on the server next to the quantiser (after it on the way out, before the
dequantiser on the way in) and writes the size of the compressed payload into the message's meta:
``WIRE_BYTES_KEY``. A site copies the size of the model it received into its reply
(``RECEIVED_WIRE_BYTES_KEY``), so the round record holds both directions as they really were.
"""

from __future__ import annotations

from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable

WIRE_BYTES_KEY = "fedseg_wire_bytes"
RECEIVED_WIRE_BYTES_KEY = "fedseg_received_wire_bytes"
# NVFlare's quantisation types that need no GPU; blockwise8/float4/normfloat4 move tensors to CUDA
CPU_QUANTIZATION = ("float16",)
GPU_QUANTIZATION = ("blockwise8", "float4", "normfloat4")
QUANTIZATION_TYPES = CPU_QUANTIZATION + GPU_QUANTIZATION
# refused, with the reason: measured with bench.communication on nvflare 2.9.0
BROKEN_QUANTIZATION = {
    "adaquant": "NVFlare 2.9.0's AdaQuantizer gives a tensor whose values span less than about 2e-4 zero "
    "quantisation levels and dequantises it to NaN (0/0); the conv biases in our updates are such "
    "tensors, so the server would reject every update",
}


def payload_bytes(value) -> int:
    """Bytes of the arrays/tensors in a value, looking into dicts (parameters, quantisation state)."""
    if isinstance(value, dict):
        return sum(payload_bytes(v) for v in value.values())
    if isinstance(value, (bytes, bytearray)):
        return len(value)
    nbytes = getattr(value, "nbytes", None)
    if nbytes is None and hasattr(value, "element_size"):
        nbytes = value.element_size() * value.nelement()
    return int(nbytes or 0)


class WireSizeMeter(DXOFilter):
    """Writes the bytes of a weights/update message's tensors (and their quantisation state) into its meta."""

    def __init__(self):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> None | DXO:
        size = payload_bytes(dxo.data) + sum(
            payload_bytes(v) for k, v in dxo.meta.items() if isinstance(v, dict) and k != WIRE_BYTES_KEY
        )
        dxo.set_meta_prop(WIRE_BYTES_KEY, size)
        return dxo


def check_quantization(quantization: str) -> None:
    """ValueError, with the reason, for a type this pipeline cannot use."""
    if quantization in BROKEN_QUANTIZATION:
        raise ValueError(f"quantization {quantization!r} is refused: {BROKEN_QUANTIZATION[quantization]}")
    if quantization not in QUANTIZATION_TYPES:
        raise ValueError(f"quantization {quantization!r} is not one of {', '.join(QUANTIZATION_TYPES)}")


def quantization_filters(quantization: str):
    """(quantiser, dequantiser) of NVFlare for one of ``QUANTIZATION_TYPES``."""
    check_quantization(quantization)
    from nvflare.app_opt.pt.quantization.dequantizer import ModelDequantizer
    from nvflare.app_opt.pt.quantization.quantizer import ModelQuantizer

    return ModelQuantizer(quantization_type=quantization), ModelDequantizer()
