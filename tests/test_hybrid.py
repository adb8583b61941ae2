"""Hybrid (Jamba-style) models: equivalence with transformers' Jamba, the mixed cache, MoE, generation."""

import pytest
import torch
import transformers
from conftest import assert_close_to_scale, spread_weights
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import ssm_hf
from ssm_hf.conversion import hybrid_to_jamba, jamba_to_hybrid
from ssm_hf.layers.mlp import load_balancing_loss

PRESETS = ["hybrid-tiny", "hybrid-mamba2-tiny"]
# a mamba_ssm-style hybrid: rotary embeddings on part of each attention head, attention biases, no MLPs
MAMBA_SSM_STYLE = dict(attention_rope_dim=4, attention_rope_theta=100.0, attention_qkv_bias=True,
                       attention_out_bias=True, layers_mlp_type=["none"] * 4, mamba_inner_layernorms=False)
LAYOUTS = [("hybrid-tiny", {}), ("hybrid-mamba2-tiny", {}), ("hybrid-tiny", MAMBA_SSM_STYLE)]


def _tiny(preset="hybrid-tiny", **overrides):
    return ssm_hf.preset_config(preset, **{"bos_token_id": None, "eos_token_id": None, **overrides})


def _jamba_config(**overrides):
    fields = dict(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2,
                  expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_dt_rank=4)
    fields.update(overrides)
    return transformers.JambaConfig(**fields)


@pytest.mark.parametrize("overrides", [dict(), dict(num_experts=1, tie_word_embeddings=True),
                                       dict(num_hidden_layers=8, attn_layer_period=3, attn_layer_offset=0,
                                            num_key_value_heads=4, mamba_proj_bias=True)])
def test_logits_equal_transformers_jamba(overrides):
    jamba_config = _jamba_config(**overrides)
    theirs = spread_weights(transformers.JambaForCausalLM(jamba_config).eval(), scale=0.1)
    config, state_dict = jamba_to_hybrid(jamba_config, theirs.state_dict())
    ours = ssm_hf.HybridForCausalLM(config).eval()
    ours.load_state_dict(state_dict)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for seqlen in (1, 7, 33, 100):
            ids = torch.randint(0, 128, (2, seqlen), generator=g)
            diff = (ours(ids).logits - theirs(ids).logits).abs().max().item()
            assert diff < 1e-4, (seqlen, diff)
        if not jamba_config.mamba_proj_bias:
            # left padding: the real positions agree (with an in_proj bias, Jamba's zeroed padding becomes the
            # bias and reaches the conv, while ours skips padding altogether)
            mask = torch.ones(2, 33, dtype=torch.long)
            mask[0, :5] = 0
            ids = torch.randint(1, 128, (2, 33), generator=g)
            assert_close_to_scale(ours(ids, attention_mask=mask).logits[0, 5:],
                                  theirs(ids, attention_mask=mask).logits[0, 5:])
    # and back, bit-exact
    fields, back = hybrid_to_jamba(config, ours.state_dict())
    reference = theirs.state_dict()
    assert set(back) == set(reference) and all(torch.equal(back[k], reference[k]) for k in reference)
    assert transformers.JambaConfig(**fields).layers_block_type == jamba_config.layers_block_type


def test_logits_in_lm_head_dtype_and_loss_in_float32():
    torch.manual_seed(0)
    model = ssm_hf.HybridForCausalLM(_tiny()).to(torch.bfloat16).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 9))
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)


def test_jamba_converter_names_what_does_not_fit():
    jamba_config = _jamba_config()
    state_dict = transformers.JambaForCausalLM(jamba_config).state_dict()
    broken = dict(state_dict)
    broken.pop("model.layers.1.mamba.A_log")
    broken["model.layers.0.feed_forward.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(ValueError) as err:
        jamba_to_hybrid(jamba_config, broken)
    assert "backbone.layers.1.mixer.A_log" in str(err.value)
    assert "backbone.layers.0.ffn.up_proj.weight [3, 3]" in str(err.value)
    with pytest.raises(ValueError, match="unknown Jamba tensor 'model.extra.weight'"):
        jamba_to_hybrid(jamba_config, {**state_dict, "model.extra.weight": torch.zeros(1)})


def test_layer_layout_from_period_and_offset_or_lists():
    jamba_like = ssm_hf.HybridConfig(hidden_size=64, num_hidden_layers=16, num_attention_heads=4,
                                     num_key_value_heads=2)
    assert [i for i, k in enumerate(jamba_like.layers_block_type) if k == "attention"] == [4, 12]
    assert [i for i, k in enumerate(jamba_like.layers_mlp_type) if k == "moe"] == list(range(1, 16, 2))
    assert jamba_like.layer_types[4] == "full_attention" and jamba_like.layer_types[0] == "linear_attention"
    explicit = ssm_hf.HybridConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                                   layers_block_type=["mamba2", "attention", "mamba"],
                                   layers_mlp_type=["moe", "dense", "dense"], mamba2_head_dim=16)
    model = ssm_hf.HybridModel(explicit)
    assert [type(b.mixer).__name__ for b in model.layers] == ["Mamba2Mixer", "Attention", "MambaMixer"]
    assert [type(b.ffn).__name__ for b in model.layers] == ["MoE", "GatedMLP", "GatedMLP"]
    # the mixers are the pure models' classes, not copies
    assert type(model.layers[0].mixer) is type(ssm_hf.Mamba2Model(ssm_hf.preset_config("mamba2-tiny")).layers[0].mixer)


@pytest.mark.parametrize("fields,message", [
    (dict(layers_block_type=["mamba", "conv"], num_hidden_layers=2), "unknown kind"),
    (dict(layers_block_type=["mamba"], num_hidden_layers=2), "has 1 entries"),
    (dict(attn_layer_offset=8), "attn_layer_offset"),
    (dict(num_key_value_heads=3), "not divisible by num_key_value_heads"),
    (dict(num_experts_per_tok=5, num_experts=4), "num_experts_per_tok"),
    (dict(ssm_mixer="s5"), "ssm_mixer"),
    (dict(mamba_d_state=0), "state_size"),
    (dict(attention_rope_dim=3), "attention_rope_dim=3 must be even"),
    (dict(attention_rope_dim=10), r"attention_rope_dim=10 must be even and in \[0, head_dim=8\]"),
    (dict(layers_mlp_type=["dense", "none"], num_hidden_layers=2, intermediate_size=0), "intermediate_size"),
])
def test_config_validation(fields, message):
    with pytest.raises(StrictDataclassError, match=message):
        ssm_hf.HybridConfig(hidden_size=32, num_hidden_layers=fields.pop("num_hidden_layers", 8),
                            num_attention_heads=4, num_key_value_heads=fields.pop("num_key_value_heads", 2), **fields)


@pytest.mark.parametrize("preset", PRESETS)
def test_cache_grows_only_in_attention_layers(preset):
    config = _tiny(preset)
    model = spread_weights(AutoModelForCausalLM.from_config(config)).eval()
    ids = torch.randint(1, config.vocab_size, (2, 13))
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
        sizes = []
        for extra in range(3):
            model(torch.randint(1, config.vocab_size, (2, 1)), past_key_values=cache)
            sizes.append([(tuple(layer.keys.shape) if kind == "attention" else
                           (tuple(layer.conv_states[0].shape), tuple(layer.recurrent_states[0].shape)))
                          for kind, layer in zip(config.layers_block_type, cache.layers)])
    kv = config.num_key_value_heads
    for extra, layers in enumerate(sizes):
        for kind, size in zip(config.layers_block_type, layers):
            if kind == "attention":
                assert size == (2, kv, 13 + extra + 1, config.head_dim)
            else:
                assert size == sizes[0][config.layers_block_type.index(kind)]  # fixed-size state
    assert cache.get_seq_length() == 16


@pytest.mark.parametrize("preset, overrides", LAYOUTS)
def test_generation_with_cache_equals_without_and_left_padding_matches(preset, overrides):
    config = _tiny(preset, **overrides)
    torch.manual_seed(0)
    model = spread_weights(AutoModelForCausalLM.from_config(config), seed=2).eval()
    prompts = [torch.randint(1, config.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
               for n in (5, 12, 8)]
    for p in prompts:
        with_cache = model.generate(p, max_new_tokens=10, do_sample=False)
        without = model.generate(p, max_new_tokens=10, do_sample=False, use_cache=False)
        assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, -10:].tolist())) > 2
    width = 12
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, p in enumerate(prompts):
        ids[row, width - p.shape[1]:], mask[row, width - p.shape[1]:] = p[0], 1
    batched = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False)
    for row, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=10, do_sample=False)
        assert torch.equal(batched[row, width:], alone[0, p.shape[1]:]), row
    beams = model.generate(prompts[0], max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(beams, model.generate(prompts[0], max_new_tokens=6, num_beams=3, do_sample=False,
                                             use_cache=False))


@pytest.mark.parametrize("overrides", [{}, MAMBA_SSM_STYLE])
def test_forward_in_chunks_with_cache_equals_full_forward(overrides):
    config = _tiny(**overrides)
    model = spread_weights(AutoModelForCausalLM.from_config(config)).eval()
    ids = torch.randint(1, config.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(ids).logits
        cache, pieces, start = None, [], 0
        for size in (1, 9, 1, 19):
            out = model(ids[:, start:start + size], past_key_values=cache, use_cache=True)
            cache, start = out.past_key_values, start + size
            pieces.append(out.logits)
    assert_close_to_scale(torch.cat(pieces, 1), full)


def test_partial_rope_matches_complex_rotation_in_float64():
    """Channel pairs (i, i + rope_dim/2), i < rope_dim/2, read as complex numbers are multiplied by
    exp(1j * position * theta^(-2i/rope_dim)); the channels past rope_dim are left alone."""
    from ssm_hf.layers.attention import apply_partial_rope

    x = torch.randn(2, 3, 5, 10, dtype=torch.float64)
    positions = torch.tensor([0, 1, 7, 100, 1000])
    rope_dim, theta = 6, 500.0
    out = apply_partial_rope(x, positions, rope_dim, theta)
    half = rope_dim // 2
    freq = theta ** (-2 * torch.arange(half, dtype=torch.float64) / rope_dim)
    rotation = torch.polar(torch.ones(5, half, dtype=torch.float64), positions[:, None].double() * freq)
    rotated = torch.complex(x[..., :half], x[..., half:rope_dim]) * rotation
    expected = torch.cat([rotated.real, rotated.imag, x[..., rope_dim:]], dim=-1)
    # angles are computed in float32 (as transformers and flash-attn do): position 1000 costs ~1e-4 of a radian
    assert_close_to_scale(out, expected, tol=1e-3)
    assert_close_to_scale(out[..., :2, :], expected[..., :2, :], tol=1e-6)
    assert torch.equal(out[..., rope_dim:], x[..., rope_dim:])


def test_layers_without_mlp_have_no_ffn_weights():
    config = _tiny(**MAMBA_SSM_STYLE)
    names = ssm_hf.HybridForCausalLM(config).state_dict()
    assert not any(".ffn" in name for name in names)
    assert "backbone.layers.2.mixer.q_proj.bias" in names and "backbone.layers.2.mixer.o_proj.bias" in names
    with pytest.raises(ValueError, match="attention_rope_dim=4, attention_qkv_bias=True, attention_out_bias=True, "
                                         "layers without an MLP"):
        hybrid_to_jamba(_tiny(**{**MAMBA_SSM_STYLE, "mamba_inner_layernorms": True}), names)


def test_router_logits_and_load_balancing_loss():
    config = _tiny(router_aux_loss_coef=0.1)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, config.vocab_size, (2, 9))
    out = model.eval()(ids, output_router_logits=True, labels=ids)
    n_moe = config.layers_mlp_type.count("moe")
    assert len(out.router_logits) == n_moe and out.router_logits[0].shape == (18, config.num_experts)
    lm_loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size),
                                                ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, lm_loss + 0.1 * out.aux_loss)
    assert model.eval()(ids).router_logits is None and model(ids, labels=ids).aux_loss is None
    train_out = model.train()(ids, labels=ids)  # training adds the auxiliary loss without being asked
    assert train_out.aux_loss is not None and train_out.aux_loss > 0
    train_out.loss.backward()
    assert model.backbone.layers[1].ffn.router.weight.grad.abs().sum() > 0


def test_load_balancing_loss_weighted_by_share_of_num_items_in_batch():
    """With `num_items_in_batch` (Trainer's count of the optimizer step's labelled tokens), the LM loss is a sum over
    this call's tokens / num_items_in_batch, and the load-balancing loss is weighted by the same share, so that over
    the step's micro-batches and processes it counts once (tests/test_distributed.py checks that under Trainer)."""
    config = _tiny(router_aux_loss_coef=0.5)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(1, config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, -3:] = -100  # 13 of the 16 shifted labels count
    num_items = torch.tensor(52)  # this call holds a quarter of the step's tokens
    out = model.eval()(ids, labels=labels, output_router_logits=True, num_items_in_batch=num_items)
    lm_sum = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size),
                                               labels[:, 1:].reshape(-1), reduction="sum")
    assert_close_to_scale(out.loss, lm_sum / 52 + 0.5 * out.aux_loss * 13 / 52)
    # shift_labels (given by some collators) are counted as they are; without num_items_in_batch the weight is 1
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    shifted[1, :4] = -100  # 13 - 4 = 9 count
    out = model(ids, labels=labels, shift_labels=shifted, output_router_logits=True, num_items_in_batch=num_items)
    lm_sum = torch.nn.functional.cross_entropy(out.logits.reshape(-1, config.vocab_size), shifted.reshape(-1),
                                               reduction="sum")
    assert_close_to_scale(out.loss, lm_sum / 52 + 0.5 * out.aux_loss * 9 / 52)
    out = model(ids, labels=labels, output_router_logits=True)
    lm_mean = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, config.vocab_size),
                                                labels[:, 1:].reshape(-1))
    assert_close_to_scale(out.loss, lm_mean + 0.5 * out.aux_loss)


def test_load_balancing_loss_values():
    uniform = torch.zeros(10, 4)
    assert torch.isclose(load_balancing_loss((uniform,), top_k=2), torch.tensor(2.0))
    # all tokens to expert 0 (and 1 as the second choice): 4 * (1 * p0 + 1 * p1), p0 + p1 close to 1
    skewed = torch.tensor([[10.0, 9.0, -10.0, -10.0]]).repeat(10, 1)
    assert load_balancing_loss((skewed,), top_k=2) > 3.9
    # masked rows do not count: the padded half is skewed, the real half uniform
    mixed = torch.cat([uniform[:5], skewed[:5]])
    mask = torch.tensor([[1] * 5 + [0] * 5])
    assert torch.isclose(load_balancing_loss((mixed,), top_k=2, attention_mask=mask), torch.tensor(2.0))


@pytest.mark.parametrize("preset", PRESETS)
def test_trainer_lowers_the_loss_and_checkpoint_roundtrip(preset, tokenizer, stdlib_text, tmp_path):
    from transformers import Trainer, TrainingArguments

    from ssm_hf.data import causal_lm_blocks

    blocks = causal_lm_blocks(tokenizer, stdlib_text, block_size=64)[:48]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_tiny(preset, vocab_size=len(tokenizer)))
    ids = torch.stack([b["input_ids"] for b in blocks[:8]])
    before = model.eval()(ids, labels=ids).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=8, learning_rate=5e-3,
                             num_train_epochs=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=blocks).train()
    after = model.eval()(ids, labels=ids).loss.item()
    assert after < before - 0.5, (before, after)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    assert type(loaded) is ssm_hf.HybridForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=0, atol=0)
    classifier = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved", num_labels=2)
    assert type(classifier) is ssm_hf.HybridForSequenceClassification
    mask = torch.ones_like(ids[:2])
    mask[0, :10] = 0
    assert classifier(ids[:2], attention_mask=mask, labels=torch.tensor([0, 1])).loss.isfinite()


def test_unsupported_uses_raise_clear_errors(tmp_path):
    config = _tiny()
    model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(1, config.vocab_size, (1, 6))
    # (assisted and prompt-lookup decoding work: the cache rolls back, tests/test_assisted.py)
    assert torch.equal(model.generate(ids, max_new_tokens=3, prompt_lookup_num_tokens=2, do_sample=False),
                       model.generate(ids, max_new_tokens=3, do_sample=False))
    static = transformers.StaticCache(config=config, max_cache_len=32)
    with pytest.raises(ValueError, match="not supported"):
        model(ids, past_key_values=static)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="lists 4 layers but num_hidden_layers is 2"):
        AutoModelForCausalLM.from_pretrained(tmp_path, num_hidden_layers=2)
    with pytest.raises(ValueError, match="cache_implementation='static' is not supported"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static")


def test_single_expert_means_dense_and_jamba_export_of_periodless_layouts():
    config = _tiny(num_experts=1)
    assert config.layers_mlp_type == ["dense"] * 4
    for overrides in (dict(attn_layer_period=0), dict(expert_layer_period=0), dict(num_experts=1)):
        hybrid = _tiny(**overrides)
        fields, state = hybrid_to_jamba(hybrid, ssm_hf.HybridForCausalLM(hybrid).state_dict())
        jamba_config = transformers.JambaConfig(**fields)
        assert jamba_config.layers_block_type == hybrid.layers_block_type, overrides
        jamba = transformers.JambaForCausalLM(jamba_config)
        assert set(jamba.state_dict()) == set(state), overrides


def test_sub_config_errors_name_the_hybrid_fields():
    with pytest.raises(StrictDataclassError, match="mamba2_\\* fields"):
        _tiny("hybrid-mamba2-tiny", mamba2_n_groups=3)
