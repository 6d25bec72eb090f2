import copy
import inspect
import threading
import warnings

import evaluate
import pytest
import torch
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from hf_lossfree_moe import (
    LossFreeBalancer,
    LossFreeMoeForCausalLM,
    RouterAdapter,
    RouterLocation,
    maxvio,
    register_router_adapter,
    routers,
)
from hf_lossfree_moe.metrics import MAXVIO_METRIC_PATH


TOP_K = 2


def padded_batch(lengths, seq_len=12, vocab=128):
    """input_ids (B, S) with right padding (pad id 0) and the matching 2-D attention_mask."""
    input_ids = torch.randint(3, vocab, (len(lengths), seq_len))
    attention_mask = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    return input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def record_topk(model):
    """Hooks that keep each router's (T, K) indices of every call, in router order."""
    calls = {router: [] for router in model.routers()}
    for router in model.routers():
        router.register_forward_hook(lambda module, args, output: calls[module].append(output[2].clone()))
    return calls


class ToyRouter(nn.Module):
    """Top-K of fixed per-token scores plus the bias; returns the DeepSeek-V3 router triple."""

    def __init__(self, scores: torch.Tensor, top_k: int):
        super().__init__()
        self.scores = scores  # (T, E)
        self.top_k = top_k
        self.e_score_correction_bias = nn.Buffer(torch.zeros(scores.size(1)))

    def forward(self, hidden_states):
        indices = (self.scores + self.e_score_correction_bias).topk(self.top_k, dim=-1).indices  # (T, K)
        return self.scores, self.scores.gather(1, indices), indices


class ToyModel(nn.Module):
    def __init__(self, *routers):
        super().__init__()
        self.layers = nn.ModuleList(routers)

    def forward(self, hidden_states=None, attention_mask=None):
        for router in self.layers:
            router(hidden_states)


@pytest.fixture
def model(tiny_config):
    return LossFreeMoeForCausalLM(tiny_config()).train()


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
    assert measurement.maxvio_global == pytest.approx(maxvio(before).mean)


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


def test_step_applies_the_sign_rule_in_place(model):
    balancer = LossFreeBalancer(model)
    tensors = [router.e_score_correction_bias for router in model.routers()]
    pointers = [bias.data_ptr() for bias in tensors]
    with torch.no_grad():
        for bias in tensors:
            bias.uniform_(-0.01, 0.01)
    before = balancer.biases()
    input_ids, attention_mask = padded_batch([12, 8, 4])
    model(input_ids=input_ids, attention_mask=attention_mask)
    loads = balancer.loads.double()

    stats = balancer.step()

    expected = before + 1e-3 * torch.sign(loads.mean(dim=-1, keepdim=True) - loads).float()
    assert torch.equal(balancer.biases(), expected)
    assert all(
        a is b for a, b in zip(tensors, [r.e_score_correction_bias for r in model.routers()], strict=True)
    )  # same objects
    assert [bias.data_ptr() for bias in tensors] == pointers  # ... same storage
    assert all(bias.dtype == torch.float32 for bias in tensors)
    assert torch.equal(model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"], expected[0])
    per_layer = maxvio(loads)
    assert stats["maxvio_batch"] == pytest.approx(per_layer.mean)
    assert [stats["maxvio_batch/layer_1"], stats["maxvio_batch/layer_2"]] == pytest.approx(
        list(per_layer.per_layer.values())
    )
    assert stats["bias_abs_max"] == pytest.approx(expected.abs().max().item())
    assert stats["bias_updated"] == 1.0
    assert balancer.loads.sum() == 0


def test_error_rule_and_centering(model):
    balancer = LossFreeBalancer(model, update_rate=1e-2, rule="error", center=True)
    input_ids, attention_mask = padded_batch([12, 12, 7])
    model(input_ids=input_ids, attention_mask=attention_mask)
    loads = balancer.loads.double()
    balancer.step()

    mean = loads.mean(dim=-1, keepdim=True)
    delta = 1e-2 * (mean - loads) / mean
    expected = (delta - delta.mean(dim=-1, keepdim=True)).float()
    torch.testing.assert_close(balancer.biases(), expected, rtol=0, atol=1e-8)
    assert balancer.biases().sum(dim=-1).abs().max() < 1e-7


def test_multiplicative_bias_starts_at_one_and_takes_the_same_steps(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(bias_type="multiplicative")).train()
    balancer = LossFreeBalancer(model)
    assert balancer.bias_type == "multiplicative"
    assert torch.equal(balancer.biases(), torch.ones(2, 8))
    model(torch.randint(3, 128, (3, 10)))
    loads = balancer.loads.double()
    stats = balancer.step()
    expected = 1 + 1e-3 * torch.sign(loads.mean(dim=-1, keepdim=True) - loads).float()
    assert torch.equal(balancer.biases(), expected)
    assert stats["bias_abs_max"] == pytest.approx(1e-3, abs=1e-6)  # measured from the neutral value 1


def test_step_without_tokens_changes_nothing_and_says_so(model):
    balancer = LossFreeBalancer(model)
    model.eval()
    model(torch.randint(3, 128, (2, 6)))
    with pytest.warns(UserWarning, match="no token was counted"):
        stats = balancer.step()
    assert "maxvio_batch" not in stats
    assert stats == {
        "maxvio_batch/skipped_layers": 2.0,
        "bias_abs_max": 0.0,
        "bias_abs_mean": 0.0,
        "bias_update_factor": 1.0,
        "bias_updated": 0.0,
    }
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))


def test_step_after_eval_mode_forwards_says_call_train_at_the_callers_line(model, tmp_path):
    model.save_pretrained(tmp_path)
    loaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path)  # in eval mode, as from_pretrained leaves every model
    balancer = LossFreeBalancer(loaded)
    loaded(torch.randint(3, 128, (2, 6)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        line = inspect.currentframe().f_lineno + 1
        stats = balancer.step()
    [warning] = caught
    assert (warning.filename, warning.lineno) == (__file__, line)  # the user's call, not torch's no_grad wrapper
    assert "call model.train()" in str(warning.message)
    assert stats["bias_updated"] == 0.0

    loaded.train()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        balancer.step()  # no forward at all since the last step: nothing ran in eval mode, no advice to call train()
    assert "no token was counted" in str(caught[0].message) and "model.train()" not in str(caught[0].message)
    loaded(torch.randint(3, 128, (2, 6)))
    assert balancer.step()["bias_updated"] == 1.0


@pytest.mark.parametrize("kwargs", [{"frozen": True}, {"update_rate": 0.0}])
def test_frozen_or_zero_rate_measures_without_updating(model, kwargs):
    balancer = LossFreeBalancer(model, **kwargs)
    model(torch.randint(3, 128, (2, 6)))
    stats = balancer.step()
    assert stats["maxvio_batch"] > 0
    assert stats["bias_updated"] == 0.0
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))


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


def test_a_frozen_router_keeps_its_bias(model):
    model.routers()[0].weight.requires_grad_(False)
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 5)))  # 10 tokens x 2 / 8 experts: no load equals the mean, every bias moves
    balancer.step()
    biases = balancer.biases()
    assert torch.equal(biases[0], torch.zeros(8))
    assert biases[1].abs().min() == pytest.approx(1e-3)

    balancer.remove()
    balancer = LossFreeBalancer(model, frozen=False)
    model(torch.randint(3, 128, (2, 5)))
    balancer.step()
    assert balancer.biases()[0].abs().min() == pytest.approx(1e-3)


def test_freezing_a_router_after_construction_keeps_its_bias(model):
    balancer = LossFreeBalancer(model)
    first, second = model.routers()
    first.weight = nn.Parameter(first.weight.detach().clone(), requires_grad=False)  # a new object, as FSDP makes
    second.weight.requires_grad_(False)
    model(torch.randint(3, 128, (2, 5)))
    stats = balancer.step()
    assert stats["bias_updated"] == 0.0
    assert torch.equal(balancer.biases(), torch.zeros(2, 8))

    second.weight.requires_grad_(True)
    model(torch.randint(3, 128, (2, 5)))
    balancer.step()
    biases = balancer.biases()
    assert torch.equal(biases[0], torch.zeros(8))
    assert biases[1].abs().min() == pytest.approx(1e-3)


def test_bias_stays_fp32_in_a_bf16_model(model):
    model.to(torch.bfloat16)
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 5)))
    balancer.step()
    assert all(router.e_score_correction_bias.dtype == torch.float32 for router in model.routers())
    assert balancer.biases().abs().min() == pytest.approx(1e-3)


def test_a_foreign_bf16_bias_is_upcast_in_place_of_the_buffer():
    config = DeepseekV3Config(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        q_lora_rank=None,
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
    )
    model = DeepseekV3ForCausalLM(config).to(torch.bfloat16).train()
    router = model.model.layers[1].mlp.gate
    assert router.e_score_correction_bias.dtype == torch.bfloat16

    with pytest.warns(UserWarning, match="bfloat16"):
        balancer = LossFreeBalancer(model)
    assert balancer.names == ["model.layers.1.mlp.gate"]
    bias = router.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert dict(router.named_buffers())["e_score_correction_bias"] is bias
    assert model.state_dict()["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32

    model(torch.randint(0, 64, (2, 5)))
    balancer.step()
    assert router.e_score_correction_bias is bias
    assert bias.abs().min() == pytest.approx(1e-3)


@pytest.mark.parametrize("steps", [5_000, pytest.param(100_000, marks=pytest.mark.slow)])
def test_long_run_of_sign_updates_stays_exact_in_fp32(steps):
    router = ToyRouter(torch.rand(16, 4), top_k=1)
    router.e_score_correction_bias[0] = 5.0
    model = ToyModel(router)
    balancer = LossFreeBalancer(model, update_rate=1e-3)
    exact = torch.tensor([5.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    bf16 = router.e_score_correction_bias.to(torch.bfloat16)
    for _ in range(steps):
        model()
        loads = balancer.loads[0].double()
        delta = 1e-3 * torch.sign(loads.mean() - loads)
        exact += delta
        bf16 += delta.to(torch.bfloat16)
        balancer.step()
    assert (router.e_score_correction_bias.double() - exact).abs().max() < 1e-2
    assert (exact - 5.0).abs().max() > 1  # the bias did travel
    assert bf16[0] == 5.0  # in bf16, 5 + 1e-3 rounds back to 5: the bias would never have moved


def test_a_parameter_bias_stops_requiring_grad():
    router = ToyRouter(torch.rand(4, 4), top_k=2)
    del router.e_score_correction_bias
    router.e_score_correction_bias = nn.Parameter(torch.zeros(4))
    with pytest.warns(UserWarning, match="requires grad"):
        LossFreeBalancer(ToyModel(router))
    assert not router.e_score_correction_bias.requires_grad


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


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grad", [False, True])
def test_generation_never_counts_toward_step(model, mode, grad):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
    model.train(mode == "train")
    with torch.set_grad_enabled(grad):
        # generate() itself runs without grad; its decoding loop is the same either way
        model.generate(input_ids.flip(1), attention_mask=attention_mask.flip(1), max_new_tokens=3, do_sample=False)
        assert balancer.loads.sum() == 0
        model.train()
        model(input_ids=input_ids, attention_mask=attention_mask)  # a training forward right after counts as ever
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 8] * 2


def test_generate_batch_counts_nothing_even_from_its_worker_thread():
    """Continuous batching decodes in a worker thread while `generate_batch` waits for it."""

    class BatchGenerating(ToyModel):
        def generate_batch(self, num_forwards):
            worker = threading.Thread(target=lambda: [self() for _ in range(num_forwards)])
            worker.start()
            worker.join()

    model = BatchGenerating(ToyRouter(torch.rand(6, 4), top_k=2)).train()
    balancer = LossFreeBalancer(model)
    model.generate_batch(3)
    assert balancer.loads.sum() == 0
    model()
    assert balancer.loads.sum() == 6 * 2


def test_a_deep_copy_of_the_model_is_not_watched(model):
    """Reference models are deep copies: their forwards must not count, their generate() must decode with the copy."""
    balancer = LossFreeBalancer(model)
    clone = copy.deepcopy(model).train()
    clone(torch.randint(3, 128, (2, 6)))
    assert balancer.loads.sum() == 0
    clone.eval()
    with torch.no_grad():
        clone.lm_head.weight.zero_()  # every logit 0: greedy decoding picks token 0
    prompt = torch.randint(3, 128, (1, 4))
    assert clone.generate(prompt, max_new_tokens=2, do_sample=False)[0, 4:].tolist() == [0, 0]
    assert model.eval().generate(prompt, max_new_tokens=2, do_sample=False)[0, 4:].tolist() != [0, 0]
    assert balancer.loads.sum() == 0


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


def test_wrappers_are_unwrapped(model):
    wrapped = nn.DataParallel(model)
    balancer = LossFreeBalancer(wrapped)
    assert balancer.model is model
    assert balancer.names == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    wrapped(torch.randint(3, 128, (2, 5)), torch.ones(2, 5))
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 10] * 2


def test_a_model_without_routers_is_rejected():
    with pytest.raises(ValueError, match="has no router"):
        LossFreeBalancer(nn.Linear(4, 4))


def test_a_router_with_another_output_needs_an_adapter():
    class TwoOutputRouter(ToyRouter):
        def forward(self, hidden_states):
            return super().forward(hidden_states)[1:]

    model = ToyModel(TwoOutputRouter(torch.rand(4, 4), top_k=2))
    LossFreeBalancer(model)
    with pytest.raises(ValueError, match="TwoOutputRouter.*register_router_adapter"):
        model()


def test_registered_adapter_reads_a_bias_stored_elsewhere(monkeypatch):
    monkeypatch.setattr(routers, "_FAMILY_ADAPTERS", {})

    class Statics(nn.Module):  # holds the bias for its router, as ERNIE-4.5-MoE does; shape (1, E)
        def __init__(self, num_experts):
            super().__init__()
            self.e_score_correction_bias = nn.Parameter(torch.zeros(1, num_experts), requires_grad=False)

    class PairRouter(nn.Module):  # returns (weights, indices)
        def __init__(self, scores):
            super().__init__()
            self.scores = scores
            self.statics = Statics(scores.size(1))

        def forward(self, hidden_states):
            indices = (self.scores + self.statics.e_score_correction_bias).topk(2, dim=-1).indices
            return self.scores.gather(1, indices), indices

    register_router_adapter(
        RouterAdapter(
            name="pair",
            locate=lambda module: (
                RouterLocation(module, module.statics, "e_score_correction_bias")
                if isinstance(module, PairRouter)
                else None
            ),
            topk_indices=lambda router, output: output[1],
        )
    )
    scores = torch.tensor([[0.9, 0.8, 0.1, 0.0]] * 3)
    model = ToyModel(PairRouter(scores), PairRouter(scores))
    balancer = LossFreeBalancer(model)
    assert balancer.names == ["layers.0", "layers.1"]  # the Statics modules are not routers of their own
    model()
    balancer.step()
    assert torch.equal(model.layers[0].statics.e_score_correction_bias, torch.tensor([[-1e-3, -1e-3, 1e-3, 1e-3]]))


def test_the_mask_must_fit_the_routed_tokens():
    model = ToyModel(ToyRouter(torch.rand(6, 4), top_k=2)).train()
    LossFreeBalancer(model)
    with pytest.raises(ValueError, match="does not fit the attention_mask"):
        model(attention_mask=torch.ones(4, 2))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"update_rate": -1e-3}, "update_rate"),
        ({"update_rate": float("nan")}, "update_rate"),
        ({"update_rate": True}, "update_rate"),
        ({"rule": "momentum"}, "rule must be one of"),
        ({"bias_type": "gated"}, "bias_type must be one of"),
        ({"center": "yes"}, "center must be"),
        ({"frozen": 1}, "frozen must be"),
    ],
)
def test_bad_settings_are_rejected(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        LossFreeBalancer(model, **kwargs)


def test_maxvio_by_hand():
    loads = torch.tensor([[3, 1, 2, 2], [2, 2, 2, 2]])
    assert maxvio(loads).per_layer == {0: 0.5, 1: 0.0}
    assert maxvio(loads).mean == 0.25
    assert maxvio(loads[0]).per_layer == {0: 0.5}
    assert maxvio(loads, layers=[3, 5]).metrics("maxvio_batch") == {
        "maxvio_batch": 0.25,
        "maxvio_batch/layer_3": 0.5,
        "maxvio_batch/layer_5": 0.0,
    }
    with pytest.raises(ValueError, match=">= 0"):
        maxvio(torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="layers must number each of the 2 rows"):
        maxvio(loads, layers=[1])


def test_maxvio_skips_a_layer_without_tokens_and_says_so():
    """An idle router (a vision expert on text, PEFT's idle copy) must not hide the other layers' metric."""
    result = maxvio(torch.tensor([[0, 0, 0, 0], [6, 0, 2, 0]]), layers=[1, 2])
    assert result.per_layer == {2: 2.0}  # mean load 2, max 6: (6 - 2) / 2
    assert result.skipped == (1,)
    assert result.mean == 2.0
    assert result.metrics("eval_maxvio_global") == {
        "eval_maxvio_global": 2.0,
        "eval_maxvio_global/layer_2": 2.0,
        "eval_maxvio_global/skipped_layers": 1.0,
    }
    nothing = maxvio(torch.zeros(2, 4))
    assert (nothing.mean, nothing.skipped) == (None, (0, 1))
    assert nothing.metrics("maxvio_batch") == {"maxvio_batch/skipped_layers": 2.0}


def test_maxvio_evaluate_module_loads_from_a_local_path():
    metric = evaluate.load(MAXVIO_METRIC_PATH)
    assert metric.compute(loads=[[3, 1, 2, 2], [2, 2, 2, 2]]) == {
        "maxvio": 0.25,
        "maxvio_per_layer": [0.5, 0.0],
        "skipped_layers": [],
    }
    assert metric.compute(loads=[[0, 0], [1, 3]]) == {
        "maxvio": 0.5,
        "maxvio_per_layer": [None, 0.5],
        "skipped_layers": [0],
    }
    with pytest.raises(ValueError, match=">= 0"):
        metric.compute(loads=[[1, -1]])


def test_no_warning_for_a_healthy_model(model):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        balancer = LossFreeBalancer(model)
        model(torch.randint(3, 128, (2, 6)))
        balancer.step()


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


class PausingStreamer:
    """A streamer whose generate() stops after its prefill forward until `resume` is set."""

    def __init__(self):
        self.paused, self.resume = threading.Event(), threading.Event()
        self.puts = 0

    def put(self, tokens):
        self.puts += 1
        if self.puts == 2:  # the prompt, then the first new token: the prefill forward has run
            self.paused.set()
            assert self.resume.wait(timeout=60)

    def end(self):
        pass


def test_generation_in_another_thread_leaves_this_threads_training_forwards_counted(model):
    """A sampling thread inside generate() (async RL) must not hide the training forwards of the trainer's thread."""
    balancer = LossFreeBalancer(model)
    streamer = PausingStreamer()
    prompt = torch.randint(3, 128, (2, 5))
    sampler = threading.Thread(
        target=lambda: model.generate(prompt, max_new_tokens=3, do_sample=False, streamer=streamer)
    )
    sampler.start()
    try:
        assert streamer.paused.wait(timeout=60)
        input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
        model(input_ids=input_ids, attention_mask=attention_mask).logits.sum().backward()
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        streamer.resume.set()
        sampler.join()
    # two forwards of 8 real tokens, top-2, per layer; nothing from the sampler's 3 forwards of 10 and 2 tokens
    assert balancer.loads.sum(dim=-1).tolist() == [2 * 8 * TOP_K] * 2


def test_generate_batch_in_another_thread_leaves_this_threads_training_forwards_counted():
    """Only threads started during the generate_batch call (its worker) count as generating, not older ones."""

    class BatchGenerating(ToyModel):
        def generate_batch(self, decoding, resume):
            def decode():
                self()
                decoding.set()
                assert resume.wait(timeout=60)
                self()

            worker = threading.Thread(target=decode)
            worker.start()
            worker.join()

    model = BatchGenerating(ToyRouter(torch.rand(6, 4), top_k=2), ToyRouter(torch.rand(6, 4), top_k=2)).train()
    balancer = LossFreeBalancer(model)
    decoding, resume = threading.Event(), threading.Event()
    caller = threading.Thread(target=model.generate_batch, args=(decoding, resume))
    caller.start()
    try:
        assert decoding.wait(timeout=60)
        model()
    finally:
        resume.set()
        caller.join()
    assert balancer.loads.sum(dim=-1).tolist() == [6 * 2] * 2  # this thread's forward alone: 6 tokens, top-2
