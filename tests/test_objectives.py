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
    win = obj.SlidingWindow(base=50)
    w = obj.sw_weights(loss, correct, mask, 0.5, win)[0]
    base = torch.sigmoid(torch.tensor(10 * (2.0 - math.log(2))))
    assert torch.allclose(w[:a], base.expand(a))  # before the anchor: base weight
    for i in (a, a + 1, a + 20, a + 50):  # inside the window: exponential decay from the anchor
        assert math.isclose(float(w[i]), float(base) * math.exp(-(i - a) / 20), rel_tol=1e-5)
    assert math.isclose(float(w[a + 51]), float(base) * 0.01, rel_tol=1e-5)  # beyond: floor
    assert math.isclose(float(w[-1]), float(base) * 0.01, rel_tol=1e-5)


def test_sw_window_grows_when_anchor_is_stuck_and_resets_when_it_moves():
    win = obj.SlidingWindow(base=50)
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
    rows = [len(obj.curriculum_rows(s, 100, 10, 5)) for s in (0, 19, 20, 40, 60, 80, 99)]
    assert rows == [2, 2, 4, 6, 8, 10, 10]
    assert obj.curriculum_rows(5, 100, 1, 5) == [0]
