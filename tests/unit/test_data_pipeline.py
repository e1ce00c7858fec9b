"""The training data path: two-stage augmentation, the loader thread, workers and the GPU warm-up change no result."""

from __future__ import annotations

import threading

import pytest
import torch
from monai.transforms import (
    Compose,
    RandCropByPosNegLabeld,
    RandFlipd,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialPadd,
)

from fedseg.cache import CaseCache
from fedseg.data import HOST_STAGE, load_site_datalist, prefetched, to_regions, train_transforms
from fedseg.data_prep.fets2022 import prepare
from fedseg.settings import TrainingSettings
from fedseg.trainer import SiteTrainer, parse_args, warm_up


@pytest.fixture(scope="module")
def site(tiny_fets, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    prepare(tiny_fets, str(root / "sites"), partitions=[1], mode="link", validation_fraction=0.25, show_progress=False)
    return str(root / "sites" / "site-1")


def single_stage(crop: list[int], samples: int) -> Compose:
    """The pipeline before the two stages: the whole cached volume to float32 and regions, then crop and augment."""
    return Compose(
        to_regions()
        + [
            SpatialPadd(keys=["image", "label"], spatial_size=crop),
            RandCropByPosNegLabeld(
                keys=["image", "label"],
                label_key="label",
                spatial_size=crop,
                pos=1,
                neg=1,
                num_samples=samples,
                image_key="image",
                image_threshold=0,
            ),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=1),
            RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=2),
            RandScaleIntensityd(keys="image", factors=0.1, prob=0.5),
            RandShiftIntensityd(keys="image", offsets=0.1, prob=0.5),
        ]
    )


@pytest.mark.parametrize("crop", [[16, 16, 16], [40, 20, 16]], ids=["inside", "padded"])
def test_two_stage_augmentation_gives_the_single_stage_crops_bit_for_bit(site, tmp_path, crop):
    training, _ = load_site_datalist(site)
    cases = CaseCache(training, str(tmp_path / "cache"))
    before, after = single_stage(crop, 2), train_transforms(crop, 2)
    before.set_random_state(seed=7)
    after.set_random_state(seed=7)
    for draw in range(8):
        case = cases[draw % len(cases)]
        expected = before(dict(case))
        got = after(after(dict(case), end=HOST_STAGE), start=HOST_STAGE)
        assert len(got) == len(expected) == 2
        for a, b in zip(expected, got):
            for key in ("image", "label"):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key].as_tensor(), b[key].as_tensor()), (draw, key)


def trainer(site, tmp_path, *extra) -> SiteTrainer:
    args = ["--crop", "16", "16", "16", "--channels", "4", "8", "--batch_size", "2", "--local_steps", "3"]
    return SiteTrainer(site, parse_args([*args, "--cache_dir", str(tmp_path / "cache"), *extra]))


def two_rounds(trainer: SiteTrainer) -> list[dict]:
    """The batches of two rounds of 3 steps as ``train`` makes them (with the loader thread when the trainer has it):
    the first round stops mid-epoch, the second starts a new one, as rounds of local steps do."""
    out = []
    for _ in range(2):
        batches = trainer.batches(0, 3)

        def prepare(cases):
            return trainer.data.device_batch(cases, trainer.device)

        out += prefetched(batches, prepare, trainer.device) if trainer.prefetch else map(prepare, batches)
    return out


def test_the_loader_thread_and_workers_give_the_same_batches_in_the_same_order(site, tmp_path):
    serial = trainer(site, tmp_path)
    serial.prefetch = False
    expected = two_rounds(serial)  # one trainer after the other: the loaders draw from torch's generator
    threaded = trainer(site, tmp_path, "--num_workers", "1")
    assert threaded.prefetch  # the default
    got = two_rounds(threaded)
    assert len(got) == len(expected) == 6
    for a, b in zip(expected, got):
        assert a["image"].shape[1:] == (4, 16, 16, 16) and a["image"].dtype == torch.float32
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])


def test_a_round_times_its_data_side_and_its_compute(site, tmp_path):
    result = trainer(site, tmp_path).train()
    assert result["num_steps"] == 3 and result["data_seconds"] > 0 and result["compute_seconds"] > 0
    assert result["data_seconds"] + result["compute_seconds"] <= result["train_seconds"]


CPU = torch.device("cpu")


def test_prefetched_keeps_the_order_and_raises_the_producers_error():
    assert list(prefetched(iter(range(50)), lambda x: 2 * x, CPU, depth=3)) == list(range(0, 100, 2))

    def broken():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(broken(), str, CPU))


def test_prefetched_stops_its_thread_when_the_consumer_stops():
    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    before = threading.active_count()
    for item in prefetched(endless(), int, CPU, depth=2):
        if item == 3:
            break
    assert threading.active_count() == before
    assert len(produced) <= 3 + 1 + 2 + 1  # taken, one in the thread's hands, the queue's depth, one blocked put


def test_warm_up_runs_every_shape_without_touching_the_model_or_the_random_streams():
    from fedseg.network import FedSegUNet

    settings = TrainingSettings(crop=(16, 16, 16), channels=(4, 8), batch_size=2, samples_per_case=2, sw_batch_size=3)
    model = FedSegUNet.from_settings(settings)
    shapes = set()
    model.register_forward_pre_hook(lambda module, args: shapes.add(tuple(args[0].shape)))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    assert warm_up(model, settings, torch.device("cpu"), amp=False) > 0
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    # the copy (which keeps the model's hooks) ran the training batches of 1 and 2 cases and 1 to 3 windows
    assert shapes == {(n, 4, 16, 16, 16) for n in (1, 2, 3, 4)}
