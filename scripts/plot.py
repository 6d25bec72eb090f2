#!/usr/bin/env python
"""Redraw the plots of a training run from its `trainer_state.json` and `routing_history.json`.

Works on the output folder of `scripts/train.py` and on any of its `checkpoint-*` folders:

    python scripts/plot.py outputs/lossfree-moe-tiny
"""

import argparse

from hf_lossfree_moe.plotting import draw_run_plots


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="A run's output folder or checkpoint folder; the plots are written there.")
    args = parser.parse_args(argv)
    try:
        paths = draw_run_plots(args.run_dir)
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    print("\n".join(str(path) for path in paths))


if __name__ == "__main__":
    main()
