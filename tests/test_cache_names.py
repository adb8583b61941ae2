"""The cache's names between transformers and our models (`ssm_hf.models.cache_names`): the models take it as
`cache`, `cache_params` or `past_key_values` on any transformers version; outputs and generate() use the installed
version's names (transformers 5.24 renamed all of them `cache`), so no deprecation is triggered by our own code."""

import logging
import warnings

import pytest
import torch
import transformers
from conftest import tiny_lm
from transformers.utils import logging as transformers_logging

import ssm_hf
from ssm_hf.models.cache_names import CACHE_IS_NAMED_CACHE, output_cache, pick_cache
from ssm_hf.models.outputs import SSMCausalLMOutput, SSMModelOutput

PRESETS = ["mamba-tiny", "mamba2-tiny", "s4d-tiny", "hybrid-tiny"]


def _ids(length: int, seed: int, batch: int = 1) -> torch.Tensor:
    return torch.randint(1, 512, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", PRESETS)
def test_forward_takes_the_cache_under_each_name(preset):
    model = tiny_lm(preset, seed=3).eval()
    ids = _ids(12, seed=4)
    with torch.no_grad():
        whole = model(ids).logits[:, 9:]
        prefix = ssm_hf.snapshot(output_cache(model(ids[:, :9], use_cache=True)))
        for name in ("cache", "cache_params", "past_key_values"):
            cache = prefix.to_cache()
            out = model(ids[:, 9:], use_cache=True, **{name: cache})
            torch.testing.assert_close(out.logits, whole, rtol=1e-5, atol=1e-5, msg=name)
            assert output_cache(out) is cache, name
            assert cache.get_seq_length() == 12, name


@pytest.mark.parametrize("preset", ["mamba-tiny", "hybrid-tiny"])
def test_two_different_caches_are_refused(preset):
    model = tiny_lm(preset, seed=3).eval()
    ids = _ids(4, seed=5)
    first, second = ssm_hf.StateCache(config=model.config), ssm_hf.StateCache(config=model.config)
    with pytest.raises(ValueError, match="Two different caches"):
        model(ids, cache=first, past_key_values=second, use_cache=True)
    with torch.no_grad():  # the same cache under two names is one cache
        model(ids, cache=first, cache_params=first, use_cache=True)
    assert first.get_seq_length() == 4


def test_pick_cache():
    cache = ssm_hf.StateCache()
    assert pick_cache(None, None, None) is None
    assert pick_cache(None, cache, None) is cache
    assert pick_cache(cache, None, cache) is cache
    with pytest.raises(ValueError, match="Two different caches"):
        pick_cache(cache, ssm_hf.StateCache(), None)


def test_output_classes_name_the_cache_as_the_installed_transformers_does():
    cache = ssm_hf.StateCache()
    hidden = torch.randn(1, 3, 8)
    field = "cache" if CACHE_IS_NAMED_CACHE else "cache_params"
    for output, first in ((SSMModelOutput(last_hidden_state=hidden, cache=cache), "last_hidden_state"),
                          (SSMCausalLMOutput(logits=hidden, cache=cache), "logits")):
        assert list(output.keys()) == [first, field]
        assert output.cache is cache and output[field] is cache and output_cache(output) is cache
        assert output.to_tuple()[1] is cache
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        older = SSMModelOutput(last_hidden_state=hidden, cache_params=cache)  # transformers' Mamba's keyword
    assert older.cache is cache
    other = ssm_hf.StateCache()
    older.cache = other   # set under the new name, read under the installed one
    assert older[field] is other and output_cache(older) is other


def test_a_state_cache_is_croppable_while_recording_only():
    """transformers asks before it decides to record (a deferred stop check on MPS would then leave the returned
    cache recording) and, in assisted decoding, after it started recording."""
    cache = ssm_hf.StateCache()
    assert not cache.is_croppable
    cache.activate_past_recording()
    assert cache.is_croppable
    cache.stop_recording()
    assert not cache.is_croppable


@pytest.mark.skipif(not hasattr(transformers.generation.utils, "DeferredStopCheck"),
                    reason="this transformers has no deferred stop check")
@pytest.mark.parametrize("preset", ["mamba-tiny", "hybrid-tiny"])
def test_a_given_cache_ends_at_the_last_token_with_a_deferred_stop_check(preset, monkeypatch):
    """transformers (5.23, 5.24) on MPS learns of a stop one step late (one extra forward). A cache the caller passed
    outlives generate(), so it must not keep that step: transformers takes care of that for a cache it marks as the
    caller's. MPS is simulated on the CPU: the check is allowed on any device, with events that do nothing."""
    generation = transformers.generation.utils
    model = tiny_lm(preset, seed=5).eval()
    ids = _ids(8, seed=6)
    greedy = model.generate(ids, max_new_tokens=6, do_sample=False)
    eos = int(greedy[0, 10])  # the third new token: generation stops there
    expected = output_cache(model.generate(ids, cache=ssm_hf.StateCache(config=model.config), max_new_tokens=6,
                                           do_sample=False, eos_token_id=eos, return_dict_in_generate=True))

    class Event:  # the CPU has no events; the steps run in order anyway
        def __init__(self, *args, **kwargs):
            pass

        def record(self, *args):
            pass

        def synchronize(self):
            pass

    supported = generation.DeferredStopCheck.is_supported  # a staticmethod: the plain function
    monkeypatch.setattr(torch, "Event", Event)
    monkeypatch.setattr(generation.DeferredStopCheck, "is_supported", staticmethod(
        lambda device, *args, **kwargs: supported(torch.device("mps"), *args, **kwargs)))
    cache = ssm_hf.StateCache(config=model.config)
    out = model.generate(ids, cache=cache, max_new_tokens=6, do_sample=False, eos_token_id=eos)
    assert torch.equal(out, greedy[:, :11])
    assert cache.get_seq_length() == expected.get_seq_length() == 10 and not cache.recording
    # the same state: reading the last token from each gives the same logits
    with torch.no_grad():
        mine, reference = (model(out[:, -1:], cache=c, use_cache=True).logits for c in (cache, expected))
    assert torch.equal(mine, reference)


def test_stream_passes_the_cache_to_a_transformers_model():
    """`ssm_hf.stream` works for any causal LM: the cache goes under the installed transformers' keyword."""
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    ids = _ids(12, seed=8) % 100
    with torch.no_grad():
        whole = model(ids).logits
    cache = ssm_hf.StateCache()
    chunks = list(ssm_hf.stream(model, ids.split(4, dim=1), cache))
    torch.testing.assert_close(torch.cat([out.logits for out in chunks], dim=1), whole, rtol=1e-5, atol=1e-5)
    assert cache.get_seq_length() == 12


@pytest.fixture
def deprecations():
    """Every deprecation message transformers logs or warns while the test runs (its once-only log cache reset)."""
    messages = []

    class Collect(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    handler = Collect(level=logging.WARNING)
    logger = transformers_logging.get_logger("transformers")
    logging.Logger.warning_once.cache_clear()
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield messages
        messages.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logging.Logger.warning_once.cache_clear()


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_passes_the_cache_without_deprecations(preset, deprecations):
    model = tiny_lm(preset, seed=3).eval()
    ids = _ids(6, seed=6, batch=2)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    beams = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, num_beams=2)
    # continuing from a given cache (cache=, on every transformers version): the prompt read once, in the prefix
    prefix = ssm_hf.snapshot(output_cache(model(ids[:1, :5], use_cache=True)))
    continued = model.generate(ids[:1], cache=prefix.to_cache(), max_new_tokens=4, do_sample=False)
    alone = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
    assert plain.shape == beams.shape == (2, 10)
    assert torch.equal(continued, alone)
    stale = [message for message in deprecations if "deprecated" in message.lower() and "cache" in message]
    assert not stale, stale
