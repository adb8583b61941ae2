"""Assisted decoding (`generate(..., assistant_model=...)`) and prompt-lookup decoding with ssm-hf models as the main
model and as the assistant: the candidates a model rejects are rolled back from its `StateCache` (`crop`), so the
tokens equal plain greedy decoding of the main model."""

import copy

import pytest
import torch
import transformers
from conftest import assert_close_to_scale, spread_weights, tiny_lm

import ssm_hf
from ssm_hf.models.state import layer_tensors

PRESETS = ["mamba-tiny", "mamba2-tiny", "s4d-tiny", "hybrid-tiny"]


def _main(preset: str) -> torch.nn.Module:
    # a random S4 with tied embeddings mostly repeats its input token; untied, its continuations vary
    return tiny_lm(preset, seed=1, **({"tie_word_embeddings": False} if preset.startswith("s4") else {}))


def _near_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The model with slightly perturbed weights: an assistant that agrees with it on some tokens, not all."""
    return spread_weights(copy.deepcopy(model), seed=9, scale=0.02)


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 512, (1, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def crops(monkeypatch) -> list[int]:
    """The number of tokens each StateCache.crop call removes, in order."""
    removed = []
    crop = ssm_hf.StateCache.crop

    def spy(self, tokens_to_remove):
        removed.append(-tokens_to_remove)
        return crop(self, tokens_to_remove)

    monkeypatch.setattr(ssm_hf.StateCache, "crop", spy)
    return removed


@pytest.mark.parametrize("assistant", ["mamba-tiny", "mamba2-tiny", "near copy"])
@pytest.mark.parametrize("main", PRESETS)
def test_assisted_greedy_equals_plain_greedy(main, assistant, crops):
    model = _main(main)
    helper = _near_copy(model) if assistant == "near copy" else tiny_lm(assistant, seed=2)
    for seed in (0, 1):
        ids = _prompt(9, seed)
        plain = model.generate(ids, max_new_tokens=24, do_sample=False)
        assert len(set(plain[0, 9:].tolist())) > 4
        assisted = model.generate(ids, max_new_tokens=24, do_sample=False, assistant_model=helper)
        assert torch.equal(assisted, plain)
    # candidates were rejected (rolled back) and, from the near copy, accepted
    assert any(n > 0 for n in crops) and (assistant != "near copy" or 0 in crops)


@pytest.mark.parametrize("assistant", ["mamba-tiny", "mamba2-tiny", "s4-tiny"])
def test_an_ssm_assistant_for_a_transformers_model(assistant, crops):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                      bos_token_id=None, eos_token_id=None)
    llama = spread_weights(transformers.LlamaForCausalLM(config), seed=3).eval()
    helper = tiny_lm(assistant, seed=2)
    ids = _prompt(7, 2)
    plain = llama.generate(ids, max_new_tokens=16, do_sample=False)
    assert torch.equal(llama.generate(ids, max_new_tokens=16, do_sample=False, assistant_model=helper), plain)
    assert any(n > 0 for n in crops)


def test_prompt_lookup_decoding_equals_plain_greedy(crops):
    model = _main("mamba2-tiny")
    ids = _prompt(6, 3).repeat(1, 3)    # a repetitive prompt: n-gram candidates are found
    plain = model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=4), plain)
    assert crops


def test_the_cache_of_an_assisted_generation_continues_like_a_plain_one():
    model = _main("mamba-tiny")
    ids = _prompt(8, 4)
    first = model.generate(ids, max_new_tokens=10, do_sample=False, assistant_model=_near_copy(model),
                           return_dict_in_generate=True)
    cache = first.past_key_values
    assert isinstance(cache, ssm_hf.StateCache) and not cache.recording
    assert cache.get_seq_length() == first.sequences.shape[1] - 1
    follow_up = torch.cat([first.sequences, _prompt(3, 5)], dim=1)
    assert torch.equal(model.generate(follow_up, past_key_values=cache, max_new_tokens=8, do_sample=False),
                       model.generate(follow_up, max_new_tokens=8, do_sample=False))


def test_assisted_decoding_continues_a_cache_holding_a_prefix():
    """transformers' assisted decoding feeds the whole sequence in its first step: the cached prefix is sliced
    off (else it would be read twice into the state)."""
    model = _main("mamba2-tiny")
    ids = _prompt(12, 8)
    plain = model.generate(ids, max_new_tokens=12, do_sample=False)
    with torch.no_grad():
        snap = ssm_hf.snapshot(model(ids[:, :8], use_cache=True).cache_params)
    out = model.generate(ids, past_key_values=snap.to_cache(), max_new_tokens=12, do_sample=False,
                         assistant_model=_near_copy(model), return_dict_in_generate=True)
    assert torch.equal(out.sequences, plain)
    assert out.past_key_values.get_seq_length() == out.sequences.shape[1] - 1


def _input_lengths(backbone: torch.nn.Module) -> list[int]:
    """The sequence length of every forward of `backbone` from now on."""
    lengths = []

    def hook(module, args, kwargs):
        inputs = args[0] if args and args[0] is not None else kwargs.get("input_ids")
        lengths.append((inputs if inputs is not None else kwargs["inputs_embeds"]).shape[1])

    backbone.register_forward_pre_hook(hook, with_kwargs=True)
    return lengths


def test_rollbacks_never_read_the_prompt_again():
    """The prompt is read before the first recorded forward, of the main model and of the assistant, so a
    rollback reads again only the last prompt token and accepted candidates, not the prompt."""
    model = _main("mamba-tiny")
    helper = tiny_lm("mamba2-tiny", seed=2)    # disagrees with the main model: rollbacks in every round
    main_lengths, helper_lengths = _input_lengths(model.backbone), _input_lengths(helper.backbone)
    ids = _prompt(40, 9)
    assisted = model.generate(ids, max_new_tokens=12, do_sample=False, assistant_model=helper)
    for lengths in (main_lengths, helper_lengths):
        assert lengths[0] == 39 and max(lengths[1:]) < 39, lengths
    assert torch.equal(assisted, model.generate(ids, max_new_tokens=12, do_sample=False))


@pytest.mark.parametrize("preset", PRESETS + ["s4-tiny", "hybrid-mamba2-tiny"])
def test_crop_rolls_the_state_back_to_an_earlier_token(preset):
    """While recording, crop(-n) puts the cache where it was n tokens earlier (also inside a chunk), as if the
    removed tokens had never been read; crop(0) commits what was read."""
    model = _main(preset)
    ids = _prompt(20, 6)
    with torch.no_grad():
        full = model(ids).logits
        cache = ssm_hf.StateCache(config=model.config)
        model(ids[:, :4], past_key_values=cache)
        cache.activate_past_recording()
        assert cache.recording and not cache.is_compileable   # recorded steps run eagerly, not from graphs
        model(ids[:, 4:9], past_key_values=cache)              # a chunk and two steps, of which 4 tokens go
        model(ids[:, 9:10], past_key_values=cache)
        model(ids[:, 10:11], past_key_values=cache)
        cache.crop(-4)
        assert cache.get_seq_length() == 7
        reference = model(ids[:, :7], use_cache=True).past_key_values
        for layer, expected in zip(cache.layers, reference.layers):
            got, want = layer_tensors(layer), layer_tensors(expected)
            assert got.keys() == want.keys()
            for name in want:
                assert_close_to_scale(got[name], want[name])
        pieces = [model(ids[:, 7:12], past_key_values=cache).logits]
        cache.crop(-2)                                          # back into the chunk just read
        cache.crop(0)                                           # commit token 10
        pieces.append(model(ids[:, 10:11], past_key_values=cache).logits)
        cache.crop(0)
        pieces.append(model(ids[:, 11:20], past_key_values=cache).logits)
    assert_close_to_scale(torch.cat([pieces[0][:, :3], *pieces[1:]], 1), full[:, 7:], tol=1e-4)
    assert cache.get_seq_length() == 20


@pytest.mark.parametrize("preset", ["mamba-tiny", "mamba2-tiny", "s4d-tiny"])
def test_crop_rolls_back_a_left_padded_batch(preset):
    model = _main(preset)
    ids = torch.randint(1, 512, (2, 12), generator=torch.Generator().manual_seed(13))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0                                             # row 0 is left-padded
    with torch.no_grad():
        cache = ssm_hf.StateCache(config=model.config)
        cache.activate_past_recording()
        model(ids[:, :8], attention_mask=mask[:, :8], past_key_values=cache)
        model(ids[:, 8:10], attention_mask=mask[:, :10], past_key_values=cache)
        cache.crop(-3)
        reference = model(ids[:, :7], attention_mask=mask[:, :7], use_cache=True).past_key_values
        for layer, expected in zip(cache.layers, reference.layers):
            for name, tensor in layer_tensors(expected).items():
                assert_close_to_scale(layer_tensors(layer)[name], tensor)
        rest = model(ids[:, 7:], attention_mask=mask, past_key_values=cache).logits
        full = model(ids, attention_mask=mask).logits
    assert_close_to_scale(rest[1], full[1, 7:], tol=1e-4)
    assert_close_to_scale(rest[0], full[0, 7:], tol=1e-4)


def test_crop_errors_name_the_problem():
    model = _main("mamba-tiny")
    ids = _prompt(8, 7)
    with torch.no_grad():
        cache = model(ids[:, :4], use_cache=True).past_key_values
        with pytest.raises(RuntimeError, match="activate_past_recording"):
            cache.crop(-1)
        cache.activate_past_recording()
        model(ids[:, 4:6], past_key_values=cache)
        with pytest.raises(RuntimeError, match="2 tokens"):
            cache.crop(-3)
        with pytest.raises(ValueError, match="negative"):
            cache.crop(3)
        cache.crop(0)
        with pytest.raises(RuntimeError, match="0 tokens"):
            cache.crop(-1)
    assert cache.get_seq_length() == 6
