"""generate() and pipeline() with the recurrent state cache."""

import pytest
import torch
from conftest import FAMILIES, assert_close_to_scale, causal_lm_class, spread_weights, tiny_config, tiny_lm
from transformers import pipeline

import ssm_hf
from ssm_hf.models.modeling_utils import mixer_padding
from ssm_hf.models.state import StateCache, layer_tensors


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    # A random S4 with tied embeddings mostly repeats its input token (the residual stream carries the token's
    # embedding, the SSM adds a slow average); untied, its greedy continuations vary, which these tests need.
    overrides = dict(tie_word_embeddings=False) if request.param in ("s4", "s4d") else {}
    return spread_weights(causal_lm_class(request.param)(tiny_config(request.param, **overrides)), seed=1).eval()


def _prompt(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, 512, (1, length), generator=torch.Generator().manual_seed(seed))


def _padded(prompts: list[torch.Tensor], width: int, side: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), each (len(prompts), width): the (1, n) prompts padded on `side` with id 0."""
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        real = slice(width - p.shape[1], width) if side == "left" else slice(0, p.shape[1])
        ids[row, real], mask[row, real] = p[0], 1
    return ids, mask


def test_greedy_with_cache_equals_without(model):
    prompt = _prompt(9, 0)
    with_cache = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False)
    assert with_cache.shape == (1, 29)
    assert len(set(with_cache[0, 9:].tolist())) > 3  # a real continuation, not one repeated token
    assert torch.equal(with_cache, without)


def test_decoding_feeds_one_token_per_step_into_a_fixed_size_state(model):
    seen_lengths, state_shapes = [], []

    def record(module, args, kwargs):
        seen_lengths.append(args[0].shape[1])
        cache = kwargs.get("cache_params")
        if cache is not None and cache.layers[0].recurrent_states[0] is not None:
            conv = cache.layers[0].conv_states[0]
            state_shapes.append((None if conv is None else tuple(conv.shape),
                                 tuple(cache.layers[0].recurrent_states[0].shape)))

    handle = model.backbone.layers[0].mixer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        model.generate(_prompt(12, 1), max_new_tokens=6, do_sample=False)
    finally:
        handle.remove()
    assert seen_lengths == [12] + [1] * 5
    config = model.config
    if isinstance(config, ssm_hf.S4Config):  # no conv; complex state as a real view
        expected = (None, (1, config.num_ssms, config.state_size // 2, 2))
    else:
        conv_channels = getattr(model.backbone.layers[0].mixer, "conv_dim", config.intermediate_size)
        recurrent = ((1, config.num_heads, config.head_dim, config.state_size) if hasattr(config, "num_heads")
                     else (1, config.intermediate_size, config.state_size))
        expected = ((1, conv_channels, config.conv_kernel), recurrent)
    assert state_shapes == [expected] * 5


def test_left_padded_batch_matches_each_prompt_alone(model):
    prompts = [_prompt(n, seed) for seed, n in enumerate((4, 11, 7))]
    width = max(p.shape[1] for p in prompts)
    ids, mask = _padded(prompts, width)
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    for row, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=12, do_sample=False)
        assert torch.equal(batched[row, width:], alone[0, p.shape[1]:]), row


@pytest.mark.parametrize("preset, path, overrides", [
    ("mamba-tiny", "torch", {}), ("mamba2-tiny", "torch", {}), ("hybrid-tiny", "torch", {}),
    ("hybrid-mamba2-tiny", "torch", {}), ("s4d-tiny", "torch", {}), ("mamba-tiny", "triton", {}),
    ("mamba2-tiny", "triton", {}), ("mamba2-tiny", "triton", dict(time_step_limit=(0.01, 1.0)))])
def test_left_padded_first_prompt_reads_the_padding_as_identity_steps(monkeypatch, preset, path, overrides):
    """A left-padded batch read into an empty cache: the mixers learn that the padding leads (one host read per
    forward) and read it as zero inputs and identity steps on their unpadded paths (Mamba-2's fused op on the
    Triton path, unless a time-step limit above 0 keeps Δ from 0). Logits at real positions, the states left in the
    cache (rows of 1 and 2 real tokens, shorter than the conv, included) and the next step's logits equal each
    row's run alone (float32; the Triton path in the interpreter on the CPU)."""
    from ssm_hf import kernels
    from ssm_hf.kernels import conv_ssd_norm_triton

    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: path == "triton" and tensor.dtype != torch.float64)
    fused = []
    forward = conv_ssd_norm_triton._FORWARD
    monkeypatch.setattr(conv_ssd_norm_triton, "_FORWARD", lambda *a: fused.append(a[0][7]) or forward(*a))
    model = tiny_lm(preset, seed=3, **overrides).to(device)
    lengths, width = (1, 9, 2, 6), 9
    prompts = [torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
               for n in lengths]
    ids, mask = _padded(prompts, width)
    prompts, ids, mask = [p.to(device) for p in prompts], ids.to(device), mask.to(device)
    seen = []
    mixers = [m for m in model.modules() if type(m).__name__ in ("MambaMixer", "Mamba2Mixer")]
    hooks = [m.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs), with_kwargs=True)
             for m in mixers]
    with torch.no_grad():
        batched = model(ids, attention_mask=mask, cache=StateCache(model.config))
        for hook in hooks:
            hook.remove()
        assert len(seen) == len(mixers) and all(kw["attention_mask"] is mask and kw["padding_leads"] for kw in seen)
        # Mamba-2's fused op ran once per layer, unpadded (no seq_idx), where Δ can be 0
        fuses = path == "triton" and "mamba2" in preset and not overrides
        assert fused == ([None] * len(mixers) if fuses else [])
        alone = [model(p, cache=StateCache(model.config)) for p in prompts]
        for row, (p, out) in enumerate(zip(prompts, alone)):
            assert_close_to_scale(batched.logits[row, width - p.shape[1]:], out.logits[0], 2e-5)
            for i, layer in enumerate(out.cache.layers):
                for name, tensor in layer_tensors(layer).items():
                    if "states" in name:  # attention keys hold the padded positions too
                        assert_close_to_scale(layer_tensors(batched.cache.layers[i])[name][row], tensor[0], 2e-5)
        step_ids = torch.randint(1, model.config.vocab_size, (len(prompts), 1), generator=torch.Generator())
        step_ids = step_ids.to(device)
        step_mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
        batched_step = model(step_ids, attention_mask=step_mask, cache=batched.cache).logits[:, -1]
        for row, out in enumerate(alone):
            assert_close_to_scale(batched_step[row], model(step_ids[row:row + 1], cache=out.cache).logits[0, -1],
                                  2e-5)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("preset, path", [("mamba-tiny", "torch"), ("mamba2-tiny", "torch"),
                                          ("mamba-tiny", "triton"), ("mamba2-tiny", "triton"),
                                          ("hybrid-mamba2-tiny", "torch"), ("s4d-tiny", "torch")])
def test_padded_training_batch_has_each_rows_gradients(monkeypatch, preset, path, side):
    """Training on a padded batch (no cache). Left padding is read as identity steps; right padding reaches no
    mixer at all (every mixer is causal: a real token never sees the padding after it). Either way the loss summed
    over real tokens and every weight's gradient equal the sums over the rows run alone (float32; no NaN from the
    padding's Δ of -inf before softplus, nor from the outputs at padded positions)."""
    from ssm_hf import kernels

    device = "cuda" if path == "triton" and torch.cuda.is_available() else "cpu"
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: path == "triton" and tensor.dtype != torch.float64)
    model = tiny_lm(preset, seed=4).to(device).train()
    lengths, width = (3, 37, 20), 37   # past one 32-token SSD chunk
    prompts = [torch.randint(1, model.config.vocab_size, (1, n), generator=torch.Generator().manual_seed(10 + n))
               for n in lengths]
    ids, mask = _padded(prompts, width, side)
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, 1:][mask[:, :-1] == 0] = -100   # a row's first real token is no target, as when it runs alone
    seen = []
    mixers = [m for m in model.modules() if type(m).__name__ in ("MambaMixer", "Mamba2Mixer", "S4Mixer")]
    hooks = [m.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs.get("attention_mask")),
                                         with_kwargs=True) for m in mixers]

    def loss_and_grads(**inputs):
        model.zero_grad()
        logits = model(**{k: v.to(device) for k, v in inputs.items() if k != "labels"}).logits.float()
        targets = inputs["labels"][:, 1:].to(device)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), reduction="sum",
                                                 ignore_index=-100)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    batched_loss, batched_grads = loss_and_grads(input_ids=ids, attention_mask=mask, labels=labels)
    for hook in hooks:
        hook.remove()
    assert len(mixers) > 0 and len(seen) == len(mixers)
    assert all((m is None) == (side == "right") for m in seen)   # the mask reaches the mixers for left padding only
    alone = [loss_and_grads(input_ids=p, labels=p) for p in prompts]
    assert_close_to_scale(batched_loss, sum(loss for loss, _ in alone), 1e-5)
    for name, grad in batched_grads.items():
        assert torch.isfinite(grad).all(), name
        assert_close_to_scale(grad, sum(grads[name] for _, grads in alone), 2e-5)


def test_mixer_padding_says_whether_the_padding_leads():
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert mixer_padding(left, 4) == (left, True)
    assert mixer_padding(left, 4, stateless=True) == (left, True)
    assert mixer_padding(torch.ones(2, 4, dtype=torch.long), 4) == (None, False)
    # only the last `length` columns count: a decoding step after a left-padded prompt is unpadded, a later
    # piece of a prompt may still start with padding
    assert mixer_padding(torch.cat([left, torch.ones(2, 1, dtype=torch.long)], 1), 1)[0] is None
    assert mixer_padding(left, 3) == (left, True)
    right, inside = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]])
    for mask in (right, inside):
        assert mixer_padding(mask, 4) == (mask, False)
    # without a cache, padding after every row's real tokens concerns no causal mixer; inside a row it does
    assert mixer_padding(right, 4, stateless=True) == (None, False)
    assert mixer_padding(inside, 4, stateless=True) == (inside, False)
    assert mixer_padding(torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]), 4, stateless=True) == (None, False)
    assert mixer_padding(None, 4) == (None, False)


def test_beam_search_with_cache_equals_without(model):
    prompt = _prompt(6, 3)
    kwargs = dict(max_new_tokens=8, num_beams=4, num_return_sequences=2, do_sample=False)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 14)
    assert torch.equal(with_cache, without)


def test_sampling_is_seeded_and_stays_in_the_vocabulary(model):
    prompt = _prompt(5, 4)
    torch.manual_seed(123)
    first = model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=50, temperature=1.5)
    torch.manual_seed(123)
    again = model.generate(prompt, max_new_tokens=15, do_sample=True, top_k=50, temperature=1.5)
    assert torch.equal(first, again)
    assert first.shape == (1, 20) and int(first.max()) < model.config.vocab_size
    greedy = model.generate(prompt, max_new_tokens=15, do_sample=False)
    assert not torch.equal(first, greedy)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_generation_pipeline_with_local_tokenizer(tokenizer, family):
    config = tiny_config(family, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    model = spread_weights(causal_lm_class(family)(config)).eval()
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    out = generator("def main(", max_new_tokens=10, do_sample=False)
    text = out[0]["generated_text"]
    assert text.startswith("def main(") and len(text) > len("def main(")
    batch = generator(["import os", "class Foo:\n    def"], max_new_tokens=5, do_sample=False, batch_size=2)
    assert [b[0]["generated_text"][:9] for b in batch] == ["import os", "class Foo"]
