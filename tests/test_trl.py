import pytest
import torch
from accelerate import Accelerator
from datasets import Dataset

from hf_lossfree_moe import LossFreeBalancer, LossFreeBalancingCallback, LossFreeMoeForCausalLM
from hf_lossfree_moe.testing_utils import build_tiny_tokenizer
from test_callbacks import TOP_K, tensorboard_scalars


trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")


def random_texts(count: int, seed: int, min_words: int = 3, max_words: int = 12) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_words, max_words + 1, (count,), generator=generator).tolist()
    return [" ".join(f"w{i}" for i in torch.randint(3, 128, (n,), generator=generator).tolist()) for n in lengths]


def spy_on_loads(balancer) -> list[torch.Tensor]:
    """The loads each `step()` sees."""
    seen, step = [], balancer.step

    def recorded_step():
        seen.append(balancer.loads)
        return step()

    balancer.step = recorded_step
    return seen


@pytest.fixture
def lm(tiny_config):
    """A tiny LossFreeMoe with the special ids of `build_tiny_tokenizer`."""
    return LossFreeMoeForCausalLM(tiny_config(bos_token_id=1, eos_token_id=2))


def test_sft_trainer_callback_reaches_tensorboard_and_skips_padding_free_padding(lm, tmp_path):
    tokenizer = build_tiny_tokenizer()
    texts = random_texts(16, seed=0)
    callback = LossFreeBalancingCallback()
    args = trl.SFTConfig(
        str(tmp_path),
        max_steps=4,  # 16 texts, 4 per step: one epoch
        per_device_train_batch_size=4,
        logging_steps=2,
        padding_free=True,  # sequences packed into one row, padded to a multiple of 16 without an attention_mask
        pad_to_multiple_of=16,
        max_length=None,
        report_to=["tensorboard"],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.SFTTrainer(
        model=lm,
        args=args,
        train_dataset=Dataset.from_dict({"text": texts}),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    seen = spy_on_loads(callback.balancer)
    trainer.train()

    real = sum(len(tokenizer(text)["input_ids"]) + 1 for text in texts)  # <s> ... </s>
    assert sum(seen).sum(dim=-1).tolist() == [TOP_K * real] * 2
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    scalars = tensorboard_scalars(tmp_path)
    assert scalars["train/maxvio_batch"] == pytest.approx([entry["maxvio_batch"] for entry in train_logs])
    assert scalars["train/maxvio_batch/layer_1"] == pytest.approx([e["maxvio_batch/layer_1"] for e in train_logs])
    assert scalars["train/bias_abs_max"] == pytest.approx([entry["bias_abs_max"] for entry in train_logs])


@pytest.mark.parametrize("wrapper", ["none", "peft"])
def test_grpo_style_rollouts_in_train_mode_do_not_count(lm, wrapper):
    """Generate in training mode under no_grad, through TRL's unwrap helper, then train on the rollouts."""
    model = (
        lm
        if wrapper == "none"
        else peft.get_peft_model(lm, peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["gate"]))
    )
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(model)
    balancer = LossFreeBalancer(model)
    prompts = torch.randint(3, 128, (4, 5))
    model.train()
    with trl.models.utils.unwrap_model_for_generation(model, accelerator) as unwrapped, torch.no_grad():
        rollouts = unwrapped.generate(
            input_ids=prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=6, do_sample=True
        )
    assert balancer.loads.sum() == 0

    attention_mask = torch.ones_like(rollouts)
    attention_mask[0, -2:] = 0  # a completion that ended early
    accelerator.backward(model(input_ids=rollouts, attention_mask=attention_mask, labels=rollouts).loss)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * int(attention_mask.sum())] * 2


def test_grpo_trainer_counts_only_the_training_forward(lm, tmp_path):
    callback = LossFreeBalancingCallback()
    args = trl.GRPOConfig(
        str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = trl.GRPOTrainer(
        model=lm,
        reward_funcs=lambda completions, **kwargs: [float(len(completion)) for completion in completions],
        args=args,
        train_dataset=Dataset.from_dict({"prompt": random_texts(4, seed=1, min_words=4, max_words=4)}),
        processing_class=build_tiny_tokenizer(),
        callbacks=[callback],
    )
    seen = spy_on_loads(callback.balancer)
    trainer.train()
    # num_tokens: the tokens of the training forward (prompts and completions, padding excluded)
    tokens = int(trainer.state.log_history[0]["num_tokens"])
    assert seen[0].sum(dim=-1).tolist() == [TOP_K * tokens] * 2
