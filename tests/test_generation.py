"""Generation never steers the biases: `generate()` and `generate_batch()` forwards are not counted, per thread."""

import copy
import threading

import pytest
import torch

from conftest import TOP_K, ToyModel, ToyRouter, padded_batch
from hf_lossfree_moe import LossFreeBalancer


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("grad", [False, True])
def test_generation_never_counts_toward_step(model, mode, grad):
    balancer = LossFreeBalancer(model)
    input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
    model.train(mode == "train")
    with torch.set_grad_enabled(grad):
        # generate() itself runs without grad; its decoding loop is the same either way
        model.generate(input_ids.flip(1), attention_mask=attention_mask.flip(1), max_new_tokens=3, do_sample=False)
        assert balancer.loads.sum() == 0
        model.train()
        model(input_ids=input_ids, attention_mask=attention_mask)  # a training forward right after counts as ever
    assert balancer.loads.sum(dim=-1).tolist() == [TOP_K * 8] * 2


def test_generate_batch_counts_nothing_even_from_its_worker_thread():
    """Continuous batching decodes in a worker thread while `generate_batch` waits for it."""

    class BatchGenerating(ToyModel):
        def generate_batch(self, num_forwards):
            worker = threading.Thread(target=lambda: [self() for _ in range(num_forwards)])
            worker.start()
            worker.join()

    model = BatchGenerating(ToyRouter(torch.rand(6, 4), top_k=2)).train()
    balancer = LossFreeBalancer(model)
    model.generate_batch(3)
    assert balancer.loads.sum() == 0
    model()
    assert balancer.loads.sum() == 6 * 2


def test_a_deep_copy_of_the_model_is_not_watched(model):
    """Reference models are deep copies: their forwards must not count, their generate() must decode with the copy."""
    balancer = LossFreeBalancer(model)
    clone = copy.deepcopy(model).train()
    clone(torch.randint(3, 128, (2, 6)))
    assert balancer.loads.sum() == 0
    clone.eval()
    with torch.no_grad():
        clone.lm_head.weight.zero_()  # every logit 0: greedy decoding picks token 0
    prompt = torch.randint(3, 128, (1, 4))
    assert clone.generate(prompt, max_new_tokens=2, do_sample=False)[0, 4:].tolist() == [0, 0]
    assert model.eval().generate(prompt, max_new_tokens=2, do_sample=False)[0, 4:].tolist() != [0, 0]
    assert balancer.loads.sum() == 0


class PausingStreamer:
    """A streamer whose generate() stops after its prefill forward until `resume` is set."""

    def __init__(self):
        self.paused, self.resume = threading.Event(), threading.Event()
        self.puts = 0

    def put(self, tokens):
        self.puts += 1
        if self.puts == 2:  # the prompt, then the first new token: the prefill forward has run
            self.paused.set()
            assert self.resume.wait(timeout=60)

    def end(self):
        pass


def test_generation_in_another_thread_leaves_this_threads_training_forwards_counted(model):
    """A sampling thread inside generate() (async RL) must not hide the training forwards of the trainer's thread."""
    balancer = LossFreeBalancer(model)
    streamer = PausingStreamer()
    prompt = torch.randint(3, 128, (2, 5))
    sampler = threading.Thread(
        target=lambda: model.generate(prompt, max_new_tokens=3, do_sample=False, streamer=streamer)
    )
    sampler.start()
    try:
        assert streamer.paused.wait(timeout=60)
        input_ids, attention_mask = padded_batch([5, 3], seq_len=5)
        model(input_ids=input_ids, attention_mask=attention_mask).logits.sum().backward()
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        streamer.resume.set()
        sampler.join()
    # two forwards of 8 real tokens, top-2, per layer; nothing from the sampler's 3 forwards of 10 and 2 tokens
    assert balancer.loads.sum(dim=-1).tolist() == [2 * 8 * TOP_K] * 2


def test_generate_batch_in_another_thread_leaves_this_threads_training_forwards_counted():
    """Only threads started during the generate_batch call (its worker) count as generating, not older ones."""

    class BatchGenerating(ToyModel):
        def generate_batch(self, decoding, resume):
            def decode():
                self()
                decoding.set()
                assert resume.wait(timeout=60)
                self()

            worker = threading.Thread(target=decode)
            worker.start()
            worker.join()

    model = BatchGenerating(ToyRouter(torch.rand(6, 4), top_k=2), ToyRouter(torch.rand(6, 4), top_k=2)).train()
    balancer = LossFreeBalancer(model)
    decoding, resume = threading.Event(), threading.Event()
    caller = threading.Thread(target=model.generate_batch, args=(decoding, resume))
    caller.start()
    try:
        assert decoding.wait(timeout=60)
        model()
    finally:
        resume.set()
        caller.join()
    assert balancer.loads.sum(dim=-1).tolist() == [6 * 2] * 2  # this thread's forward alone: 6 tokens, top-2
