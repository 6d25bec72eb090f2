#!/usr/bin/env python
"""Write docs/support_table.md, the status of every transformers MoE family under `LossFreeBalancer`.

Every MoE family of the installed transformers (`moe_families()`) is built tiny on CPU (`build_tiny_model`) and checked
the way the tests check it: one training forward with padding must count exactly top-K real tokens per router, and
one `step()` must move each bias by the sign rule. A family is

- balanced with its own bias: its routers carry an `e_score_correction_bias`;
- measure-only: its routers return their top-K choice but have no bias; "opt-in bias" where
  `add_selection_bias` can give them one (checked the same way, after adding it);
- unsupported, with the reason: no module of it returns its top-K choice, or it cannot be built tiny on CPU.

The table also says where the bias lives, which adapter reads the router, whether routing is group-limited, and
what dtype the bias has after `from_pretrained(..., dtype=torch.bfloat16)`. A few minutes on a laptop CPU.

    python scripts/support_table.py                                  # writes docs/support_table.md
    python scripts/support_table.py --output_file /dev/stdout
"""

import inspect
import re
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import HfArgumentParser
from transformers.utils import logging

from hf_lossfree_moe import LossFreeBalancer
from hf_lossfree_moe.routers import find_routers
from hf_lossfree_moe.selection_bias import add_selection_bias, supports_selection_bias
from hf_lossfree_moe.testing_utils import build_tiny_model, moe_families, tiny_model_class


TOP_K = 2  # build_tiny_model routes each token to 2 of 8 experts
UPDATE_RATE = 1e-3
BALANCED = "balanced with its own bias"
MEASURED = "measure-only"
OPT_IN = "measure-only; opt-in bias"
UNSUPPORTED = "unsupported"
HEADER = (
    "| family | tiny model | router | bias | adapter | group-limited | bias after bf16 load | status |\n"
    "|---|---|---|---|---|---|---|---|"
)


@dataclass
class TableArguments:
    output_file: str = field(default="docs/support_table.md", metadata={"help": "Where to write the Markdown."})


def layer_relative(name: str) -> str:
    """`model.layers.0.mlp.gate` -> `mlp.gate`: where the module sits inside a decoder layer."""
    return re.sub(r"^.*?layers\.\d+\.", "", name)


def module_name(model: torch.nn.Module, module: torch.nn.Module) -> str:
    return next(name for name, candidate in model.named_modules() if candidate is module)


def verify(model: torch.nn.Module, measure_only: bool = False) -> str:
    """'verified' when counts (and, unless `measure_only`, the first update) are exact, else what went wrong."""
    balancer = LossFreeBalancer(model, bias_update_rate=0.0 if measure_only else UPDATE_RATE)
    input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0
    before = balancer.biases()
    with torch.no_grad():
        model.train()(input_ids=input_ids.masked_fill(attention_mask == 0, 0), attention_mask=attention_mask)
    loads = balancer.loads  # (L, E)
    balancer.step()
    balancer.remove()
    routed = loads.sum(dim=-1) > 0  # (L,)
    if not routed.any() or set(loads[routed].sum(dim=-1).tolist()) != {TOP_K * int(attention_mask.sum())}:
        return f"counts {loads.sum(dim=-1).tolist()} != top-{TOP_K} x {int(attention_mask.sum())} real tokens"
    if measure_only:
        return "verified"
    mean = loads.double().mean(dim=-1, keepdim=True)  # (L, 1)
    expected = torch.where(routed.unsqueeze(-1), UPDATE_RATE * torch.sign(mean - loads), 0.0).float()
    if not torch.allclose(balancer.biases() - before, expected):
        return "the bias did not follow the sign rule"
    return "verified"


def bf16_load_dtype(family: str, model: torch.nn.Module) -> str:
    with tempfile.TemporaryDirectory() as folder:
        try:
            model.save_pretrained(folder)
            loaded = tiny_model_class(family).from_pretrained(folder, dtype=torch.bfloat16)
        except Exception as error:  # the table reports the family's own save/load failure
            return f"save/load fails ({type(error).__name__})"
    dtype = {getattr(router.bias_owner, router.bias_attr).dtype for router in find_routers(loaded)}
    return "fp32" if dtype == {torch.float32} else "**bf16** (upcast by the balancer)"


def router_outputs(model: torch.nn.Module) -> str:
    """What the modules that look like routers (a class name with Router, Gate or Gating) return on one forward, for
    a family none of whose modules returns its top-K choice."""
    seen = {}

    def describe(module, args, output):
        outputs = output if isinstance(output, tuple) else (output,)
        shapes = ", ".join(
            f"{tuple(o.shape)} {str(o.dtype).removeprefix('torch.')}"
            if isinstance(o, torch.Tensor)
            else type(o).__name__
            for o in outputs
        )
        seen.setdefault(type(module).__name__, f"`{type(module).__name__}` returns ({shapes})")

    hooks = [
        module.register_forward_hook(describe)
        for module in model.modules()
        if re.search(r"Router|Gate|Gating", type(module).__name__)
    ]
    try:
        with torch.no_grad():
            input_ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(0))
            decoder = {"decoder_input_ids": input_ids} if getattr(model.config, "is_encoder_decoder", False) else {}
            model.train()(input_ids=input_ids, **decoder)
    except Exception as error:  # the forward's own failure is the reason reported
        return f"a training forward fails ({type(error).__name__}: {_first_line(error)})"
    finally:
        for hook in hooks:
            hook.remove()
    if not seen:
        return "no router module runs in a text forward"
    return (
        "; ".join(seen.values())
        + " (16 tokens): none returns the (logits, weights, (tokens, top_k) indices) the balancer reads"
    )


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0][:160].replace("|", "/") if str(error).strip() else ""


def unsupported_row(family: str, class_name: str, reason: str) -> str:
    return f"| `{family}` | {class_name} | | | | | | {UNSUPPORTED}: {reason} |"


def row(family: str) -> str:
    try:
        model_class = tiny_model_class(family)
    except ValueError as error:
        return unsupported_row(family, "", _first_line(error))
    try:
        torch.manual_seed(0)
        model = build_tiny_model(family)
    except Exception as error:  # a family that cannot be built tiny on CPU is reported, not hidden
        reason = f"cannot be built tiny on CPU ({type(error).__name__}: {_first_line(error)})"
        return unsupported_row(family, f"`{model_class.__name__}`", reason)
    routers = find_routers(model)
    if not routers:
        return unsupported_row(family, f"`{model_class.__name__}`", router_outputs(model))
    router = routers[0]
    grouped = "yes" if "topk_group" in inspect.getsource(type(router.module)) else "no"
    try:
        if router.has_bias:
            bias = getattr(router.bias_owner, router.bias_attr)
            storage = "`nn.Parameter`" if isinstance(bias, torch.nn.Parameter) else "buffer"
            owner = layer_relative(module_name(model, router.bias_owner))
            where = f"{storage} `{owner}.{router.bias_attr}` {tuple(bias.shape)}"
            status, bf16 = _status(BALANCED, verify(model)), bf16_load_dtype(family, model)
        else:
            where, bf16 = "none", ""
            status = _status(MEASURED, verify(model, measure_only=True))
            if status == MEASURED and supports_selection_bias(type(router.module)):
                status = _status(OPT_IN, verify(add_selection_bias(model)))
    except Exception as error:  # the tiny model's own failure is the reason reported
        reason = f"a training forward of the tiny model fails ({type(error).__name__}: {_first_line(error)})"
        return unsupported_row(family, f"`{model_class.__name__}`", reason)
    return (
        f"| `{family}` | `{model_class.__name__}` | `{layer_relative(router.name)}` | {where} | {router.adapter.name} "
        f"| {grouped} | {bf16} | {status} |"
    )


def _status(status: str, check: str) -> str:
    return status if check == "verified" else f"{status}, **check failed**: {check}"


def render_table(rows: list[str]) -> str:
    counts = {status: sum(f"| {status}" in row for row in rows) for status in (BALANCED, OPT_IN, MEASURED)}
    counts[MEASURED] -= counts[OPT_IN]  # "measure-only; opt-in bias" also starts with "measure-only"
    counts[UNSUPPORTED] = sum(f"| {UNSUPPORTED}:" in row for row in rows)
    return "\n".join(
        [
            f"Every mixture-of-experts family of transformers {transformers.__version__} ({len(rows)}), each built tiny "
            f"(hidden 64, 8 experts, top-{TOP_K}) and checked by `scripts/support_table.py`: one training forward "
            "counts exactly top-K real tokens per router (padding excluded), and for a family with a bias one "
            "`step()` moves every bias by the sign rule. Text decoders only: vision and audio towers are not built. "
            "What the statuses mean: [families.md](families.md#support-status).",
            "",
            ", ".join(f"{status}: {count}" for status, count in counts.items()),
            "",
            HEADER,
            *rows,
            "",
        ]
    )


def main():
    (args,) = HfArgumentParser(TableArguments).parse_args_into_dataclasses()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.simplefilter("ignore")  # the balancer's bf16 and requires_grad warnings are what the table reports
    table = render_table([row(family) for family in moe_families()])
    Path(args.output_file).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output_file).write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    main()
