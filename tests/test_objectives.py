import math

import torch

from memcore import objectives as obj


def test_cut_is_minus_log_tau():
    assert math.isclose(obj.cut(0.5), math.log(2))
    loss = torch.tensor([[0.69, 0.70, 3.0, 0.1]])
    mask = torch.ones_like(loss, dtype=torch.bool)
    # p = exp(-loss): 0.5016 (above 0.5, no weight), 0.4966 (below, weight), ...
    assert obj.ot_weights(loss, mask, 0.5).tolist() == [[0.0, 1.0, 1.0, 0.0]]


def test_ot_weights_ignore_masked_positions():
    loss = torch.tensor([[5.0, 5.0], [5.0, 0.0]])
    mask = torch.tensor([[False, True], [True, True]])
    assert obj.ot_weights(loss, mask, 0.5).tolist() == [[0.0, 1.0], [1.0, 0.0]]


def test_first_wrong_per_row():
    correct = torch.tensor([[True, False, False], [True, True, True], [False, True, True]])
    mask = torch.tensor([[True, True, True], [True, True, True], [False, True, True]])
    # row 2: position 0 is padding, so its "wrong" argmax does not count
    assert obj.first_wrong(correct, mask).tolist() == [1, -1, -1]


def test_sw_weights_follow_the_rule():
    K, a = 120, 10
    loss = torch.full((1, K), 2.0)
    correct = torch.ones((1, K), dtype=torch.bool)
    correct[0, a] = False
    mask = torch.ones((1, K), dtype=torch.bool)
    win = obj.SlidingWindow(size=50)
    w = obj.sw_weights(loss, correct, mask, 0.5, win)[0]
    base = torch.sigmoid(torch.tensor(10 * (2.0 - math.log(2))))
    assert torch.allclose(w[:a], base.expand(a))  # before the anchor: base weight
    for i in (a, a + 1, a + 20, a + 50):  # inside the window: exponential decay from the anchor
        assert math.isclose(float(w[i]), float(base) * math.exp(-(i - a) / 20), rel_tol=1e-5)
    assert math.isclose(float(w[a + 51]), float(base) * 0.01, rel_tol=1e-5)  # beyond: floor
    assert math.isclose(float(w[-1]), float(base) * 0.01, rel_tol=1e-5)


def test_sw_window_grows_when_anchor_is_stuck_and_resets_when_it_moves():
    win = obj.SlidingWindow(size=50)
    widths = [win.update([7])[0] for _ in range(12)]
    # first call sets W; the anchor then stays put: after 3 still steps W grows by 25 per step, capped at 200
    assert widths[:3] == [50, 50, 50]
    assert widths[3] == 75 and widths[4] == 100
    assert max(widths) == 200 and widths[-1] == 200
    assert win.update([9]) == [50]


def test_sw_without_anchor_keeps_base_weights():
    loss = torch.tensor([[0.1, 2.0, 0.5]])
    mask = torch.ones_like(loss, dtype=torch.bool)
    w = obj.sw_weights(loss, torch.ones_like(mask), mask, 0.5, obj.SlidingWindow())
    assert torch.allclose(w, torch.sigmoid(10 * (loss - math.log(2))))


def test_curriculum_steps_up_in_fifths():
    counts = [obj.curriculum_count(s, 100, 10, 5) for s in (0, 19, 20, 40, 60, 80, 99)]
    assert counts == [2, 2, 4, 6, 8, 10, 10]
    assert obj.curriculum_count(5, 100, 1, 5) == 1


def _losses(loss: torch.Tensor, step: int = 0) -> obj.StepLosses:
    mask = torch.ones_like(loss, dtype=torch.bool)
    return obj.StepLosses(loss=loss, correct=loss < 0.1, mask=mask, host_loss=loss.flatten().numpy(), step=step)


def test_every_method_has_a_weighting_rule():
    from memcore.config import METHODS

    assert set(obj.WEIGHTS) == set(METHODS)


def test_token_weights_ot_trains_only_tokens_below_tau_and_falls_back_to_the_mean_when_asked():
    from memcore.config import TrainSpec

    loss = torch.tensor([[0.1, 2.0, 0.5, 3.0]])  # tau 0.5: cut ln 2 = 0.69 -> two tokens below tau
    w, active = obj.token_weights(TrainSpec(method="memft-ot", tau=0.5), _losses(loss), obj.SlidingWindow())
    assert w.tolist() == [[0.0, 1.0, 0.0, 1.0]] and active == 2
    done = torch.full((1, 4), 0.01)  # every token above tau
    w, active = obj.token_weights(TrainSpec(method="memft-ot", tau=0.5), _losses(done), obj.SlidingWindow())
    assert active == 0 and w.sum() == 0  # the default: skip the update
    w, active = obj.token_weights(TrainSpec(method="memft-ot", tau=0.5, ot_when_empty="mean"), _losses(done),
                                  obj.SlidingWindow())
    assert active == 4 and w.tolist() == [[1.0] * 4]


def test_token_weights_sw_masks_the_rows_whose_curriculum_stage_has_not_come():
    from memcore.config import TrainSpec

    spec = TrainSpec(method="memft-sw", max_steps=100, curriculum_stages=2)
    loss = torch.full((4, 3), 2.0)
    w, active = obj.token_weights(spec, _losses(loss, step=0), obj.SlidingWindow())
    assert (w[:2] > 0).all() and (w[2:] == 0).all() and active == 6  # stage 1 of 2: the first half of the rows
    w, active = obj.token_weights(spec, _losses(loss, step=60), obj.SlidingWindow())
    assert (w > 0).all() and active == 12
