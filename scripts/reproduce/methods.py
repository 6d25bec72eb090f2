"""The load-balancing methods of the replay and the comparisons (tables) that group them."""

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Method:
    """A load-balancing setting: `config` overrides `LossFreeMoeConfig` fields of the shape every method shares.

    `paper` quotes the paper's 1B-model validation perplexity / MaxVio_global where it reports them.
    """

    name: str
    label: str
    config: dict
    paper: str = "—"


METHODS = {
    method.name: method
    for method in (
        Method(
            "aux_loss",
            "Loss-Controlled (aux loss, α=1e-3)",
            {"load_balancing": "aux_loss", "router_aux_loss_coef": 1e-3},
            "9.56 / 0.72",
        ),
        Method("loss_free", "Loss-Free (u=1e-3, sign)", {"load_balancing": "loss_free"}, "9.50 / 0.04"),
        Method("none", "No balancing", {"load_balancing": "none"}),
        Method(
            "loss_free_u1e-4",
            "Loss-Free (u=1e-4, sign)",
            {"load_balancing": "loss_free", "bias_update_rate": 1e-4},
            "9.51 / —",
        ),
        Method(
            "loss_free_u1e-2",
            "Loss-Free (u=1e-2, sign)",
            {"load_balancing": "loss_free", "bias_update_rate": 1e-2},
            "9.51 / —",
        ),
        Method(
            "loss_free_error",
            "Loss-Free (u=1e-3, error rule)",
            {"load_balancing": "loss_free", "bias_update_rule": "error"},
            "9.51 / 0.036",
        ),
        Method(
            "loss_free_multiplicative",
            "Loss-Free (u=1e-3, multiplicative bias)",
            {"load_balancing": "loss_free", "bias_type": "multiplicative"},
            "9.52 / 0.036",
        ),
        Method(
            "softmax_aux_loss",
            "Softmax gate, aux loss (α=3e-4)",
            {"scoring_func": "softmax", "load_balancing": "aux_loss", "router_aux_loss_coef": 3e-4},
            "9.604 / 0.937",
        ),
        Method(
            "softmax_loss_free",
            "Softmax gate, Loss-Free (u=1e-3, sign)",
            {"scoring_func": "softmax", "load_balancing": "loss_free"},
            "9.599 / 0.027",
        ),
        Method(
            "loss_free_quantile",
            "Loss-Free, Quantile Balancing (EMA 0.2)",
            {"load_balancing": "loss_free", "bias_update_rule": "quantile", "bias_quantile_ema": 0.2},
        ),
        Method(
            "loss_free_quantile_no_ema",
            "Loss-Free, Quantile Balancing (no EMA)",
            {"load_balancing": "loss_free", "bias_update_rule": "quantile", "bias_quantile_ema": 1.0},
        ),
        Method(
            "loss_free_quantile_annealed",
            "Loss-Free, Quantile Balancing (annealed: weight 1 for 100 steps, then 100 / n, floor 0.01)",
            {
                "load_balancing": "loss_free",
                "bias_update_rule": "quantile",
                "bias_quantile_ema": 0.01,
                "bias_quantile_anneal_steps": 100,
            },
        ),
        Method(
            "loss_free_batch_balanced",
            "Loss-Free, batch-balanced routing (4 passes) + annealed Quantile Balancing",
            {
                "load_balancing": "loss_free",
                "bias_update_rule": "quantile",
                "bias_quantile_ema": 0.01,
                "bias_quantile_anneal_steps": 100,
                "batch_balance_iterations": 4,
            },
        ),
        Method(
            "loss_free_batch_balanced_early",
            "Loss-Free, batch-balanced routing for 200 steps + annealed Quantile Balancing",
            {
                "load_balancing": "loss_free",
                "bias_update_rule": "quantile",
                "bias_quantile_ema": 0.01,
                "bias_quantile_anneal_steps": 100,
                "batch_balance_iterations": 4,
                "batch_balance_steps": 200,
            },
        ),
        Method(
            "loss_free_smebu",
            "Loss-Free, SMEBU-style (u=1e-2, momentum 0.9)",
            {"load_balancing": "loss_free", "bias_update_rule": "smebu", "bias_update_rate": 1e-2},
        ),
        Method(
            "loss_free_seq_aux",
            "Loss-Free + sequence-wise aux loss (α=1e-4, DeepSeek-V3)",
            {"load_balancing": "loss_free", "router_aux_loss_coef": 1e-4},
        ),
    )
}


# Expert Choice routing (Zhou et al., 2022), the paper's non-causal baseline (RQ4): each expert picks its top tokens of a
# routing chunk of one sequence or the whole batch (16 sequences), with or without shuffling the batch's tokens first.
EXPERT_CHOICE_METHODS = {
    method.name: method
    for method in (
        Method(
            "expert_choice_batch",
            "Expert Choice, chunk = the batch",
            {"load_balancing": "expert_choice"},
        ),
        Method(
            "expert_choice_sequence",
            "Expert Choice, chunk = 1 sequence",
            {"load_balancing": "expert_choice", "expert_choice_chunk_size": 1},
        ),
        Method(
            "expert_choice_sequence_shuffled",
            "Expert Choice, chunk = 1 sequence's worth of shuffled tokens",
            {"load_balancing": "expert_choice", "expert_choice_chunk_size": 1, "expert_choice_shuffle": True},
        ),
    )
}
METHODS.update(EXPERT_CHOICE_METHODS)


def is_expert_choice(method: Method) -> bool:
    """Whether the method routes by Expert Choice: no balancer watches it, its loads come from its routers."""
    return method.config.get("load_balancing") == "expert_choice"


@dataclass(frozen=True)
class Comparison:
    """Methods shown in one table and one MaxVio_batch plot; `name` is how `--ablations` selects it."""

    name: str
    title: str
    methods: tuple[str, ...]


MAIN_COMPARISON = Comparison("main", "Main comparison (sigmoid gate)", ("aux_loss", "loss_free", "none"))
ABLATIONS = {
    comparison.name: comparison
    for comparison in (
        Comparison("update_rate", "Update rate u", ("loss_free_u1e-4", "loss_free", "loss_free_u1e-2")),
        Comparison("rule", "Update rule: sign vs. error", ("loss_free", "loss_free_error")),
        Comparison("bias_type", "Additive vs. multiplicative bias", ("loss_free", "loss_free_multiplicative")),
        Comparison("softmax", "Softmax gate", ("softmax_aux_loss", "softmax_loss_free")),
        Comparison("dsv3", "DeepSeek-V3 combination", ("loss_free", "loss_free_seq_aux")),
        Comparison("quantile", "Quantile Balancing vs. the sign rule", ("loss_free", "loss_free_quantile")),
        Comparison(
            "rules",
            "Post-paper update rules",
            (
                "loss_free",
                "loss_free_quantile",
                "loss_free_quantile_annealed",
                "loss_free_batch_balanced",
                "loss_free_batch_balanced_early",
                "loss_free_smebu",
            ),
        ),
        Comparison(
            "batch_balance",
            "Batch-balanced routing",
            ("loss_free", "loss_free_quantile_annealed", "loss_free_batch_balanced_early"),
        ),
    )
}
ABLATIONS["expert_choice"] = Comparison(
    "expert_choice",
    "Expert Choice and future-token leakage (RQ4)",
    ("loss_free", *EXPERT_CHOICE_METHODS),
)


def select_comparisons(ablations: Sequence[str], include_main: bool = True) -> list[Comparison]:
    """The main comparison (unless `include_main` is False) followed by the named ablations (`"all"` selects every
    one); names may be comma-joined."""
    names = list(dict.fromkeys(name for item in ablations for name in item.split(",") if name))
    names = list(ABLATIONS) if names == ["all"] else names
    unknown = [name for name in names if name not in ABLATIONS]
    if unknown:
        raise ValueError(f"--ablations must be 'all' or names among {sorted(ABLATIONS)}, got {unknown}.")
    if not include_main and not names:
        raise ValueError("--skip_main needs at least one comparison in --ablations.")
    return [MAIN_COMPARISON] * include_main + [ABLATIONS[name] for name in names]


def methods_of(comparisons: Sequence[Comparison]) -> list[Method]:
    """Every method the comparisons need, once each, in order of first appearance."""
    names = dict.fromkeys(name for comparison in comparisons for name in comparison.methods)
    return [METHODS[name] for name in names]
