"""The names of the files a training run writes into its output folder, beside the model.

`plotting` writes them and `model_card` links them; they live here so that naming a file needs neither matplotlib
nor the Trainer callback.
"""

ROUTING_HISTORY_FILE = "routing_history.json"
TRAINER_STATE_FILE = "trainer_state.json"
MAXVIO_PLOT = "maxvio_batch.png"
LOAD_HEATMAP_PLOT = "eval_load_heatmap.png"
BIAS_PLOT = "bias_trajectories.png"
