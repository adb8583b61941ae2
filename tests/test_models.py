"""Mamba and Mamba-2 models against transformers' in-tree twins; loading, saving, errors, heads."""

import os

import pytest
import torch
import transformers
from conftest import (
    FAMILIES,
    assert_close_to_scale,
    causal_lm_class,
    spread_weights,
    tiny_config,
    tiny_mamba_config,
    transformers_twin,
)
from huggingface_hub.errors import StrictDataclassError
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

import ssm_hf

families = pytest.mark.parametrize("family", list(FAMILIES))


def test_config_built_from_transformers_mamba_config_dict():
    theirs = transformers.MambaConfig(hidden_size=48, num_hidden_layers=3, state_size=4, vocab_size=99,
                                      expand=3, conv_kernel=3, use_conv_bias=False, time_step_rank=5)
    ours = ssm_hf.MambaConfig(**theirs.to_dict())
    assert ours.model_type == "ssm_mamba" and ours.to_dict()["model_type"] == "ssm_mamba"
    for name in ("hidden_size", "num_hidden_layers", "state_size", "vocab_size", "expand", "conv_kernel",
                 "use_conv_bias", "time_step_rank", "intermediate_size", "layer_norm_epsilon"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("family,overrides", [
    ("mamba", dict(time_step_rank=3)),
    ("mamba", dict(use_bias=True, use_conv_bias=False)),
    ("mamba2", dict()),
    ("mamba2", dict(n_groups=1, use_bias=True, chunk_size=8, time_step_limit=(0.01, 0.5))),
    # an activation the conv ops do not fuse (SiLU is applied inside them): the mixers apply it after the conv
    ("mamba", dict(hidden_act="gelu")),
    ("mamba2", dict(hidden_act="relu")),
])
def test_logits_equal_transformers_twin(family, overrides):
    config = tiny_config(family, **overrides)
    theirs = spread_weights(transformers_twin(family, config), seed=1, scale=0.2)
    ours = causal_lm_class(family)(config).eval()
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    assert set(ours.state_dict()) == set(theirs.state_dict())
    g = torch.Generator().manual_seed(5)
    for seqlen in (1, 2, 15, 16, 17, 31, 32, 33, 100, 300):  # chunk sizes here are 8, 16 and 32
        ids = torch.randint(0, config.vocab_size, (2, seqlen), generator=g)
        with torch.no_grad():
            diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
        assert diff < 1e-4, (seqlen, diff)
    # and back: their model takes our weights
    theirs_again = transformers_twin(family, config)
    theirs_again.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.allclose(theirs_again(ids).logits, ours(ids).logits, atol=1e-4)


def test_mamba2_config_built_from_transformers_config_dict():
    theirs = transformers.Mamba2Config(hidden_size=48, num_heads=6, head_dim=16, n_groups=3, num_hidden_layers=3,
                                       state_size=4, vocab_size=99, chunk_size=32, time_step_limit=(0.0, 2.0))
    ours = ssm_hf.Mamba2Config(**theirs.to_dict())
    assert ours.model_type == "ssm_mamba2" and ours.to_dict()["model_type"] == "ssm_mamba2"
    for name in ("hidden_size", "num_heads", "head_dim", "n_groups", "num_hidden_layers", "state_size",
                 "vocab_size", "chunk_size", "conv_kernel", "layer_norm_epsilon"):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert tuple(ours.time_step_limit) == (0.0, 2.0)


def test_presets():
    names = ssm_hf.list_presets()
    for name in ("mamba-tiny", "mamba-130m", "mamba-370m", "mamba-790m", "mamba-1.4b", "mamba-2.8b",
                 "mamba2-tiny", "mamba2-130m", "mamba2-370m", "mamba2-780m", "mamba2-1.3b", "mamba2-2.7b"):
        assert name in names
    for tiny in (ssm_hf.preset_config("mamba-tiny"), ssm_hf.preset_config("mamba2-tiny")):
        assert tiny.hidden_size <= 64 and tiny.num_hidden_layers <= 4
    assert isinstance(ssm_hf.preset_config("mamba2-130m"), ssm_hf.Mamba2Config)
    assert ssm_hf.preset_config("mamba-130m").hidden_size == 768
    assert ssm_hf.preset_config("mamba-2.8b").num_hidden_layers == 64
    assert ssm_hf.preset_config("mamba-tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(KeyError, match="mamba-huge"):
        ssm_hf.preset_config("mamba-huge")


@pytest.mark.parametrize("fields,message", [
    (dict(hidden_size=0), "hidden_size"),
    (dict(state_size=-2), "state_size"),
    (dict(num_hidden_layers=0), "num_hidden_layers"),
    (dict(hidden_act="swishy"), "hidden_act"),
    (dict(hidden_size=30, expand=1.5), None),  # 45: an integer width, accepted
    (dict(hidden_size=30, expand=1.25), "non-integer"),
])
def test_mamba_config_validation(fields, message):
    if message is None:
        assert ssm_hf.MambaConfig(**fields).intermediate_size == 45
        return
    with pytest.raises(StrictDataclassError, match=message):
        ssm_hf.MambaConfig(**fields)


@pytest.mark.parametrize("fields,message", [
    (dict(num_heads=5), "num_heads \\* head_dim"),
    (dict(n_groups=3), "not divisible by n_groups"),
    (dict(chunk_size=0), "chunk_size"),
    (dict(time_step_limit=(0.5, 0.1)), "time_step_limit"),
])
def test_mamba2_config_validation(fields, message):
    with pytest.raises(StrictDataclassError, match=message):
        ssm_hf.preset_config("mamba2-tiny", **fields)


@families
def test_token_ids_out_of_range_are_named(family):
    model = causal_lm_class(family)(tiny_config(family)).eval()
    with pytest.raises(ValueError, match="token id 512"):
        model(torch.tensor([[1, 2, 512]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))


def test_token_id_check_reads_back_only_where_it_costs_nothing(monkeypatch):
    """The range check reads the ids back (a device synchronisation): on the CPU and in forwards with a cache
    (generation), not in cache-less forwards on an accelerator unless SSM_HF_CHECK_TOKEN_IDS=1; =0 turns it off."""
    from ssm_hf.models.modeling_utils import check_token_ids

    reads, stack = [], torch.stack
    # meta tensors stand in for an accelerator's (their values cannot be read: the spy reads CPU ones instead)
    monkeypatch.setattr(torch, "stack", lambda tensors: (reads.append(tensors[0].device.type),
                                                         stack([torch.tensor(0), torch.tensor(3)]))[1])
    monkeypatch.delenv("SSM_HF_CHECK_TOKEN_IDS", raising=False)
    on_device = torch.ones(2, 5, dtype=torch.long, device="meta")
    check_token_ids(on_device, 10)                                    # training / scoring: no read-back
    check_token_ids(on_device[:, :1], 10, with_cache=True)             # a decoding step: no read-back
    assert reads == []
    check_token_ids(on_device, 10, with_cache=True)                   # generation's prompt
    check_token_ids(torch.ones(2, 5, dtype=torch.long), 10)           # the CPU
    assert reads == ["meta", "cpu"]
    monkeypatch.setenv("SSM_HF_CHECK_TOKEN_IDS", "1")
    check_token_ids(on_device, 10)
    assert reads == ["meta", "cpu", "meta"]
    monkeypatch.setenv("SSM_HF_CHECK_TOKEN_IDS", "0")
    check_token_ids(torch.tensor([[5, 99]]), 10)                      # off: nothing read, nothing raised
    assert reads == ["meta", "cpu", "meta"]
    monkeypatch.setattr(torch, "stack", stack)
    monkeypatch.delenv("SSM_HF_CHECK_TOKEN_IDS")
    with pytest.raises(ValueError, match="token id 99"):
        check_token_ids(torch.tensor([[5, 99]]), 10)


@families
def test_logits_in_lm_head_dtype_and_loss_in_float32(family):
    """bf16 logits (as transformers' Llama gives them, no float32 copy of the whole vocabulary per token); the
    loss is still the float32 cross-entropy of those logits."""
    torch.manual_seed(0)
    model = causal_lm_class(family)(tiny_config(family)).to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


@families
def test_load_state_dict_names_missing_and_misshaped_keys(family):
    model = causal_lm_class(family)(tiny_config(family))
    state = model.state_dict()
    dropped = next(name for name in state if name.startswith("backbone.layers.1.mixer.") and "D" not in name)
    state.pop(dropped)
    state["backbone.layers.0.mixer.D"] = torch.zeros(3)
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(state)
    assert dropped in str(err.value)
    assert "backbone.layers.0.mixer.D" in str(err.value)


@families
def test_save_and_load_through_auto_classes(tmp_path, family):
    config = tiny_config(family)
    model = spread_weights(AutoModelForCausalLM.from_config(config)).eval()
    assert type(model) is causal_lm_class(family)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    assert AutoConfig.from_pretrained(tmp_path).model_type == config.model_type
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is causal_lm_class(family)
    ids = torch.randint(1, config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    base = AutoModel.from_pretrained(tmp_path)
    assert type(base) is causal_lm_class(family).backbone_class
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=3)
    assert type(classifier).__name__ == type(model).__name__.replace("ForCausalLM", "ForSequenceClassification")
    torch.testing.assert_close(classifier.backbone.embeddings.weight, model.backbone.embeddings.weight)


def test_from_pretrained_refuses_missing_or_misshaped_weights(tmp_path):
    config = tiny_mamba_config()
    model = ssm_hf.MambaForCausalLM(config)
    model.save_pretrained(tmp_path)
    weights_file = os.path.join(tmp_path, "model.safetensors")
    weights = load_file(weights_file)
    good = dict(weights)
    weights.pop("backbone.layers.0.mixer.x_proj.weight")
    save_file(weights, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"backbone\.layers\.0\.mixer\.x_proj\.weight"):
        AutoModelForCausalLM.from_pretrained(tmp_path)
    good["backbone.layers.1.mixer.conv1d.weight"] = torch.zeros(5, 1, 2)
    save_file(good, weights_file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"backbone\.layers\.1\.mixer\.conv1d\.weight has shape \[5, 1, 2\]"):
        AutoModelForCausalLM.from_pretrained(tmp_path)


def test_transformers_own_mamba_models_still_resolve():
    model = AutoModel.from_config(transformers.MambaConfig(hidden_size=16, num_hidden_layers=1, vocab_size=32))
    assert type(model) is transformers.MambaModel
    model = AutoModel.from_config(transformers.Mamba2Config(hidden_size=16, num_heads=2, head_dim=16, n_groups=1,
                                                            num_hidden_layers=1, vocab_size=32))
    assert type(model) is transformers.Mamba2Model


@families
def test_forward_in_chunks_with_cache_equals_full_forward(family):
    config = tiny_config(family)
    model = spread_weights(causal_lm_class(family)(config)).eval()
    ids = torch.randint(1, config.vocab_size, (2, 40))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :1], use_cache=True)
        pieces, cache, start = [out.logits], out.cache_params, 1
        for size in (7, 1, 12, 19):
            out = model(ids[:, start:start + size], cache_params=cache, use_cache=True)
            pieces.append(out.logits)
            start += size
    assert_close_to_scale(torch.cat(pieces, 1), full)


@families
def test_hidden_states_and_tuple_outputs(family):
    config = tiny_config(family)
    model = causal_lm_class(family).backbone_class(config).eval()
    ids = torch.randint(1, config.vocab_size, (1, 5))
    out = model(ids, output_hidden_states=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1
    assert out.last_hidden_state.shape == (1, 5, config.hidden_size)
    as_tuple = model(ids, return_dict=False, use_cache=False)
    torch.testing.assert_close(as_tuple[0], out.last_hidden_state)


@families
def test_sequence_classification_pools_last_real_token(family):
    config = tiny_config(family, num_labels=3)
    model = spread_weights(AutoModelForSequenceClassification.from_config(config)).eval()
    a, b = torch.randint(1, config.vocab_size, (1, 4)), torch.randint(1, config.vocab_size, (1, 7))
    with torch.no_grad():
        single = torch.cat([model(a).logits, model(b).logits])
        left = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), a], 1), b])
        mask = (left != 0).long()
        assert_close_to_scale(model(left, attention_mask=mask).logits, single)
        right = torch.cat([torch.cat([a, torch.zeros(1, 3, dtype=torch.long)], 1), b])
        assert_close_to_scale(model(right).logits, single)
    out = model(left, attention_mask=mask, labels=torch.tensor([0, 2]))
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.score.weight.grad is not None


@families
def test_bfloat16_model_close_to_float32(family):
    config = tiny_config(family)
    model = spread_weights(causal_lm_class(family)(config), scale=0.1).eval()
    ids = torch.randint(1, config.vocab_size, (2, 50))
    with torch.no_grad():
        ref = model(ids).logits
        low = model.to(torch.bfloat16)(ids).logits
    # S4's SSM output (the convolution plus D u) reaches several times its input before the output linear layer
    # (the slowest modes have a DC gain of about 2/|Re A| = 4, D starts standard normal), so the bf16 rounding of
    # those activations moves its random-weight logits by 2-7% of their scale (its SSM parameters stay float32).
    tol = 1e-1 if family in ("s4", "s4d") else 5e-2
    assert ((low - ref).abs().max() / ref.abs().max()).item() < tol


@families
def test_language_model_loss_and_gradients(family):
    config = tiny_config(family)
    model = causal_lm_class(family)(config)
    ids = torch.randint(1, config.vocab_size, (2, 20))
    out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size),
                                                 ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    out.loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name


def _run_chunks(model, chunks):
    """Feed (ids, mask) chunks through one cache; returns the logits of each chunk."""
    cache, logits, seen_mask = None, [], None
    for ids, mask in chunks:
        seen_mask = mask if seen_mask is None else torch.cat([seen_mask, mask], 1)
        out = model(ids, attention_mask=seen_mask, cache_params=cache, use_cache=True)
        cache = out.cache_params
        logits.append(out.logits)
    return logits


@families
@pytest.mark.parametrize("where", ["left", "right", "inside"])
def test_padding_anywhere_is_skipped_with_a_cache(family, where):
    # Row 0 of the middle chunk has two padded positions; its real tokens, and everything after, must give the
    # logits of the same tokens without the padding.
    config = tiny_config(family)
    model = spread_weights(causal_lm_class(family)(config)).eval()
    g = torch.Generator().manual_seed(11)
    first, middle, last = (torch.randint(1, config.vocab_size, (2, n), generator=g) for n in (6, 7, 5))
    real = {"left": [2, 3, 4, 5, 6], "right": [0, 1, 2, 3, 4], "inside": [0, 1, 4, 5, 6]}[where]
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0] = 0
    mask[0, real] = 1
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    with torch.no_grad():
        padded = _run_chunks(model, [(first, ones(first)), (middle, mask), (last, ones(last))])
        alone = _run_chunks(model, [(first[:1], ones(first[:1])), (middle[:1, real], ones(middle[:1, real])),
                                    (last[:1], ones(last[:1]))])
    assert_close_to_scale(padded[1][0, real], alone[1][0])
    assert_close_to_scale(padded[2][0], alone[2][0])
    # row 1 has no padding: same as a run of its own
    with torch.no_grad():
        row1 = _run_chunks(model, [(t[1:], ones(t[1:])) for t in (first, middle, last)])
    assert_close_to_scale(padded[2][1], row1[2][0])


@families
@pytest.mark.parametrize("continuation", [1, 16])
def test_backward_through_a_continuation_from_the_cache(family, continuation):
    config = tiny_config(family)
    model = causal_lm_class(family)(config).train()
    ids = torch.randint(1, config.vocab_size, (2, 8 + continuation))
    cache = model(ids[:, :8], use_cache=True).cache_params
    out = model(ids[:, 8:], cache_params=cache, use_cache=True, labels=ids[:, 8:] if continuation > 1 else None)
    loss = out.loss if out.loss is not None else out.logits.sum()
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


@families
def test_cache_misuse_gets_clear_errors(family):
    config = tiny_config(family)
    model = causal_lm_class(family)(config).eval()
    ids = torch.randint(1, config.vocab_size, (2, 5))
    cache = model(ids, use_cache=True).cache_params
    with pytest.raises(ValueError, match="batch of 2"):
        model(ids[:1], cache_params=cache)
    with pytest.raises(ValueError, match="use_cache=False"):
        model(ids, cache_params=cache, use_cache=False)
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(ids, attention_mask=torch.ones(2, 1, dtype=torch.long))
    model.train()
    model.activation_checkpointing_enable()
    assert model.backbone.gradient_checkpointing
    with pytest.raises(ValueError, match="checkpointing"):
        model(ids, cache_params=cache)


@families
def test_empty_dynamic_cache_is_filled_from_the_config(family):
    from transformers import DynamicCache

    config = tiny_config(family)
    model = spread_weights(causal_lm_class(family)(config)).eval()
    ids = torch.randint(1, config.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache()
        first = model(ids[:, :6], past_key_values=cache).logits
        second = model(ids[:, 6:], past_key_values=cache).logits
    assert len(cache.layers) == config.num_hidden_layers
    assert_close_to_scale(torch.cat([first, second], 1), full)


def test_intermediate_size_follows_expand_and_hidden_size(tmp_path):
    config = ssm_hf.preset_config("mamba-tiny")
    config.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path, expand=4).intermediate_size == 4 * config.hidden_size
    config.update({"hidden_size": 48})
    assert config.intermediate_size == 96
    assert ssm_hf.preset_config("mamba2-tiny", expand=2).intermediate_size == 64


def test_from_pretrained_refuses_weights_of_extra_layers(tmp_path):
    model = ssm_hf.MambaForCausalLM(tiny_mamba_config(num_hidden_layers=3))
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"backbone\.layers\.2\.mixer"):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=2)
    base = AutoModel.from_pretrained(tmp_path)  # the LM head's weight is unexpected here, and harmless
    assert type(base) is ssm_hf.MambaModel


@families
def test_single_padded_decoding_step_leaves_the_state_alone(family):
    config = tiny_config(family)
    model = spread_weights(causal_lm_class(family)(config)).eval()
    g = torch.Generator().manual_seed(12)
    first, step, last = (torch.randint(1, config.vocab_size, (2, n), generator=g) for n in (6, 1, 3))
    step_mask = torch.tensor([[0], [1]])
    ones = lambda t: torch.ones_like(t)  # noqa: E731
    with torch.no_grad():
        padded = _run_chunks(model, [(first, ones(first)), (step, step_mask), (last, ones(last))])
        alone = _run_chunks(model, [(first[:1], ones(first[:1])), (last[:1], ones(last[:1]))])
        both = _run_chunks(model, [(first[1:], ones(first[1:])), (step[1:], ones(step[1:])),
                                   (last[1:], ones(last[1:]))])
    assert_close_to_scale(padded[2][0], alone[1][0])
    assert_close_to_scale(padded[2][1], both[2][0])
