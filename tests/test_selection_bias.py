"""The opt-in selection bias for MoE families built without one: exact stock routing at zero, balancing, sharing."""

import subprocess
import sys

import pytest
import torch

from hf_lossfree_moe import LossFreeBalancer
from hf_lossfree_moe.selection_bias import BIAS_NAME, add_selection_bias, with_selection_bias
from hf_lossfree_moe.testing_utils import build_tiny_model, tiny_model_class


FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "olmoe", "gpt_oss"]
# Runs in a fresh interpreter where `import hf_lossfree_moe` fails: the folder must load on stock transformers plus
# the code it carries.
LOAD_WITHOUT_PACKAGE = """
import sys
sys.modules["hf_lossfree_moe"] = None
sys.path = [p for p in sys.path if not p.rstrip("/").endswith("src")]
import torch
from transformers import AutoModelForCausalLM

folder, inputs_path, results_path = sys.argv[1:]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(torch.load(inputs_path)).logits
biases = {name: buffer for name, buffer in model.named_buffers() if name.endswith("e_score_correction_bias")}
torch.save({"module": type(model).__module__, "logits": logits, "biases": biases}, results_path)
"""


def input_ids(batch_size=4, seq_len=32):
    return torch.randint(3, 128, (batch_size, seq_len), generator=torch.Generator().manual_seed(0))


def routing(model, ids):
    """The (T, K) expert indices each router chose for `ids`, in layer order, and the logits."""
    picks = []
    hooks = [
        module.register_forward_hook(lambda module, args, output: picks.append(output[2]))
        for module in model.modules()
        if isinstance(getattr(module, "top_k", None), int) and hasattr(module, "weight")
    ]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    for hook in hooks:
        hook.remove()
    return picks, logits


def biases_of(model):
    return {name: buffer for name, buffer in model.named_buffers() if name.endswith(BIAS_NAME)}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_zero_bias_routes_exactly_like_the_stock_router(family):
    torch.manual_seed(0)
    model = build_tiny_model(family).eval()
    ids = input_ids()
    stock_picks, stock_logits = routing(model, ids)
    add_selection_bias(model)
    picks, logits = routing(model, ids)

    biases = biases_of(model)
    assert len(biases) == 2 and all(b.dtype == torch.float32 and not b.any() for b in biases.values())
    assert len(picks) == len(stock_picks) == 2
    assert all(torch.equal(a, b) for a, b in zip(picks, stock_picks, strict=True))
    torch.testing.assert_close(logits, stock_logits, rtol=0, atol=0)
    assert LossFreeBalancer(model).names == [name[: -len(BIAS_NAME) - 1] for name in biases]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_bias_changes_selection_but_never_weights(family):
    """A large bias on expert 0 puts it in every token's top-K; where the stock router chose it anyway, the gate
    values are the stock router's, so the bias never weights an expert's output."""
    torch.manual_seed(0)
    model = add_selection_bias(build_tiny_model(family).eval())
    router = next(module for module in model.modules() if hasattr(module, BIAS_NAME))
    outputs = []
    router.register_forward_hook(lambda module, args, output: outputs.append((args[0], output)))
    getattr(router, BIAS_NAME)[0] = 100.0
    with torch.no_grad():
        model(input_ids=input_ids(2, 16))
        hidden_states, (logits, weights, indices) = outputs[0]
        stock_logits, stock_weights, stock_indices = type(router)._selection_bias_base.forward(router, hidden_states)
    assert (indices == 0).any(dim=-1).all()
    torch.testing.assert_close(logits, stock_logits, rtol=0, atol=0)
    same_choice = (stock_indices == 0).any(dim=-1)  # (T,)
    assert same_choice.any() and not same_choice.all()
    order, stock_order = indices.argsort(dim=-1), stock_indices.argsort(dim=-1)  # compare experts by index
    assert torch.equal(indices.gather(-1, order)[same_choice], stock_indices.gather(-1, stock_order)[same_choice])
    torch.testing.assert_close(
        weights.gather(-1, order)[same_choice], stock_weights.gather(-1, stock_order)[same_choice], rtol=0, atol=0
    )


def skew_routers(model, balancer, ids, logit_shift=1.0):
    """Make every router prefer experts 0 and 1: their weight rows move toward the mean router input of `ids`, so the
    average token's logits for them rise by `logit_shift`."""
    inputs = {}
    hooks = [
        router.register_forward_pre_hook(lambda module, args, i=i: inputs.__setitem__(i, args[0]))
        for i, router in enumerate(balancer.routers)
    ]
    with torch.no_grad():
        model.eval()(input_ids=ids)
        for i, router in enumerate(balancer.routers):
            direction = inputs[i].reshape(-1, inputs[i].size(-1)).mean(dim=0)
            router.weight[:2] += logit_shift * direction / direction.norm() ** 2
    for hook in hooks:
        hook.remove()
    model.train()


# gpt-oss selects on logits (spread of several units), the others on softmax probabilities (spread of about 0.1).
UPDATE_RATES = {"qwen3_moe": 1e-2, "mixtral": 1e-2, "gpt_oss": 5e-2}


@pytest.mark.parametrize("family", list(UPDATE_RATES))
def test_the_opt_in_bias_balances_a_skewed_router(family):
    torch.manual_seed(0)
    model = add_selection_bias(build_tiny_model(family).requires_grad_(False))
    ids = input_ids()
    balancer = LossFreeBalancer(model, bias_update_rate=UPDATE_RATES[family], frozen=False)
    skew_routers(model, balancer, ids)
    history = []
    for _ in range(20):
        with torch.no_grad():
            model(input_ids=ids)
        history.append(balancer.step()["maxvio_batch"])

    assert history[0] > 2.0, history  # most tokens pick experts 0 and 1: their load is 3x the mean or more
    assert max(history[-4:]) < history[0] / 2.5, history
    assert all(bias.dtype == torch.float32 for bias in biases_of(model).values())
    assert balancer.biases()[:, :2].max() < 0 < balancer.biases()[:, 2:].max()


# A fresh interpreter importing transformers takes ~10 s: one family in the default suite, the others marked slow.
@pytest.mark.parametrize(
    "family", ["qwen3_moe", *(pytest.param(f, marks=pytest.mark.slow) for f in ("mixtral", "gpt_oss"))]
)
def test_a_saved_model_reloads_its_biases_with_and_without_the_package(family, tmp_path):
    torch.manual_seed(0)
    model = add_selection_bias(build_tiny_model(family).eval())
    ids = input_ids(2, 16)
    stock_picks, _ = routing(model, ids)
    with torch.no_grad():
        for bias in biases_of(model).values():
            bias.copy_(torch.randn(bias.shape) * 0.5 + 1e-5)  # fp32-only digits, large enough to change routing
    picks, logits = routing(model, ids)
    assert not all(torch.equal(a, b) for a, b in zip(picks, stock_picks, strict=True))
    model.save_pretrained(tmp_path / "model")
    assert {"selection_bias.py", "modeling_selection_bias.py"} <= {p.name for p in (tmp_path / "model").iterdir()}

    # through this library
    reloaded = with_selection_bias(tiny_model_class(family)).from_pretrained(tmp_path / "model").eval()
    reloaded_picks, reloaded_logits = routing(reloaded, ids)
    assert all(torch.equal(a, b) for a, b in zip(reloaded_picks, picks, strict=True))
    torch.testing.assert_close(reloaded_logits, logits)
    for name, bias in biases_of(model).items():
        assert torch.equal(biases_of(reloaded)[name], bias)

    # through the folder alone, in a process where hf_lossfree_moe cannot be imported
    torch.save(ids, tmp_path / "ids.pt")
    arguments = [str(tmp_path / name) for name in ("model", "ids.pt", "out.pt")]
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_PACKAGE, *arguments], check=True, cwd=tmp_path)
    results = torch.load(tmp_path / "out.pt")
    assert not results["module"].startswith("hf_lossfree_moe")
    torch.testing.assert_close(results["logits"], logits)
    assert results["biases"].keys() == biases_of(model).keys()
    assert all(torch.equal(results["biases"][name], bias) for name, bias in biases_of(model).items())


def test_adding_twice_keeps_the_bias_and_a_model_without_such_routers_is_refused():
    model = add_selection_bias(build_tiny_model("qwen3_moe"))
    biases = biases_of(model)
    with torch.no_grad():
        for bias in biases.values():
            bias.fill_(0.25)
    assert add_selection_bias(model) is model
    assert biases_of(model).keys() == biases.keys()
    assert all(
        now is before and bool((now == 0.25).all())
        for now, before in zip(biases_of(model).values(), biases.values(), strict=True)
    )
    with pytest.raises(ValueError, match="has no router that add_selection_bias can give a bias"):
        add_selection_bias(build_tiny_model("deepseek_v3"))  # already biased, in another layout
    with pytest.raises(ValueError, match="has no router that add_selection_bias can give a bias"):
        add_selection_bias(build_tiny_model("granitemoe"))  # a top-K router whose forward is not one it reproduces


def test_a_stock_checkpoint_loads_with_a_zero_bias_and_routes_as_the_stock_model(tmp_path):
    """A folder saved without a bias (any stock checkpoint): the wrapped class starts from zero, not from memory."""
    torch.manual_seed(0)
    stock = build_tiny_model("qwen3_moe").eval()
    stock.save_pretrained(tmp_path / "stock")
    ids = input_ids(2, 16)
    stock_picks, stock_logits = routing(stock, ids)
    loaded = with_selection_bias(tiny_model_class("qwen3_moe")).from_pretrained(tmp_path / "stock").eval()
    biases = biases_of(loaded)
    assert len(biases) == stock.config.num_hidden_layers
    assert all(bias.dtype == torch.float32 and torch.equal(bias, torch.zeros_like(bias)) for bias in biases.values())
    picks, logits = routing(loaded, ids)
    assert all(torch.equal(a, b) for a, b in zip(picks, stock_picks, strict=True))
    torch.testing.assert_close(logits, stock_logits)


def test_casting_the_model_keeps_the_bias_in_float32():
    """`.to(bf16)` / `.half()` cast the weights; the bias keeps its fp32 digits, as the package's own router does."""
    model = add_selection_bias(build_tiny_model("qwen3_moe"))
    with torch.no_grad():
        for bias in biases_of(model).values():
            bias.copy_(torch.linspace(-0.05, 0.05, bias.numel()) + 1e-4)
    before = {name: bias.clone() for name, bias in biases_of(model).items()}
    for cast in (lambda m: m.to(torch.bfloat16), lambda m: m.half()):
        cast(model)
        assert model.lm_head.weight.dtype != torch.float32
        for name, bias in biases_of(model).items():
            assert bias.dtype == torch.float32 and torch.equal(bias, before[name]), name
