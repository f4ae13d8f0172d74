"""Run comparisons at matched training loss, over the last checkpoints and across seeds, on constructed runs."""
import math

import pytest

from sam_probe.core.compare import at_loss, change, compare, matched_level, seed_group


def test_seed_groups():
    assert seed_group("sgd-s2") == ("sgd", 2) and seed_group("late-sam_seed11") == ("late-sam", 11)
    assert seed_group("sam.s0") == ("sam", 0) and seed_group("mlpseed=3") == ("mlp", 3)
    assert seed_group("resnet18") == ("resnet18", None) and seed_group("runs2") == ("runs2", None)


def _run(losses, lams, steps=None):
    steps = steps or list(range(0, 10 * len(losses), 10))
    return [(s, l, {"lambda_max": v}) for s, l, v in zip(steps, losses, lams)]


def test_matched_loss_interpolates_in_log_loss():
    run = _run([1.0, 0.1, 0.01], [2.0, 4.0, 8.0])
    v, s = at_loss(run, "lambda_max", 0.1)
    assert (v, s) == (4.0, 10.0)  # exactly at a checkpoint
    v, s = at_loss(run, "lambda_max", math.sqrt(0.1 * 0.01))  # half-way in log loss
    assert v == pytest.approx(6.0) and s == pytest.approx(15.0)
    assert at_loss(run, "lambda_max", 1e-3) == (None, None)  # never reached


def test_compare_groups_seeds_and_matches_the_loss_every_run_reaches():
    runs = {"sgd-s0": _run([1.0, 0.1, 0.01], [1.0, 2.0, 3.0]), "sgd-s1": _run([1.0, 0.1, 0.02], [1.0, 2.0, 5.0]),
            "sam-s0": _run([1.0, 0.5, 0.1], [1.0, 1.0, 1.0]), "sam-s1": _run([1.0, 0.3, 0.1], [1.0, 0.5, 0.5])}
    assert matched_level(runs) == 0.1
    res = compare(runs, ["lambda_max"], last=2)
    g = res["groups"]
    assert g["sgd"]["runs"] == ["sgd-s0", "sgd-s1"] and g["sgd"]["at_loss"]["lambda_max"]["mean"] == 2.0
    assert g["sam"]["at_loss"]["lambda_max"] == {"mean": 0.75, "std": pytest.approx(math.sqrt(0.125)), "n": 2,
                                                 "values": [1.0, 0.5]}
    assert g["sgd"]["last"]["lambda_max"]["mean"] == pytest.approx((2.5 + 3.5) / 2)
    c = change(res, "sgd", "sam", "lambda_max")
    assert c["change"] == pytest.approx(0.75 / 2.0 - 1)
    assert c["paired"]["values"] == [pytest.approx(-0.5), pytest.approx(-0.75)]
    # the naive comparison at the end mixes losses 0.01-0.02 (SGD) with 0.1 (SAM)
    assert change(res, "sgd", "sam", "lambda_max", "last")["change"] < c["change"]
