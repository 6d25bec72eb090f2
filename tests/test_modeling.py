import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from conftest import TINY
from hf_lossfree_moe import LossFreeMoeConfig, LossFreeMoeForCausalLM, LossFreeMoeModel
from hf_lossfree_moe.modeling_lossfree_moe import (
    LossFreeMoeSparseMoeBlock,
    LossFreeMoeTopkRouter,
    sequence_balance_loss,
)


def make_router(tiny_config, **overrides):
    router = LossFreeMoeTopkRouter(tiny_config(**overrides))
    torch.nn.init.normal_(router.weight, std=0.5)
    return router


def test_auto_classes_resolve(tiny_config):
    config = tiny_config()
    assert isinstance(AutoConfig.for_model("lossfree_moe", **TINY), LossFreeMoeConfig)
    assert type(AutoModel.from_config(config)) is LossFreeMoeModel
    assert type(AutoModelForCausalLM.from_config(config)) is LossFreeMoeForCausalLM


def test_layers_and_output_shapes(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    assert not isinstance(model.model.layers[0].mlp, LossFreeMoeSparseMoeBlock)
    assert all(isinstance(layer.mlp, LossFreeMoeSparseMoeBlock) for layer in model.model.layers[1:])
    assert len(model.routers()) == 2
    input_ids = torch.randint(3, 128, (2, 5))
    out = model(input_ids, output_router_logits=True, output_hidden_states=True)
    assert out.logits.shape == (2, 5, 128)
    assert [logits.shape for logits in out.router_logits] == [(10, 8), (10, 8)]
    assert len(out.hidden_states) == 4
    assert out.aux_loss.ndim == 0
    assert model(input_ids).router_logits is None


def test_large_bias_forces_expert_but_never_weights_it(tiny_config):
    router = make_router(tiny_config)
    hidden = torch.randn(32, 64)
    router.e_score_correction_bias[5] = 10.0
    logits, weights, indices = router(hidden)
    assert (indices == 5).any(dim=-1).all()
    scores = torch.sigmoid(hidden @ router.weight.T)
    torch.testing.assert_close(logits, hidden @ router.weight.T)
    torch.testing.assert_close(weights, scores.gather(1, indices))
    # the other pick is the best unbiased expert among the rest
    others = scores.clone()
    others[:, 5] = -1
    picked_other = torch.where(indices[:, 0] == 5, indices[:, 1], indices[:, 0])
    assert torch.equal(picked_other, others.argmax(dim=-1))


def test_router_computes_in_float32_under_autocast(tiny_config):
    router = make_router(tiny_config)
    hidden = torch.randn(16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, weights, _ = router(hidden.bfloat16())
    assert logits.dtype == weights.dtype == torch.float32
    torch.testing.assert_close(logits, hidden.bfloat16().float() @ router.weight.T)


def test_without_bias_selection_is_plain_top_k(tiny_config):
    router = make_router(tiny_config)
    hidden = torch.randn(16, 64)
    _, weights, indices = router(hidden)
    expected = torch.sigmoid(hidden @ router.weight.T).topk(2, dim=-1)
    assert torch.equal(indices.sort(dim=-1).values, expected.indices.sort(dim=-1).values)
    torch.testing.assert_close(weights.sort(dim=-1).values, expected.values.sort(dim=-1).values)


def test_group_limited_routing_never_selects_masked_groups(tiny_config):
    router = make_router(tiny_config, n_group=4, topk_group=2, num_experts_per_tok=3)
    # All biases strongly negative: a masked group filled with 0 instead of -inf would win every time.
    router.e_score_correction_bias.copy_(torch.tensor([-5.0, -5.1, -4.9, -5.2, -5.0, -5.3, -4.8, -5.0]))
    hidden = torch.randn(64, 64)
    _, _, indices = router(hidden)
    biased = torch.sigmoid(hidden @ router.weight.T) + router.e_score_correction_bias  # (T, 8)
    group_scores = biased.view(64, 4, 2).sum(dim=-1)  # top-2 of a 2-expert group is the whole group
    kept = group_scores.topk(2, dim=-1).indices  # (T, 2)
    selected_groups = indices // 2
    assert (selected_groups.unsqueeze(-1) == kept.unsqueeze(1)).any(dim=-1).all()
    # and inside the kept groups it is plain top-K of the biased scores
    allowed = torch.zeros(64, 8, dtype=torch.bool)
    allowed.view(64, 4, 2)[torch.arange(64)[:, None], kept] = True
    expected = biased.masked_fill(~allowed, float("-inf")).topk(3, dim=-1).indices
    assert torch.equal(indices.sort(dim=-1).values, expected.sort(dim=-1).values)


def test_softmax_scoring_weights(tiny_config):
    router = make_router(tiny_config, scoring_func="softmax")
    router.e_score_correction_bias[2] = 1.0
    hidden = torch.randn(16, 64)
    _, weights, indices = router(hidden)
    assert (indices == 2).any(dim=-1).all()
    probs = torch.softmax(hidden @ router.weight.T, dim=-1)
    torch.testing.assert_close(weights, probs.gather(1, indices))


def test_multiplicative_bias_starts_at_one_and_scales_choice(tiny_config):
    router = make_router(tiny_config, bias_type="multiplicative")
    assert torch.equal(router.e_score_correction_bias, torch.ones(8))
    model = LossFreeMoeForCausalLM(tiny_config(bias_type="multiplicative"))
    assert all(torch.equal(r.e_score_correction_bias, torch.ones(8)) for r in model.routers())
    hidden = torch.randn(16, 64)
    router.e_score_correction_bias[1] = 1e4
    _, weights, indices = router(hidden)
    assert (indices == 1).any(dim=-1).all()
    torch.testing.assert_close(weights, torch.sigmoid(hidden @ router.weight.T).gather(1, indices))


def test_normalised_and_scaled_gate_values(tiny_config):
    router = make_router(tiny_config, norm_topk_prob=True, routed_scaling_factor=2.5)
    _, weights, _ = router(torch.randn(16, 64))
    torch.testing.assert_close(weights.sum(dim=-1), torch.full((16,), 2.5))


def test_bias_is_a_gradient_free_buffer(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config())
    names = [name for name, _ in model.named_parameters()]
    assert not any("e_score_correction_bias" in name for name in names)
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    input_ids = torch.randint(3, 128, (2, 6))
    model(input_ids, labels=input_ids).loss.backward()
    router = model.routers()[0]
    assert router.e_score_correction_bias.grad is None
    assert not router.e_score_correction_bias.requires_grad
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("cast", ["to", "bfloat16", "half"])
def test_bias_stays_float32_when_model_is_cast(tiny_config, cast):
    model = LossFreeMoeForCausalLM(tiny_config())
    bias = model.routers()[0].e_score_correction_bias
    bias.fill_(1e-3)
    model = {"to": lambda m: m.to(torch.bfloat16), "bfloat16": lambda m: m.bfloat16(), "half": lambda m: m.half()}[
        cast
    ](model)
    assert model.lm_head.weight.dtype != torch.float32
    for router in model.routers():
        assert router.e_score_correction_bias.dtype == torch.float32
    assert model.routers()[0].e_score_correction_bias is bias
    assert model.routers()[0].e_score_correction_bias[0].item() == pytest.approx(1e-3)


def test_save_load_round_trip_and_bf16_load(tmp_path, tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    for i, router in enumerate(model.routers()):
        router.e_score_correction_bias.copy_(torch.linspace(-0.01, 0.01, 8) * (i + 1) + 1e-4)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = torch.randint(3, 128, (2, 7))
    torch.testing.assert_close(loaded(input_ids).logits, model(input_ids).logits)  # float rounding; biases exact below
    for a, b in zip(loaded.routers(), model.routers(), strict=True):
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)

    bf16 = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert bf16.lm_head.weight.dtype == torch.bfloat16
    for a, b in zip(bf16.routers(), model.routers(), strict=True):
        assert a.e_score_correction_bias.dtype == torch.float32
        assert torch.equal(a.e_score_correction_bias, b.e_score_correction_bias)


def test_saved_folder_carries_code_and_auto_map(tmp_path, tiny_config):
    LossFreeMoeForCausalLM(tiny_config()).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_lossfree_moe.LossFreeMoeConfig",
        "AutoModel": "modeling_lossfree_moe.LossFreeMoeModel",
        "AutoModelForCausalLM": "modeling_lossfree_moe.LossFreeMoeForCausalLM",
    }
    assert (tmp_path / "modeling_lossfree_moe.py").exists()
    assert (tmp_path / "configuration_lossfree_moe.py").exists()


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import sys

    class BlockPackage:
        def find_spec(self, name, path=None, target=None):
            if name == "hf_lossfree_moe" or name.startswith("hf_lossfree_moe."):
                raise ImportError("hf_lossfree_moe is blocked in this process")

    sys.meta_path.insert(0, BlockPackage())
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    folder, input_path, output_path = sys.argv[1:]
    causal_lm = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    assert "hf_lossfree_moe" not in sys.modules
    for model in (causal_lm, base):
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    input_ids = torch.load(input_path)
    with torch.no_grad():
        torch.save((causal_lm(input_ids).logits, base(input_ids).last_hidden_state), output_path)
    """
)


def test_remote_code_load_without_the_package(tmp_path, tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    model.routers()[1].e_score_correction_bias[3] = 0.5
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    input_ids = torch.randint(3, 128, (2, 7))
    torch.save(input_ids, tmp_path / "input.pt")
    script = tmp_path / "load.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "input.pt"), str(tmp_path / "out.pt")],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    with torch.no_grad():
        expected = model(input_ids).logits, model.model(input_ids).last_hidden_state
    torch.testing.assert_close(torch.load(tmp_path / "out.pt"), expected)  # another process: float rounding only


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_greedy_generate_same_with_and_without_cache(tiny_config, attn_implementation):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(attn_implementation)
    prompt = torch.randint(3, 128, (2, 5))
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=None)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without_cache = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 13)
    assert torch.equal(with_cache, without_cache)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_padded_batch_matches_unpadded_sequences(tiny_config, attn_implementation):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    model.set_attn_implementation(attn_implementation)
    long_seq = torch.randint(3, 128, (1, 7))
    short_seq = torch.randint(3, 128, (1, 4))
    with torch.no_grad():
        long_logits = model(long_seq).logits[0]
        short_logits = model(short_seq).logits[0]
        # right padding
        batch = torch.cat([long_seq, F.pad(short_seq, (0, 3), value=0)])
        mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
        logits = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(logits[0], long_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(logits[1, :4], short_logits, rtol=1e-5, atol=1e-5)
        # left padding, positions counted from the first real token
        batch = torch.cat([long_seq, F.pad(short_seq, (3, 0), value=0)])
        mask = torch.tensor([[1] * 7, [0] * 3 + [1] * 4])
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(batch, attention_mask=mask, position_ids=position_ids).logits
        torch.testing.assert_close(logits[1, 3:], short_logits, rtol=1e-5, atol=1e-5)


def test_sequence_balance_loss_matches_hand_computation():
    # Sequence 0: two real tokens and one pad; sequence 1: one real token. N = 4 experts, K = 2.
    scores = torch.tensor(
        [
            [[0.8, 0.4, 0.2, 0.6], [0.5, 0.1, 0.3, 0.1], [0.9, 0.9, 0.9, 0.9]],
            [[0.3, 0.1, 0.2, 0.4], [0.9, 0.9, 0.9, 0.9], [0.9, 0.9, 0.9, 0.9]],
        ]
    )
    indices = torch.tensor([[[0, 3], [0, 2], [0, 1]], [[3, 0], [1, 2], [1, 2]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    # seq 0: s' = [.4,.2,.1,.3] and [.5,.1,.3,.1] -> P = [.45,.15,.2,.2]; f = 4/(2*2) * [2,0,1,1]; sum f P = 1.3
    # seq 1: s' = [.3,.1,.2,.4] -> P = s'; f = 4/(2*1) * [1,0,0,1] = [2,0,0,2]; sum f P = 1.4
    loss = sequence_balance_loss(scores, indices, mask, num_experts=4, normalize_scores=True)
    assert loss.item() == pytest.approx((1.3 + 1.4) / 2)


def test_aux_loss_is_added_with_alpha_and_ignores_padding(tiny_config):
    alpha = 0.05
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing="aux_loss", router_aux_loss_coef=alpha)).eval()
    sequence = torch.randint(3, 128, (1, 6))
    out = model(sequence, labels=sequence)
    lm_loss = F.cross_entropy(out.logits[0, :-1], sequence[0, 1:])
    assert out.aux_loss > 0
    torch.testing.assert_close(out.loss, lm_loss + alpha * out.aux_loss)
    padded = F.pad(sequence, (0, 4), value=0)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    padded_out = model(padded, attention_mask=mask, labels=padded.masked_fill(mask == 0, -100))
    torch.testing.assert_close(padded_out.aux_loss, out.aux_loss)
    torch.testing.assert_close(padded_out.loss, out.loss)


def test_aux_loss_trains_router_weights(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config(load_balancing="aux_loss", router_aux_loss_coef=1.0))
    input_ids = torch.randint(3, 128, (2, 6))
    out = model(input_ids, output_router_logits=True)
    out.aux_loss.backward()
    assert all(router.weight.grad.abs().sum() > 0 for router in model.routers())


def test_loss_free_model_adds_no_aux_loss_by_default(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config()).eval()
    input_ids = torch.randint(3, 128, (2, 6))
    out = model(input_ids, labels=input_ids)
    assert out.aux_loss is None
    torch.testing.assert_close(
        out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 128), input_ids[:, 1:].reshape(-1))
    )


def test_gradient_checkpointing_gives_same_loss_and_gradients(tiny_config):
    model = LossFreeMoeForCausalLM(tiny_config()).train()
    input_ids = torch.randint(3, 128, (2, 6))
    model(input_ids, labels=input_ids).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    model.activation_checkpointing_enable()
    model(input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], msg=name)
