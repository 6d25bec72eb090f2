import warnings

import pytest
import torch

from hf_lossfree_moe import LossFreeBalancer, LossFreeBalancingCallback, LossFreeMoeForCausalLM, compute_maxvio
from test_callbacks import TOP_K, collate, make_trainer, padded_examples, real_tokens


peft = pytest.importorskip("peft")

ROUTER_COPIES = [f"base_model.model.model.layers.{i}.mlp.gate.modules_to_save.default" for i in (1, 2)]


def with_lora(model, **config):
    """LoRA on the attention projections only, as most recipes for MoE checkpoints do."""
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], **config))


def routers_biases(model) -> torch.Tensor:
    return torch.stack([router.e_score_correction_bias for router in model.routers()])


def test_modules_to_save_is_watched_through_the_copy_that_runs(tiny_config):
    model = with_lora(LossFreeMoeForCausalLM(tiny_config()), modules_to_save=["gate"]).train()
    balancer = LossFreeBalancer(model)
    assert balancer.names == ROUTER_COPIES  # the idle originals are no routers
    assert balancer.layers == [1, 2]
    batch = collate(padded_examples(3, seed=0))
    model(**batch)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * int(batch["attention_mask"].sum())] * 2

    with model.disable_adapter():  # a reference forward of DPO or GRPO: the originals route, uncounted
        model(**batch)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * int(batch["attention_mask"].sum())] * 2


def adapter_warnings(caught) -> list[str]:
    return [str(warning.message) for warning in caught if "modules_to_save" in str(warning.message)]


def test_lora_without_the_gate_keeps_the_biases_and_warns_only_when_told_to_move_them(tiny_config, tmp_path):
    train = padded_examples(8, seed=1)
    model = with_lora(LossFreeMoeForCausalLM(tiny_config()))
    trainer = make_trainer(model, tmp_path / "a", train, max_steps=3, callbacks=[LossFreeBalancingCallback()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert torch.equal(routers_biases(model.base_model.model), torch.zeros(2, 8))  # the frozen gate keeps its bias
    assert adapter_warnings(caught) == []

    model = with_lora(LossFreeMoeForCausalLM(tiny_config()))
    callback = LossFreeBalancingCallback(frozen=False)
    trainer = make_trainer(model, tmp_path / "b", train, max_steps=3, callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert routers_biases(model.base_model.model).abs().max() == pytest.approx(3e-3)
    messages = adapter_warnings(caught)
    assert len(messages) == 1  # once, not at every step
    assert "modules_to_save=['gate']" in messages[0] and "merge_and_unload" in messages[0]


def test_modules_to_save_adapter_carries_the_trained_biases(tiny_config, tmp_path):
    base = LossFreeMoeForCausalLM(tiny_config())
    base.save_pretrained(tmp_path / "base")
    model = with_lora(base, modules_to_save=["gate"])
    validation = padded_examples(4, seed=3)
    trainer = make_trainer(
        model,
        tmp_path / "run",
        padded_examples(8, seed=2),
        validation,
        max_steps=4,
        callbacks=[LossFreeBalancingCallback()],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert adapter_warnings(caught) == []
    callback = trainer.callback_handler.callbacks[0]
    trained = callback.balancer.biases()
    assert trained.abs().max() == pytest.approx(4e-3)

    metrics = trainer.evaluate()  # one router per layer: no idle original hides or dilutes the metric
    assert metrics["eval_maxvio_global"] == pytest.approx(compute_maxvio(callback.last_eval_loads).mean)
    assert callback.last_eval_loads.sum(dim=-1).tolist() == [TOP_K * real_tokens(validation)] * 2
    assert "eval_maxvio_global/skipped_layers" not in metrics

    model.save_pretrained(tmp_path / "adapter")
    fresh = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "base")
    assert torch.equal(routers_biases(fresh), torch.zeros(2, 8))
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert torch.equal(LossFreeBalancer(reloaded).biases(), trained)
    batch = collate(validation)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, model.eval()(**batch).logits, rtol=0, atol=0)
