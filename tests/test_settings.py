"""BalancingSettings: one set of names, the config's checks, defaults from the model's config."""

import pytest
import torch

from conftest import tiny_model
from hf_lossfree_moe import (
    BalancingSettings,
    LossFreeBalancer,
    LossFreeBalancingCallback,
    LossFreeMoeConfig,
    LossFreeMoeForCausalLM,
)
from hf_lossfree_moe.testing_utils import build_tiny_model
from hf_lossfree_moe.update_rules import UpdateSchedule


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_rate": -1e-3}, "^bias_update_rate must be a number >= 0"),
        ({"update_rate": float("nan")}, "^bias_update_rate must be a number >= 0"),
        ({"update_rate": True}, "^bias_update_rate must be a number >= 0"),
        ({"rule": "momentum"}, "^bias_update_rule must be one of"),
        ({"bias_type": "gated"}, "^bias_type must be one of"),
        ({"center": "yes"}, "^center must be True or False"),
        ({"frozen": 1}, "^frozen must be None, True or False"),
    ],
)
def test_bad_settings_are_rejected(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossFreeBalancer(model, **kwargs)


@pytest.mark.parametrize("load_balancing", ["aux_loss", "none"])
def test_baselines_are_only_measured(tiny_config, load_balancing):
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing=load_balancing)).train()
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 6)))
    assert balancer.step()["maxvio_batch"] > 0
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))
    balancer.remove()
    with pytest.raises(ValueError, match="load_balancing"):
        LossFreeBalancer(model, update_rate=1e-3)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"rule": "qb"}, "bias_update_rule"),
        ({"schedule": "step"}, "bias_update_schedule"),
        ({"warmup_steps": 1.5}, "bias_update_warmup_steps"),
        ({"stop_fraction": float("nan")}, "bias_update_stop_fraction"),
        ({"quantile_ema": 2.0}, "bias_quantile_ema"),
        ({"momentum": -0.1}, "bias_update_momentum"),
        ({"bias_quantile_anneal_steps": 2.5}, "bias_quantile_anneal_steps"),
        ({"bias_update_rule": "sign", "bias_quantile_anneal_steps": 5}, "bias_quantile_anneal_steps"),
        ({"rule": "quantile", "bias_quantile_solver": "median"}, "bias_quantile_solver"),
        ({"bias_update_rule": "sign", "bias_quantile_solver": "global_histogram"}, "bias_quantile_solver"),
        ({"bias_quantile_histogram_bins": 2.5}, "bias_quantile_histogram_bins"),
        ({"bias_quantile_histogram_range": -1.0}, "bias_quantile_histogram_range"),
        ({"total_steps": True}, "total_steps"),
    ],
)
def test_balancer_and_callback_reject_bad_settings_naming_them(kwargs, field):
    with pytest.raises(ValueError, match=f"^{field} must be"):
        LossFreeBalancer(tiny_model(), **kwargs)
    if "total_steps" not in kwargs:
        with pytest.raises(ValueError, match=f"^{field} must be"):
            LossFreeBalancingCallback(**kwargs)


def test_quantile_needs_an_additive_bias():
    with pytest.raises(ValueError, match="LossFreeMoeConfig.bias_update_rule must be other than 'quantile'"):
        LossFreeMoeConfig(bias_update_rule="quantile", bias_type="multiplicative")
    with pytest.raises(ValueError, match="^bias_update_rule must be other than 'quantile' with bias_type='multipl"):
        LossFreeBalancer(tiny_model(bias_type="multiplicative"), rule="quantile")


def test_config_names_and_the_names_of_earlier_releases_set_the_same_setting(model):
    assert LossFreeBalancer(model, bias_update_rate=1e-2).update_rate == 1e-2
    assert LossFreeBalancer(model, update_rate=1e-2).settings.bias_update_rate == 1e-2
    assert LossFreeBalancer(model, momentum=0.5).settings.bias_update_momentum == 0.5
    with pytest.raises(TypeError, match="'update_rate' and 'bias_update_rate' name the same setting"):
        LossFreeBalancer(model, update_rate=1e-2, bias_update_rate=1e-3)
    with pytest.raises(TypeError, match="Unexpected balancing setting 'update_rates'"):
        LossFreeBalancer(model, update_rates=1e-2)


def test_the_spellings_of_earlier_releases_still_work_with_a_deprecation_warning(model):
    """Positional settings in the earlier order (update_rate, rule, bias_type, center, frozen, process_group, ...),
    `balancer.schedule = ...` and `callback.balancer_kwargs`."""
    spelled = r"pass them by keyword: LossFreeBalancer\(\.\.\., bias_update_rate=0.01, bias_update_rule='error'\)"
    with pytest.warns(DeprecationWarning, match=spelled):
        balancer = LossFreeBalancer(model, 1e-2, "error")
    assert (balancer.update_rate, balancer.rule) == (1e-2, "error")
    with pytest.warns(DeprecationWarning):
        balancer = LossFreeBalancer(model, None, "sign", "additive", True, True, None, "linear_warmup", 4)
    assert (balancer.update_rate, balancer.center, balancer.frozen) == (1e-3, True, True)  # the config's rate
    assert (balancer.schedule.kind, balancer.schedule.warmup_steps) == ("linear_warmup", 4)
    with pytest.raises(TypeError, match="got 'rule' both by position and by keyword"):
        LossFreeBalancer(model, 1e-2, "sign", rule="error")

    with pytest.warns(DeprecationWarning, match="set balancer.settings.bias_update_schedule"):
        balancer.schedule = UpdateSchedule("cosine", 2, 0.5)
    assert balancer.schedule == UpdateSchedule("cosine", 2, 0.5)
    assert balancer.settings.bias_update_stop_fraction == 0.5

    with pytest.warns(DeprecationWarning, match="LossFreeBalancingCallback\\(\\.\\.\\., bias_update_rate=0.01, "):
        callback = LossFreeBalancingCallback(1e-2, "error")
    with pytest.warns(DeprecationWarning, match="balancer_kwargs is deprecated; read callback.settings"):
        kwargs = callback.balancer_kwargs
    assert kwargs == {
        "update_rate": 1e-2,
        "rule": "error",
        "bias_type": None,
        "center": False,
        "frozen": None,
        "process_group": None,
        "schedule": None,
        "warmup_steps": None,
        "stop_fraction": None,
        "quantile_ema": None,
        "momentum": None,
    }
    with pytest.raises(TypeError, match="takes at most 11 positional settings"):
        LossFreeBalancingCallback(*[None] * 12)


def test_unset_settings_come_from_the_model_config_then_from_the_config_class(tiny_config):
    ours = LossFreeBalancer(LossFreeMoeForCausalLM(tiny_config(bias_update_rate=5e-3, bias_update_momentum=0.5)))
    assert (ours.settings.bias_update_rate, ours.settings.bias_update_momentum) == (5e-3, 0.5)
    assert ours.settings.bias_update_rule == "sign"

    stock = LossFreeBalancer(build_tiny_model("deepseek_v3"))  # a config without any balancing field
    defaults = LossFreeMoeConfig()
    for name in (
        "bias_update_rate",
        "bias_update_rule",
        "bias_type",
        "bias_update_schedule",
        "bias_update_warmup_steps",
        "bias_update_stop_fraction",
        "bias_quantile_ema",
        "bias_update_momentum",
        "bias_quantile_solver",
        "bias_quantile_histogram_bins",
        "bias_quantile_histogram_range",
    ):
        assert getattr(stock.settings, name) == getattr(defaults, name), name
    explicit = LossFreeBalancer(build_tiny_model("deepseek_v3"), BalancingSettings(bias_update_rule="error"))
    assert (explicit.rule, explicit.update_rate) == ("error", defaults.bias_update_rate)


def test_an_assignment_is_checked_like_the_constructor(model):
    balancer = LossFreeBalancer(model)
    with pytest.raises(ValueError, match="^bias_update_rate must be a number >= 0"):
        balancer.update_rate = float("nan")
    with pytest.raises(ValueError, match="^bias_update_momentum must be a number in"):
        balancer.settings.bias_update_momentum = 1.0
    with pytest.raises(ValueError, match="^frozen must be None, True or False"):
        balancer.frozen = "yes"
    assert (balancer.update_rate, balancer.momentum, balancer.frozen) == (1e-3, 0.9, None)
    balancer.bias_type = "multiplicative"
    with pytest.raises(ValueError, match="^bias_update_rule must be other than 'quantile'"):
        balancer.rule = "quantile"
    assert balancer.rule == "sign"
    balancer.update_rate = 1e-2
    assert balancer.settings.bias_update_rate == 1e-2


def test_the_global_quantile_solver_is_refused_for_another_rule_at_assignment(model):
    balancer = LossFreeBalancer(model)
    with pytest.raises(ValueError, match="^bias_quantile_solver must be 'call_mean' unless bias_update_rule='quan"):
        balancer.settings.bias_quantile_solver = "global_histogram"
    balancer.rule = "quantile"
    balancer.settings.bias_quantile_solver = "global_histogram"
    with pytest.raises(ValueError, match="^bias_quantile_solver must be 'call_mean' unless"):
        balancer.rule = "sign"
    assert (balancer.rule, balancer.settings.bias_quantile_solver) == ("quantile", "global_histogram")


def test_a_callback_rebuilt_from_its_checkpoint_state_has_the_same_settings():
    callback = LossFreeBalancingCallback(update_rate=1e-2, center=True, bias_update_schedule="cosine")
    rebuilt = LossFreeBalancingCallback(**callback.state()["args"])  # what Trainer does when it resumes
    assert rebuilt.settings == callback.settings
    assert rebuilt.settings.bias_update_rate == 1e-2
    # the arguments a checkpoint of an earlier release saved, under the earlier names
    earlier = {"update_rate": 1e-2, "rule": "error", "bias_type": None, "center": True, "frozen": None}
    assert LossFreeBalancingCallback(**earlier).settings == BalancingSettings(
        bias_update_rate=1e-2, bias_update_rule="error", center=True
    )


@pytest.mark.parametrize(
    ("attribute", "value", "message"),
    [
        ("update_rate", -1.0, "^bias_update_rate must be a number >= 0"),
        ("update_rate", None, r"^bias_update_rate must be a number >= 0 .*, got None"),
        ("rule", None, r"^bias_update_rule must be one of .*, got None"),
        ("rule", "qb", "^bias_update_rule must be one of"),
        ("bias_type", None, "^bias_type must be one of"),
        ("quantile_ema", 0.0, r"^bias_quantile_ema must be a number in \(0, 1\]"),
        ("momentum", None, r"^bias_update_momentum must be a number in \[0, 1\)"),
        ("center", None, "^center must be True or False"),
        ("frozen", 0, "^frozen must be None, True or False"),
        ("total_steps", 0, "^total_steps must be"),
        ("completed_steps", -1, "^completed_steps must be an integer >= 0, got -1"),
        ("completed_steps", 2.5, "^completed_steps must be an integer >= 0, got 2.5"),
    ],
)
def test_every_public_setting_is_checked_when_assigned_and_kept_when_refused(model, attribute, value, message):
    balancer = LossFreeBalancer(model, total_steps=10)
    before = getattr(balancer, attribute)
    with pytest.raises(ValueError, match=message):
        setattr(balancer, attribute, value)
    assert getattr(balancer, attribute) == before


@pytest.mark.parametrize("field", ["bias_update_schedule", "bias_update_warmup_steps", "bias_update_stop_fraction"])
def test_a_resolved_setting_cannot_be_unset(model, field):
    """None means "from the model's config" at construction only; afterwards it would reach the update as None."""
    balancer = LossFreeBalancer(model)
    with pytest.raises(ValueError, match=f"^{field} must be .*, got None"):
        setattr(balancer.settings, field, None)


@pytest.mark.parametrize("load_balancing", ["aux_loss", "none"])
def test_a_measured_model_refuses_an_update_after_construction_as_at_it(tiny_config, load_balancing):
    balancer = LossFreeBalancer(LossFreeMoeForCausalLM(tiny_config(load_balancing=load_balancing)))
    message = f"config.load_balancing is '{load_balancing}', so its biases stay fixed"
    for attribute, value in (("update_rate", 1e-2), ("frozen", False), ("frozen", None)):
        with pytest.raises(ValueError, match=message):
            setattr(balancer, attribute, value)
    balancer.update_rate = 0.0
    assert (balancer.frozen, balancer.updates_biases) == (True, False)


def test_switching_to_quantile_checks_the_routers_scores_as_the_constructor_does():
    model = tiny_model()
    for router in model.model.routers():
        router.scoring_func = "sqrtsoftplus"
    balancer = LossFreeBalancer(model)
    with pytest.raises(ValueError, match="rule='quantile' needs the routers' scores.*model.layers.1.mlp.gate"):
        balancer.rule = "quantile"
    with pytest.raises(ValueError, match="rule='quantile' needs the routers' scores"):
        balancer.settings.bias_update_rule = "quantile"
    assert balancer.rule == "sign"
    balancer.rule = "error"
    assert balancer.settings.bias_update_rule == "error"


def test_the_settings_object_is_changed_field_by_field_not_replaced(model):
    balancer = LossFreeBalancer(model)
    with pytest.raises(AttributeError):
        balancer.settings = BalancingSettings(bias_update_rate=1e-2)
    balancer.settings.bias_update_rate = 5e-3
    assert balancer.update_rate == 5e-3


def test_the_callback_takes_a_settings_object_and_its_balancer_gets_a_copy(model):
    settings = BalancingSettings(bias_update_rate=1e-2, center=True)
    callback = LossFreeBalancingCallback(settings, bias_update_rule="error")
    callback.attach(model)
    assert (callback.balancer.update_rate, callback.balancer.rule, callback.balancer.center) == (1e-2, "error", True)
    callback.balancer.update_rate = 5e-2
    assert (settings.bias_update_rate, callback.settings.bias_update_rate) == (1e-2, 1e-2)
    assert settings.bias_update_rule is None  # the keyword set the callback's copy, not the caller's object
