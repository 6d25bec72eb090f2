"""What transformers' common causal-LM tests check of every in-library model, checked here for LossFreeMoe.

Serialization (safetensors, sharded or not; bf16 loading), attention backends, padding, optional outputs,
`inputs_embeds`, embedding resizing and tying, caches (dynamic, static, compiled, continued), 4-D masks and
activation checkpointing. Checks that need hardware this suite does not have are skipped with the reason.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import AutoModelForCausalLM, CompileConfig

from hf_lossfree_moe import LossFreeMoeForCausalLM


LAYERS, MOE_LAYERS, HEADS, HIDDEN, VOCAB, EXPERTS = 3, 2, 4, 64, 128, 8
GREEDY = dict(do_sample=False, max_new_tokens=6, eos_token_id=None, pad_token_id=0)


@pytest.fixture
def model(tiny_config):
    """The tiny model in eval mode, with distinct, non-neutral routing biases (so a lost bias changes routing)."""
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    for layer, router in enumerate(model.routers()):
        router.e_score_correction_bias.copy_(torch.linspace(-0.02, 0.03, EXPERTS) * (layer + 1) + 1e-3)
    return model


def left_padded_prompts():
    """Prompts of 7 and 4 tokens, the shorter one left-padded with the pad id 0."""
    long_prompt = torch.randint(3, VOCAB, (7,))
    short_prompt = torch.randint(3, VOCAB, (4,))
    input_ids = torch.stack([long_prompt, F.pad(short_prompt, (3, 0), value=0)])
    attention_mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
    return input_ids, attention_mask, [long_prompt, short_prompt]


def logits(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


@pytest.mark.parametrize("max_shard_size", [None, "200KB"])
def test_save_and_load_round_trip(tmp_path, model, max_shard_size):
    """Every tensor, the biases included, comes back exactly, from one safetensors file or from several shards."""
    model.save_pretrained(tmp_path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    shards = sorted(tmp_path.glob("*.safetensors"))
    if max_shard_size is None:
        assert [path.name for path in shards] == ["model.safetensors"]
    else:
        assert len(shards) > 1
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
        assert set(index["weight_map"].values()) == {path.name for path in shards}
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is LossFreeMoeForCausalLM
    expected = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    input_ids = torch.randint(3, VOCAB, (2, 6))
    # Equal weights in other memory can take other CPU kernel paths: logits agree to float rounding, not bit for bit.
    torch.testing.assert_close(logits(loaded, input_ids), logits(model, input_ids))


def test_saved_code_files_carry_the_license_header(tmp_path, model):
    """The files a saved model carries for `trust_remote_code` start with the copyright line tools read."""
    model.save_pretrained(tmp_path)
    code_files = sorted(path.name for path in tmp_path.glob("*.py"))
    assert code_files == [
        "configuration_lossfree_moe.py",
        "modeling_lossfree_moe.py",
        "quantile_threshold.py",
        "sorted_experts.py",
    ]
    for name in code_files:
        lines = (tmp_path / name).read_text().splitlines()
        assert lines[0] == "# Copyright 2026 The hf-lossfree-moe Authors. All rights reserved.", name
        assert '# Licensed under the Apache License, Version 2.0 (the "License");' in lines[:4], name


def test_bfloat16_loading_keeps_the_routing_bias_in_float32(tmp_path, model):
    """Weights load in bf16; the biases stay fp32 and exact, also through a checkpoint saved from a bf16 model."""
    fp32_biases = [router.e_score_correction_bias.clone() for router in model.routers()]
    model.save_pretrained(tmp_path / "fp32")
    bf16 = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16)
    bf16.save_pretrained(tmp_path / "bf16")
    reloaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path / "bf16", dtype="auto")
    for loaded in (bf16, reloaded):
        assert loaded.lm_head.weight.dtype == torch.bfloat16
        assert loaded.model.layers[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
        for router, expected in zip(loaded.routers(), fp32_biases, strict=True):
            assert router.e_score_correction_bias.dtype == torch.float32
            assert torch.equal(router.e_score_correction_bias, expected)
    # The biases are not bf16 numbers: a bf16 round trip anywhere would have changed them.
    assert not torch.equal(fp32_biases[0].bfloat16().float(), fp32_biases[0])


@pytest.mark.parametrize(
    "attn_implementation",
    [
        "eager",
        "sdpa",
        pytest.param("flex_attention", marks=pytest.mark.slow),  # compiles its kernel: about a minute on CPU
        pytest.param(
            "flash_attention_2",
            marks=pytest.mark.skip(reason="flash attention kernels need a CUDA device and the flash-attn package"),
        ),
    ],
)
def test_from_pretrained_with_each_attention_implementation(tmp_path, model, attn_implementation):
    model.save_pretrained(tmp_path)
    loaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path, attn_implementation=attn_implementation).eval()
    assert loaded.config._attn_implementation == attn_implementation
    input_ids, attention_mask, _ = left_padded_prompts()
    expected = logits(model, input_ids, attention_mask=attention_mask)
    actual = logits(loaded, input_ids, attention_mask=attention_mask)
    # Padded query rows attend to nothing and differ between backends; every real token must agree.
    real = attention_mask.bool()
    torch.testing.assert_close(actual[real], expected[real], rtol=1e-4, atol=1e-5)


def test_left_padded_batch_generates_what_each_prompt_generates_alone(model):
    input_ids, attention_mask, prompts = left_padded_prompts()
    batch = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)[:, input_ids.size(1) :]
    for row, prompt in enumerate(prompts):
        alone = model.generate(prompt[None], **GREEDY)[0, prompt.size(0) :]
        assert torch.equal(batch[row], alone), f"prompt {row}"


def test_optional_outputs_have_one_entry_per_layer(model):
    model.set_attn_implementation("eager")  # sdpa does not return attention weights
    input_ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        out = model(input_ids, output_hidden_states=True, output_attentions=True, output_router_logits=True)
        last_hidden_state = model.model(input_ids).last_hidden_state
    assert [tuple(h.shape) for h in out.hidden_states] == [(2, 5, HIDDEN)] * (LAYERS + 1)
    assert torch.equal(out.hidden_states[0], model.model.embed_tokens(input_ids))
    assert torch.equal(out.hidden_states[-1], last_hidden_state)
    assert [tuple(a.shape) for a in out.attentions] == [(2, HEADS, 5, 5)] * LAYERS
    torch.testing.assert_close(out.attentions[0].sum(dim=-1), torch.ones(2, HEADS, 5))
    assert out.attentions[0][0, 0].triu(diagonal=1).abs().max() == 0, "causal: no weight on later tokens"
    assert [tuple(r.shape) for r in out.router_logits] == [(10, EXPERTS)] * MOE_LAYERS
    assert out.aux_loss.ndim == 0
    plain = model(input_ids)
    assert plain.hidden_states is None and plain.attentions is None and plain.router_logits is None


def test_tuple_outputs_match_the_output_dataclass(model):
    input_ids = torch.randint(3, VOCAB, (2, 5))
    with torch.no_grad():
        as_dataclass = model(input_ids, labels=input_ids, use_cache=False)
        as_tuple = model(input_ids, labels=input_ids, use_cache=False, return_dict=False)
    assert isinstance(as_tuple, tuple)
    assert torch.equal(as_tuple[0], as_dataclass.loss)
    assert torch.equal(as_tuple[1], as_dataclass.logits)


def test_batched_rows_match_rows_run_alone(model):
    input_ids = torch.randint(3, VOCAB, (3, 6))
    batched = logits(model, input_ids)
    for row in range(3):
        torch.testing.assert_close(batched[row], logits(model, input_ids[row : row + 1])[0], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_match_input_ids(model):
    input_ids, attention_mask, _ = left_padded_prompts()
    inputs_embeds = model.get_input_embeddings()(input_ids)
    with torch.no_grad():
        from_embeds = model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
    torch.testing.assert_close(from_embeds, logits(model, input_ids, attention_mask=attention_mask))
    with pytest.raises(ValueError, match="exactly one of input_ids or inputs_embeds"):
        model(input_ids, inputs_embeds=inputs_embeds)
    # Generating from embeddings returns only the new tokens: the same ones as generating from the ids.
    from_ids = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)[:, input_ids.size(1) :]
    generated = model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **GREEDY)
    assert torch.equal(generated, from_ids)


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_resize_token_embeddings_keeps_the_old_vocabulary(tiny_config, tie_word_embeddings):
    model = LossFreeMoeForCausalLM(tiny_config(tie_word_embeddings=tie_word_embeddings)).eval()
    input_ids = torch.randint(3, VOCAB, (2, 6))
    before = logits(model, input_ids)
    old_embeddings = model.get_input_embeddings().weight.detach().clone()

    model.resize_token_embeddings(VOCAB + 8)
    assert model.config.vocab_size == VOCAB + 8
    assert model.get_input_embeddings().weight.shape == (VOCAB + 8, HIDDEN)
    assert model.get_output_embeddings().weight.shape == (VOCAB + 8, HIDDEN)
    assert torch.equal(model.get_input_embeddings().weight[:VOCAB], old_embeddings)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tie_word_embeddings
    after = logits(model, input_ids)
    assert after.shape == (2, 6, VOCAB + 8)
    torch.testing.assert_close(after[..., :VOCAB], before)  # the resized head is new memory: float rounding only
    # The new rows can be generated and embedded.
    assert logits(model, torch.tensor([[VOCAB + 7]])).shape == (1, 1, VOCAB + 8)

    model.resize_token_embeddings(VOCAB - 28, pad_to_multiple_of=32)
    assert model.config.vocab_size == 128
    model.resize_token_embeddings(VOCAB - 8)
    assert model.get_output_embeddings().weight.shape == (VOCAB - 8, HIDDEN)
    assert torch.equal(model.get_input_embeddings().weight, old_embeddings[: VOCAB - 8])


@pytest.mark.parametrize("tie_word_embeddings", [False, True])
def test_tied_and_untied_heads_survive_save_and_load(tmp_path, tiny_config, tie_word_embeddings):
    model = LossFreeMoeForCausalLM(tiny_config(tie_word_embeddings=tie_word_embeddings)).eval()
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert (head is embedding) is tie_word_embeddings
    assert torch.equal(head, embedding) is tie_word_embeddings
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", framework="pt") as checkpoint:
        saved = set(checkpoint.keys())
    # A tied head is stored once, under the embedding's name.
    assert ("lm_head.weight" in saved) is not tie_word_embeddings
    loaded = LossFreeMoeForCausalLM.from_pretrained(tmp_path).eval()
    assert (loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight) is tie_word_embeddings
    assert torch.equal(loaded.get_output_embeddings().weight, head)


def test_static_cache_generation_matches_dynamic_cache(model):
    input_ids, attention_mask, _ = left_padded_prompts()
    dynamic = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    static = model.generate(input_ids, attention_mask=attention_mask, cache_implementation="static", **GREEDY)
    assert dynamic.shape == (2, 7 + GREEDY["max_new_tokens"])
    assert torch.equal(static, dynamic)


def test_compiled_static_cache_generation_matches_eager(model):
    """`generate` compiles the decoding forward with `fullgraph=True`; the `eager` backend keeps it fast on CPU."""
    assert model._can_compile_fullgraph, "transformers compiles (and tests compiling) only models that declare it"
    torch._dynamo.reset()
    input_ids, attention_mask, _ = left_padded_prompts()
    expected = model.generate(input_ids, attention_mask=attention_mask, **GREEDY)
    compile_config = CompileConfig(fullgraph=True, dynamic=False, backend="eager", mode="default")
    compile_config._compile_all_devices = True  # generate compiles only on accelerators unless told otherwise
    generated = model.generate(
        input_ids,
        attention_mask=attention_mask,
        cache_implementation="static",
        compile_config=compile_config,
        **GREEDY,
    )
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0, "the decoding forward was compiled"
    assert torch.equal(generated, expected)
    torch._dynamo.reset()


def test_generation_continues_from_the_returned_cache(model):
    input_ids, attention_mask, _ = left_padded_prompts()
    in_one_go = model.generate(input_ids, attention_mask=attention_mask, **{**GREEDY, "max_new_tokens": 8})
    first = model.generate(
        input_ids, attention_mask=attention_mask, return_dict_in_generate=True, **{**GREEDY, "max_new_tokens": 3}
    )
    sequences = first.sequences
    continued_mask = torch.cat([attention_mask, attention_mask.new_ones(2, 3)], dim=1)
    continued = model.generate(
        sequences,
        attention_mask=continued_mask,
        cache=first.cache,
        **{**GREEDY, "max_new_tokens": 5},
    )
    assert torch.equal(continued, in_one_go)


def test_packed_sequences_with_a_4d_mask_match_separate_sequences(model):
    """Two sequences packed in one row, a block-diagonal causal 4-D mask and restarting positions."""
    first, second = torch.randint(3, VOCAB, (1, 4)), torch.randint(3, VOCAB, (1, 3))
    packed = torch.cat([first, second], dim=1)
    allowed = torch.zeros(7, 7, dtype=torch.bool)
    allowed[:4, :4] = torch.ones(4, 4).tril().bool()
    allowed[4:, 4:] = torch.ones(3, 3).tril().bool()
    mask = torch.zeros(1, 1, 7, 7).masked_fill(~allowed, torch.finfo(torch.float32).min)
    position_ids = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    packed_logits = logits(model, packed, attention_mask=mask, position_ids=position_ids)
    torch.testing.assert_close(packed_logits[:, :4], logits(model, first), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(packed_logits[:, 4:], logits(model, second), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_activation_checkpointing_gives_the_same_gradients(model, use_reentrant):
    model.train()
    input_ids = torch.randint(3, VOCAB, (2, 6))
    model(input_ids, labels=input_ids).loss.backward()
    expected = {name: param.grad.clone() for name, param in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert model.is_activation_checkpointing
    model(input_ids, labels=input_ids, use_cache=False).loss.backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
