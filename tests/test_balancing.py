"""The balancer as a whole: one per model, wrappers unwrapped, detached without a trace."""

import warnings

import pytest
import torch
from torch import nn

from conftest import TOP_K
from hf_lossfree_moe import LossFreeBalancer


def module_state(model):
    """Everything a balancer may touch on a model: instance attributes and hooks of every module."""
    return [
        (name, sorted(vars(module)), dict(module._forward_hooks), dict(module._forward_pre_hooks))
        for name, module in model.named_modules()
    ]


def test_a_new_balancer_takes_over_and_removing_it_restores_the_model(model):
    untouched = module_state(model)
    first = LossFreeBalancer(model)
    second = LossFreeBalancer(model.model)  # e.g. the callback of a second Trainer on the same model
    assert (first.attached, second.attached) == (False, True)
    model(torch.randint(3, 128, (2, 6)))
    assert second.loads.sum(dim=-1).tolist() == [TOP_K * 12] * 2  # counted once, by the new balancer
    assert first.loads.sum() == 0
    with pytest.warns(UserWarning, match="detached"):
        first.step()

    second.remove()
    assert module_state(model) == untouched
    model(torch.randint(3, 128, (2, 6)))
    assert second.loads.sum(dim=-1).tolist() == [TOP_K * 12] * 2  # nothing more counted
    third = LossFreeBalancer(model)
    third.remove()
    assert module_state(model) == untouched


def test_wrappers_are_unwrapped(model):
    wrapped = nn.DataParallel(model)
    balancer = LossFreeBalancer(wrapped)
    assert balancer.model is model
    assert balancer.names == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    wrapped(torch.randint(3, 128, (2, 5)), torch.ones(2, 5))
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 10] * 2


def test_no_warning_for_a_healthy_model(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer = LossFreeBalancer(model)
        model(torch.randint(3, 128, (2, 6)))
        balancer.step()
