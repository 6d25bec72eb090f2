"""Counting: which router calls count, padding and padding-free masks, recomputation, measurements."""

import copy

import pytest
import torch

from conftest import TOP_K, ToyModel, ToyRouter, padded_batch, record_topk
from hf_lossfree_moe import LossFreeBalancer, compute_maxvio


def test_counts_are_exact_and_exclude_padding(model):
    calls = record_topk(model)
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([12, 7, 3])
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)

    real = attention_mask.reshape(-1).bool()
    expected = torch.stack([torch.bincount(calls[r][0][real].reshape(-1), minlength=8) for r in model.routers()])
    assert torch.equal(balancer.loads, expected)
    assert balancer.loads.dtype == torch.int64
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 22, TOP_K * 22]


def test_positional_attention_mask_also_excludes_padding(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([5, 2])
    model(input_ids, attention_mask)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 7, TOP_K * 7]


def test_without_mask_every_token_counts(model):
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 6)))
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 12, TOP_K * 12]


def test_eval_forwards_do_not_touch_training_counts(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([9, 4])
    model(input_ids=input_ids, attention_mask=attention_mask)
    before = balancer.loads

    model.eval()
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(balancer.loads, before)

    model.train()
    with balancer.measure() as measurement:
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(balancer.loads, before)
    assert torch.equal(measurement.loads, before)  # same weights and biases: same routing
    assert measurement.maxvio_global == pytest.approx(compute_maxvio(before).mean)


def test_eval_only_measurement_leaves_training_forwards_to_step(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([6, 6])
    with balancer.measure(eval_only=True) as measurement:
        model(input_ids=input_ids, attention_mask=attention_mask)
        model.eval()
        model(input_ids=input_ids[:1], attention_mask=attention_mask[:1])
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 12] * 2
    assert measurement.loads.sum(dim=-1).tolist() == [TOP_K * 6] * 2


def test_generation_with_cache_counts_each_new_token_once(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
    input_ids, attention_mask = input_ids.flip(1), attention_mask.flip(1)  # left padding for generation
    model.eval()
    with balancer.measure() as measurement:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # the prompt's 8 real tokens, then one forward per new token but the last: 2 rows x 3
    assert measurement.loads.sum(dim=-1).tolist() == [TOP_K * (8 + 2 * 3)] * 2


def test_two_half_batches_count_like_one_full_batch(model):
    balancer = LossFreeBalancer(model, frozen=True)
    input_ids, attention_mask = padded_batch([12, 5, 9, 2])
    model(input_ids=input_ids, attention_mask=attention_mask)
    full = balancer.loads
    balancer.step()
    assert balancer.loads.sum() == 0

    model(input_ids=input_ids[:2], attention_mask=attention_mask[:2])
    model(input_ids=input_ids[2:], attention_mask=attention_mask[2:])
    assert torch.equal(balancer.loads, full)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_token_once(model, reentrant):
    balancer = LossFreeBalancer(model, frozen=True)
    input_ids, attention_mask = padded_batch([10, 6])
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    plain = balancer.loads
    balancer.step()

    router_calls = []
    model.routers()[0].register_forward_hook(lambda *args: router_calls.append(1))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert len(router_calls) == 2  # the backward pass did recompute the router
    assert torch.equal(balancer.loads, plain)


def packed_batch(lengths, pad_to, pad_token_id=0):
    """One padding-free row as TRL's collator builds it: position ids restart at 0 per sequence, each sequence's
    first label is -100, and `pad_to` pads the row with position 0, label -100 and the pad id."""
    input_ids = torch.cat([torch.randint(3, 128, (n,)) for n in lengths])
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    labels = input_ids.masked_fill(position_ids == 0, -100)
    padding = pad_to - input_ids.numel()
    return {
        "input_ids": torch.cat([input_ids, torch.full((padding,), pad_token_id)])[None],
        "position_ids": torch.cat([position_ids, torch.zeros(padding, dtype=torch.long)])[None],
        "labels": torch.cat([labels, torch.full((padding,), -100)])[None],
    }


def test_trailing_padding_of_a_padding_free_batch_is_not_counted(model):
    balancer = LossFreeBalancer(model)
    model(**packed_batch([5, 1, 4], pad_to=16))  # a real one-token sequence, then 6 pad tokens
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 10] * 2

    balancer.step()
    batch = packed_batch([5, 4], pad_to=16)
    batch["input_ids"][0, -1] = 7  # the row ends with a token that is not the pad id: nothing says it is padding
    model(**batch)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 16] * 2

    balancer.step()
    batch = packed_batch([5, 4], pad_to=16)
    model(**{key: value for key, value in batch.items() if key != "labels"})  # no labels: every token counts
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 16] * 2


def test_the_mask_must_fit_the_routed_tokens():
    model = ToyModel(ToyRouter(torch.rand(6, 4), top_k=2)).train()
    LossFreeBalancer(model)
    with pytest.raises(ValueError, match="does not fit the attention_mask"):
        model(attention_mask=torch.ones(4, 2))


def test_a_deep_copy_of_the_model_leaves_the_balancer_and_its_process_group_alone(model):
    """Process groups refuse to be copied; the copy's forwards must neither fail nor add to the balancer's counts."""

    class ProcessGroupStandIn:
        def __deepcopy__(self, memo):
            raise TypeError("cannot pickle 'ProcessGroup' object")

    balancer = LossFreeBalancer(model, process_group=ProcessGroupStandIn())
    clone = copy.deepcopy(model).train()
    input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
    clone(input_ids=input_ids, attention_mask=attention_mask)
    assert balancer.loads.sum() == 0
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 8] * 2  # 8 real tokens, top-2, per layer
