"""Small-scale replay of the paper's experiments (Wang et al., arXiv 2408.15664), driven by `reproduce_paper.py`.

- methods.py: the load-balancing methods and which of them each comparison (main table, ablations) shows;
- runs.py: the shared model shape and budget, and one run: train with `Trainer` + `LossFreeBalancingCallback`, then
  measure perplexity and MaxVio on held-out blocks;
- report.py: mean ± std over seeds, the Markdown table, the JSON file and the plots;
- loads.py: loads read from the routers themselves, per validation sequence (MaxVio over computation batches of any
  size) and per step of Expert Choice runs, which no balancer watches;
- leakage.py: the bound on what Expert Choice routing can leak, in bits per token;
- batch_report.py: the results page's sections on computation batches (RQ3) and Expert Choice (RQ4).
"""
