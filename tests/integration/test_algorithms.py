"""Every algorithm through the same trainer and job builder, and the server's defences, in FLARE's simulator.

Runs are judged by their results: from the saved models, each algorithm's global model is the one its rule
gives (FedRef's closed form, FedAvg's mean, FedAvgM's momentum, FedAdam's first Adam step, FedProx's term
at the sites, FedPIDAvg's weights from what the sites reported). Sites train deterministically from the same seed, so two runs that send the sites the same
model get the same site updates: that is what lets one run's artifacts check another's server step.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.federations import FEDREF, SITES, TINY, simulate

from fedseg.checkpoint import load_network, load_state_dict
from fedseg.controller import FEDREF_STEP_FILE
from fedseg.jobs.recipes import JobSettings, run_simulation

BASELINES = ["fedavg", "fedprox", "fedadam", "fedavgm", "scaffold", "fedpidavg"]
ROUNDS = {"fedadam": 1}  # one round is what its closed-form check needs; the others run TINY's two


def baseline(federation, algorithm: str):
    """The shared run of one baseline (Scaffold with cross-site evaluation: its checkpoint must stay loadable)."""
    return federation(
        algorithm=algorithm,
        cross_site_eval=algorithm == "scaffold",
        num_rounds=ROUNDS.get(algorithm, TINY["num_rounds"]),
    )


def fedref_step(run) -> dict:
    """The inputs of the run's last MAP step, as the FedRef controller recorded them."""
    return torch.load(os.path.join(run.server_dir, FEDREF_STEP_FILE), weights_only=True)


def as_float64(model: dict) -> dict[str, np.ndarray]:
    """Every tensor as float64, so that the rules are computed here in more precision than the server used."""
    return {k: np.asarray(v, dtype=np.float64) for k, v in model.items()}


def weights(path: str) -> dict[str, np.ndarray]:
    """A saved global model's tensors, as float64."""
    return as_float64(load_state_dict(path))


def first_update(run) -> tuple[dict, dict]:
    """(theta_0, u_0): the seeded initial model and the sites' first averaged update, from the FedRef run.

    Its round 0 is warm-up, plain FedAvg, so its buffer then holds theta_0 and theta_1 = theta_0 + u_0: the
    same models any algorithm started from and got after one FedAvg round of the same sites.
    """
    theta0, theta1 = (as_float64(m) for m in fedref_step(run)["buffer"])
    return theta0, {k: theta1[k] - theta0[k] for k in theta0}


@pytest.mark.parametrize("algorithm", BASELINES)
def test_each_baseline_completes_its_rounds(federation, algorithm):
    job, run = baseline(federation, algorithm)
    model_bytes = sum(t.numel() * t.element_size() for t in job.network().state_dict().values())
    assert [r["round"] for r in run.rounds] == list(range(job.num_rounds))
    for record in run.rounds:
        assert record["algorithm"] == algorithm
        assert sorted(record["sites"]) == SITES and record["global_updated"]
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
        assert sorted(run.cross_site) == SITES


def test_fedref_global_model_is_the_closed_form_of_its_last_round(fedref_run):
    job, run = fedref_run
    step = fedref_step(run)
    assert (step["round"], step["applied"]) == (1, True) and len(step["buffer"]) == job.buffer_size == 2
    assert (step["lambda1"], step["lambda2"], step["variant"]) == (job.lambda1, job.lambda2, job.fedref_variant)
    assert job.fedref_variant in ("mean", "trend") and job.lambda2 > 0
    saved = weights(run.global_model)
    averaged, previous = as_float64(step["averaged"]), as_float64(step["previous_global"])
    buffered = [as_float64(m) for m in step["buffer"]]
    after = [as_float64(m) for m in torch.load(run.reference_buffer, weights_only=True)["models"]]
    assert saved.keys() == averaged.keys() == previous.keys()
    for name, value in saved.items():
        if job.fedref_variant == "trend":  # p = 2: the line through the two buffered models, one round ahead
            reference = 2 * buffered[1][name] - buffered[0][name]
        else:  # uniform weighting: the mean of the p models
            reference = sum(m[name] for m in buffered) / len(buffered)
        expected = (averaged[name] + job.lambda1 * previous[name] + job.lambda2 * reference) / (
            1 + job.lambda1 + job.lambda2
        )
        np.testing.assert_allclose(value, expected, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(previous[name], buffered[-1][name])  # theta_r is the newest buffered model
        np.testing.assert_array_equal(after[-1][name], value)  # the buffer now holds FedRef's output ...
        np.testing.assert_array_equal(after[0][name], buffered[-1][name])  # ... after the models before it
    assert not all(np.allclose(saved[k], averaged[k], atol=1e-6) for k in saved)  # the step moved the FedAvg model


def test_fedavg_global_model_is_the_mean_fedref_started_from(fedref_run, federation):
    # both runs send the sites theta_0, then theta_1 (FedRef's round 0 is warm-up): the sites' updates are the
    # same, so FedAvg's final model is the weighted mean that FedRef's last step recorded as its input
    _, fedavg = baseline(federation, "fedavg")
    averaged = as_float64(fedref_step(fedref_run[1])["averaged"])
    for name, value in weights(fedavg.global_model).items():
        np.testing.assert_allclose(value, averaged[name], rtol=1e-6, atol=1e-7, err_msg=name)


def test_fedavgm_adds_the_momentum_of_the_first_update(fedref_run, federation):
    # server SGD with lr 1 and momentum 0.9 on the averaged update: round 0 is FedAvg's step (theta_1 is the
    # same), round 1 adds 0.9 u_0 to what FedAvg does: theta_2(FedAvgM) - theta_2(FedAvg) = 0.9 u_0
    job, fedavgm = baseline(federation, "fedavgm")
    _, fedavg = baseline(federation, "fedavg")
    _, u0 = first_update(fedref_run[1])
    momentum, plain = weights(fedavgm.global_model), weights(fedavg.global_model)
    assert job.server_momentum == 0.9
    for name in plain:
        np.testing.assert_allclose(momentum[name] - plain[name], 0.9 * u0[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert max(np.abs(u0[k]).max() for k in u0) > 1e-3  # a difference this test can see


def test_fedadam_takes_adams_first_step_on_the_averaged_update(fedref_run, federation):
    # Adam's first step on the gradient -u_0 with bias correction: theta_0 + lr u_0 / (|u_0| + eps), lr 0.03,
    # eps 1e-3 -- nearly lr * sign(u_0) per weight, nothing like FedAvg's theta_0 + u_0
    job, fedadam = baseline(federation, "fedadam")
    theta0, u0 = first_update(fedref_run[1])
    initial = {k: v.detach().double().numpy() for k, v in job.network().state_dict().items()}
    saved = weights(fedadam.global_model)
    for name, value in saved.items():
        np.testing.assert_array_equal(theta0[name], initial[name])  # every run starts from the seeded network
        expected = theta0[name] + 0.03 * u0[name] / (np.abs(u0[name]) + 1e-3)
        np.testing.assert_allclose(value, expected, rtol=1e-4, atol=1e-5, err_msg=name)
    assert not all(np.allclose(saved[k], theta0[k] + u0[k], atol=1e-4) for k in saved)


def test_fedprox_adds_its_proximal_term_at_the_sites(federation):
    # FedProx aggregates as FedAvg does: what differs is the loss the sites minimise, loss + mu/2 |w - w_global|^2.
    # The term and its gradient are 0 at a round's first step (the weights are the global model's) and act from
    # the second step on (TINY takes two): the same site, from the same model, reports a different training
    # loss and sends a different update.
    _, fedprox = baseline(federation, "fedprox")
    _, fedavg = baseline(federation, "fedavg")
    for site in SITES:
        prox, plain = fedprox.rounds[0]["sites"][site], fedavg.rounds[0]["sites"][site]
        assert prox["dice_mean"] == plain["dice_mean"]  # both validated the same initial model
        assert prox["num_steps"] == plain["num_steps"] >= 2  # a second step, where the term is not 0
        assert (prox["fedprox_mu"], plain["fedprox_mu"]) == (0.01, 0.0)
        assert prox["train_loss"] != plain["train_loss"]
    prox_model, plain_model = weights(fedprox.global_model), weights(fedavg.global_model)
    assert not all(np.array_equal(prox_model[k], plain_model[k]) for k in plain_model)


def test_fedpidavg_weighs_the_sites_as_its_rule_gives_from_what_they_reported(federation):
    # the shared run of test_each_baseline_completes_its_rounds: each round's recorded weights are FedPIDAvg's
    # rule applied to the sites' reported training cases and losses, and the losses of the rounds before
    from fedseg.pidavg import PIDRule

    job, run = baseline(federation, "fedpidavg")
    rule, history = PIDRule(job.pid_alpha, job.pid_beta, job.pid_gamma, job.pid_window), {}
    for record in run.rounds:
        sites, pid = record["sites"], record["fedpidavg"]
        sizes = {site: values["n_train_cases"] for site, values in sites.items()}
        inputs = rule.inputs(sizes, {site: values["train_loss"] for site, values in sites.items()}, history)
        assert sorted(pid["weights"]) == SITES and sum(pid["weights"].values()) == pytest.approx(1.0)
        assert pid["weights"] == pytest.approx(rule.weights(inputs), rel=1e-9)
        for site in SITES:
            assert pid["inputs"][site] == pytest.approx(inputs[site], rel=1e-9), site
        rule.remember(history, {site: values["loss"] for site, values in inputs.items()})
    assert (pid["alpha"], pid["beta"], pid["gamma"], pid["window"]) == (0.45, 0.45, 0.1, 6)
    assert len(run.rounds) == 2 and all(pid["inputs"][site]["loss"] is not None for site in SITES)


def test_poisoned_updates_are_rejected_and_rounds_complete(two_sites, tmp_path):
    _, run = simulate(two_sites, tmp_path, algorithm="fedref", min_clients=1, faults=["site-2:nan:0", "site-2:shape:1"])
    first, second = run.rounds
    assert first["rejected"] == {"site-2": "non-finite values (NaN or Inf) in unet.model.0.conv.unit0.conv.weight"}
    assert second["rejected"]["site-2"].startswith("shape of unet.model.0.conv.unit0.conv.weight is (1,)")
    assert first["global_updated"] and second["global_updated"]  # site-1 alone carried both rounds
    assert first["nr_aggregated"] == second["nr_aggregated"] == 1


def test_too_few_good_updates_keep_the_global_model(two_sites, tmp_path):
    _, run = simulate(two_sites, tmp_path, algorithm="fedavg", min_clients=2, num_rounds=1, faults=["site-1:nan:0"])
    assert run.rounds[0]["global_updated"] is False
    assert "site-1" in run.rounds[0]["rejected"]


def test_a_site_that_dies_leaves_a_finished_job_that_says_so(two_sites, tmp_path):
    _, run = simulate(
        two_sites,
        tmp_path,
        algorithm="fedref",
        num_rounds=3,
        min_clients=1,
        wait_after_min_seconds=3,
        faults=["site-2:die:1"],
    )
    assert [r["round"] for r in run.rounds] == [0, 1, 2]
    assert [r["missing"] for r in run.rounds] == [[], ["site-2"], ["site-2"]]
    assert all(r["global_updated"] for r in run.rounds)
    assert run.global_model is not None


def test_a_stopped_fedref_run_resumes_with_its_buffer_and_global_model(fedref_run, two_sites, tmp_path):
    _, first = fedref_run
    assert first.rounds[-1]["fedref"]["buffer"] == 2
    _, resumed = simulate(
        two_sites, tmp_path / "resumed", algorithm="fedref", buffer_size=2, num_rounds=1, resume_from=first.folder
    )
    (record,) = resumed.rounds
    assert record["round"] == 2
    assert record["fedref"]["applied"]  # a fresh server would still be warming up: the buffer came back
    # the sites were sent the first run's final global model, and the MAP step used its buffer
    step = fedref_step(resumed)
    saved, previous = weights(first.global_model), as_float64(step["previous_global"])
    buffered = [as_float64(m) for m in torch.load(first.reference_buffer, weights_only=True)["models"]]
    for name, value in saved.items():
        np.testing.assert_array_equal(previous[name], value, err_msg=name)
        for got, want in zip(step["buffer"], buffered, strict=True):
            np.testing.assert_array_equal(np.asarray(got[name], dtype=np.float64), want[name], err_msg=name)


def test_float16_transfer_halves_the_bytes_and_keeps_the_server_in_full_precision(two_sites, tmp_path):
    job, run = simulate(two_sites, tmp_path, algorithm="fedref", buffer_size=2, quantization="float16")
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
    buffer = torch.load(next(Path(run.folder).rglob("fedref_reference_buffer.pt")), weights_only=True)
    tensors = [v for model in buffer["models"] for v in model.values()]
    assert tensors and {torch.as_tensor(v).dtype for v in tensors} == {torch.float32}


def test_an_unknown_or_gpu_only_quantization_is_refused_before_anything_runs(two_sites, tmp_path):
    with pytest.raises(ValueError, match="quantization 'int3' is not one of float16, blockwise8"):
        JobSettings(quantization="int3")
    with pytest.raises(ValueError, match="'adaquant' is refused: NVFlare 2.9.0's AdaQuantizer .* NaN"):
        JobSettings(quantization="adaquant")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="blockwise8.*no GPU"):
            run_simulation(JobSettings(**dict(TINY, data_root=two_sites, quantization="blockwise8")), str(tmp_path))
        assert not (tmp_path / "fedseg_fedref").exists()


def test_the_same_settings_give_the_same_run(fedref_run, two_sites, tmp_path):
    # the server's initial model is built from the job config with its seed, and updates are summed in
    # site order whatever order they arrive in: a run can be repeated exactly, and compared exactly
    _, first = fedref_run
    _, again = simulate(two_sites, tmp_path, **FEDREF)
    one, two = load_state_dict(first.global_model), load_state_dict(again.global_model)
    assert one.keys() == two.keys()
    assert all(torch.equal(one[k], two[k]) for k in one)
    for r in range(2):
        for site in SITES:
            a, b = (run.rounds[r]["sites"][site] for run in (first, again))
            assert (a["dice_mean"], a["train_loss"]) == (b["dice_mean"], b["train_loss"])


def test_tensorboard_holds_each_sites_scalars_for_every_round(fedref_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run = fedref_run
    for site in SITES:
        (events,) = Path(run.folder).rglob(f"tb_events/{site}/events.out.tfevents.*")
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        assert set(accumulator.Tags()["scalars"]) == {"dice_tc", "dice_wt", "dice_et", "dice_mean", "train_loss"}
        for tag in accumulator.Tags()["scalars"]:
            points = accumulator.Scalars(tag)
            assert [p.step for p in points] == [0, 1], (site, tag)
            recorded = [record["sites"][site][tag] for record in run.rounds]  # what the round records hold
            assert [p.value for p in points] == pytest.approx(recorded, rel=1e-6), (site, tag)
