import json
import struct

import pytest
import torch
from transformers import TrainerControl, TrainerState, TrainingArguments

from hf_lossfree_moe import LossFreeBalancingCallback, LossFreeMoeForCausalLM, plotting
from hf_lossfree_moe.plotting import (
    RoutingHistory,
    RoutingHistoryRecorder,
    draw_run_plots,
    layer_labels,
    plot_maxvio_batch,
)
from hf_lossfree_moe.run_files import BIAS_PLOT, LOAD_HEATMAP_PLOT, MAXVIO_PLOT, ROUTING_HISTORY_FILE
from hf_lossfree_moe_scripts import plot as plot_script


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROUTERS = ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]


def png_size(path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which follows the signature."""
    header = path.read_bytes()[:24]
    assert header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR"
    return struct.unpack(">II", header[16:24])


@pytest.fixture
def finished_run(tmp_path):
    """A run folder as `scripts/train.py` leaves it: 3 logs of 2 MoE layers x 8 experts, then an evaluation."""
    log_history = [
        {
            "step": step,
            "loss": 6.0 - step / 10,
            "maxvio_batch": mv,
            "maxvio_batch/layer_1": mv,
            "maxvio_batch/layer_2": mv,
        }
        for step, mv in ((10, 3.0), (20, 1.0), (30, 0.2))
    ]
    log_history.append({"step": 30, "eval_loss": 3.0, "eval_maxvio_global": 0.1})
    (tmp_path / "trainer_state.json").write_text(json.dumps({"log_history": log_history}))
    history = RoutingHistory(
        router_names=ROUTERS,
        steps=[0, 10, 20, 30],
        biases=[[[0.001 * step * (e - 3.5) for e in range(8)] for _ in ROUTERS] for step in (0, 10, 20, 30)],
        eval_loads=[[100 + 10 * e for e in range(8)], [135] * 8],
    )
    history.save(tmp_path / ROUTING_HISTORY_FILE)
    return tmp_path


def test_every_plot_of_a_finished_run_is_a_readable_png(finished_run):
    paths = draw_run_plots(finished_run)
    assert sorted(path.name for path in paths) == sorted([MAXVIO_PLOT, BIAS_PLOT, LOAD_HEATMAP_PLOT])
    for path in paths:
        width, height = png_size(path)
        assert width >= 600 and height >= 250  # readable at a glance, not a thumbnail
        assert path.stat().st_size > 10_000  # axes, lines and labels, not an empty canvas


def test_plots_need_the_run_files(tmp_path):
    with pytest.raises(ValueError, match="holds no trainer_state.json"):
        draw_run_plots(tmp_path)


def test_maxvio_plot_refuses_a_log_history_without_balancing_metrics(tmp_path):
    with pytest.raises(ValueError, match="no 'maxvio_batch' entry"):
        plot_maxvio_batch([{"step": 1, "loss": 2.0}], ROUTERS, tmp_path / "p.png")


def test_routing_history_round_trips_through_json(tmp_path):
    history = RoutingHistory(router_names=ROUTERS, steps=[0, 5], biases=[[[0.0]], [[0.5]]], eval_loads=[[3, 4]])
    history.save(tmp_path / "h.json")
    assert RoutingHistory.load(tmp_path / "h.json") == history


@pytest.fixture
def drawn_labels(monkeypatch):
    """The layer labels of each figure `draw_run_plots` draws (legend, heatmap rows, bias panels), by file name."""
    labels = {}

    def keep(fig, path):
        texts = [text.get_text() for ax in fig.axes if ax.get_legend() for text in ax.get_legend().get_texts()]
        texts += [ax.get_title() for ax in fig.axes] + [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
        labels[path.name] = [text for text in texts if text.startswith("layer ")]
        return path

    monkeypatch.setattr(plotting, "_save", keep)
    return labels


def test_plots_number_layers_as_the_run_logged_them(finished_run, drawn_labels):
    """Recorded layer numbers win over the router names; a file from before they were recorded reads the names."""
    state = finished_run / "trainer_state.json"
    state.write_text(state.read_text().replace("/layer_1", "/layer_5").replace("/layer_2", "/layer_7"))
    history = RoutingHistory.load(finished_run / ROUTING_HISTORY_FILE)
    history.layers = [5, 7]
    history.save(finished_run / ROUTING_HISTORY_FILE)
    draw_run_plots(finished_run)
    assert drawn_labels == {name: ["layer 5", "layer 7"] for name in (MAXVIO_PLOT, LOAD_HEATMAP_PLOT, BIAS_PLOT)}

    old_file = json.loads((finished_run / ROUTING_HISTORY_FILE).read_text())
    del old_file["layers"]
    (finished_run / ROUTING_HISTORY_FILE).write_text(json.dumps(old_file))
    draw_run_plots(finished_run)
    assert drawn_labels == {name: ["layer 1", "layer 2"] for name in (MAXVIO_PLOT, LOAD_HEATMAP_PLOT, BIAS_PLOT)}


def test_every_plot_says_what_its_layer_numbers_are(finished_run, monkeypatch):
    """The MoE layers are 1 and 2 of a model whose layer 0 is dense: each figure says so under its axes."""
    captions = {}
    monkeypatch.setattr(plotting, "_save", lambda fig, path: captions.setdefault(path.name, fig.get_supxlabel()))
    draw_run_plots(finished_run)
    expected = "layer i: the decoder layer index as the model numbers them (model.model.layers[i]);\nlayer 0 is dense"
    assert captions == {name: f"{expected} (no router)" for name in (MAXVIO_PLOT, LOAD_HEATMAP_PLOT, BIAS_PLOT)}


@pytest.mark.parametrize(
    ("layers", "caption_end"),
    [([1, 2], "layer 0 is dense (no router)"), ([2, 3], "layer 0, 1 are dense (no router)"), ([0, 1], "layers[i])")],
)
def test_layer_caption_names_the_dense_layers(layers, caption_end):
    assert plotting.layer_caption(layers).endswith(caption_end)


@pytest.mark.parametrize(
    ("names", "labels"),
    [
        (["model.layers.1.mlp.gate", "model.layers.12.mlp.gate"], ["layer 1", "layer 12"]),
        (["gate", "model.layers.3.mlp.gate"], ["layer 0", "layer 1"]),  # a name without a layer: by position
        (["layers.2.mlp.text.gate", "layers.2.mlp.vision.gate"], ["layer 0", "layer 1"]),  # two routers in one layer
    ],
)
def test_layer_labels_use_the_decoder_layer_index(names, labels):
    assert layer_labels(names) == labels


def test_recorder_keeps_biases_per_training_log_and_the_eval_loads(tiny_config, tmp_path):
    model = LossFreeMoeForCausalLM(tiny_config())
    balancing = LossFreeBalancingCallback()
    balancing.attach(model)
    recorder = RoutingHistoryRecorder(balancing)
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none")
    state, control = TrainerState(), TrainerControl()

    recorder.on_train_begin(args, state, control)
    for router in model.routers():
        router.e_score_correction_bias.fill_(0.25)
    state.global_step = 10
    recorder.on_log(args, state, control, logs={"loss": 1.0})
    recorder.on_log(args, state, control, logs={"eval_loss": 1.0})  # evaluations add no snapshot
    recorder.on_train_end(args, state, control)  # step 10 is already recorded
    balancing.last_eval_loads = torch.tensor([[1, 2] * 4, [3, 4] * 4])
    recorder.on_evaluate(args, state, control)
    (tmp_path / "checkpoint-10").mkdir()
    balancing.write_checkpoint_files(tmp_path / "checkpoint-10", state.global_step)

    history = RoutingHistory.load(tmp_path / "checkpoint-10" / ROUTING_HISTORY_FILE)
    assert history.router_names == ["model.layers.1.mlp.gate", "model.layers.2.mlp.gate"]
    assert history.steps == [0, 10]
    assert history.biases == [[[0.0] * 8] * 2, [[0.25] * 8] * 2]
    assert history.eval_loads == [[1, 2] * 4, [3, 4] * 4]


def test_plot_script_redraws_a_run_and_explains_a_wrong_folder(finished_run, tmp_path, capsys):
    plot_script.main([str(finished_run)])
    printed = capsys.readouterr().out.split()
    assert sorted(printed) == sorted(str(finished_run / name) for name in (MAXVIO_PLOT, LOAD_HEATMAP_PLOT, BIAS_PLOT))
    with pytest.raises(SystemExit, match="error: .* holds no trainer_state.json"):
        plot_script.main([str(tmp_path / "empty")])
