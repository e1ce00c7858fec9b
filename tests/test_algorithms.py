"""Every algorithm through the same trainer and job builder, and the server's defences, in FLARE's simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedseg.app.artifacts import load_run
from fedseg.data_prep.fets2022 import prepare_sites
from fedseg.checkpoint import load_network
from fedseg.jobs.recipes import JobSettings, run_simulation

pytestmark = pytest.mark.integration

TINY = dict(sites=["site-1", "site-2"], num_rounds=2, local_epochs=1, crop=(32, 32, 24), channels=(8, 16, 32),
            threads=1, cross_site_eval=False)


@pytest.fixture(scope="module")
def sites(tmp_path_factory, tiny_fets):
    root = tmp_path_factory.mktemp("sites")
    prepare_sites(tiny_fets, str(root), partitions=[1, 2], validation_fraction=0.34)
    return str(root)


def simulate(sites: str, workspace, **settings):
    options = dict(TINY, data_root=sites)
    options.update(settings)
    job = JobSettings(**options)
    return job, load_run(run_simulation(job, str(workspace)))


@pytest.mark.parametrize("algorithm", ["fedavg", "fedprox", "fedadam", "fedavgm", "scaffold"])
def test_each_baseline_completes_two_rounds(sites, tmp_path, algorithm):
    # Scaffold also runs cross-site evaluation: its checkpoint must stay loadable without its controls
    job, run = simulate(sites, tmp_path, algorithm=algorithm, cross_site_eval=algorithm == "scaffold")
    model_bytes = sum(t.numel() * t.element_size() for t in job.network().state_dict().values())
    assert [r["round"] for r in run.rounds] == [0, 1]
    for record in run.rounds:
        assert record["algorithm"] == algorithm
        assert sorted(record["sites"]) == ["site-1", "site-2"] and record["global_updated"]
        for site in record["sites"].values():
            assert site["num_steps"] > 0
            assert site["fedprox_mu"] == (0.01 if algorithm == "fedprox" else 0.0)  # FedProx reaches the sites
            assert site["scaffold"] == (1.0 if algorithm == "scaffold" else 0.0)  # so do Scaffold's controls
            # the weights each way; Scaffold's control variates travel with them (twice the bytes), and
            # NVFlare's Scaffold also forwards the last aggregated control deltas in the model's meta
            if algorithm == "scaffold":
                assert site["bytes_sent_by_site"] == 2 * model_bytes
                assert record["bytes_sent_per_site"] == (2 if record["round"] == 0 else 3) * model_bytes
            else:
                assert site["bytes_sent_by_site"] == record["bytes_sent_per_site"] == model_bytes
    load_network(run.global_model, job.network().config())
    if algorithm == "scaffold":
        assert sorted(run.cross_site) == ["site-1", "site-2"]


def test_poisoned_updates_are_rejected_and_rounds_complete(sites, tmp_path):
    _, run = simulate(sites, tmp_path, algorithm="fedref", min_clients=1,
                      faults=["site-2:nan:0", "site-2:shape:1"])
    first, second = run.rounds
    assert first["rejected"] == {"site-2": "non-finite values (NaN or Inf) in unet.model.0.conv.unit0.conv.weight"}
    assert second["rejected"]["site-2"].startswith("shape of unet.model.0.conv.unit0.conv.weight is (1,)")
    assert first["global_updated"] and second["global_updated"]  # site-1 alone carried both rounds
    assert first["nr_aggregated"] == second["nr_aggregated"] == 1


def test_too_few_good_updates_keep_the_global_model(sites, tmp_path):
    _, run = simulate(sites, tmp_path, algorithm="fedavg", min_clients=2, num_rounds=1, faults=["site-1:nan:0"])
    assert run.rounds[0]["global_updated"] is False
    assert "site-1" in run.rounds[0]["rejected"]


def test_a_site_that_dies_leaves_a_finished_job_that_says_so(sites, tmp_path):
    _, run = simulate(sites, tmp_path, algorithm="fedref", num_rounds=3, min_clients=1, wait_after_min_seconds=3,
                      faults=["site-2:die:1"])
    assert [r["round"] for r in run.rounds] == [0, 1, 2]
    assert [r["missing"] for r in run.rounds] == [[], ["site-2"], ["site-2"]]
    assert all(r["global_updated"] for r in run.rounds)
    assert run.global_model is not None


def test_a_stopped_fedref_run_resumes_with_its_buffer_and_global_model(sites, tmp_path):
    first_job, first = simulate(sites, tmp_path / "first", algorithm="fedref", buffer_size=2, cross_site_eval=True)
    assert first.rounds[-1]["fedref"]["buffer"] == 2
    _, resumed = simulate(sites, tmp_path / "resumed", algorithm="fedref", buffer_size=2, num_rounds=1,
                          resume_from=first.folder)
    (record,) = resumed.rounds
    assert record["round"] == 2
    assert record["fedref"]["applied"]  # a fresh server would still be warming up: the buffer came back
    # the sites received the first run's final global model: their validation equals its cross-site scores
    for site in ("site-1", "site-2"):
        final = first.cross_site[site]["SRV_FL_global_model.pt"]
        assert record["sites"][site]["dice_mean"] == pytest.approx(final["dice_mean"], abs=1e-6)


def test_float16_transfer_halves_the_bytes_and_keeps_the_server_in_full_precision(sites, tmp_path):
    import torch

    job, run = simulate(sites, tmp_path, algorithm="fedref", buffer_size=2, quantization="float16")
    model_bytes = sum(t.numel() * t.element_size() for t in job.network().state_dict().values())
    for record in run.rounds:
        assert record["global_updated"] and record["bytes_sent_per_site"] == model_bytes // 2
        for site in record["sites"].values():  # measured on the wire by the server's WireSizeMeter, both ways
            assert site["bytes_sent_by_site"] == site["bytes_received_by_site"] == model_bytes // 2
            assert 0.0 <= site["dice_mean"] <= 1.0
    assert run.rounds[-1]["fedref"]["applied"]
    # the quantiser changed the messages, not what the server keeps: global model and FedRef's buffer are fp32
    state = load_network(run.global_model, job.network().config()).state_dict()
    assert {t.dtype for t in state.values()} == {torch.float32}
    buffer = torch.load(next(Path(run.folder).rglob("fedref_reference_buffer.pt")), weights_only=False)
    tensors = [v for model in buffer["models"] for v in model.values()]
    assert tensors and {torch.as_tensor(v).dtype for v in tensors} == {torch.float32}


def test_an_unknown_or_gpu_only_quantization_is_refused_before_anything_runs(sites, tmp_path):
    with pytest.raises(ValueError, match="quantization 'int3' is not one of float16, blockwise8"):
        JobSettings(quantization="int3")
    with pytest.raises(ValueError, match="'adaquant' is refused: NVFlare 2.9.0's AdaQuantizer .* NaN"):
        JobSettings(quantization="adaquant")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="blockwise8.*no GPU"):
            run_simulation(JobSettings(**dict(TINY, data_root=sites, quantization="blockwise8")), str(tmp_path))
        assert not (tmp_path / "fedseg_fedref").exists()


def test_the_same_settings_give_the_same_run(sites, tmp_path):
    # the server's initial model is built from the job config with its seed, and updates are summed in
    # site order whatever order they arrive in: a run can be repeated exactly, and compared exactly
    import torch

    runs = [simulate(sites, tmp_path / name, algorithm="fedref", num_rounds=1)[1] for name in ("a", "b")]
    first, second = (torch.load(r.global_model, weights_only=False) for r in runs)
    first, second = first.get("model", first), second.get("model", second)
    assert first.keys() == second.keys()
    assert all(torch.equal(torch.as_tensor(first[k]), torch.as_tensor(second[k])) for k in first)
    for site in ("site-1", "site-2"):
        a, b = (r.rounds[0]["sites"][site] for r in runs)
        assert (a["dice_mean"], a["train_loss"]) == (b["dice_mean"], b["train_loss"])
