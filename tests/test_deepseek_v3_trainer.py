"""Fine-tuning transformers' own DeepSeek-V3 with `Trainer` and loss-free balancing, end to end."""

import pytest
import torch
from datasets import Dataset
from transformers import DeepseekV3ForCausalLM, Trainer, TrainingArguments

from hf_lossfree_moe import LossFreeBalancingCallback, add_balancing_callback
from hf_lossfree_moe.testing_utils import build_tiny_model


STEPS = 4
UPDATE_RATE = 1e-3


def tiny_deepseek_v3():
    """Layer 0 dense, layers 1-2 MoE with 8 experts in 4 groups, top-2 within 2 groups."""
    return build_tiny_model("deepseek_v3", num_layers=3, first_k_dense_replace=1, n_group=4, topk_group=2)


def padded_dataset(num_rows=16, seq_len=16):
    """Random sequences of 8 to 16 tokens, right-padded; labels ignore the padding."""
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, 128, (num_rows, seq_len), generator=generator)
    lengths = torch.randint(8, seq_len + 1, (num_rows,), generator=generator)
    attention_mask = (torch.arange(seq_len) < lengths.unsqueeze(-1)).long()  # (N, S)
    return Dataset.from_dict(
        {
            "input_ids": input_ids.masked_fill(attention_mask == 0, 0).tolist(),
            "attention_mask": attention_mask.tolist(),
            "labels": input_ids.masked_fill(attention_mask == 0, -100).tolist(),
        }
    )


def router_biases(model):
    return torch.stack([layer.mlp.gate.e_score_correction_bias for layer in model.model.layers[1:]])


def test_trainer_balances_saves_and_stock_transformers_reloads(tmp_path):
    torch.manual_seed(0)
    model = tiny_deepseek_v3()
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-3,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=padded_dataset())
    callback = add_balancing_callback(trainer, LossFreeBalancingCallback(bias_update_rate=UPDATE_RATE))
    trainer.train()

    logged = [entry for entry in trainer.state.log_history if "maxvio_batch" in entry]
    assert len(logged) == STEPS
    for entry in logged:  # the mean over the two MoE layers
        layers = entry["maxvio_batch/layer_1"], entry["maxvio_batch/layer_2"]
        assert entry["maxvio_batch"] == pytest.approx(sum(layers) / 2)
    biases = router_biases(model)  # (2, 8)
    assert callback.balancer.names == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    assert biases.dtype == torch.float32
    assert biases.abs().max() > 0
    # sign rule, one update per optimizer step: each bias is u times a whole number of net steps, at most STEPS
    net_steps = biases / UPDATE_RATE
    torch.testing.assert_close(net_steps, net_steps.round(), atol=1e-4, rtol=0)
    assert net_steps.abs().max() <= STEPS

    trainer.save_model(str(tmp_path / "tuned"))
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "tuned")
    assert torch.equal(router_biases(reloaded), biases)
