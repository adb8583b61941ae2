"""Graphed decoding in generate() (ssm_hf.models.graphs).

On CPU the capture strategy is `TracedReplay`: the step's tensor operations are recorded once (an op tape holding the
tensors it read and wrote, as a CUDA graph holds their addresses) and replayed without the model's Python, so a
replay computes what a graph would: the captured weights, state tensors, hooks and flags as they were at capture.
Every result is compared token for token with plain generate(). The CUDA tests run real graphs when a GPU is there.
"""

import contextlib
import copy
import gc
import threading
import weakref

import pytest
import torch
from conftest import tiny_lm
from transformers import DynamicCache
from transformers.cache_utils import LinearAttentionLayer

import ssm_hf
from ssm_hf.models.graphs import (
    DISABLE_ENV,
    CapturedDecodeStep,
    EagerReplay,
    GraphedDecodeStep,
    TracedReplay,
    clear_decode_graphs,
    decode_capture_for,
    decode_graph_store,
)
from ssm_hf.models.state import layer_tensors

PRESETS = ["mamba-tiny", "mamba2-tiny", "s4-tiny", "s4d-tiny"]


def _model(preset: str, seed: int = 0) -> torch.nn.Module:
    # a random S4 with tied embeddings mostly repeats its input token; untied, its continuations vary
    return tiny_lm(preset, seed=seed, **({"tie_word_embeddings": False} if preset.startswith("s4") else {}))


@pytest.fixture(scope="module", params=PRESETS)
def model(request):
    return _model(request.param)


def _ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, graphed: bool, seed: int | None = None, caller=None, **kwargs):
    """generate() with the dict output, plainly or through the graphed decoding path (TracedReplay); `caller`:
    a wrapper of `model` (e.g. a PEFT model) to call generate() on instead."""
    model.decode_capture = TracedReplay() if graphed else None
    try:
        if seed is not None:
            torch.manual_seed(seed)
        return (model if caller is None else caller).generate(return_dict_in_generate=True, **kwargs)
    finally:
        model.decode_capture = None


def _replays(out) -> list[int]:
    return [entry.replays for entry in out.past_key_values.decode_graphs.values()]


def test_greedy_decoding_replays_every_step_and_matches_plain_generate(model):
    ids = _ids(2, 9, 0)
    plain = _generate(model, False, input_ids=ids, max_new_tokens=16, do_sample=False)
    graphed = _generate(model, True, input_ids=ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert len(set(plain.sequences[:, 9:].flatten().tolist())) > 4  # a real continuation
    assert _replays(graphed) == [15] and _replays(plain) == []      # the prefill's token, then 15 replays
    assert graphed.past_key_values.seen_tokens == plain.past_key_values.seen_tokens == 9 + 15


def test_seeded_sampling_matches_plain_generate(model):
    kwargs = dict(input_ids=_ids(3, 6, 1), max_new_tokens=14, do_sample=True, top_k=50, temperature=1.5)
    plain = _generate(model, False, seed=7, **kwargs)
    graphed = _generate(model, True, seed=7, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences) and _replays(graphed) == [13]


def test_left_padded_batch_matches_plain_generate_and_each_prompt_alone(model):
    lengths, width = (4, 11, 7), 11
    ids, mask = torch.zeros(3, width, dtype=torch.long), torch.zeros(3, width, dtype=torch.long)
    for row, n in enumerate(lengths):
        ids[row, width - n:], mask[row, width - n:] = _ids(1, n, 10 + row)[0], 1
    plain = _generate(model, False, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    graphed = _generate(model, True, input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    assert torch.equal(graphed.sequences, plain.sequences) and _replays(graphed) == [9]
    for row, n in enumerate(lengths):
        alone = _generate(model, True, input_ids=ids[row:row + 1, width - n:], max_new_tokens=10, do_sample=False)
        assert torch.equal(alone.sequences[0, n:], graphed.sequences[row, width:]), row


def test_beam_search_matches_plain_generate(model):
    # transformers' beam search calls the model itself (not the faster decoding call): it stays eager
    kwargs = dict(input_ids=_ids(1, 6, 3), max_new_tokens=8, num_beams=4, num_return_sequences=2, do_sample=False)
    plain = _generate(model, False, **kwargs)
    graphed = _generate(model, True, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert graphed.sequences.shape == (2, 14) and _replays(graphed) == []


def test_chunked_prefill_and_requested_hidden_states_run_eagerly():
    model = _model("mamba-tiny")
    ids = _ids(2, 10, 4)
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, prefill_chunk_size=3)
    plain, graphed = _generate(model, False, **kwargs), _generate(model, True, **kwargs)
    # chunks of 3, 3, 3, 1: the last, one unpadded token on a state, is a decoding step like the 5 after it
    assert torch.equal(graphed.sequences, plain.sequences) and _replays(graphed) == [6]
    kwargs = dict(input_ids=ids, max_new_tokens=6, do_sample=False, output_hidden_states=True)
    plain, graphed = _generate(model, False, **kwargs), _generate(model, True, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences) and _replays(graphed) == []
    assert len(graphed.hidden_states) == 6


@pytest.mark.parametrize("preset", ["mamba-tiny", "mamba2-tiny", "s4d-tiny"])
def test_replays_follow_beam_reorders_in_place_and_replaced_state_tensors(preset):
    """Beam search's reorder every step: StateCache.reorder_cache copies into the same tensors; transformers'
    own reorder (DynamicCache.reorder_cache) replaces them, and the next replay copies them back into the
    captured ones. Each step's logits equal an eager step on a cache reordered by transformers."""
    model = _model(preset)
    ids = _ids(4, 7, 5)
    with torch.no_grad():
        graphed_cache = model(ids, use_cache=True).cache_params
        eager_cache = copy.deepcopy(graphed_cache)
        step = GraphedDecodeStep(model, TracedReplay())
        token = _ids(4, 1, 6)
        for i in range(6):
            out = step(input_ids=token, past_key_values=graphed_cache, use_cache=True, return_dict=True,
                       logits_to_keep=1)
            ref = model(token, past_key_values=eager_cache, use_cache=True, logits_to_keep=1)
            assert torch.equal(out.logits, ref.logits), i
            # what a graph reads: the captured tensors, which the cache holds again after each replay
            (entry,) = [use.step for use in graphed_cache.decode_graphs.values()]
            held = [t for layer in graphed_cache.layers for t in layer_tensors(layer).values()]
            assert len(held) == len(entry.slots) and all(a is b for a, (*_, b) in zip(held, entry.slots))
            beams = torch.randint(0, 4, (4,), generator=torch.Generator().manual_seed(i))
            pointers = [t.data_ptr() for t in held]
            if i % 2:
                graphed_cache.reorder_cache(beams)
                assert pointers == [t.data_ptr() for layer in graphed_cache.layers
                                    for t in layer_tensors(layer).values()]
            else:
                DynamicCache.reorder_cache(graphed_cache, beams)  # new tensors
            DynamicCache.reorder_cache(eager_cache, beams)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
    (use,) = graphed_cache.decode_graphs.values()
    assert use.replays == use.step.replays == 6 and step.eager_calls == 0 and step.captures == 1
    assert graphed_cache.seen_tokens == eager_cache.seen_tokens == 7 + 6
    # released (as at the end of a generate() call): the cache holds tensors of its own, with the state reached
    step.release()
    held = [t for layer in graphed_cache.layers for t in layer_tensors(layer).values()]
    assert not any(t is static for t, (*_, static) in zip(held, use.step.slots))
    assert all(torch.equal(t, ref) for t, ref in zip(held, [t for layer in eager_cache.layers
                                                           for t in layer_tensors(layer).values()]))


def test_hybrids_disable_compile_the_environment_and_cpu_keep_the_eager_call(monkeypatch):
    ids = _ids(2, 5, 8)
    for preset, layers in (("hybrid-tiny", None), ("hybrid-tiny", ["mamba", "mamba2", "mamba", "mamba"])):
        hybrid = tiny_lm(preset, **({"layers_block_type": layers} if layers else {}))
        hybrid.decode_capture = TracedReplay()
        out = hybrid.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
        assert out.past_key_values.is_compileable == (layers is not None)   # attention layers grow a KV cache
        assert out.past_key_values.decode_graphs == {}
        assert hybrid.get_compiled_call(None) == hybrid.__call__
    model = _model("mamba-tiny")
    assert _replays(_generate(model, True, input_ids=ids, max_new_tokens=4, disable_compile=True)) == []
    assert model.get_compiled_call(None) == model.__call__       # on CPU without a strategy: eager
    model.decode_capture = TracedReplay()
    assert isinstance(model.get_compiled_call(None), GraphedDecodeStep)
    model.train()
    assert decode_capture_for(model) is None                    # dropout would be frozen into a graph
    model.eval()
    monkeypatch.setenv(DISABLE_ENV, "1")
    assert decode_capture_for(model) is None
    model.decode_capture = None
    assert _replays(_generate(model, True, input_ids=ids, max_new_tokens=4)) == []


def test_compileable_cache_gets_the_2d_padding_mask():
    model = _model("mamba-tiny")
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert model.create_masks_for_generate(config=model.config, inputs_embeds=torch.empty(2, 3, 0),
                                           attention_mask=mask, past_key_values=None) is mask
    cache = ssm_hf.StateCache(config=model.config)
    inputs = model.prepare_inputs_for_generation(torch.ones(2, 3, dtype=torch.long), past_key_values=cache,
                                                 attention_mask=mask, use_cache=True, is_first_iteration=True)
    assert cache.is_compileable and inputs["attention_mask"] is mask


def test_a_returned_cache_keeps_its_graph_and_moved_weights_are_recaptured():
    model = _model("mamba2-tiny")
    ids = _ids(2, 8, 9)
    first = _generate(model, True, input_ids=ids, max_new_tokens=5, do_sample=False)
    cache = first.past_key_values
    (entry,) = cache.decode_graphs.values()

    def continue_both(sequence):
        reference = copy.deepcopy(cache)   # a copy holds no graphs
        assert reference.decode_graphs == {}
        plain = _generate(model, False, input_ids=sequence, past_key_values=reference, max_new_tokens=5,
                          do_sample=False)
        graphed = _generate(model, True, input_ids=sequence, past_key_values=cache, max_new_tokens=5,
                            do_sample=False)
        assert torch.equal(graphed.sequences, plain.sequences)
        return graphed.sequences

    # the whole sequence, of which the cache holds all but the last token (generated, not fed yet)
    sequence = continue_both(first.sequences)
    assert list(cache.decode_graphs.values()) == [entry] and entry.replays == 4 + 4
    with torch.no_grad():
        for param in model.parameters():
            param.data = param.data.clone()  # new storage: the old graph would read freed memory
    continue_both(sequence)
    (new_entry,) = cache.decode_graphs.values()
    assert new_entry is not entry and new_entry.replays == 4


def test_graphs_are_kept_by_the_model_and_die_with_it():
    """The captured steps stay with the model (its store) after the call's cache is gone, and go with the model;
    the cache's record holds them weakly."""
    model = _model("mamba-tiny")
    out = _generate(model, True, input_ids=_ids(1, 5, 13), max_new_tokens=3, do_sample=False)
    (use,) = out.past_key_values.decode_graphs.values()
    entry = use.step
    ref = weakref.ref(entry)
    assert isinstance(entry, CapturedDecodeStep) and entry.model is model and use.replays == 2
    assert decode_graph_store(model).entries == [entry] and entry.claimant is None and entry.holder is None
    del entry, out
    gc.collect()
    assert ref() is not None and decode_graph_store(model).entries == [ref()]
    del model
    gc.collect()
    assert ref() is None and use.step is None


class _FailingCapture(EagerReplay):
    def capture(self, step, device):
        step()  # changes the state, as a failed capture may have: it must be put back
        raise RuntimeError("operation not permitted when stream is capturing")


def test_a_failed_capture_restores_the_state_and_decodes_eagerly():
    model = _model("s4d-tiny")
    ids = _ids(2, 6, 14)
    plain = _generate(model, False, input_ids=ids, max_new_tokens=8, do_sample=False)
    model.decode_capture = _FailingCapture()
    try:
        out = model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, return_dict_in_generate=True)
    finally:
        model.decode_capture = None
    assert torch.equal(out.sequences, plain.sequences) and out.past_key_values.decode_graphs == {}


def test_a_step_that_replaces_state_tensors_is_not_graphed_and_keeps_its_state(monkeypatch):
    def replacing_update(self, recurrent_states, state_idx=0, **kwargs):
        self.recurrent_states[state_idx] = recurrent_states.clone()   # a new tensor each step
        self.is_recurrent_states_initialized[state_idx] = True
        return self.recurrent_states[state_idx]

    monkeypatch.setattr(LinearAttentionLayer, "update_recurrent_state", replacing_update)
    model = _model("s4d-tiny")  # S4 writes its state through update_recurrent_state at every step
    ids = _ids(2, 6, 20)
    plain = _generate(model, False, input_ids=ids, max_new_tokens=8, do_sample=False)
    graphed = _generate(model, True, input_ids=ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(graphed.sequences, plain.sequences) and _replays(graphed) == []


@pytest.mark.parametrize("preset", PRESETS)
def test_a_decoding_step_updates_the_state_tensors_in_place(preset):
    model = _model(preset)
    with torch.no_grad():
        cache = model(_ids(2, 5, 15), use_cache=True).cache_params
        tensors = [t for layer in cache.layers for t in layer_tensors(layer).values()]
        before = [(t.data_ptr(), t.clone()) for t in tensors]
        model(_ids(2, 1, 16), past_key_values=cache, use_cache=True)
    after = [t for layer in cache.layers for t in layer_tensors(layer).values()]
    assert all(a is t for a, t in zip(after, tensors))
    for t, (pointer, old) in zip(after, before):
        assert t.data_ptr() == pointer and not torch.equal(t, old)


def test_state_cache_row_selection_keeps_addresses_when_the_shape_stays():
    model = _model("mamba-tiny")
    with torch.no_grad():
        cache = model(_ids(3, 4, 17), use_cache=True).cache_params
    state = cache.layers[0].recurrent_states[0]
    expected = state[[2, 0, 1]].clone()
    cache.batch_select_indices(torch.tensor([2, 0, 1]))
    assert cache.layers[0].recurrent_states[0] is state and torch.equal(state, expected)
    cache.batch_select_indices(torch.tensor([1]))                      # fewer rows: new tensors
    assert cache.layers[0].recurrent_states[0].shape[0] == 1 and torch.equal(cache.layers[0].recurrent_states[0],
                                                                            expected[1:2])


def test_traced_replay_runs_no_python_like_a_graph():
    """The CPU stand-in for a graph must not run the model's Python on replay, or the tests below could not see
    what a graph skips: a forward hook runs for the warm-up and the recording only, not for the replays."""
    model = _model("mamba-tiny")
    calls = []
    handle = model.backbone.norm_f.register_forward_hook(lambda *args: calls.append(1))
    try:
        with torch.no_grad():
            cache = model(_ids(1, 4, 40), use_cache=True).cache_params
            calls.clear()
            entry = CapturedDecodeStep(model, cache, _ids(1, 1, 41), TracedReplay(), fingerprint=None)
            captured = len(calls)
            for seed in range(3):
                entry(cache, _ids(1, 1, 42 + seed))
    finally:
        handle.remove()
    assert captured == 2 and len(calls) == 2 and entry.replays == 3


def test_stored_logits_and_scores_are_copies_of_the_replayed_output(model):
    """generate() keeps every step's logits (output_logits) and processed scores (output_scores): each must be
    its own tensor, equal to plain generate's, and none the graph's output buffer, which the next replay
    overwrites."""
    kwargs = dict(input_ids=_ids(2, 5, 21), max_new_tokens=7, do_sample=False, output_logits=True,
                  output_scores=True, repetition_penalty=1.3)
    plain = _generate(model, False, **kwargs)
    graphed = _generate(model, True, **kwargs)
    assert _replays(graphed) == [6] and torch.equal(graphed.sequences, plain.sequences)
    for name in ("logits", "scores"):
        got, expected = getattr(graphed, name), getattr(plain, name)
        assert len(got) == 7 and all(torch.equal(a, b) for a, b in zip(got, expected)), name
    (entry,) = [use.step for use in graphed.past_key_values.decode_graphs.values()]
    pointers = {t.data_ptr() for t in (*graphed.logits, *graphed.scores)}
    assert len(pointers) == 14 and entry.logits.data_ptr() not in pointers


def test_rows_finishing_at_eos_in_a_padded_batch_match_plain_generate():
    """A row that reaches EOS is fed padding from then on (its state still advances): the graphed steps must keep
    doing what plain generate does, for the finished rows and the others."""
    model = _model("mamba2-tiny")
    ids, mask = _ids(3, 8, 22), torch.ones(3, 8, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    free = _generate(model, False, input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    eos = int(free.sequences[0, 8 + 2])         # row 0 emits it at its third new token
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, eos_token_id=eos)
    plain, graphed = _generate(model, False, **kwargs), _generate(model, True, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert (plain.sequences[0, 8 + 3:] == model.config.pad_token_id).all()   # row 0 did finish early
    assert (plain.sequences[1:, 8:] != model.config.pad_token_id).any() and _replays(graphed) != []


def test_one_or_two_new_tokens():
    """max_new_tokens=1 is the prefill alone (nothing to capture); 2 captures and replays once."""
    model = _model("mamba-tiny")
    for new, replays in ((1, []), (2, [1])):
        kwargs = dict(input_ids=_ids(2, 5, 47), max_new_tokens=new, do_sample=False)
        plain, graphed = _generate(model, False, **kwargs), _generate(model, True, **kwargs)
        assert torch.equal(graphed.sequences, plain.sequences) and graphed.sequences.shape == (2, 5 + new)
        assert _replays(graphed) == replays


def test_a_dtype_round_trip_between_calls_on_a_kept_cache():
    """A cache of the float32 model, kept while the model goes to bfloat16 (and decodes there, with its own
    graphs) and back: its graph is captured again for the new weights, and the tokens stay those of plain
    generate. A cache of one dtype is refused by the other in both paths."""
    model = _model("s4d-tiny")

    def to_bfloat16_and_back():
        model.to(torch.bfloat16)
        kwargs = dict(input_ids=_ids(1, 5, 48), max_new_tokens=4, do_sample=False)
        assert torch.equal(_generate(model, True, **kwargs).sequences, _generate(model, False, **kwargs).sequences)
        model.to(torch.float32)

    plain, graphed, cache = _continue_twice(model, dict(max_new_tokens=4), dict(max_new_tokens=6),
                                            between=to_bfloat16_and_back)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert sorted(e.replays for e in cache.decode_graphs.values()) == [5]
    model.to(torch.bfloat16)
    for graphed in (False, True):
        with pytest.raises(ValueError, match="float32 model"):
            _generate(model, graphed, input_ids=plain.sequences, past_key_values=cache,
                      max_new_tokens=2, do_sample=False)


def _continue_twice(model, first: dict, second: dict, between=None, caller=None, first_context=contextlib.nullcontext,
                    prefill_context=torch.no_grad):
    """Prefill a cache, then two seeded generate() calls (greedy unless told) that continue it, the second from
    the first's output, plainly and graphed on separate copies of the cache; `between()` runs between the calls,
    the first call runs inside `first_context()`, the prefill inside `prefill_context()`. `caller` is what
    generate() is called on (a wrapper of `model`, which gets the capture strategy). Returns the plain and graphed
    outputs of the second call and the graphed cache."""
    ids = _ids(2, 6, 30)
    with prefill_context():
        graphed_cache = (model if caller is None else caller)(input_ids=ids, use_cache=True).cache_params
        plain_cache = copy.deepcopy(graphed_cache)
    outputs = {}
    for index, kwargs in enumerate((first, second)):
        if index == 1 and between is not None:
            between()
        for graphed, cache in ((False, plain_cache), (True, graphed_cache)):
            start = outputs[graphed].sequences if index else torch.cat([ids, _ids(2, 1, 31)], 1)
            with first_context() if index == 0 else contextlib.nullcontext():
                outputs[graphed] = _generate(model, graphed, seed=32 + index, caller=caller, input_ids=start,
                                             past_key_values=cache, **({"do_sample": False} | kwargs))
        if index == 0:
            assert torch.equal(outputs[True].sequences, outputs[False].sequences) and _replays(outputs[True])
    return outputs[False], outputs[True], graphed_cache


def test_a_graph_captured_in_inference_mode_is_not_replayed_outside_it():
    """Buffers made under inference_mode are inference tensors, which cannot be written outside it: a cache
    continued first under inference_mode, then normally, must decode in both (as it does eagerly)."""
    plain, graphed, cache = _continue_twice(_model("mamba-tiny"), dict(max_new_tokens=4), dict(max_new_tokens=4),
                                            first_context=torch.inference_mode)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert sorted(e.replays for e in cache.decode_graphs.values()) == [3, 3]   # one graph per mode


@pytest.mark.parametrize("preset", ["mamba2-tiny", "s4-tiny"])
def test_a_cache_filled_in_inference_mode_is_graphed_outside_it(preset):
    """A prefill and a first generate() under inference_mode leave inference tensors in the cache (and a graph
    captured on them); a later call outside it decodes from normal copies of them, graphed as eagerly."""
    plain, graphed, cache = _continue_twice(_model(preset), dict(max_new_tokens=4), dict(max_new_tokens=5),
                                            first_context=torch.inference_mode, prefill_context=torch.inference_mode)
    assert torch.equal(graphed.sequences, plain.sequences)
    states = [t for layer in cache.layers for t in layer_tensors(layer).values()]
    assert not any(t.is_inference() for t in states)
    # one captured step per mode (its static state is an inference tensor in inference mode only)
    assert sorted(e.replays for e in cache.decode_graphs.values()) == [3, 4]


@pytest.mark.parametrize("preset", ["mamba-tiny", "s4d-tiny"])
def test_a_model_made_in_inference_mode_is_graphed_and_its_in_place_edits_are_seen(preset):
    """Weights made under inference_mode are inference tensors, without a version counter: they are still
    fingerprinted (by storage and layout), and an in-place edit between calls is read by the replay, which reads
    the weights' memory (S4 then derives its step values inside the graph)."""
    with torch.inference_mode():
        model = _model(preset)
        ids = _ids(2, 7, 40)
        plain = _generate(model, False, input_ids=ids, max_new_tokens=5, do_sample=False)
        graphed = _generate(model, True, input_ids=ids, max_new_tokens=5, do_sample=False)
        assert torch.equal(graphed.sequences, plain.sequences) and _replays(graphed) == [4]
        unedited = _generate(model, False, input_ids=plain.sequences, max_new_tokens=6, do_sample=False,
                             past_key_values=copy.deepcopy(plain.past_key_values))
        generator = torch.Generator().manual_seed(41)
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
        plain = _generate(model, False, input_ids=plain.sequences, past_key_values=plain.past_key_values,
                          max_new_tokens=6, do_sample=False)
        graphed = _generate(model, True, input_ids=graphed.sequences, past_key_values=graphed.past_key_values,
                            max_new_tokens=6, do_sample=False)
    assert torch.equal(graphed.sequences, plain.sequences) and not torch.equal(plain.sequences, unedited.sequences)
    assert _replays(graphed) == [4 + 5]


def test_a_graph_captured_under_autocast_is_not_replayed_without_it():
    """A capture freezes the precision autocast chose: a cache continued under autocast and then without it must
    get full-precision steps in the second call (one graph per autocast setting)."""
    plain, graphed, cache = _continue_twice(
        _model("mamba2-tiny"), dict(max_new_tokens=5), dict(max_new_tokens=5, output_logits=True),
        first_context=lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    assert all(torch.equal(a, b) for a, b in zip(graphed.logits, plain.logits))
    assert sorted(e.replays for e in cache.decode_graphs.values()) == [4, 4]


def test_forward_hooks_keep_decoding_eager():
    """A graph replays no Python, so a hook would silently stop running after the capture: a recording hook
    must see every step, and a hook registered after a cache's capture must act on its next call."""
    model = _model("mamba-tiny")
    calls = {False: [], True: []}
    for graphed in (False, True):
        handle = model.backbone.layers[1].register_forward_hook(lambda *args, g=graphed: calls[g].append(1))
        try:
            out = _generate(model, graphed, input_ids=_ids(2, 5, 36), max_new_tokens=6, do_sample=False)
        finally:
            handle.remove()
    assert len(calls[True]) == len(calls[False]) == 6 and _replays(out) == []
    hooks = []
    plain, graphed, cache = _continue_twice(
        model, dict(max_new_tokens=4), dict(max_new_tokens=6),
        between=lambda: hooks.append(model.backbone.layers[1].register_forward_hook(lambda m, a, out: out * -3)))
    hooks[0].remove()
    assert torch.equal(graphed.sequences, plain.sequences)
    assert not torch.equal(plain.sequences[:, -5:], _continue_twice(model, dict(max_new_tokens=4),
                                                                    dict(max_new_tokens=6))[0].sequences[:, -5:])
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)   # global hooks too
    try:
        assert decode_capture_for(model) is None
    finally:
        handle.remove()


def test_a_submodule_in_training_mode_keeps_decoding_eager():
    """Dropout and other training-mode behaviour would be frozen into a graph: any module in training mode, not
    only the top one, keeps the decoding eager."""
    model = _model("s4d-tiny")
    model.decode_capture = TracedReplay()
    try:
        assert decode_capture_for(model) is not None
        model.backbone.layers[0].train()
        assert decode_capture_for(model) is None
    finally:
        model.decode_capture = None
        model.eval()


def test_switching_a_peft_adapter_off_between_calls_is_seen():
    """A LoRA adapter switched off (PEFT's disable_adapter, a flag on its layers) changes no weight; a cache's
    graph captured with the adapter on must not be replayed once it is off."""
    peft = pytest.importorskip("peft")
    base = _model("mamba-tiny")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["out_proj"], init_lora_weights=False))
    lora.eval()
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(generator=torch.Generator().manual_seed(37))
    plain, graphed, cache = _continue_twice(base, dict(max_new_tokens=4), dict(max_new_tokens=6), caller=lora,
                                            between=lambda: lora.base_model.disable_adapter_layers())
    lora.base_model.enable_adapter_layers()
    assert torch.equal(graphed.sequences, plain.sequences)
    assert sorted(e.replays for e in cache.decode_graphs.values()) == [5]    # captured again after the switch


def test_weights_replaced_at_reused_addresses_are_recaptured(monkeypatch):
    """The allocator hands freed memory out again, so new weights may sit at the old weights' addresses; a
    graph's weights are told apart by their storage, not by their address (simulated: every address reads 0)."""
    model = _model("mamba2-tiny")

    def replace_weights():
        generator = torch.Generator().manual_seed(38)
        with torch.no_grad():
            for param in model.parameters():
                param.data = param.data + 0.3 * torch.randn(param.shape, generator=generator)

    monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 0)
    plain, graphed, cache = _continue_twice(model, dict(max_new_tokens=4), dict(max_new_tokens=6),
                                            between=replace_weights)
    assert torch.equal(graphed.sequences, plain.sequences)
    assert sorted(e.replays for e in cache.decode_graphs.values()) == [5]


def test_a_returned_cache_does_not_keep_the_model_alive():
    """Users keep returned caches (to continue a chat); the captured steps on them must not pin the model and its
    weights once the model is dropped."""
    model = _model("mamba-tiny")
    out = _generate(model, True, input_ids=_ids(1, 5, 39), max_new_tokens=3, do_sample=False)
    (use,) = out.past_key_values.decode_graphs.values()
    assert use.step.model is model
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and len(out.past_key_values.decode_graphs) == 1 and use.step is None


def test_a_cache_repeated_to_a_larger_batch_gets_the_step_of_that_batch():
    """num_return_sequences repeats a given cache's rows into new state tensors of another batch size: decoded
    with the step of that batch (the cache records both)."""
    model = _model("mamba-tiny")
    plain, graphed, cache = _continue_twice(
        model, dict(max_new_tokens=4), dict(max_new_tokens=5, num_return_sequences=3, do_sample=True))
    assert torch.equal(graphed.sequences, plain.sequences) and graphed.sequences.shape[0] == 6
    assert {use.step.input_ids.shape[0]: use.replays for use in cache.decode_graphs.values()} == {2: 3, 6: 4}
    assert decode_graph_store(model).captures == 2


# --- captured steps kept by the model: reused across generate() calls and caches --------------------------------

REUSED = ["mamba-tiny", "mamba2-tiny", "s4d-tiny"]


def _states(cache) -> list[torch.Tensor]:
    return [t for layer in cache.layers for t in layer_tensors(layer).values()]


def _same_states(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(_states(a), _states(b), strict=True))


@pytest.mark.parametrize("preset", REUSED)
def test_successive_calls_with_new_caches_capture_once(preset):
    """Every generate() call makes a new cache; the step captured in the first call is taken again by the later
    ones (one capture for all), and each call gives plain generate's tokens, greedy and sampled. The returned
    cache holds tensors of its own (not the step's static state) with plain generate's final state."""
    model = _model(preset)
    store = decode_graph_store(model)
    calls = [dict(input_ids=_ids(2, 7, 60), max_new_tokens=6, do_sample=False),
             dict(input_ids=_ids(2, 4, 61), max_new_tokens=9, do_sample=False),
             dict(input_ids=_ids(2, 9, 62), max_new_tokens=8, do_sample=True, top_k=40, temperature=1.3)]
    for index, kwargs in enumerate(calls):
        plain = _generate(model, False, seed=63, **kwargs)
        graphed = _generate(model, True, seed=63, **kwargs)
        assert torch.equal(graphed.sequences, plain.sequences), index
        assert _replays(graphed) == [kwargs["max_new_tokens"] - 1] and store.captures == 1, index
        (entry,) = store.entries
        assert entry.holder is None and entry.claimant is None     # released when the call returned
        assert not any(t is static for t, (*_, static) in zip(_states(graphed.past_key_values), entry.slots))
        assert _same_states(graphed.past_key_values, plain.past_key_values)
    assert entry.replays == sum(kwargs["max_new_tokens"] - 1 for kwargs in calls)
    assert len(set(plain.sequences[:, 9:].flatten().tolist())) > 4   # a real continuation


def test_interleaved_caches_sharing_a_step_do_not_disturb_each_other():
    """Caches A and B of one batch size decode with one captured step: A continued, then B, then A again, then B
    give plain generate's tokens each time, and decoding one leaves the other's state as it was."""
    model = _model("mamba2-tiny")
    prompts = {"A": _ids(2, 6, 64), "B": _ids(2, 8, 65)}
    plain, graphed, sequences = {}, {}, {}
    with torch.no_grad():
        for name, ids in prompts.items():
            graphed[name] = model(ids, use_cache=True).cache_params
            plain[name] = copy.deepcopy(graphed[name])
            sequences[name] = torch.cat([ids, _ids(2, 1, 66)], 1)   # the cache holds all but the last token
    for turn, (name, other) in enumerate((("A", "B"), ("B", "A"), ("A", "B"), ("B", "A"))):
        untouched = [t.clone() for t in _states(graphed[other])]
        kwargs = dict(input_ids=sequences[name], max_new_tokens=5, do_sample=False)
        expected = _generate(model, False, past_key_values=plain[name], **kwargs)
        got = _generate(model, True, past_key_values=graphed[name], **kwargs)
        assert torch.equal(got.sequences, expected.sequences), turn
        assert all(torch.equal(a, b) for a, b in zip(_states(graphed[other]), untouched, strict=True)), turn
        assert _same_states(graphed[name], plain[name]), turn
        sequences[name] = got.sequences
    assert decode_graph_store(model).captures == 1
    assert [use.replays for use in graphed["A"].decode_graphs.values()] == [4 + 4]


@pytest.mark.parametrize("preset", ["mamba-tiny", "s4d-tiny"])
def test_one_step_object_decoding_two_caches_in_turn_matches_eager_steps(preset):
    """Outside a generate() call (a GraphedDecodeStep used directly, never released) a cache keeps the static
    state between its steps; another cache taking the step first gives it its own tensors back, with its state."""
    model = _model(preset)
    with torch.no_grad():
        caches = [model(_ids(3, 5, 70 + i), use_cache=True).cache_params for i in range(2)]
        eager = [copy.deepcopy(cache) for cache in caches]
        step = GraphedDecodeStep(model, TracedReplay())
        tokens = [_ids(3, 1, 72), _ids(3, 1, 73)]
        for turn, which in enumerate((0, 1, 1, 0, 0, 1, 0, 1)):
            out = step(input_ids=tokens[which], past_key_values=caches[which], use_cache=True, return_dict=True,
                       logits_to_keep=1)
            ref = model(tokens[which], past_key_values=eager[which], use_cache=True, logits_to_keep=1)
            assert torch.equal(out.logits, ref.logits), turn
            tokens[which] = out.logits[:, -1].argmax(-1, keepdim=True)
            (entry,) = [use.step for use in caches[which].decode_graphs.values()]
            assert entry.holds_state_of(caches[which]) and not entry.holds_state_of(caches[1 - which])
            assert _same_states(caches[1 - which], eager[1 - which]), turn
    assert step.captures == 1 and step.eager_calls == 0 and entry.replays == 8


def test_two_calls_in_flight_at_once_do_not_share_a_step():
    """A kept step belongs to one call until that call ends: a second call decoding meanwhile (another thread)
    captures its own, the two interleaved give eager steps' logits, and once released either step is taken
    again by a later call."""
    model = _model("mamba-tiny")
    store = decode_graph_store(model)
    with torch.no_grad():
        caches = [model(_ids(2, 6, 74 + i), use_cache=True).cache_params for i in range(2)]
        eager = [copy.deepcopy(cache) for cache in caches]
        calls = [GraphedDecodeStep(model, TracedReplay()) for _ in range(2)]
        tokens = [_ids(2, 1, 76), _ids(2, 1, 77)]
        for turn in range(4):
            for which in (0, 1):
                out = calls[which](input_ids=tokens[which], past_key_values=caches[which], use_cache=True,
                                   return_dict=True, logits_to_keep=1)
                ref = model(tokens[which], past_key_values=eager[which], use_cache=True, logits_to_keep=1)
                assert torch.equal(out.logits, ref.logits), (turn, which)
                tokens[which] = out.logits[:, -1].argmax(-1, keepdim=True)
        entries = [next(iter(cache.decode_graphs.values())).step for cache in caches]
        assert [call.captures for call in calls] == [1, 1] and entries[0] is not entries[1]
        assert store.captures == 2 and store.entries == entries
        for call in calls:
            call.release()
        assert _same_states(caches[0], eager[0]) and _same_states(caches[1], eager[1])
        later = GraphedDecodeStep(model, TracedReplay())
        out = later(input_ids=tokens[0], past_key_values=caches[0], use_cache=True, return_dict=True,
                    logits_to_keep=1)
        ref = model(tokens[0], past_key_values=eager[0], use_cache=True, logits_to_keep=1)
    assert torch.equal(out.logits, ref.logits) and later.captures == 0 and store.captures == 2


def test_a_cache_handed_between_two_unreleased_step_objects_ends_with_its_own_state():
    """Two GraphedDecodeSteps used directly (each holding its own captured step) decode one cache in turn: the
    cache passes from one step's static state to the other's; released in either order, it holds tensors of its
    own, with the eager state, which a later call decoding another cache with either step leaves alone."""
    model = _model("mamba-tiny")
    store = decode_graph_store(model)
    for order in ((0, 1), (1, 0)):
        with torch.no_grad():
            cache = model(_ids(2, 5, 100), use_cache=True).cache_params
            eager = copy.deepcopy(cache)
            steps = [GraphedDecodeStep(model, TracedReplay()) for _ in range(2)]
            token = _ids(2, 1, 101)
            for turn, which in enumerate((0, 1, 0, 1, 1)):
                out = steps[which](input_ids=token, past_key_values=cache, use_cache=True, return_dict=True,
                                   logits_to_keep=1)
                ref = model(token, past_key_values=eager, use_cache=True, logits_to_keep=1)
                assert torch.equal(out.logits, ref.logits), (order, turn)
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            for which in order:
                steps[which].release()
            static = {id(t) for entry in store.entries for *_, t in entry.slots}
            assert not any(id(t) in static for t in _states(cache)) and _same_states(cache, eager)
            kept = [t.clone() for t in _states(cache)]
            other = model(_ids(2, 5, 102), use_cache=True).cache_params
            later = [GraphedDecodeStep(model, TracedReplay()) for _ in range(2)]
            for step in later:
                step(input_ids=token, past_key_values=other, use_cache=True, return_dict=True, logits_to_keep=1)
            assert [step.captures for step in later] == [0, 0]
            for step in later:
                step.release()
        assert all(torch.equal(a, b) for a, b in zip(_states(cache), kept, strict=True)), order
    assert store.captures == 2


def test_threads_decoding_one_model_at_once_give_plain_tokens():
    """Two threads decoding the same model at one batch size (a server): a step is held by one call at a time,
    so each call decodes on its own state (`EagerReplay` runs the step's Python on the static buffers, which
    another call writing into them meanwhile would corrupt)."""
    model = _model("mamba-tiny")
    prompts = [_ids(2, 6, 97 + i) for i in range(2)]
    expected = [model.generate(p, max_new_tokens=8, do_sample=False) for p in prompts]
    model.decode_capture = EagerReplay()
    errors, results = [], []

    def run(index: int):
        try:
            for _ in range(4):
                results.append((index, model.generate(prompts[index], max_new_tokens=8, do_sample=False,
                                                      return_dict_in_generate=True)))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    try:
        threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    finally:
        model.decode_capture = None
    assert errors == [] and len(results) == 8
    for index, out in results:
        assert torch.equal(out.sequences, expected[index]) and _replays(out) == [7]
    store = decode_graph_store(model)
    assert 1 <= store.captures <= 2 and all(e.claimant is None and e.holder is None for e in store.entries)


def test_each_batch_size_gets_its_own_step_and_the_least_recently_used_are_released():
    model = _model("mamba-tiny")
    model.decode_graphs_kept = 2
    store = decode_graph_store(model)
    first = {}
    for batch in (1, 2, 1, 3):
        kwargs = dict(input_ids=_ids(batch, 5, 80 + batch), max_new_tokens=4, do_sample=False)
        plain, graphed = _generate(model, False, **kwargs), _generate(model, True, **kwargs)
        assert torch.equal(graphed.sequences, plain.sequences), batch
        (use,) = graphed.past_key_values.decode_graphs.values()
        assert use.step.input_ids.shape[0] == batch and use.replays == 3
        assert use.step is first.setdefault(batch, weakref.ref(use.step))()   # one step per batch size
    del use, graphed
    gc.collect()
    # kept: the two used last (batch 1, then 3); batch 2's step is released, graph and static state with it
    assert store.captures == 3 and [e.input_ids.shape[0] for e in store.entries] == [1, 3]
    assert first[2]() is None and first[1]() is not None
    _generate(model, True, input_ids=_ids(2, 5, 85), max_new_tokens=3, do_sample=False)
    assert store.captures == 4 and [e.input_ids.shape[0] for e in store.entries] == [3, 2]
    model.decode_graphs_kept = 0   # keep none: every call captures its own, released with the call
    for seed in (86, 87):
        kwargs = dict(input_ids=_ids(2, 5, seed), max_new_tokens=3, do_sample=False)
        assert torch.equal(_generate(model, True, **kwargs).sequences, _generate(model, False, **kwargs).sequences)
    assert store.captures == 6 and store.entries == []


@pytest.mark.parametrize("preset", REUSED)
def test_weights_changed_in_place_between_calls_are_captured_again(preset):
    """A kept step replays the weights' memory as it was captured with: after an in-place change (a version
    bump, seen by the fingerprint) the next call captures again and gives the new weights' tokens; the step of
    the old weights is released."""
    model = _model(preset)
    store = decode_graph_store(model)
    kwargs = dict(input_ids=_ids(2, 6, 91), max_new_tokens=8, do_sample=False)
    before = _generate(model, True, **kwargs)
    (old,) = store.entries
    generator = torch.Generator().manual_seed(92)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.3 * torch.randn(param.shape, generator=generator))
    plain, graphed = _generate(model, False, **kwargs), _generate(model, True, **kwargs)
    assert torch.equal(graphed.sequences, plain.sequences) and not torch.equal(plain.sequences, before.sequences)
    assert store.captures == 2 and len(store.entries) == 1 and store.entries[0] is not old
    assert _replays(graphed) == [7]


def test_disable_compile_and_the_environment_still_decode_eagerly_with_steps_kept(monkeypatch):
    model = _model("mamba2-tiny")
    store = decode_graph_store(model)
    kwargs = dict(input_ids=_ids(2, 6, 93), max_new_tokens=5, do_sample=False)
    graphed = _generate(model, True, **kwargs)
    assert _replays(graphed) == [4] and store.captures == 1
    off = _generate(model, True, disable_compile=True, **kwargs)
    assert _replays(off) == [] and torch.equal(off.sequences, graphed.sequences)
    monkeypatch.setenv(DISABLE_ENV, "1")
    off = _generate(model, True, **kwargs)
    assert _replays(off) == [] and torch.equal(off.sequences, graphed.sequences)
    monkeypatch.delenv(DISABLE_ENV)
    assert _replays(_generate(model, True, **kwargs)) == [4] and store.captures == 1
    clear_decode_graphs(model)
    assert store.entries == []
    assert _replays(_generate(model, True, **kwargs)) == [4] and store.captures == 2


def test_a_call_ended_by_an_exception_still_gives_the_cache_its_state_back():
    """generate() left by an exception mid-decoding (here a logits processor) releases its steps as well: the
    cache passed in holds its own tensors with the state reached, and the next call takes the kept step."""

    class StopAt:
        def __init__(self, calls: int):
            self.calls, self.left = calls, calls

        def __call__(self, input_ids, scores):
            self.left -= 1
            if self.left == 0:
                raise KeyboardInterrupt("stopped")
            return scores

    model = _model("mamba-tiny")
    ids = _ids(2, 6, 94)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params
        reference = copy.deepcopy(cache)
    sequence = torch.cat([ids, _ids(2, 1, 95)], 1)
    for graphed, state in ((False, reference), (True, cache)):
        with pytest.raises(KeyboardInterrupt):
            _generate(model, graphed, input_ids=sequence, past_key_values=state, max_new_tokens=8,
                      do_sample=False, logits_processor=[StopAt(5)])
    (entry,) = decode_graph_store(model).entries
    assert entry.claimant is None and entry.holder is None and not entry.holds_state_of(cache)
    assert entry.replays == 4 and _same_states(cache, reference) and cache.seen_tokens == reference.seen_tokens
    again = _generate(model, True, input_ids=_ids(2, 4, 96), max_new_tokens=4, do_sample=False)
    assert _replays(again) == [3] and decode_graph_store(model).captures == 1


def test_a_text_generation_pipeline_called_again_reuses_its_step(tokenizer):
    """A pipeline makes a new cache per call: short generations take the kept step instead of capturing."""
    from transformers import pipeline

    model = tiny_lm("mamba-tiny", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    # on the CPU, where "plain" is eager (a pipeline would put the model on a GPU, where graphs are the default)
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
    prompts = ["def main(", "import os", "class Foo:\n    def"]
    plain = [generator(p, max_new_tokens=6, do_sample=False)[0]["generated_text"] for p in prompts]
    model.decode_capture = TracedReplay()
    try:
        graphed = [generator(p, max_new_tokens=6, do_sample=False)[0]["generated_text"] for p in prompts]
    finally:
        model.decode_capture = None
    assert graphed == plain and decode_graph_store(model).captures == 1
    assert decode_graph_store(model).entries[0].replays == 3 * 5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("preset", ["mamba-tiny", "mamba2-tiny", "s4d-tiny"])
def test_cuda_graphed_generate_equals_eager_generate(preset):
    model = _model(preset).cuda()
    ids, mask = _ids(3, 12, 18).cuda(), torch.ones(3, 12, dtype=torch.long, device="cuda")
    mask[0, :5] = 0
    for kwargs in (dict(do_sample=False), dict(do_sample=True, top_k=20)):
        torch.manual_seed(19)
        eager = model.generate(ids, attention_mask=mask, max_new_tokens=24, disable_compile=True,
                               return_dict_in_generate=True, **kwargs)
        torch.manual_seed(19)
        graphed = model.generate(ids, attention_mask=mask, max_new_tokens=24, return_dict_in_generate=True,
                                 **kwargs)
        assert torch.equal(graphed.sequences, eager.sequences), kwargs
        assert _replays(graphed) == [23] and _replays(eager) == []
        (use,) = graphed.past_key_values.decode_graphs.values()
        assert isinstance(use.step.replay.__self__, torch.cuda.CUDAGraph)   # a real graph was replayed


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_capture_in_one_thread_leaves_other_threads_decoding():
    """A capture in one thread must not break CUDA work another thread does meanwhile (a server answering several
    requests): graphs are captured in thread-local mode, one capture at a time. Per model, two threads decode with
    graphs (a kept step is used by one call at a time: while both decode, each has its own) while one decodes
    eagerly; every call gives the eager tokens and every graphed call replays all its steps (a capture broken by
    another thread would have fallen back)."""
    models = [_model("mamba-tiny").cuda(), _model("mamba2-tiny").cuda()]
    ids = _ids(2, 8, 46).cuda()
    expected = [m.generate(ids, max_new_tokens=16, do_sample=False, disable_compile=True) for m in models]
    errors, results = [], []

    def run(index: int, graphed: bool):
        try:
            for _ in range(6):
                out = models[index].generate(ids, max_new_tokens=16, do_sample=False, disable_compile=not graphed,
                                             return_dict_in_generate=True)
                results.append((index, graphed, out))
        except Exception as err:  # noqa: BLE001 - reported below
            errors.append(repr(err))

    # per model: two threads with graphs (one kept step each while both decode) and one without
    threads = [threading.Thread(target=run, args=(i, g)) for i in range(2) for g in (True, True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and len(results) == 36
    for index, graphed, out in results:
        assert torch.equal(out.sequences, expected[index])
        assert _replays(out) == ([15] if graphed else [])
    for model in models:
        store = decode_graph_store(model)
        assert 1 <= store.captures <= 2 and all(e.claimant is None and e.holder is None for e in store.entries)
