"""The FedRef controller's own state: schedule, buffer persistence, and a restart that continues exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedseg.controller import FedRefController, update_problem
from fedseg.fedref import FedRefUpdater


def model(rng) -> dict:
    return {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}


def test_restarted_controller_gives_the_same_next_global_model(tmp_path):
    rng = np.random.default_rng(0)
    initial = model(rng)
    averaged = [model(rng) for _ in range(5)]
    straight = FedRefUpdater(3, 0.1, 0.3)
    straight.start(initial)
    current, outputs = initial, []
    for avg in averaged:
        current, _ = straight.update(avg, current)
        outputs.append(current)

    stopped = FedRefUpdater(3, 0.1, 0.3)  # a server that stops after round 3 and saved its buffer
    stopped.start(initial)
    current = initial
    for avg in averaged[:3]:
        current, _ = stopped.update(avg, current)
    path = tmp_path / "fedref_reference_buffer.pt"
    torch.save({**stopped.buffer.state(), "round": 2}, path)

    restarted = FedRefController(num_clients=2, num_rounds=2, buffer_size=3, lambda1=0.1, lambda2=0.3,
                                 resume_buffer=str(path))
    assert len(restarted.updater.buffer) == 3
    for got, want in zip(restarted.updater.buffer.models, stopped.buffer.models):
        np.testing.assert_array_equal(got["w"], want["w"])
    for avg, want in zip(averaged[3:], outputs[3:]):
        current, applied = restarted.updater.update(avg, current)
        assert applied
        np.testing.assert_allclose(current["w"], want["w"], rtol=1e-6)


def test_resume_with_another_buffer_size_is_refused(tmp_path):
    updater = FedRefUpdater(2)
    updater.start({"w": np.zeros(2, np.float32)})
    torch.save(updater.buffer.state(), tmp_path / "b.pt")
    with pytest.raises(ValueError, match="job asks for p=3"):
        FedRefController(num_clients=2, num_rounds=1, buffer_size=3, resume_buffer=str(tmp_path / "b.pt"))


def test_lambda2_schedule():
    controller = FedRefController(num_clients=2, num_rounds=10, lambda2=0.1, lambda2_factor=2.0, lambda2_every=3,
                                  lambda2_max=0.35)
    assert [controller.lambda2_at(r) for r in (0, 2, 3, 5, 6, 9)] == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.35, 0.35])
    assert FedRefController(num_clients=2, num_rounds=2, lambda2=0.1).lambda2_at(50) == 0.1


@pytest.mark.parametrize(
    "update, reason",
    [
        ({"w": np.full((3, 2), np.nan, np.float32), "b": np.zeros(2, np.float32)}, "non-finite values (NaN or Inf) in w"),
        ({"w": np.zeros((3, 2), np.float32), "b": np.array([np.inf, 0], np.float32)}, "non-finite values (NaN or Inf) in b"),
        ({"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}, "shape of w is (2, 3), expected (3, 2)"),
        ({"w": np.zeros((3, 2), np.float32)}, "1 missing key(s), e.g. b"),
        ({"w": np.zeros((3, 2)), "b": np.zeros(2), "x": np.zeros(1)}, "1 unexpected key(s), e.g. x"),
        ({}, "empty update (no parameters)"),
        ({"w": torch.zeros(3, 2), "b": torch.zeros(2)}, None),
    ],
)
def test_update_checks(update, reason):
    reference = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    assert update_problem(update, reference) == reason
