"""Does a token's output depend on tokens it must not see?

A causal language model computes the logits at position t from tokens 0..t of the same sequence only. Two ways to
break that, each measured here as the largest change of the logits at positions <= t:

- the future: replace every token after position t (same shapes, other token ids);
- the batch: replace the other sequences of the batch.

Token-choice routing (loss-free balancing, the auxiliary loss, or no balancing) routes each token on its own hidden
state. With the `batched_mm` experts kernel, which multiplies every (token, expert) pair on its own, the change is
exactly 0: every token goes through the same shapes in the same kernels, masked attention weights are exact zeros,
and no router looks across tokens. The grouped kernels (`sorted_mm`, the default, and the `eager` loop) multiply all
tokens of an expert as one matrix; its row count depends on how the other tokens were routed, BLAS blocks the
product by that count, and a row may round differently (seen here: 1.5e-7). They are held to `ROUNDING`, four orders
of magnitude below what a changed routing decision does to the logits (`CLEARLY_NON_ZERO`).

Expert Choice routing lets experts pick among all tokens of a chunk, so earlier logits move when later tokens change:
the future leaks into the prediction.
"""

import pytest
import torch

from hf_lossfree_moe import LossFreeMoeForCausalLM
from hf_lossfree_moe.modeling_lossfree_moe import LossFreeMoeTopkRouter, routing_scores


BATCH, LENGTH, LAST_SEEN = 4, 24, 11  # positions 0..LAST_SEEN must not see positions LAST_SEEN+1..LENGTH-1
TOKEN_CHOICE = ("loss_free", "aux_loss", "none")
# A changed routing decision moves logits by the size of an expert's output: far above rounding.
CLEARLY_NON_ZERO = 1e-3
# fp32 rounding of a product whose blocking depends on the row count (a few ulps of logits of size ~1).
ROUNDING = 1e-5


def build(tiny_config, load_balancing: str, **overrides) -> LossFreeMoeForCausalLM:
    """A tiny model in eval mode; loss-free biases set away from zero so that they take part in the selection."""
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing=load_balancing, **overrides)).eval()
    with torch.no_grad():
        for router in model.routers():
            router.e_score_correction_bias.uniform_(-0.05, 0.05)
    return model


def other_tokens(input_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every token replaced by another id (never the same one)."""
    return (input_ids + torch.randint(1, vocab_size, input_ids.shape)) % vocab_size


@torch.no_grad()
def change_from_future(model: LossFreeMoeForCausalLM, input_ids: torch.Tensor) -> float:
    """Largest change of the logits at positions <= LAST_SEEN when every later token is replaced."""
    changed = input_ids.clone()
    changed[:, LAST_SEEN + 1 :] = other_tokens(input_ids[:, LAST_SEEN + 1 :], model.config.vocab_size)
    before = model(input_ids).logits[:, : LAST_SEEN + 1]
    after = model(changed).logits[:, : LAST_SEEN + 1]
    return (after - before).abs().max().item()


@torch.no_grad()
def change_from_other_sequences(model: LossFreeMoeForCausalLM, input_ids: torch.Tensor) -> float:
    """Largest change of the first sequence's logits (every position) when the other sequences are replaced."""
    changed = input_ids.clone()
    changed[1:] = other_tokens(input_ids[1:], model.config.vocab_size)
    before = model(input_ids).logits[0]
    after = model(changed).logits[0]
    return (after - before).abs().max().item()


@pytest.fixture
def input_ids(tiny_config):
    return torch.randint(3, tiny_config().vocab_size, (BATCH, LENGTH))


@pytest.mark.parametrize("load_balancing", TOKEN_CHOICE)
def test_token_choice_routing_never_sees_the_future_or_the_batch(tiny_config, input_ids, load_balancing):
    model = build(tiny_config, load_balancing, experts_implementation="batched_mm")
    assert change_from_future(model, input_ids) == 0.0
    assert change_from_other_sequences(model, input_ids) == 0.0


def test_token_choice_is_causal_in_training_mode_too(tiny_config, input_ids):
    model = build(tiny_config, "loss_free", experts_implementation="batched_mm").train()
    assert change_from_future(model, input_ids) == 0.0
    assert change_from_other_sequences(model, input_ids) == 0.0


@pytest.mark.parametrize("experts_implementation", ["sorted_mm", "eager"])
@pytest.mark.parametrize("load_balancing", TOKEN_CHOICE)
def test_grouped_experts_kernels_differ_by_rounding_only(
    tiny_config, input_ids, load_balancing, experts_implementation
):
    model = build(tiny_config, load_balancing, experts_implementation=experts_implementation)
    assert change_from_future(model, input_ids) <= ROUNDING
    assert change_from_other_sequences(model, input_ids) <= ROUNDING


def test_a_batch_dependent_router_is_caught(tiny_config, input_ids, monkeypatch):
    """The check above fails for a loss-free router whose scores depend on the batch (here: centred over tokens)."""
    monkeypatch.setattr(
        LossFreeMoeTopkRouter,
        "score",
        lambda router, logits: routing_scores(logits - logits.mean(dim=0), router.scoring_func),
    )
    model = build(tiny_config, "loss_free", experts_implementation="batched_mm")
    assert change_from_future(model, input_ids) > CLEARLY_NON_ZERO
    assert change_from_other_sequences(model, input_ids) > CLEARLY_NON_ZERO


def test_expert_choice_over_the_batch_sees_the_future_and_the_batch(tiny_config, input_ids):
    model = build(tiny_config, "expert_choice", experts_implementation="batched_mm")
    assert change_from_future(model, input_ids) > CLEARLY_NON_ZERO
    assert change_from_other_sequences(model, input_ids) > CLEARLY_NON_ZERO


def test_expert_choice_per_sequence_sees_its_own_future_only(tiny_config, input_ids):
    model = build(tiny_config, "expert_choice", expert_choice_chunk_size=1, experts_implementation="batched_mm")
    assert change_from_future(model, input_ids) > CLEARLY_NON_ZERO
    assert change_from_other_sequences(model, input_ids) == 0.0
