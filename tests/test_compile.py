"""`torch.compile` of a training step: one graph with the balancer's hooks in it, and exact load counts.

Fast tests use the `eager` backend: it runs dynamo's graph capture, where graph breaks and full-graph failures
arise, and skips inductor's code generation, which takes about a minute on a small CPU. Tests marked `slow` run
inductor itself. Compiled generation is tested with the other common model checks in test_model_common.py;
docs/compile.md lists the graph breaks measured with and without activation checkpointing.
"""

import copy

import pytest
import torch

from hf_lossfree_moe import LossFreeBalancer, LossFreeMoeForCausalLM


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def padded_batch():
    """Two rows of 12 tokens, the first with 3 left-padding positions."""
    input_ids = torch.randint(3, 128, (2, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    return input_ids, attention_mask


def train_with_balancer(model, forward, batches, steps):
    """`steps` optimizer steps of one micro-batch per entry of `batches`; the loads and biases after each step."""
    balancer = LossFreeBalancer(model, bias_update_rate=0.05)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    history = []
    for _ in range(steps):
        for input_ids, attention_mask in batches:
            forward(
                input_ids=input_ids, attention_mask=attention_mask, labels=input_ids, use_cache=False
            ).loss.backward()
        loads = balancer.loads
        optimizer.step()
        optimizer.zero_grad()
        balancer.step()
        history.append((loads, balancer.biases()))
    balancer.remove()
    return history


def assert_same_history(actual, expected):
    for step, ((loads, biases), (expected_loads, expected_biases)) in enumerate(zip(actual, expected, strict=True)):
        assert torch.equal(loads, expected_loads), f"step {step}: loads"
        assert torch.equal(biases, expected_biases), f"step {step}: biases"


def test_compiled_training_step_counts_loads_exactly(tiny_config):
    """The balancer's hooks inside one graph; two micro-batches per step, padding excluded, biases moving."""
    model = LossFreeMoeForCausalLM(tiny_config()).train()
    input_ids, attention_mask = padded_batch()
    batches = [(input_ids, attention_mask), (input_ids.flip(0), attention_mask.flip(0))]
    twin = copy.deepcopy(model)
    expected = train_with_balancer(model, model, batches, steps=2)
    torch._dynamo.utils.counters.clear()
    actual = train_with_balancer(twin, torch.compile(twin, backend="eager", fullgraph=True), batches, steps=2)
    # Counting, resets and bias updates change no guard: four training forwards, one graph, no recompilation.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
    # 2 real-token rows of 12 and 9 tokens, top-2, two micro-batches: 84 choices per layer and step.
    assert expected[0][0].sum(dim=-1).tolist() == [84, 84]
    assert not torch.equal(expected[0][1], expected[1][1]), "the biases moved between the steps"
    assert_same_history(actual, expected)


@pytest.mark.slow
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_compiled_training_with_activation_checkpointing_counts_each_token_once(tiny_config, use_reentrant):
    """Dynamo refuses the counting inside a checkpointed layer and runs that layer outside the graph; counts stay exact."""
    model = LossFreeMoeForCausalLM(tiny_config()).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    batches = [padded_batch()]
    twin = copy.deepcopy(model)
    expected = train_with_balancer(model, model, batches, steps=2)
    actual = train_with_balancer(twin, torch.compile(twin, backend="eager"), batches, steps=2)
    assert expected[0][0].sum(dim=-1).tolist() == [42, 42]
    assert_same_history(actual, expected)


@pytest.mark.slow
def test_inductor_forward_and_static_cache_generation_match_eager(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    input_ids, attention_mask = padded_batch()
    generate_kwargs = dict(attention_mask=attention_mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        expected_logits = model(input_ids, attention_mask=attention_mask).logits
        expected_tokens = model.generate(input_ids, **generate_kwargs)
        model.forward = torch.compile(model.forward, fullgraph=True)
        logits = model(input_ids, attention_mask=attention_mask).logits
        tokens = model.generate(input_ids, cache_implementation="static", **generate_kwargs)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    assert torch.equal(tokens, expected_tokens)
