"""The exported bundle's documents: ``docs/README.md`` (the model card for people, from ``metadata.json``), the
data's terms (``docs/data_license.txt``), ``LICENSE`` and the logging configuration MONAI's workflow reads."""

from __future__ import annotations

import os
from importlib import metadata as package_metadata

DATA_LICENCE_FILE = "data_license.txt"
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=console

[formatters]
keys=plain

[logger_root]
level=INFO
handlers=console

[handler_console]
class=StreamHandler
level=INFO
formatter=plain
args=(sys.stdout,)

[formatter_plain]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""
FETS_TERMS = """The weights in models/model.pt were trained on the FeTS2022 training data (MICCAI Federated Tumor
Segmentation Challenge 2022). Those data are not in this bundle: the challenge's organisers give them out after
registration (https://fets-ai.github.io/Challenge/), and their use is governed by the challenge's data terms.
Read those terms before you share this model or use it for anything but research, and cite the challenge and
the BraTS papers its data page asks for, among them:

- Pati S. et al. The Federated Tumor Segmentation (FeTS) Challenge. arXiv:2105.05874.
- Menze B. H. et al. The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS). IEEE Transactions on
  Medical Imaging 34(10), 1993-2024 (2015). https://doi.org/10.1109/TMI.2014.2377694
- Bakas S. et al. Advancing The Cancer Genome Atlas glioma MRI collections with expert segmentation labels and
  radiomic features. Scientific Data 4, 170117 (2017). https://doi.org/10.1038/sdata.2017.117
- Baid U. et al. The RSNA-ASNR-MICCAI BraTS 2021 Benchmark on Brain Tumor Segmentation and Radiogenomic
  Classification. arXiv:2107.02314.
"""
SYNTHETIC_TERMS = """The weights in models/model.pt were trained on synthetic data only: subjects made by `fedseg synth`
(FedRef-Seg) in the FeTS2022 layout, with simulated tumours and institutions. No patient's data was used. The
anatomy comes from the MNI152 templates shipped inside nilearn's wheel, used under the templates' own copyright
notice (McConnell Brain Imaging Centre, Montreal Neurological Institute), which nilearn's documentation gives.
This is a demonstration model: it has not learned real tumours.
"""
NOT_RECORDED = """The run this bundle was exported from does not record which data its sites trained on (the sites'
own data, in the FeTS2022 layout). If it was FeTS2022, these terms apply:

"""
LICENCE_NOTICE = """Copyright (c) FedRef-Seg contributors

Licensed under the Apache License, Version 2.0 (the "License"); you may not use the files of this bundle (its
configurations and model weights) except in compliance with the License. You may obtain a copy of the License at

    https://www.apache.org/licenses/LICENSE-2.0

Unless required by applicable law or agreed to in writing, software distributed under the License is distributed
on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for
the specific language governing permissions and limitations under the License.
"""


def licence_text() -> str:
    """The project's Apache-2.0 licence: the full text the wheel (or the checkout) ships, else its notice."""
    candidates = []
    try:
        files = package_metadata.distribution("fedref-seg").files or []
        candidates += [str(f.locate()) for f in files if os.path.basename(str(f)) == "LICENSE"]
    except package_metadata.PackageNotFoundError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    candidates.append(os.path.join(os.path.dirname(here), "LICENSE"))  # a checkout: app/ beside LICENSE
    for path in candidates:
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            if "Apache License" in text:
                return LICENCE_NOTICE + "\n" + text
    return LICENCE_NOTICE


def data_licence(kind: str) -> str:
    """``docs/data_license.txt`` for the data the model was trained on (``bundle_card.data_kind``)."""
    if kind == "synthetic":
        return SYNTHETIC_TERMS
    return (NOT_RECORDED if kind != "fets2022" else "") + FETS_TERMS


def _setting(value) -> str:
    return "none" if value is None else str(value)


def _cell(value, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _scores_table(evaluation: dict) -> list[str]:
    from fedseg.app.bundle_card import SCORE_KEYS

    if evaluation["source"] != "cross_site_eval":
        return [f"Not evaluated: {evaluation['note'].removeprefix('not evaluated: ')}."]
    header = "| site | cases | Dice TC | Dice WT | Dice ET | Dice mean | HD95 TC (mm) | HD95 WT (mm) | HD95 ET (mm) |"
    lines = [evaluation["note"][0].upper() + evaluation["note"][1:] + ":", "", header, "|---" * 9 + "|"]
    rows = [*evaluation["sites"].items(), ("pooled (every case)", evaluation["pooled"])]
    for name, scores in rows:
        cells = [_cell(scores[k], 1 if k.startswith("hd95") else 3) for k in SCORE_KEYS]
        lines.append(f"| {name} | {scores['n_cases']} | " + " | ".join(cells) + " |")
    return lines


def _usage(meta: dict) -> list[str]:
    monai = meta["monai_version"]
    return [
        "## Running it with MONAI",
        "",
        f'Needs MONAI with its NIfTI reader and command line: `pip install "monai[nibabel,fire]=={monai}"` (and '
        f"PyTorch {meta['pytorch_version']} or later). Nothing of FedRef-Seg is needed. From this folder:",
        "",
        "```",
        "python -m monai.bundle run --config_file configs/inference.json --dataset_dir <folder> --output_dir <out>",
        "python -m monai.bundle verify_net_in_out --net_id network_def --meta_file configs/metadata.json \\",
        "    --config_file configs/inference.json",
        "```",
        "",
        "`<folder>` is a FeTS subject folder (`<subject>/<subject>_{t1,t1ce,t2,flair}.nii.gz`) or a folder of them; "
        "each case's `<subject>_seg.nii.gz` (labels 0, 1, 2, 4, in the input's grid) is written to `<out>`. From "
        "elsewhere add `--bundle_root <this folder>`. In Python, the network and its weights:",
        "",
        "```python",
        "import torch",
        "from monai.bundle import ConfigParser",
        "",
        "parser = ConfigParser()",
        'parser.read_config("configs/inference.json")',
        'network = parser.get_parsed_content("network_def")',
        'network.load_state_dict(torch.load("models/model.pt", weights_only=True))',
        "```",
        "",
        "In MONAI Label (3D Slicer as its client), the `monaibundle` app loads this folder from its `model/` folder "
        "(documented, not tested by FedRef-Seg):",
        "",
        "```",
        "monailabel apps --download --name monaibundle --output apps",
        "mkdir -p apps/monaibundle/model && cp -r <this folder> apps/monaibundle/model/",
        "monailabel start_server --app apps/monaibundle --studies <images> --conf models <this folder's name>",
        "```",
        "",
        "MONAI Label sends one image per request: give it the four modalities as one 4-channel NIfTI in the order "
        "T1, T1ce, T2, FLAIR (the preprocessing reads such a file as it reads the four files).",
        "",
    ]


def _model(meta: dict) -> list[str]:
    network = meta["network_data_format"]
    image, pred = network["inputs"]["image"], network["outputs"]["pred"]
    return [
        "## Model",
        "",
        f"- Input: {image['num_channels']} channels in this order: "
        + ", ".join(image["channel_def"].values())
        + "; co-registered, skull-stripped, each channel normalised over its nonzero (brain) voxels.",
        f"- Output: {pred['num_channels']} channels: " + "; ".join(pred["channel_def"].values()) + ".",
        f"- Inference: MONAI's sliding window of {pred['spatial_shape']} voxels, each region's sigmoid above 0.5, "
        "then FeTS labels: whole tumour 2 (oedema), tumour core inside it 1 (necrotic core), enhancing tumour "
        "inside that 4; a TC or ET voxel outside the whole tumour is dropped. The segmentation keeps the input's "
        "grid. It is `fedseg infer`'s, voxel for voxel.",
        "",
    ]


def _training(card: dict) -> list[str]:
    model = card["model"]
    after = f", saved after round {model['after_round']}" if model["after_round"] is not None else ""
    settings = card["algorithm"]["settings"]
    lines = [
        "## Training",
        "",
        f"- Algorithm: {card['algorithm']['name']}"
        + (" (" + ", ".join(f"{k} {_setting(v)}" for k, v in settings.items()) + ")" if settings else "")
        + f"; {card['rounds']} rounds, {card['participation']}.",
        f"- This model: {model['selected_by']}{after} (`{model['checkpoint']}`; models/model.pt sha256 "
        f"{model['sha256']}).",
        f"- Run: {card['run']['job']} ({card['run'].get('mode') or 'mode not recorded'}), status "
        f"{card['run']['status']}, {card['run']['rounds_done']} of {card['run']['rounds_planned']} rounds.",
        f"- Data: {card['data']['description']} (terms: docs/{DATA_LICENCE_FILE}).",
        "",
        "| site | training cases | validation cases |",
        "|---|---|---|",
    ]
    for site, counts in card["sites"].items():
        lines.append(f"| {site} | {counts['training_cases']} | {counts['validation_cases']} |")
    return lines + ["", "Every setting of the run is in `configs/metadata.json` (`model_card.settings`).", ""]


def readme(meta: dict) -> str:
    """``docs/README.md``: what the model is, how to run it, how it was trained and how it scored."""
    card = meta["model_card"]
    lines = [
        f"# {meta['name']}",
        "",
        f"**{card['intended_use']}**",
        "",
        meta["description"],
        "",
        *_model(meta),
        *_usage(meta),
        *_training(card),
        "## Evaluation",
        "",
        *_scores_table(card["evaluation"]),
        "",
        "## Versions",
        "",
        f"Exported {card['exported']} by {card['exported_by']}, with "
        + ", ".join(f"{k} {v}" for k, v in card["versions"].items())
        + ".",
        "",
        "## References",
        "",
        *[f"- {r}" for r in meta["references"]],
        "",
        "## License",
        "",
        f"The configurations and weights: Apache-2.0 (`LICENSE`). The training data's terms: `docs/{DATA_LICENCE_FILE}`.",
        "",
    ]
    return "\n".join(lines)
