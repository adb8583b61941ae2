"""The state as a first-class object: streaming in chunks, snapshots saved and reused, generate() from a snapshot,
forks into a batch, long streams in flat memory (ssm_hf.models.state)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_to_scale, spread_weights, tiny_config
from transformers import AutoModelForCausalLM, DynamicCache

import ssm_hf
from ssm_hf.models.state import layer_tensors

ROOT = Path(__file__).resolve().parent.parent

# name -> config: every family of the zoo, hybrids with and without attention layers
CASES = {
    "mamba": lambda: tiny_config("mamba"),
    "mamba2": lambda: tiny_config("mamba2"),
    "hybrid": lambda: ssm_hf.preset_config("hybrid-tiny", bos_token_id=None, eos_token_id=None),
    "hybrid-mamba2": lambda: ssm_hf.preset_config("hybrid-mamba2-tiny", bos_token_id=None, eos_token_id=None),
    "hybrid-no-attention": lambda: ssm_hf.preset_config("hybrid-tiny", attn_layer_period=0, bos_token_id=None,
                                                        eos_token_id=None),
    "s4d": lambda: ssm_hf.preset_config("s4d-tiny", bos_token_id=None, eos_token_id=None),
    "s4": lambda: ssm_hf.preset_config("s4-tiny", bos_token_id=None, eos_token_id=None),
}
PURE_SSM = [name for name in CASES if not name.startswith("hybrid")] + ["hybrid-no-attention"]
SPREAD = {"s4": 0.03}  # a random DPLR S4 with more noise repeats one token, which would make generation tests weak


def _model(name: str, seed: int = 1, scale: float | None = None, dtype=torch.float32):
    torch.manual_seed(0)
    scale = SPREAD.get(name, 0.3) if scale is None else scale
    return spread_weights(AutoModelForCausalLM.from_config(CASES[name]()), seed=seed, scale=scale).to(dtype).eval()


def _ids(batch: int, length: int, seed: int, vocab: int = 512) -> torch.Tensor:
    return torch.randint(1, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _state(out):
    return out.past_key_values  # our SSM outputs also answer to this name (an alias of cache_params)


def _prefix_snapshot(model, ids: torch.Tensor, n: int) -> ssm_hf.StateSnapshot:
    with torch.no_grad():
        return ssm_hf.snapshot(_state(model(ids[:, :n], use_cache=True)))


CHUNKINGS = {"1": 1, "7": 7, "64": 64, "mixed": [1, 7, 3, 1, 64, 4]}


@pytest.mark.parametrize("chunks", list(CHUNKINGS))
@pytest.mark.parametrize("name", list(CASES))
def test_stream_in_chunks_equals_one_forward(name, chunks):
    model = _model(name)
    ids = _ids(2, 80, seed=3)
    with torch.no_grad():
        full = model(ids).logits
        reference = copy.deepcopy(model).double()(ids).logits
    cache = ssm_hf.StateCache(config=model.config)
    pieces, sizes = [], []
    for out in ssm_hf.stream(model, ids.split(CHUNKINGS[chunks], dim=1), cache):
        pieces.append(out.logits)
        sizes.append(cache.nbytes)
    streamed = torch.cat(pieces, dim=1)
    # both float32 paths agree with the float64 forward to float32 rounding (so with each other too)
    assert_close_to_scale(streamed, reference, tol=1e-5)
    assert_close_to_scale(full, reference, tol=1e-5)
    assert cache.get_seq_length() == 80 and not streamed.requires_grad
    if name in PURE_SSM:
        assert len(set(sizes)) == 1, sizes  # the state does not grow with the stream


@pytest.mark.parametrize("name", ["mamba", "mamba2", "hybrid"])
def test_bf16_stream_is_as_accurate_as_one_bf16_forward(name):
    model = _model(name, scale=0.05)
    ids = _ids(2, 80, seed=4)
    with torch.no_grad():
        reference = copy.deepcopy(model).double()(ids).logits
        bf16 = model.to(torch.bfloat16)
        full = bf16(ids).logits
    for chunks in (1, [1, 7, 64, 8]):
        streamed = torch.cat([out.logits for out in ssm_hf.stream(bf16, ids.split(chunks, dim=1))], dim=1)
        scale = reference.abs().max()
        err_full = (full.double() - reference).abs().max() / scale
        err_stream = (streamed.double() - reference).abs().max() / scale
        assert err_stream <= 2 * err_full + 1e-2, (chunks, err_stream.item(), err_full.item())


def test_stream_accepts_1d_chunks_lists_and_forward_kwargs():
    model = _model("mamba")
    ids = _ids(1, 20, seed=5)
    with torch.no_grad():
        full = model(ids).logits
    outs = list(ssm_hf.stream(model, [ids[0, :5], ids[0, 5:12].tolist(), ids[:, 12:]], logits_to_keep=1))
    assert [o.logits.shape[1] for o in outs] == [1, 1, 1]
    assert_close_to_scale(torch.cat([o.logits for o in outs], 1), full[:, [4, 11, 19]])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(CASES))
def test_snapshot_save_load_roundtrip_is_bit_exact(name, dtype, tmp_path):
    model = _model(name, dtype=dtype)
    ids = _ids(2, 40, seed=6)
    snap = _prefix_snapshot(model, ids, 31)
    assert snap.num_tokens == 31 and snap.batch_size == 2 and snap.dtype == dtype
    snap.save(tmp_path / "state.safetensors")
    loaded = ssm_hf.load_snapshot(tmp_path / "state.safetensors", model)
    assert loaded.tensors.keys() == snap.tensors.keys() and loaded.num_tokens == 31
    for key, tensor in snap.tensors.items():
        assert loaded.tensors[key].dtype == tensor.dtype and torch.equal(loaded.tensors[key], tensor), key
    assert loaded.has_previous_state == snap.has_previous_state and loaded.layer_classes == snap.layer_classes
    if "attention" in model.config.to_dict().get("layers_block_type", []):
        assert any(key.endswith(".keys") for key in snap.tensors)  # the KV part of a hybrid's state is in it
    # continuing from the loaded state is bit-identical to continuing the original cache
    with torch.no_grad():
        original = model(ids[:, :31], use_cache=True)
        expected = model(ids[:, 31:], past_key_values=_state(original)).logits
        again = model(ids[:, 31:], past_key_values=loaded.to_cache()).logits
        once_more = model(ids[:, 31:], past_key_values=loaded.to_cache()).logits  # the snapshot is left unchanged
    assert torch.equal(again, expected) and torch.equal(once_more, expected)


def test_snapshot_is_a_detached_copy_and_to_cache_copies_again():
    model = _model("mamba")
    ids = _ids(1, 20, seed=7)
    with torch.no_grad():
        cache = _state(model(ids[:, :10], use_cache=True))
        snap = ssm_hf.snapshot(cache)
        frozen = {k: t.clone() for k, t in snap.tensors.items()}
        model(ids[:, 10:], past_key_values=cache)  # the cache moves on, in place
        fresh = snap.to_cache()
        model(ids[:, 10:], past_key_values=fresh)
    assert all(torch.equal(snap.tensors[k], t) for k, t in frozen.items())
    assert cache.get_seq_length() == 20 and fresh.get_seq_length() == 20 and snap.num_tokens == 10


def test_mismatched_model_dtype_or_batch_is_refused_with_clear_errors(tmp_path):
    model = _model("mamba")
    ids = _ids(2, 12, seed=8)
    path = tmp_path / "state.safetensors"
    _prefix_snapshot(model, ids, 10).save(path)
    other_size = ssm_hf.MambaForCausalLM(tiny_config("mamba", state_size=16))
    with pytest.raises(ValueError, match="state_size: 8 in the snapshot, 16 in the model"):
        ssm_hf.load_snapshot(path, other_size)
    with pytest.raises(ValueError, match="ssm_mamba model; this model is ssm_mamba2"):
        ssm_hf.load_snapshot(path, _model("mamba2"))
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 model; this model is bfloat16"):
        ssm_hf.load_snapshot(path, bf16)
    loaded = ssm_hf.load_snapshot(path, model)
    with pytest.raises(ValueError, match="batch of 2, the input has 1 rows"):
        model(ids[:1, 10:], past_key_values=loaded.to_cache())
    with pytest.raises(ValueError, match="batch of 2, the input has 1 rows"):
        model.generate(ids[:1], past_key_values=loaded.to_cache(), max_new_tokens=2)
    with pytest.raises(ValueError, match="float32 model; the model it was passed to is bfloat16"):
        bf16(ids[:, 10:], past_key_values=loaded.to_cache())
    # fields that do not shape the state may differ (special tokens, scan chunk length, initialisation)
    relaxed = ssm_hf.MambaForCausalLM(tiny_config("mamba", scan_chunk_size=8, eos_token_id=3, initializer_range=0.5))
    assert ssm_hf.load_snapshot(path, relaxed).num_tokens == 10
    model.save_pretrained(tmp_path / "weights")
    with pytest.raises(ValueError, match="not an ssm-hf state snapshot"):
        ssm_hf.load_snapshot(tmp_path / "weights" / "model.safetensors", model)


def test_snapshot_misuse_gets_clear_errors():
    model = _model("mamba")
    ids = _ids(1, 12, seed=9)
    with pytest.raises(ValueError, match="holds no state yet"):
        ssm_hf.snapshot(ssm_hf.StateCache(config=model.config))
    with pytest.raises(TypeError, match="takes the model's cache"):
        ssm_hf.snapshot(model(ids, use_cache=True))
    with pytest.raises(ValueError, match="fork"):
        _prefix_snapshot(model, ids, 5).fork(0)
    # a plain DynamicCache does not count its tokens: snapshot needs the model and the count, generate refuses it
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :6], past_key_values=plain)
    with pytest.raises(ValueError, match="pass the model"):
        ssm_hf.snapshot(plain)
    with pytest.raises(ValueError, match="num_tokens"):
        ssm_hf.snapshot(plain, model)
    with pytest.raises(ValueError, match="does not count the tokens"):
        model.generate(ids, past_key_values=plain, max_new_tokens=2)
    counted = ssm_hf.snapshot(plain, model, num_tokens=6)
    expected = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, past_key_values=counted.to_cache(), max_new_tokens=5, do_sample=False),
                       expected)
    # an empty plain DynamicCache is fine: generate fills it in place
    empty = DynamicCache(config=model.config)
    assert torch.equal(model.generate(ids, past_key_values=empty, max_new_tokens=5, do_sample=False), expected)
    assert empty.layers[0].has_previous_state[0]
    # the cache must leave at least one new token to read
    with pytest.raises(ValueError, match="at least one new token"):
        model.generate(ids[:, :5], past_key_values=_prefix_snapshot(model, ids, 5).to_cache(), max_new_tokens=2)


@pytest.mark.parametrize("name", list(CASES))
def test_generate_from_a_snapshot_equals_generate_from_the_full_prompt(name, tmp_path):
    model = _model(name)
    ids = _ids(1, 24, seed=10)
    snap = _prefix_snapshot(model, ids, 20)
    snap.save(tmp_path / "prompt.safetensors")
    loaded = ssm_hf.load_snapshot(tmp_path / "prompt.safetensors", model)
    greedy = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert len(set(greedy[0, 24:].tolist())) > 3
    for source in (snap, loaded):
        assert torch.equal(model.generate(ids, past_key_values=source.to_cache(), max_new_tokens=12,
                                          do_sample=False), greedy)
    # under transformers' Mamba name too, and with only the new ids plus a mask covering the whole sequence
    assert torch.equal(model.generate(ids, cache_params=snap.to_cache(), max_new_tokens=12, do_sample=False),
                       greedy)
    new_only = model.generate(ids[:, 20:], attention_mask=torch.ones(1, 24, dtype=torch.long),
                              past_key_values=snap.to_cache(), max_new_tokens=12, do_sample=False)
    assert torch.equal(new_only, greedy[:, 20:])
    # sampling with one seed consumes the generator identically: same tokens
    torch.manual_seed(7)
    sampled = model.generate(ids, max_new_tokens=10, do_sample=True, top_k=50)
    torch.manual_seed(7)
    assert torch.equal(model.generate(ids, past_key_values=loaded.to_cache(), max_new_tokens=10, do_sample=True,
                                      top_k=50), sampled)
    # beam search: the snapshot's batch of one is expanded to the beams
    kwargs = dict(max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False)
    assert torch.equal(model.generate(ids, past_key_values=snap.to_cache(), **kwargs), model.generate(ids, **kwargs))
    # and a prompt read in chunks by generate itself
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, prefill_chunk_size=7), greedy)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "hybrid", "hybrid-no-attention", "s4d"])
def test_fork_samples_several_continuations_of_one_prompt(name):
    model = _model(name)
    ids = _ids(1, 18, seed=11)
    snap = _prefix_snapshot(model, ids, 15)
    forked = snap.fork(3)
    assert forked.batch_size == 3 and forked.num_tokens == 15 and snap.batch_size == 1
    assert all(torch.equal(forked.tensors[k][i], t[0]) for k, t in snap.tensors.items() for i in range(3))
    sample = dict(max_new_tokens=10, do_sample=True, temperature=1.5)
    torch.manual_seed(3)
    rows = model.generate(ids.repeat(3, 1), past_key_values=forked.to_cache(), **sample)
    torch.manual_seed(3)
    expected = model.generate(ids.repeat(3, 1), **sample)
    assert torch.equal(rows, expected)
    assert len({tuple(r) for r in rows[:, 18:].tolist()}) > 1  # several different continuations
    # num_return_sequences expands a batch-1 snapshot the same way
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, past_key_values=snap.to_cache(), num_return_sequences=3, **sample),
                       expected)


@pytest.mark.parametrize("name", ["mamba", "hybrid"])
def test_conversation_continues_from_the_state_generate_returns(name):
    model = _model(name)
    ids = _ids(1, 10, seed=13)
    first = model.generate(ids, max_new_tokens=6, do_sample=False, return_dict_in_generate=True)
    state = first.past_key_values  # everything but the last generated token, which the next call reads
    assert isinstance(state, ssm_hf.StateCache) and state.get_seq_length() == 15
    follow_up = torch.cat([first.sequences, _ids(1, 4, seed=14)], dim=1)
    expected = model.generate(follow_up, max_new_tokens=6, do_sample=False)
    assert torch.equal(model.generate(follow_up, past_key_values=ssm_hf.snapshot(state).to_cache(),
                                      max_new_tokens=6, do_sample=False), expected)


def test_left_padded_batch_continues_from_its_snapshot():
    model = _model("mamba")
    prompts = [_ids(1, n, seed=n)[0] for n in (9, 14)]
    ids = torch.zeros(2, 16, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, 16 - len(p):], mask[row, 16 - len(p):] = p, 1
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    with torch.no_grad():
        cache = _state(model(ids[:, :12], attention_mask=mask[:, :12], use_cache=True))
    got = model.generate(ids, attention_mask=mask, past_key_values=ssm_hf.snapshot(cache).to_cache(),
                         max_new_tokens=8, do_sample=False)
    assert torch.equal(got, expected)


def _inference_tensors(cache) -> list[str]:
    return [f"{i}.{name}" for i, layer in enumerate(cache.layers) for name, t in layer_tensors(layer).items()
            if t.is_inference()]


@pytest.mark.parametrize("name", list(CASES))
def test_a_state_filled_in_inference_mode_continues_outside_it(name):
    """A prefill under torch.inference_mode() leaves inference tensors in the cache, which cannot be updated in
    place outside it: the model continues such a cache (decoding steps, a chunk, under autograd too) as if the
    state had been filled normally, and then updates its own copies in place."""
    model = _model(name)
    ids = _ids(2, 30, seed=40)
    with torch.no_grad():
        full = model(ids).logits
    with torch.inference_mode():
        cache = _state(model(ids[:, :20], use_cache=True))
    assert _inference_tensors(cache)
    pieces = []
    with torch.no_grad():
        pieces.append(model(ids[:, 20:21], past_key_values=cache).logits)
        assert not _inference_tensors(cache)
        kept = {name: t for name, t in layer_tensors(cache.layers[0]).items() if "states" in name}
        for start, stop in ((21, 22), (22, 27)):                # decoding steps, then a chunk
            pieces.append(model(ids[:, start:stop], past_key_values=cache).logits)
        # from then on the state tensors are updated in place, as for any cache
        assert all(layer_tensors(cache.layers[0])[name] is t for name, t in kept.items())
    last = model(ids[:, 27:], past_key_values=cache).logits   # under autograd
    last.float().pow(2).mean().backward()
    assert_close_to_scale(torch.cat([*pieces, last.detach()], 1), full[:, 20:], tol=1e-4)
    assert cache.get_seq_length() == 30


@pytest.mark.parametrize("name", ["mamba", "hybrid", "s4d"])
def test_generate_in_inference_mode_then_continue_outside_it(name):
    model = _model(name)
    ids = _ids(1, 10, seed=41)
    with torch.inference_mode():
        first = model.generate(ids, max_new_tokens=5, do_sample=False, return_dict_in_generate=True)
        snap = ssm_hf.snapshot(first.past_key_values)
        inference_cache = snap.to_cache()
    follow_up = torch.cat([first.sequences, _ids(1, 3, seed=42)], dim=1)
    expected = model.generate(follow_up, max_new_tokens=6, do_sample=False)
    assert _inference_tensors(first.past_key_values) and _inference_tensors(inference_cache)
    for cache in (first.past_key_values, inference_cache, snap.to_cache()):
        assert torch.equal(model.generate(follow_up, past_key_values=cache, max_new_tokens=6, do_sample=False),
                           expected)
    # forked, sampled, and searched with beams (whose row reorders write into the state tensors)
    sample = dict(max_new_tokens=6, do_sample=True, temperature=1.5)
    torch.manual_seed(5)
    rows = model.generate(follow_up.repeat(3, 1), past_key_values=snap.fork(3).to_cache(), **sample)
    torch.manual_seed(5)
    assert torch.equal(rows, model.generate(follow_up.repeat(3, 1), **sample))
    beams = dict(max_new_tokens=5, num_beams=3, num_return_sequences=2, do_sample=False)
    with torch.inference_mode():
        beam_cache = snap.fork(3).to_cache()
    assert torch.equal(model.generate(follow_up.repeat(3, 1), past_key_values=beam_cache, **beams),
                       model.generate(follow_up.repeat(3, 1), **beams))


def test_row_operations_on_a_state_made_in_inference_mode():
    """Reordering, selecting and resetting a cache write into its tensors; outside inference_mode they work on a
    cache filled inside it too."""
    model = _model("mamba")
    ids = _ids(3, 12, seed=43)
    with torch.no_grad():
        reference = _state(model(ids[:, :8], use_cache=True))
    with torch.inference_mode():
        cache = _state(model(ids[:, :8], use_cache=True))
    order = torch.tensor([2, 0, 1])
    for each in (cache, reference):
        each.reorder_cache(order)
        each.batch_select_indices(torch.tensor([0, 2]))
    with torch.no_grad():
        got = model(ids[[2, 1], 8:], past_key_values=cache).logits
        expected = model(ids[[2, 1], 8:], past_key_values=reference).logits
    assert torch.equal(got, expected)
    with torch.inference_mode():
        cache = _state(model(ids[:, :8], use_cache=True))
    cache.reset()
    with torch.no_grad():
        assert torch.equal(model(ids, past_key_values=cache).logits, model(ids).logits)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "s4d"])
def test_long_stream_in_flat_memory(name):
    model = _model(name, scale=0.05)
    cache = ssm_hf.StateCache(config=model.config)
    generator = torch.Generator().manual_seed(12)
    chunks = (torch.randint(1, 512, (1, 1000), generator=generator) for _ in range(25))
    sizes = []
    for out in ssm_hf.stream(model, chunks, cache, logits_to_keep=1):
        assert torch.isfinite(out.logits).all()
        sizes.append(cache.nbytes)
    assert cache.get_seq_length() == 25_000
    assert len(set(sizes)) == 1 and sizes[0] < 64 * 1024, sizes[:3]
    snap = ssm_hf.snapshot(cache)
    assert snap.nbytes == sizes[0] and all(torch.isfinite(t).all() for t in snap.tensors.values())


def test_stream_long_file_example_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "stream_long_file.py"), "--chars", "20000", "--chunk", "256",
         "--train-seconds", "0", "--new-tokens", "8", "--output", str(tmp_path / "file.state")],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "same tokens as re-reading the file: True" in result.stdout, result.stdout
    assert (tmp_path / "file.state").is_file()


def _env() -> dict:
    """This environment with the repository first on PYTHONPATH (what was there stays: it may hold the packages)."""
    import os

    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
