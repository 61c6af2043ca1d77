"""The lambda schedule of docs/method.md#lambda-schedule and the hyperparameter checks."""

from __future__ import annotations

import pytest

from hf_cage import cage_lambda
from hf_cage.optim import check_cage_hyperparameters


@pytest.mark.parametrize(
    ("step", "expected"),
    [(1, 0.0), (5, 0.0), (8, 0.0), (9, 5.0), (10, 10.0), (12, 10.0)],
)
def test_linear_ramp_matches_cage_md(step, expected):
    # T=10, s=0.8: silent while t/T <= 0.8, then 10 * (t/T - 0.8) / 0.2.
    assert cage_lambda(step, 10, 10.0, 0.8, "linear_ramp") == pytest.approx(expected, abs=1e-12)


def test_linear_ramp_exact_fractions():
    # T=8, s=0.5: r=5/8 -> 0.25 of the ramp, r=6/8 -> 0.5, r=7/8 -> 0.75 (all exact in binary).
    assert [cage_lambda(t, 8, 4.0, 0.5, "linear_ramp") for t in range(1, 9)] == [0, 0, 0, 0, 1.0, 2.0, 3.0, 4.0]


def test_constant_schedule():
    assert [cage_lambda(t, 10, 15.0, 0.7, "constant") for t in range(1, 11)] == [0.0] * 7 + [15.0] * 3
    assert cage_lambda(1, None, 3.0, 0.0, "constant") == 3.0


def test_zero_lambda_is_always_silent():
    assert all(cage_lambda(t, 10, 0.0, 0.0, s) == 0.0 for t in range(1, 12) for s in ("linear_ramp", "constant"))


def test_no_silence_ramps_from_the_first_step():
    assert cage_lambda(1, 4, 8.0, 0.0, "linear_ramp") == 2.0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        (dict(cage_lambda=-1.0), "cage_lambda"),
        (dict(cage_silence_ratio=1.0), "cage_silence_ratio"),
        (dict(cage_silence_ratio=-0.1), "cage_silence_ratio"),
        (dict(cage_schedule="cosine"), "cage_schedule"),
        (dict(cage_variant="both"), "cage_variant"),
        (dict(total_steps=0), "total_steps"),
        (dict(total_steps=None), "total_steps"),
    ],
)
def test_bad_hyperparameters_name_the_field(kwargs, field):
    values = dict(cage_lambda=10.0, cage_silence_ratio=0.8, cage_schedule="linear_ramp", cage_variant="decoupled")
    values["total_steps"] = 100
    values.update(kwargs)
    with pytest.raises(ValueError, match=field):
        check_cage_hyperparameters(**values)


def test_step_and_schedule_errors():
    with pytest.raises(ValueError, match="step"):
        cage_lambda(0, 10, 10.0, 0.8, "linear_ramp")
    with pytest.raises(ValueError, match="cage_schedule"):
        cage_lambda(1, 10, 10.0, 0.8, "cosine")
    with pytest.raises(ValueError, match="total_steps"):
        cage_lambda(1, None, 10.0, 0.8, "linear_ramp")
