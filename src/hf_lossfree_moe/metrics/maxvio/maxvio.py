"""MaxVio: how far the most loaded expert of a MoE layer is above the mean load (Wang et al., 2024)."""

import datasets
import evaluate

from hf_lossfree_moe.balance_metrics import compute_maxvio


_CITATION = """\
@article{wang2024auxiliary,
  title={Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts},
  author={Wang, Lean and Gao, Huazuo and Zhao, Chenggang and Sun, Xu and Dai, Damai},
  journal={arXiv preprint arXiv:2408.15664},
  year={2024}
}
"""

_DESCRIPTION = """\
MaxVio = (max_i Load_i - mean Load) / mean Load, per MoE layer, averaged over layers. Load_i is the number of tokens
routed to expert i: over one training step it gives MaxVio_batch, over a whole validation set MaxVio_global.
0 means perfectly balanced; 1 means the busiest expert does twice the average work. A layer that received no token
has no MaxVio: it is left out of the mean and listed in `skipped_layers`.
"""

_KWARGS_DESCRIPTION = """
Args:
    loads (`list[list[float]]`): one row per MoE layer, the tokens each of its experts received.
Returns:
    maxvio (`float` or `None`): the mean over the layers that received tokens (None if none did).
    maxvio_per_layer (`list[float | None]`): the value of each layer, in row order (None for a skipped layer).
    skipped_layers (`list[int]`): the rows that received no token.
Examples:
    >>> maxvio = evaluate.load("path/to/maxvio")
    >>> maxvio.compute(loads=[[3, 1, 2, 2], [2, 2, 2, 2]])
    {'maxvio': 0.25, 'maxvio_per_layer': [0.5, 0.0], 'skipped_layers': []}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Maxvio(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"loads": datasets.Sequence(datasets.Value("float64"))}),
            reference_urls=["https://arxiv.org/abs/2408.15664"],
        )

    def _compute(self, loads):
        widths = {len(row) for row in loads}
        if len(widths) != 1:
            raise ValueError(f"loads must have one row per layer of equal width, got row widths {sorted(widths)}.")
        result = compute_maxvio(loads)
        return {
            "maxvio": result.mean,
            "maxvio_per_layer": [result.per_layer.get(layer) for layer in range(len(loads))],
            "skipped_layers": list(result.skipped),
        }
