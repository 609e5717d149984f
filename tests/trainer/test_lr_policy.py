"""Caffe's lr policies against their closed forms (sgd_solver.cpp GetLearningRate), and their checks."""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from caffeonnx.errors import SolverError
from caffeonnx.proto import caffe_pb2
from caffeonnx.trainer.lr_policy import LearningRate

ITERS = [0, 1, 7, 10, 11, 99, 250, 999]


def solver(**fields: object) -> caffe_pb2.SolverParameter:
    return caffe_pb2.SolverParameter(base_lr=0.1, max_iter=1000, **fields)


Formula = Callable[[caffe_pb2.SolverParameter, int], float]
CLOSED_FORMS: list[tuple[str, dict, Formula]] = [
    ("fixed", {}, lambda p, i: p.base_lr),
    ("step", {"gamma": 0.5, "stepsize": 10}, lambda p, i: p.base_lr * p.gamma ** math.floor(i / p.stepsize)),
    ("exp", {"gamma": 0.99}, lambda p, i: p.base_lr * p.gamma ** i),
    ("inv", {"gamma": 1e-4, "power": 0.75}, lambda p, i: p.base_lr * (1 + p.gamma * i) ** -p.power),
    ("poly", {"power": 2.0}, lambda p, i: p.base_lr * (1 - i / p.max_iter) ** p.power),
    ("sigmoid", {"gamma": 0.05, "stepsize": 100}, lambda p, i: p.base_lr / (1 + math.exp(-p.gamma * (i - p.stepsize)))),
]


@pytest.mark.parametrize(("policy", "fields", "formula"), CLOSED_FORMS, ids=[c[0] for c in CLOSED_FORMS])
def test_policy_matches_its_closed_form(policy: str, fields: dict, formula: Formula) -> None:
    param = solver(lr_policy=policy, **fields)
    lr = LearningRate(param)
    for i in ITERS:
        assert lr.rate(i) == pytest.approx(formula(param, i), rel=1e-12), f"{policy} at iteration {i}"


def test_multistep_advances_one_step_per_call_like_caffe() -> None:
    lr = LearningRate(solver(lr_policy="multistep", gamma=0.1, stepvalue=[3, 3, 6]))
    rates = [lr.rate(i) for i in range(8)]
    # Caffe's current_step_ moves by at most one per GetLearningRate call: the repeated 3 takes effect at 4.
    steps = [0, 0, 0, 1, 2, 2, 3, 3]
    assert rates == pytest.approx([0.1 * 0.1 ** s for s in steps], rel=1e-6)
    assert lr.current_step == 3


@pytest.mark.parametrize(("fields", "message"), [
    ({}, "lr_policy is not set"),
    ({"lr_policy": "cosine"}, r"Unknown learning rate policy: 'cosine'"),
    ({"lr_policy": "step", "gamma": 0.5}, r"needs stepsize > 0, got 0"),
    ({"lr_policy": "sigmoid", "gamma": -0.01, "stepsize": 100}, r"needs gamma >= 0, got -0.01"),
    ({"lr_policy": "exp", "gamma": -1.0}, r"needs gamma >= 0"),
])
def test_invalid_policies_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(SolverError, match=message):
        LearningRate(solver(**fields), "s.prototxt")


def test_poly_needs_max_iter() -> None:
    with pytest.raises(SolverError, match="needs max_iter > 0"):
        LearningRate(caffe_pb2.SolverParameter(base_lr=0.1, lr_policy="poly", power=1.0))
