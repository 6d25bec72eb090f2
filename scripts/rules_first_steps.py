"""MaxVio_batch over the first steps for every update rule, and the balance figures of each run, from finished runs.

Reads the replay's `results.json` (runs of `--ablations rules`) and any number of `routing_dynamics.py` outputs (runs
of a setting the replay file lacks, same scale and seeds), prints per run the figures the comparison reports, and
draws one line per setting (mean over seeds, the band spans the seeds) over the first `--steps` steps.

    python scripts/rules_first_steps.py --results docs/results/rules/results.json \\
        --dynamics annealed_seed0.json annealed_seed1.json annealed_seed2.json --output first_steps.png
"""

import argparse
import json
from pathlib import Path

import torch
from matplotlib.figure import Figure

from hf_lossfree_moe_scripts.reproduce.methods import METHODS
from hf_lossfree_moe_scripts.reproduce.runs import COLLAPSE_PHASE_STEPS, final_mean


def run_figures(curve: list[float]) -> dict:
    """Peak after the collapse phase, steps above 1.0 after it, the first step from which the curve stays <= 1.0."""
    after = curve[COLLAPSE_PHASE_STEPS:]
    last_above = max((step for step, value in enumerate(curve, start=1) if value > 1.0), default=0)
    return {
        "peak_after_50": max(after),
        "steps_above_1_after_50": sum(value > 1.0 for value in after),
        "last_step_above_1": last_above,
        "final_maxvio_batch": final_mean(curve),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", required=True)
    parser.add_argument("--dynamics", nargs="*", default=[])
    parser.add_argument(
        "--method", default="loss_free_quantile_annealed", help="The replay method the --dynamics runs trained."
    )
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--output", required=True)
    parser.add_argument("--summary", help="Write the --dynamics runs' figures and MaxVio_batch curves here (JSON).")
    args = parser.parse_args(argv)
    curves: dict[str, list[list[float]]] = {}
    summary = []
    for run in json.loads(Path(args.results).read_text(encoding="utf-8"))["runs"]:
        label = METHODS[run["method"]].label
        curves.setdefault(label, []).append(run["maxvio_batch"])
        figures = run_figures(run["maxvio_batch"])
        print(label, run["seed"], run["val_perplexity"], run["maxvio_global"], run["maxvio_global_train"], figures)
    for path in args.dynamics:
        run = json.loads(Path(path).read_text(encoding="utf-8"))
        curve = [step["maxvio_batch"] for step in run["steps"]]
        curves.setdefault(METHODS[args.method].label, []).append(curve)
        held_out = run["maxvio_global"]
        train_blocks = run.get("probe", {}).get("final", {}).get("maxvio_train")
        summary.append(
            {
                "method": args.method,
                "config": run["config"],
                "seed": run["seed"],
                **held_out,
                "maxvio_global_train": train_blocks,
                **run_figures(curve),
                "probe": run.get("probe"),
                "maxvio_batch": curve,
            }
        )
        print(
            METHODS[args.method].label,
            run["seed"],
            held_out["val_perplexity"],
            held_out["maxvio_global"],
            train_blocks,
            run_figures(curve),
        )
    fig = Figure(figsize=(7, 5.5), layout="constrained")
    ax = fig.add_subplot()
    for label, runs in curves.items():
        first = torch.tensor([curve[: args.steps] for curve in runs])  # (seeds, steps)
        steps = torch.arange(1, first.size(1) + 1)
        line = ax.plot(steps, first.mean(dim=0), lw=1.2, label=f"{label} ({len(runs)} seeds)")[0]
        if first.size(0) > 1:
            ax.fill_between(steps, first.amin(dim=0), first.amax(dim=0), color=line.get_color(), alpha=0.15)
    ax.axhline(1.0, color="black", ls=":", lw=1)
    ax.axvline(COLLAPSE_PHASE_STEPS, color="grey", ls=":", lw=1)
    ax.set(xlabel="training step", ylabel="MaxVio_batch", title=f"MaxVio_batch over the first {args.steps} steps")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    fig.legend(loc="outside lower center", ncol=1, fontsize=8)
    fig.savefig(args.output, dpi=120)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
