"""Counting: which router calls count, padding and padding-free masks, recomputation, measurements, threads."""

import copy
import sys
import threading

import pytest
import torch

from conftest import TOP_K, ToyModel, ToyRouter, padded_batch, record_topk, tiny_model
from hf_lossfree_moe import LossFreeBalancer, compute_maxvio
from hf_lossfree_moe.counting import QuantileCandidates, QuantileHistograms


def test_counts_are_exact_and_exclude_padding(model):
    calls = record_topk(model)
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([12, 7, 3])
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids)

    real = attention_mask.reshape(-1).bool()
    expected = torch.stack([torch.bincount(calls[r][0][real].reshape(-1), minlength=8) for r in model.routers()])
    assert torch.equal(balancer.loads, expected)
    assert balancer.loads.dtype == torch.int64
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 22, TOP_K * 22]


def test_positional_attention_mask_also_excludes_padding(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([5, 2])
    model(input_ids, attention_mask)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 7, TOP_K * 7]


def test_without_mask_every_token_counts(model):
    balancer = LossFreeBalancer(model)
    model(torch.randint(3, 128, (2, 6)))
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 12, TOP_K * 12]


def test_eval_forwards_do_not_touch_training_counts(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([9, 4])
    model(input_ids=input_ids, attention_mask=attention_mask)
    before = balancer.loads

    model.eval()
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(balancer.loads, before)

    model.train()
    with balancer.measure() as measurement:
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert torch.equal(balancer.loads, before)
    assert torch.equal(measurement.loads, before)  # same weights and biases: same routing
    assert measurement.maxvio_global == pytest.approx(compute_maxvio(before).mean)


def test_eval_only_measurement_leaves_training_forwards_to_step(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([6, 6])
    with balancer.measure(eval_only=True) as measurement:
        model(input_ids=input_ids, attention_mask=attention_mask)
        model.eval()
        model(input_ids=input_ids[:1], attention_mask=attention_mask[:1])
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 12] * 2
    assert measurement.loads.sum(dim=-1).tolist() == [TOP_K * 6] * 2


def test_generation_with_cache_counts_each_new_token_once(model):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
    input_ids, attention_mask = input_ids.flip(1), attention_mask.flip(1)  # left padding for generation
    model.eval()
    with balancer.measure() as measurement:
        model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=4, min_new_tokens=4, do_sample=False)
    # the prompt's 8 real tokens, then one forward per new token but the last: 2 rows x 3
    assert measurement.loads.sum(dim=-1).tolist() == [TOP_K * (8 + 2 * 3)] * 2


def test_two_half_batches_count_like_one_full_batch(model):
    balancer = LossFreeBalancer(model, frozen=True)
    input_ids, attention_mask = padded_batch([12, 5, 9, 2])
    model(input_ids=input_ids, attention_mask=attention_mask)
    full = balancer.loads
    balancer.step()
    assert balancer.loads.sum() == 0

    model(input_ids=input_ids[:2], attention_mask=attention_mask[:2])
    model(input_ids=input_ids[2:], attention_mask=attention_mask[2:])
    assert torch.equal(balancer.loads, full)


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_counts_each_token_once(model, reentrant):
    balancer = LossFreeBalancer(model, frozen=True)
    input_ids, attention_mask = padded_batch([10, 6])
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    plain = balancer.loads
    balancer.step()

    router_calls = []
    model.routers()[0].register_forward_hook(lambda *args: router_calls.append(1))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert len(router_calls) == 2  # the backward pass did recompute the router
    assert torch.equal(balancer.loads, plain)


def packed_batch(lengths, pad_to, pad_token_id=0):
    """One padding-free row as TRL's collator builds it: position ids restart at 0 per sequence, each sequence's
    first label is -100, and `pad_to` pads the row with position 0, label -100 and the pad id."""
    input_ids = torch.cat([torch.randint(3, 128, (n,)) for n in lengths])
    position_ids = torch.cat([torch.arange(n) for n in lengths])
    labels = input_ids.masked_fill(position_ids == 0, -100)
    padding = pad_to - input_ids.numel()
    return {
        "input_ids": torch.cat([input_ids, torch.full((padding,), pad_token_id)])[None],
        "position_ids": torch.cat([position_ids, torch.zeros(padding, dtype=torch.long)])[None],
        "labels": torch.cat([labels, torch.full((padding,), -100)])[None],
    }


def test_trailing_padding_of_a_padding_free_batch_is_not_counted(model):
    balancer = LossFreeBalancer(model)
    model(**packed_batch([5, 1, 4], pad_to=16))  # a real one-token sequence, then 6 pad tokens
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 10] * 2

    balancer.step()
    batch = packed_batch([5, 4], pad_to=16)
    batch["input_ids"][0, -1] = 7  # the row ends with a token that is not the pad id: nothing says it is padding
    model(**batch)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 16] * 2

    balancer.step()
    batch = packed_batch([5, 4], pad_to=16)
    model(**{key: value for key, value in batch.items() if key != "labels"})  # no labels: every token counts
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 16] * 2


def test_the_mask_must_fit_the_routed_tokens():
    model = ToyModel(ToyRouter(torch.rand(6, 4), top_k=2)).train()
    LossFreeBalancer(model)
    with pytest.raises(ValueError, match="does not fit the attention_mask"):
        model(attention_mask=torch.ones(4, 2))


def test_a_deep_copy_of_the_model_leaves_the_balancer_and_its_process_group_alone(model):
    """Process groups refuse to be copied; the copy's forwards must neither fail nor add to the balancer's counts."""

    class ProcessGroupStandIn:
        def __deepcopy__(self, memo):
            raise TypeError("cannot pickle 'ProcessGroup' object")

    balancer = LossFreeBalancer(model, process_group=ProcessGroupStandIn())
    clone = copy.deepcopy(model).train()
    input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
    clone(input_ids=input_ids, attention_mask=attention_mask)
    assert balancer.loads.sum() == 0
    model(input_ids=input_ids, attention_mask=attention_mask)
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 8] * 2  # 8 real tokens, top-2, per layer


class Stop:
    """Stops the first forward of the thread named `thread_name` that reaches `module`, until `resume` is set.

    On the first MoE layer: the model call has taken its padding mask, and no router of it has counted yet.
    """

    def __init__(self, module, thread_name: str):
        self.thread_name = thread_name
        self.inside, self.resume = threading.Event(), threading.Event()
        module.register_forward_pre_hook(self._pause)

    def _pause(self, module, args):
        if threading.current_thread().name == self.thread_name and not self.inside.is_set():
            self.inside.set()
            assert self.resume.wait(timeout=60)


def start_thread(name: str, target) -> tuple[threading.Thread, list[BaseException]]:
    """`target` running in a thread named `name`, and the list that will hold what it raised."""
    errors = []

    def run():
        try:
            target()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, name=name)
    thread.start()
    return thread, errors


def test_a_padded_training_forward_counts_its_own_tokens_while_another_thread_generates(model):
    """Async rollouts: the trainer's padded forward stops inside the model, a sampling thread's generate() enters it
    with a mask of its own and stops there too, and only then do the trainer's routers count: its 8 real tokens."""
    balancer = LossFreeBalancer(model)
    input_ids = torch.randint(3, 128, (2, 8))
    attention_mask = torch.tensor([[1] * 6 + [0] * 2, [1] * 2 + [0] * 6])  # 8 real tokens of 16
    with balancer.measure() as alone:
        model(input_ids=input_ids, attention_mask=attention_mask)
    assert alone.loads.sum(dim=-1).tolist() == [8 * TOP_K] * 2
    prompt = torch.randint(3, 128, (2, 8))  # the same shape, unpadded: the sampler's mask would count all 16

    trainer_stop, sampler_stop = Stop(model.model.layers[1], "trainer"), Stop(model.model.layers[1], "sampler")
    trainer, errors = start_thread("trainer", lambda: model(input_ids=input_ids, attention_mask=attention_mask))
    sampler = None
    try:
        assert trainer_stop.inside.wait(timeout=60)
        sampler, sampler_errors = start_thread(
            "sampler", lambda: model.generate(prompt, max_new_tokens=2, do_sample=False)
        )
        errors += sampler_errors
        assert sampler_stop.inside.wait(timeout=60)
        trainer_stop.resume.set()  # the trainer's routers count while the sampler is inside its own forward
        trainer.join(timeout=60)
    finally:
        trainer_stop.resume.set()
        sampler_stop.resume.set()
        trainer.join()
        if sampler is not None:
            sampler.join()
    assert not errors, errors
    assert torch.equal(balancer.loads, alone.loads)


def test_a_measurement_counts_only_the_forwards_of_its_own_thread(model):
    """A measurement running in one thread neither takes another thread's training forwards nor counts them."""
    balancer = LossFreeBalancer(model)
    train_ids, measured_ids = torch.randint(3, 128, (2, 6)), torch.randint(3, 128, (1, 5))
    with balancer.measure() as expected_measured:
        model(input_ids=measured_ids)
    with balancer.measure() as expected_train:
        model(input_ids=train_ids)

    stop = Stop(model.model.layers[1], "measurer")
    measured = {}

    def measure():
        with balancer.measure() as measurement:
            model(input_ids=measured_ids)
        measured["loads"] = measurement.loads

    measurer, errors = start_thread("measurer", measure)
    try:
        assert stop.inside.wait(timeout=60)
        model(input_ids=train_ids)  # while the other thread's measurement counts
    finally:
        stop.resume.set()
        measurer.join()
    assert not errors, errors
    assert torch.equal(measured["loads"], expected_measured.loads)
    assert torch.equal(balancer.loads, expected_train.loads)


def test_a_measurement_of_all_threads_counts_another_threads_forward(model):
    balancer = LossFreeBalancer(model)
    input_ids = torch.randint(3, 128, (2, 6))
    with balancer.measure(all_threads=True) as measurement:
        other = threading.Thread(target=lambda: model(input_ids=input_ids))
        other.start()
        other.join()
    assert measurement.loads.sum(dim=-1).tolist() == [12 * TOP_K] * 2  # 12 tokens, top-2
    assert balancer.loads.sum() == 0


def test_a_measurement_counts_the_worker_of_its_threads_generate_batch():
    """Continuous batching decodes in a worker thread: its forwards belong to the thread that called generate_batch."""

    class BatchGenerating(ToyModel):
        def generate_batch(self, num_forwards):
            worker = threading.Thread(target=lambda: [self() for _ in range(num_forwards)])
            worker.start()
            worker.join()

    model = BatchGenerating(ToyRouter(torch.rand(6, 4), top_k=2)).eval()
    balancer = LossFreeBalancer(model)
    with balancer.measure() as measurement:
        model.generate_batch(3)
    assert measurement.loads.sum().item() == 3 * 6 * 2  # 3 forwards of 6 tokens, top-2
    assert balancer.loads.sum() == 0


def test_a_measurement_stopped_during_a_forward_leaves_the_others_counting_it(model):
    """The hooks read the measurements in progress while another thread may stop one: as if stopped right as a router
    reads the first, the second still counts that router's call."""
    balancer = LossFreeBalancer(model)
    input_ids = torch.randint(3, 128, (2, 6))
    first, second = balancer.measure(all_threads=True).start(), balancer.measure(all_threads=True).start()
    accepts = first.accepts

    def stopped_while_read(*args):
        first.accepts = accepts  # once: at the first router's call
        first.stop()
        return accepts(*args)

    first.accepts = stopped_while_read
    model(input_ids=input_ids)
    assert second.stop().loads.sum(dim=-1).tolist() == [12 * TOP_K] * 2


def test_quantile_candidates_added_by_many_threads_at_once_are_all_summed():
    candidates = QuantileCandidates(1, 4)
    threads, adds = 4, 2000
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the read-modify-write too
    try:
        workers = [
            threading.Thread(target=lambda: [candidates.add(0, torch.ones(4)) for _ in range(adds)])
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(switch_interval)
    sums, calls = candidates.stacked(torch.device("cpu"))
    assert sums.tolist() == [[threads * adds] * 4] and calls.tolist() == [[threads * adds]]


def binned_tokens(balancer) -> list[int]:
    """The tokens in each router's global-quantile histogram (every token counts once per expert; expert 0's row)."""
    stacked = balancer._counter.histograms.stacked(balancer.device)  # (routers, E * (bins + 2) + 1)
    return stacked[:, : (stacked.size(-1) - 1) // balancer.num_experts].sum(dim=-1).long().tolist()


@pytest.mark.parametrize("reentrant", [True, False])
def test_global_quantile_histograms_bin_only_real_training_tokens(reentrant):
    model = tiny_model(bias_update_rule="quantile", bias_quantile_solver="global_histogram")
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([10, 6, 3])
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert binned_tokens(balancer) == [19, 19]  # padding left out
    stacked = balancer._counter.histograms.stacked(balancer.device)
    assert stacked[:, -1].tolist() == [19 * TOP_K] * 2  # the expert choices behind them

    model.eval()
    model(input_ids=input_ids, attention_mask=attention_mask)
    model.train()
    with balancer.measure():
        model(input_ids=input_ids, attention_mask=attention_mask)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    assert binned_tokens(balancer) == [38, 38]  # evaluation, measurement and recomputation left out

    balancer.step()
    assert binned_tokens(balancer) == [0, 0]  # the next step starts afresh


def test_a_steps_histograms_keep_the_bins_of_its_first_call():
    model = tiny_model(bias_update_rule="quantile", bias_quantile_solver="global_histogram")
    balancer = LossFreeBalancer(model, bias_quantile_histogram_bins=10)
    model(torch.randint(3, 128, (2, 6)))
    balancer.settings.bias_quantile_histogram_bins = 20  # takes effect at the next step
    model(torch.randint(3, 128, (2, 6)))
    assert balancer._counter.histograms.stacked(balancer.device).shape == (2, 8 * 12 + 1)
    assert binned_tokens(balancer) == [24, 24]
    balancer.step()
    model(torch.randint(3, 128, (2, 6)))
    assert balancer._counter.histograms.stacked(balancer.device).shape == (2, 8 * 22 + 1)


def test_quantile_histograms_added_by_many_threads_at_once_are_all_summed():
    histograms = QuantileHistograms(1, 4, lambda: (2, 1.0))
    scores = torch.tensor([[0.9, 0.1, 0.2, 0.3]])  # margins [0.6, -0.2, -0.1, 0.0]: bins 2, 1, 1, 2 of 4
    threads, adds = 4, 500
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as possible, inside the read-modify-write too
    try:
        workers = [
            threading.Thread(target=lambda: [histograms.add(0, scores, torch.zeros(4), 1, None) for _ in range(adds)])
            for _ in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        sys.setswitchinterval(switch_interval)
    calls = threads * adds
    stacked, layout = histograms.take(torch.device("cpu"))
    assert layout == (2, 1.0)
    assert stacked.tolist() == [[0, 0, calls, 0, 0, calls, 0, 0, 0, calls, 0, 0, 0, 0, calls, 0, calls]]


@pytest.mark.parametrize("reentrant", [True, False])
def test_quantile_candidates_survive_activation_checkpointing_and_count_each_call_once(reentrant):
    model = tiny_model(bias_update_rule="quantile")
    balancer = LossFreeBalancer(model)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": reentrant})
    input_ids, attention_mask = padded_batch([10, 6, 3])
    model(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss.backward()
    _, calls = balancer._counter.candidates.stacked(balancer.device)
    assert calls.flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize("rule", ["sign", "quantile"])
def test_a_step_without_the_global_solver_allocates_no_histogram(rule):
    """The step of the sign rule (the default) or of the per-call solver builds no histogram: at DeepSeek-V3 size
    the stacked zeros alone would be 58 x 256 x 1002 fp64 values, 119 MB, at every step."""
    model = tiny_model(bias_update_rule=rule)
    balancer = LossFreeBalancer(model, bias_quantile_histogram_bins=100_000)
    model(torch.randint(3, 128, (2, 6)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as profile:
        balancer.step()
    allocated = sum(max(event.self_cpu_memory_usage, 0) for event in profile.events())
    histograms = 2 * 8 * 100_002 * 8  # 2 routers x 8 experts x (bins + 2) fp64 values: 12.8 MB
    assert allocated < histograms / 10
