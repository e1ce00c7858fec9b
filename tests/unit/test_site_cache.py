"""A site's disk cache and bounded work: what a hospital's site would see on disk, in its log and in its numbers."""

from __future__ import annotations

import errno
import logging
import os

import numpy as np
import pytest
import torch

from fedseg.cache import CACHE_SUFFIX, CaseCache, case_name, decode_transforms
from fedseg.data import LEFT_OUT_FILE, cache_folder, load_site_datalist, make_site_data, validation_subset
from fedseg.data_prep.fets2022 import prepare
from fedseg.settings import TrainingSettings
from fedseg.trainer import SiteTrainer, parse_args


def tree_state(root) -> dict:
    """Every file under ``root`` with its size and modification time (sources must not change)."""
    state = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            status = os.stat(path)
            state[path] = (status.st_size, status.st_mtime_ns)
    return state


@pytest.fixture()
def site(tiny_fets, tmp_path):
    """A copy-mode site (its files can be changed by a test without touching the shared source)."""
    prepare(
        tiny_fets, str(tmp_path / "sites"), partitions=[1], mode="copy", validation_fraction=0.25, show_progress=False
    )
    return str(tmp_path / "sites" / "site-1")


def cache_files(folder) -> list[str]:
    return sorted(n for n in os.listdir(folder) if n.endswith(CACHE_SUFFIX))


def test_each_case_is_cached_once_on_disk_and_none_is_held_in_memory(site, tmp_path):
    training, _ = load_site_datalist(site)
    before = tree_state(site)
    cases = CaseCache(training, str(tmp_path / "cache"))
    assert cases.warm() == []
    assert len(cache_files(tmp_path / "cache")) == len(training) == 3
    assert cases._in_ram == {}  # no RAM budget: nothing decoded stays in the process
    assert not [n for n in os.listdir(tmp_path / "cache") if n.endswith(".tmp")]
    assert tree_state(site) == before  # the data folder is only read
    # a second cache over the same folder reads the files instead of decoding
    again = CaseCache(training, str(tmp_path / "cache"))
    again.decode = None  # decoding now would raise
    assert again[0]["image"].dtype == torch.float16


def test_a_cached_case_is_the_decoded_case_cropped_to_the_brain_and_stored_compactly(site, tmp_path):
    training, _ = load_site_datalist(site)
    cached = CaseCache(training, str(tmp_path / "cache")).__getitem__(0)
    fresh = decode_transforms()(dict(training[0]))
    assert cached["image"].dtype == torch.float16 and cached["label"].dtype == torch.uint8
    np.testing.assert_allclose(cached["image"].float().numpy(), fresh["image"].float().numpy(), atol=1e-2, rtol=1e-3)
    np.testing.assert_array_equal(cached["label"].numpy(), fresh["label"].numpy())
    assert set(np.unique(cached["label"].numpy())) <= {0, 1, 2, 4}
    # cropped to the brain: smaller than the volume, and every tumour voxel of the seg kept
    import nibabel as nib

    seg = np.asarray(nib.load(training[0]["label"]).dataobj)
    assert cached["image"].shape[1:] != seg.shape and cached["image"].shape[0] == 4
    assert int((cached["label"] > 0).sum()) == int((seg > 0).sum())
    np.testing.assert_allclose(cached["spacing"].numpy(), nib.load(training[0]["label"]).header.get_zooms(), rtol=1e-5)


def test_a_changed_source_file_is_decoded_again_and_the_stale_file_removed(site, tmp_path):
    training, validation = load_site_datalist(site)
    folder = str(tmp_path / "cache")
    first = CaseCache(training, folder)
    first.warm()
    old_names = first.file_names()
    flair = training[0]["image"][3]
    status = os.stat(flair)
    os.utime(flair, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))  # the file was replaced
    second = CaseCache(training, folder)
    decoded = []
    original = second._decode
    second._decode = lambda index: decoded.append(index) or original(index)
    second.warm()
    assert decoded == [0]  # only the changed case
    assert second.prune(second.file_names()) > 0
    assert set(cache_files(folder)) == second.file_names() != old_names


def test_an_unreadable_cache_file_is_decoded_again_not_used(site, tmp_path, caplog):
    training, _ = load_site_datalist(site)
    cases = CaseCache(training, str(tmp_path / "cache"))
    cases.warm()
    path = cases.path(1)
    with open(path, "r+b") as f:
        f.truncate(100)  # what a crash in a non-atomic writer would leave
    with caplog.at_level(logging.WARNING, logger="fedseg.cache"):
        case = CaseCache(training, str(tmp_path / "cache"))[1]
    assert case["image"].shape[0] == 4
    assert "a cache file was unreadable" in caplog.text
    assert case_name(training[1]) not in caplog.text and str(tmp_path) not in caplog.text  # job logs may leave
    assert os.path.getsize(path) > 100  # rewritten whole


def test_a_full_disk_is_one_line_and_training_goes_on_with_nothing_half_written(site, tmp_path, monkeypatch, caplog):
    training, _ = load_site_datalist(site)
    folder = tmp_path / "cache"
    real_save = torch.save

    def disk_full(obj, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")  # the write got this far
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    cases = CaseCache(training, str(folder))
    with caplog.at_level(logging.WARNING, logger="fedseg.cache"):
        assert cases.warm() == []
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "is full" in warnings[0] and "cache_dir" in warnings[0]
    assert str(folder) not in warnings[0] and not any(case_name(i) in warnings[0] for i in training)
    assert os.listdir(folder) == []  # no half-written file under any name
    monkeypatch.setattr(torch, "save", real_save)
    assert len(cases) == 3 and cases[2]["image"].shape[0] == 4  # still served, decoded each time


def test_a_case_that_cannot_be_decoded_is_named_and_left_out(site, tmp_path):
    training, _ = load_site_datalist(site)
    broken = training[1]["image"][2]
    data = open(broken, "rb").read()
    with open(broken, "wb") as f:
        f.write(data[: len(data) // 2])  # a truncated .nii.gz
    cases = CaseCache(training, str(tmp_path / "cache"))
    problems = cases.warm()
    assert len(problems) == 1 and problems[0].startswith(f"case {case_name(training[1])}: cannot be decoded")
    assert len(cases) == 2 and case_name(training[1]) not in [case_name(i) for i in cases.items]


def test_ram_budget_keeps_that_many_bytes_of_cases_in_memory(site, tmp_path):
    training, _ = load_site_datalist(site)
    size = CaseCache(training, str(tmp_path / "cache"))[0]
    one_case = sum(v.numel() * v.element_size() for v in size.values())
    budget_mb = (2 * one_case + 2**19) // 2**20 + 1
    cases = CaseCache(training, str(tmp_path / "cache"), ram_budget_mb=budget_mb)
    cases.warm()
    assert 1 <= len(cases._in_ram) <= 3 and cases._ram_used <= budget_mb * 2**20


def test_cache_folder_is_refused_inside_the_data_folder_and_follows_the_site_setting(site, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="inside the data folder"):
        cache_folder("site-1", site, os.path.join(site, "cache"))
    monkeypatch.setenv("FEDSEG_CACHE_DIR", str(tmp_path / "site_it"))
    assert cache_folder("site-1", site) == str(tmp_path / "site_it" / "site-1")
    assert cache_folder("site-1", site, str(tmp_path / "job")) == str(tmp_path / "job" / "site-1")
    monkeypatch.delenv("FEDSEG_CACHE_DIR")
    monkeypatch.chdir(tmp_path)
    assert cache_folder("site-1", site) == str(tmp_path / "fedseg_cache" / "site-1")


def test_validation_subset_is_fixed_bounded_and_seeded():
    assert validation_subset(5, 8, seed=0) == [0, 1, 2, 3, 4]
    assert validation_subset(100, 0, seed=0) == list(range(100))
    chosen = validation_subset(100, 8, seed=0)
    assert len(chosen) == 8 == len(set(chosen)) and chosen == sorted(chosen)
    assert validation_subset(100, 8, seed=0) == chosen  # the same every round and every run
    assert validation_subset(100, 8, seed=1) != chosen
    # the site's minimum: a job's narrower subset is raised to it, 0 (every case) stays every case
    assert len(validation_subset(100, 1, seed=0, min_cases=8)) == 8
    assert validation_subset(5, 1, seed=0, min_cases=8) == [0, 1, 2, 3, 4]
    assert validation_subset(100, 0, seed=0, min_cases=8) == list(range(100))
    assert validation_subset(100, 12, seed=0, min_cases=8) == validation_subset(100, 12, seed=0)


def tiny_trainer(site, tmp_path, *extra) -> SiteTrainer:
    args = parse_args(
        [
            "--crop",
            "16",
            "16",
            "16",
            "--channels",
            "4",
            "8",
            "--batch_size",
            "1",
            "--cache_dir",
            str(tmp_path / "cache"),
            *extra,
        ]
    )
    return SiteTrainer(site, args)


def test_local_steps_take_exactly_that_many_steps_whatever_the_site_size(site, tmp_path):
    trainer = tiny_trainer(site, tmp_path, "--local_steps", "7")
    assert len(trainer.train_loader) == 3  # 3 training cases, 1 per batch
    result = trainer.train()
    assert result["num_steps"] == 7 and np.isfinite(result["train_loss"])
    assert trainer.train(epochs=2)["num_steps"] == 6  # epochs given explicitly: whole passes
    by_epochs = tiny_trainer(site, tmp_path, "--local_epochs", "1")
    assert by_epochs.train()["num_steps"] == 3


def test_per_round_validation_uses_the_subset_and_cross_site_evaluation_every_case(tiny_fets, tmp_path):
    prepare(
        tiny_fets, str(tmp_path / "sites"), partitions=[1], mode="link", validation_fraction=0.75, show_progress=False
    )
    folder = str(tmp_path / "sites" / "site-1")
    trainer = tiny_trainer(folder, tmp_path, "--val_max_cases", "2", "--min_val_cases", "2")
    assert len(trainer.data.val_cases) == 3
    per_round = trainer.validate()
    every = trainer.validate(every_case=True)
    assert per_round["n_cases"] == 2 and per_round["val_all_cases"] == 0.0 and per_round["n_val_cases_site"] == 3
    assert every["n_cases"] == 3 and every["val_all_cases"] == 1.0
    assert "dice_mean_sd" in per_round and "dice_mean_sd" in every  # at the site's minimum: a spread is sent
    # one patient per round is not possible: below the site's minimum the subset is the minimum
    assert tiny_trainer(folder, tmp_path, "--val_max_cases", "1", "--min_val_cases", "2").validate()["n_cases"] == 2
    # a site with fewer validation cases than its minimum scores them all and sends no spread
    few = tiny_trainer(folder, tmp_path, "--min_val_cases", "8").validate()
    assert few["n_cases"] == 3 and not any(key.endswith("_sd") for key in few)


def test_site_data_leaves_out_a_broken_case_and_trains_on_the_rest(site, tmp_path, caplog):
    training, _ = load_site_datalist(site)
    os.remove(training[0]["label"])  # a missing seg
    with caplog.at_level(logging.ERROR, logger="fedseg.data"):
        data = make_site_data(site, TrainingSettings(crop=(16, 16, 16)), str(tmp_path / "cache"), label="site-1")
    assert len(data.train_cases) == 2 and len(data.problems) == 1
    assert "1 case(s) could not be decoded and are left out" in caplog.text and LEFT_OUT_FILE in caplog.text
    assert case_name(training[0]) not in caplog.text and site not in caplog.text  # no subject id, no path
    left_out = (tmp_path / "cache" / LEFT_OUT_FILE).read_text()  # named, with the reason, on the site only
    assert left_out.startswith(f"case {case_name(training[0])}")


def test_a_step_with_a_non_finite_loss_is_skipped_and_the_weights_stay_finite(site, tmp_path):
    trainer = tiny_trainer(site, tmp_path, "--local_steps", "4")
    real_loss, calls = trainer.loss_fn, []

    def sometimes_nan(logits, label):
        calls.append(1)
        loss = real_loss(logits, label)
        return loss * float("nan") if len(calls) == 2 else loss

    trainer.loss_fn = sometimes_nan
    result = trainer.train()
    assert result["num_steps"] == 3 and result["skipped_steps"] == 1 and np.isfinite(result["train_loss"])
    assert all(torch.isfinite(v).all() for v in trainer.state().values())
