"""Packed sequences (padding-free training): several sequences end to end in one row, told apart by `seq_idx` or by
position_ids that restart (transformers' `DataCollatorWithFlattening`). Every kernel and model must give what
running each sequence alone gives: values, final states and gradients."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_close_to_scale, spread_weights, tiny_config
from transformers import DataCollatorWithFlattening, Trainer, TrainingArguments

import ssm_hf
from ssm_hf import StateCache, kernels
from ssm_hf.kernels import causal_conv1d_torch
from ssm_hf.kernels.packing import positions_in_sequence
from ssm_hf.models import modeling_utils

triton = pytest.importorskip("triton")
from ssm_hf.kernels import causal_conv1d_triton, selective_scan_triton  # noqa: E402
from ssm_hf.kernels.ssd_triton import ssd_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _random_seq_idx(batch: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    """Random non-decreasing ids: row 0 has a one-token sequence and a start at t = 8 (a tile / chunk edge in
    the tests below), the other rows random starts and ids that do not begin at 0 or go up by 1."""
    rows = []
    for b in range(batch):
        n_starts = int(torch.randint(1, 5, (1,), generator=generator))
        starts = set(torch.randint(1, seqlen, (n_starts,), generator=generator).tolist())
        if b == 0:
            starts |= {3, 4, 8}
        flags = torch.zeros(seqlen, dtype=torch.int64)
        flags[sorted(starts)] = torch.randint(1, 4, (len(starts),), generator=generator)
        rows.append(flags.cumsum(0) + int(torch.randint(0, 5, (1,), generator=generator)))
    return torch.stack(rows)


def _lengths(row: torch.Tensor) -> list[int]:
    return torch.unique_consecutive(row, return_counts=True)[1].tolist()


def _alone(scan, inputs: dict, seq_idx: torch.Tensor, per_token: tuple[str, ...], state_key: str, **kwargs):
    """Run `scan` on each sequence of each row by itself (the initial state only for a row's first one) and
    concatenate: (y, final state of each row's last sequence)."""
    ys, finals = [], []
    for b in range(seq_idx.shape[0]):
        row, start = [], 0
        for i, n in enumerate(_lengths(seq_idx[b])):
            part = {k: (v[b : b + 1, start : start + n] if k in per_token else v) for k, v in inputs.items()}
            if state_key in inputs:
                part[state_key] = inputs[state_key][b : b + 1] if i == 0 else None
            y, h = scan(**part, return_final_state=True, **kwargs)
            row.append(y)
            start += n
        ys.append(torch.cat(row, dim=1))
        finals.append(h)
    return torch.cat(ys), torch.cat(finals)


def _check_values_and_gradients(packed, alone, leaves: dict, refs: dict, tol: float = 1e-5, grad_tol: float = 1e-5,
                                skip: tuple[str, ...] = ()):
    """packed, alone: (y, final state) from float32 `leaves` and float64 `refs`; the same weighted sum of both is
    differentiated and every input's gradient (but those in `skip`) compared."""
    (y, h), (y_ref, h_ref) = packed, alone
    assert_close_to_scale(y.cpu(), y_ref, tol)
    assert_close_to_scale(h.cpu(), h_ref, tol)
    g = torch.Generator().manual_seed(7)
    w_y = torch.randn(y_ref.shape, generator=g, dtype=torch.float64)
    w_h = torch.randn(h_ref.shape, generator=g, dtype=torch.float64)
    ((y * w_y.to(y)).sum() + (h * w_h.to(h)).sum()).backward()
    ((y_ref * w_y).sum() + (h_ref * w_h).sum()).backward()
    for key, leaf in leaves.items():
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), key
        if key not in skip:
            assert_close_to_scale(leaf.grad.cpu(), refs[key].grad, grad_tol)


def _selective_inputs(batch, seqlen, d_inner, d_state, seed, dt_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(batch, seqlen, d_inner), delta=r(batch, seqlen, d_inner) * dt_scale,
                A=-torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 8 - 0.1,
                B=r(batch, seqlen, d_state), C=r(batch, seqlen, d_state), D=r(d_inner), z=r(batch, seqlen, d_inner),
                delta_bias=r(d_inner), initial_state=r(batch, d_inner, d_state))


SELECTIVE_TOKENS = ("x", "delta", "B", "C", "z")


@pytest.mark.parametrize("impl,dt_scale", [("chunked", 1.0), ("chunked", 30.0), ("triton", 1.0)])
def test_selective_scan_with_seq_idx_equals_each_sequence_alone(impl, dt_scale, monkeypatch):
    # dt_scale 30: steps large enough that the chunked form scans some channels by recursive doubling
    batch, seqlen = 3, 29
    inputs = _selective_inputs(batch, seqlen, 10, 6, seed=int(dt_scale) + len(impl), dt_scale=dt_scale)
    seq_idx = _random_seq_idx(batch, seqlen, torch.Generator().manual_seed(len(impl)))
    refs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    alone = _alone(kernels.selective_scan_sequential, refs, seq_idx, SELECTIVE_TOKENS, "initial_state",
                   delta_softplus=True)
    leaves = {k: v.to(DEVICE, torch.float32).requires_grad_(True) for k, v in inputs.items()}
    if impl == "chunked":
        packed = kernels.selective_scan_chunked(**leaves, delta_softplus=True, return_final_state=True, chunk_size=8,
                                                seq_idx=seq_idx.to(DEVICE))
    else:  # small tiles: starts fall on a tile's first token, inside tiles, and in several channel blocks
        monkeypatch.setattr(selective_scan_triton, "TILE_CONFIG", {"block_t": 8})
        for config in ("FORWARD_CONFIG", "BACKWARD_CONFIG"):
            monkeypatch.setattr(selective_scan_triton, config, {**getattr(selective_scan_triton, config), "block_d": 4})
        # and the forward in chunks of one tile walked in parallel: starts at and inside chunk boundaries
        monkeypatch.setitem(selective_scan_triton.FORWARD_CONFIG, "min_programs", 10**6)
        monkeypatch.setitem(selective_scan_triton.BACKWARD_CONFIG, "min_programs", 10**6)
        packed = selective_scan_triton.selective_scan_triton(**leaves, delta_softplus=True, return_final_state=True,
                                                             seq_idx=seq_idx.to(DEVICE))
    _check_values_and_gradients(packed, alone, leaves, refs, grad_tol=1e-4 if impl == "triton" else 1e-5)


def test_sequential_references_with_seq_idx_are_exact():
    # the float64 references with seq_idx against themselves run per sequence: resets and nothing else
    inputs = _selective_inputs(2, 17, 4, 3, seed=3)
    seq_idx = _random_seq_idx(2, 17, torch.Generator().manual_seed(3))
    y, h = kernels.selective_scan_sequential(**inputs, delta_softplus=True, return_final_state=True, seq_idx=seq_idx)
    y_ref, h_ref = _alone(kernels.selective_scan_sequential, inputs, seq_idx, SELECTIVE_TOKENS, "initial_state",
                          delta_softplus=True)
    assert_close_to_scale(y, y_ref, 1e-12)
    assert_close_to_scale(h, h_ref, 1e-12)
    inputs = _ssd_inputs(2, 17, 4, 3, 2, 5, seed=3)
    y, h = kernels.ssd_scan_sequential(**inputs, dt_softplus=True, return_final_state=True, seq_idx=seq_idx)
    y_ref, h_ref = _alone(kernels.ssd_scan_sequential, inputs, seq_idx, SSD_TOKENS, "initial_state", dt_softplus=True)
    assert_close_to_scale(y, y_ref, 1e-12)
    assert_close_to_scale(h, h_ref, 1e-12)


def _ssd_inputs(batch, seqlen, heads, head_dim, groups, d_state, seed, dt_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(x=r(batch, seqlen, heads, head_dim), dt=r(batch, seqlen, heads) + dt_shift,
                A=-torch.rand(heads, generator=g, dtype=torch.float64) * 8 - 0.05,
                B=r(batch, seqlen, groups, d_state), C=r(batch, seqlen, groups, d_state), D=r(heads),
                dt_bias=r(heads), initial_state=r(batch, heads, head_dim, d_state))


SSD_TOKENS = ("x", "dt", "B", "C")


@pytest.mark.parametrize("impl,chunk,dt_shift", [("chunked", 8, 0.0), ("chunked", 16, 20.0), ("chunked", 64, 0.0),
                                                 ("triton", 8, 0.0)])
def test_ssd_scan_with_seq_idx_equals_each_sequence_alone(impl, chunk, dt_shift):
    # chunk 8: starts on a chunk's first token and inside chunks, a chunk holding three sequences; dt_shift 20:
    # decays of e^-160 inside a chunk; chunk 64: the whole row in one (padded) chunk
    batch, seqlen = 3, 37
    inputs = _ssd_inputs(batch, seqlen, 4, 3, 2, 5, seed=chunk, dt_shift=dt_shift)
    seq_idx = _random_seq_idx(batch, seqlen, torch.Generator().manual_seed(chunk))
    refs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    alone = _alone(kernels.ssd_scan_sequential, refs, seq_idx, SSD_TOKENS, "initial_state", dt_softplus=True)
    leaves = {k: v.to(DEVICE, torch.float32).requires_grad_(True) for k, v in inputs.items()}
    scan = kernels.ssd_scan_chunked if impl == "chunked" else ssd_scan_triton
    packed = scan(**leaves, chunk_size=chunk, dt_softplus=True, return_final_state=True, seq_idx=seq_idx.to(DEVICE))
    # with Δ ≈ 20 the final state's gradient w.r.t. A is ~1e-10 and float32 rounding in the chunked form swamps
    # it, with or without seq_idx (the chunk-end decays are differences of prefix sums): A is not compared there
    _check_values_and_gradients(packed, alone, leaves, refs, skip=("A",) if dt_shift else ())


def _conv_alone(x, weight, bias, past, seq_idx, activation=None):
    rows = []
    for b in range(x.shape[0]):
        parts, start = [], 0
        for i, n in enumerate(_lengths(seq_idx[b])):
            first_past = past[b : b + 1] if past is not None and i == 0 else None
            parts.append(causal_conv1d_torch.causal_conv1d(x[b : b + 1, start : start + n], weight, bias, first_past,
                                                           activation=activation))
            start += n
        rows.append(torch.cat(parts, dim=1))
    return torch.cat(rows)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("width,with_past,with_bias,activation", [(4, True, True, "silu"), (4, False, False, None),
                                                                  (2, True, False, None), (3, False, True, "silu")])
def test_causal_conv1d_with_seq_idx_equals_each_sequence_alone(impl, width, with_past, with_bias, activation,
                                                               monkeypatch):
    g = torch.Generator().manual_seed(width * 4 + with_past * 2 + with_bias)
    batch, seqlen, channels = 3, 21, 6
    x = torch.randn(batch, seqlen, channels, dtype=torch.float64, generator=g)
    weight = torch.randn(channels, width, dtype=torch.float64, generator=g)
    bias = torch.randn(channels, dtype=torch.float64, generator=g) if with_bias else None
    past = torch.randn(batch, channels, width + 1, dtype=torch.float64, generator=g) if with_past else None
    seq_idx = _random_seq_idx(batch, seqlen, g)
    refs = [t.clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    expected = _conv_alone(refs[0], refs[1], refs[2] if with_bias else None, past, seq_idx, activation)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in (x, weight, bias) if t is not None]
    args = (leaves[0], leaves[1], leaves[2] if with_bias else None,
            past.to(DEVICE, torch.float32) if with_past else None)
    if impl == "torch":
        out = causal_conv1d_torch.causal_conv1d(*args, seq_idx=seq_idx.to(DEVICE), activation=activation)
    else:  # blocks of 8 tokens: starts on a block's first token and taps that reach into the previous block
        monkeypatch.setattr(causal_conv1d_triton, "BLOCK_T", 8)
        monkeypatch.setattr(causal_conv1d_triton, "BACKWARD_BLOCKS_PER_PROGRAM", 2)
        out = causal_conv1d_triton.causal_conv1d_triton(*args, seq_idx=seq_idx.to(DEVICE), activation=activation)
    assert_close_to_scale(out.cpu(), expected)
    w = torch.randn(expected.shape, dtype=torch.float64, generator=g)
    (out * w.to(out)).sum().backward()
    (expected * w).sum().backward()
    for leaf, ref in zip(leaves, refs):
        assert_close_to_scale(leaf.grad.cpu(), ref.grad)


def test_one_sequence_per_row_keeps_the_plain_results():
    inputs = {k: v.float() for k, v in _selective_inputs(2, 20, 5, 4, seed=1).items()}
    one = torch.full((2, 20), 3)
    assert torch.equal(kernels.selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=8),
                       kernels.selective_scan_chunked(**inputs, delta_softplus=True, chunk_size=8, seq_idx=one))
    inputs = {k: v.float() for k, v in _ssd_inputs(2, 20, 4, 3, 2, 5, seed=1).items()}
    assert_close_to_scale(kernels.ssd_scan_chunked(**inputs, chunk_size=8, dt_softplus=True, seq_idx=one),
                          kernels.ssd_scan_chunked(**inputs, chunk_size=8, dt_softplus=True))
    assert positions_in_sequence(torch.tensor([[0, 0, 1, 1, 1, 4]])).tolist() == [[0, 1, 0, 1, 2, 0]]


# ---- models ----------------------------------------------------------------------------------------------------

HYBRID = dict(layers_block_type=["mamba", "attention", "mamba2", "attention"],
              layers_mlp_type=["dense", "moe", "none", "moe"], mamba2_head_dim=16, mamba2_chunk_size=8)
MODELS = {
    "mamba": lambda: tiny_config("mamba", scan_chunk_size=8),
    "mamba2": lambda: tiny_config("mamba2", chunk_size=8),
    "hybrid": lambda: ssm_hf.preset_config("hybrid-tiny", bos_token_id=None, eos_token_id=None, **HYBRID),
    "hybrid-rope": lambda: ssm_hf.preset_config("hybrid-tiny", bos_token_id=None, eos_token_id=None,
                                                attention_rope_dim=4, attention_rope_theta=100.0, **HYBRID),
}


def _model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    config = MODELS[name]()
    model = ssm_hf.HybridForCausalLM(config) if name.startswith("hybrid") else (
        ssm_hf.MambaForCausalLM(config) if name == "mamba" else ssm_hf.Mamba2ForCausalLM(config))
    return spread_weights(model, scale=0.1).eval()


def _sequences(vocab_size: int, lengths=(7, 1, 12, 5, 10), seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, vocab_size, (n,), generator=g) for n in lengths]


def _summed_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100, reduction="sum")


@pytest.fixture
def triton_kernels_in_chunks(monkeypatch):
    """On the CPU, models take the Triton kernels (in the interpreter) instead of the PyTorch forms, and the scans
    cut every sequence into time chunks as they do on a GPU (where `use_triton` is true and many programs are
    wanted): the model-level path the kernel tests alone do not cover (a float32 B/C column slice once went wrong
    only there)."""
    if DEVICE == "cuda":
        pytest.skip("on a GPU the other variant already runs the Triton kernels in chunks")
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    for config in (selective_scan_triton.FORWARD_CONFIG, selective_scan_triton.BACKWARD_CONFIG):
        monkeypatch.setitem(config, "min_programs", 10**6)


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_row_equals_each_sequence_alone(name, one_thread):
    # on a GPU this runs the Triton kernels inside the model
    _check_packed_row_equals_each_sequence_alone(name)


@pytest.mark.parametrize("name", ["mamba", "mamba2"])
def test_packed_row_equals_each_sequence_alone_through_triton_kernels(name, one_thread, triton_kernels_in_chunks):
    _check_packed_row_equals_each_sequence_alone(name)


def _check_packed_row_equals_each_sequence_alone(name: str) -> None:
    model = _model(name).to(DEVICE)
    seqs = [s.to(DEVICE) for s in _sequences(model.config.vocab_size)]
    batch = {k: v.to(DEVICE) for k, v in
             DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs]).items()}
    assert batch["input_ids"].shape == (1, sum(len(s) for s in seqs))
    out = model(**batch)
    alone = [model(s[None]) for s in seqs]
    assert_close_to_scale(out.logits, torch.cat([o.logits for o in alone], dim=1))
    # the loss: the collator masks each sequence's first label, so it is the token-weighted mean of the losses alone
    alone_loss = [model(s[None], labels=s[None]).loss for s in seqs if len(s) > 1]
    weights = [len(s) - 1 for s in seqs if len(s) > 1]
    expected = sum(w * loss for w, loss in zip(weights, alone_loss)) / sum(weights)
    assert math.isclose(out.loss.item(), expected.item(), rel_tol=1e-5)
    # the gradients of every weight
    model.zero_grad()
    _summed_loss(model(**batch).logits, batch["labels"]).backward()
    packed_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    sum(_summed_loss(model(s[None]).logits, s[None]) for s in seqs).backward()
    for key, param in model.named_parameters():
        if param.grad is not None:
            assert_close_to_scale(packed_grads[key], param.grad, 1e-4)
    assert len(packed_grads) == sum(p.grad is not None for p in model.parameters())
    # an explicit seq_idx (the collator's `return_seq_idx`) gives the same, in a batch of two rows too
    with_idx = DataCollatorWithFlattening(return_seq_idx=True, return_position_ids=False)(
        [{"input_ids": s.tolist()} for s in seqs])
    assert_close_to_scale(model(with_idx["input_ids"].to(DEVICE), seq_idx=with_idx["seq_idx"].to(DEVICE)).logits,
                          out.logits, 1e-6)
    two_rows = model(batch["input_ids"].repeat(2, 1), position_ids=batch["position_ids"].repeat(2, 1)).logits
    assert_close_to_scale(two_rows, out.logits.repeat(2, 1, 1))


def test_padding_and_packing_together(one_thread):
    # a right-padded batch of packed rows: the padded tail changes nothing
    model = _model("hybrid")
    seqs = _sequences(model.config.vocab_size, lengths=(4, 6, 3))
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    ids, pos = batch["input_ids"], batch["position_ids"]
    padded_ids = torch.cat([ids, torch.zeros(1, 3, dtype=ids.dtype)], dim=1).repeat(2, 1)
    padded_pos = torch.cat([pos, torch.arange(3)[None]], dim=1).repeat(2, 1)
    mask = torch.ones_like(padded_ids)
    mask[:, -3:] = 0
    logits = model(padded_ids, attention_mask=mask, position_ids=padded_pos).logits
    assert_close_to_scale(logits[:, : ids.shape[1]], model(ids, position_ids=pos).logits.repeat(2, 1, 1))


@pytest.mark.parametrize("name", list(MODELS))
def test_packed_rows_with_left_and_right_padding(name, one_thread):
    # two rows packed differently, one right-padded and one left-padded (padding's position_ids 0 and 1, as
    # collators and generate() write them): every real token gets what its sequence alone gives
    model = _model(name)
    seqs = _sequences(model.config.vocab_size, lengths=(5, 7, 3, 4, 6))
    rows, length = [seqs[:2], seqs[2:]], 20
    ids = torch.zeros(2, length, dtype=torch.long)
    positions = torch.zeros(2, length, dtype=torch.long)
    mask = torch.zeros(2, length, dtype=torch.long)
    real = [slice(0, 12), slice(length - 13, length)]                        # right padding, left padding
    positions[1, : real[1].start] = 1
    for row, (parts, where) in enumerate(zip(rows, real)):
        ids[row, where] = torch.cat(parts)
        positions[row, where] = torch.cat([torch.arange(len(part)) for part in parts])
        mask[row, where] = 1
    logits = model(ids, attention_mask=mask, position_ids=positions).logits
    for row, (parts, where) in enumerate(zip(rows, real)):
        alone = torch.cat([model(part[None]).logits for part in parts], dim=1)
        assert_close_to_scale(logits[row : row + 1, where], alone)


@pytest.mark.parametrize("collator_options", [{}, dict(return_position_ids=False, return_flash_attn_kwargs=True),
                                             dict(return_position_ids=False, return_seq_idx=True)])
def test_trainer_with_data_collator_with_flattening(collator_options, tmp_path, monkeypatch, one_thread):
    # the boundaries reach the model as position_ids, as cu_seq_lens_q/k only, or as seq_idx only
    model = _model("hybrid").train()
    g = torch.Generator().manual_seed(1)
    dataset = [{"input_ids": torch.randint(1, model.config.vocab_size, (int(n),), generator=g).tolist()}
               for n in torch.randint(3, 20, (12,), generator=g)]
    seen = []
    original = modeling_utils.packed_seq_idx

    def spy(*args, **kwargs):
        seq_idx = original(*args, **kwargs)
        seen.append(None if seq_idx is None else len(torch.unique(seq_idx)))
        return seq_idx

    monkeypatch.setattr(modeling_utils, "packed_seq_idx", spy)
    before = [p.detach().clone() for p in model.parameters()]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3, learning_rate=1e-3,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorWithFlattening(**collator_options))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(loss) for loss in losses)
    assert seen and all(n == 4 for n in seen)  # every step saw one row of 4 packed sequences
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("preset", ["s4-tiny", "s4d-tiny"])
def test_s4_refuses_packed_sequences(preset):
    model = ssm_hf.S4ForCausalLM(ssm_hf.preset_config(preset, bos_token_id=None, eos_token_id=None)).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, 8))
    model(ids, position_ids=torch.arange(8)[None])  # plain positions are fine
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]]))
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model.backbone(ids, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    with pytest.raises(NotImplementedError, match="packed sequences"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 3, 8], dtype=torch.int32))


@pytest.mark.parametrize("name", ["mamba", "hybrid"])
def test_packed_input_with_a_cache_is_refused_and_plain_generation_is_unchanged(name):
    model = _model(name)
    ids = torch.randint(1, model.config.vocab_size, (1, 8))
    packed = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="without a cache"):
        model.generate(ids, position_ids=packed, max_new_tokens=2, do_sample=False)
    with pytest.raises(ValueError, match="without a cache"):
        model(ids, position_ids=packed, use_cache=True)
    with pytest.raises(ValueError, match="without a cache"):
        model(ids, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]), past_key_values=StateCache(config=model.config))
    with pytest.raises(ValueError, match="non-decreasing"):
        model(ids, seq_idx=torch.tensor([[0, 0, 0, 1, 1, 0, 0, 0]]))
    plain = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert torch.equal(model.generate(ids, position_ids=torch.arange(8)[None], max_new_tokens=4, do_sample=False),
                       plain)


def test_sequence_classification_refuses_packed_sequences():
    model = ssm_hf.MambaForSequenceClassification(tiny_config("mamba", num_labels=3)).eval()
    ids = torch.randint(1, model.config.vocab_size, (1, 8))
    model(ids, position_ids=torch.arange(8)[None])
    with pytest.raises(NotImplementedError, match="one sequence per row"):
        model(ids, position_ids=torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]))
    with pytest.raises(NotImplementedError, match="one sequence per row"):
        model(ids, cu_seq_lens_q=torch.tensor([0, 3, 8], dtype=torch.int32))


# ---- review fixes: the collator's other outputs, labels at sequence starts, ids as the kernels read them --------


@pytest.mark.parametrize("name", ["mamba2", "hybrid"])
def test_flash_attention_kwargs_alone_mark_the_sequences(name, one_thread):
    # DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False) hands over only
    # cu_seq_lens_q/k (and max_length_q/k): the boundaries must come from them, not be silently dropped
    model = _model(name)
    seqs = _sequences(model.config.vocab_size)
    batch = DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_position_ids=False)(
        [{"input_ids": s.tolist()} for s in seqs])
    assert "position_ids" not in batch and "seq_idx" not in batch and "cu_seq_lens_q" in batch
    alone = torch.cat([model(s[None]).logits for s in seqs], dim=1)
    assert_close_to_scale(model(**batch).logits, alone)
    ids, cu = batch["input_ids"], batch["cu_seq_lens_k"]
    assert_close_to_scale(model(ids, cu_seq_lens_k=cu).logits, alone)  # either name
    assert_close_to_scale(model.backbone(ids, cu_seq_lens_q=cu).last_hidden_state,
                          model(**batch, output_hidden_states=True).hidden_states[-1])
    # two rows of the same packing: cu_seq_lens then count the tokens of both rows, as flash attention's do
    total = ids.shape[1]
    two = model(ids.repeat(2, 1), cu_seq_lens_q=torch.cat([cu, cu[1:] + total])).logits
    assert_close_to_scale(two, alone.repeat(2, 1, 1))
    for bad in (torch.tensor([0, 5, total - 1]), torch.tensor([1, 5, total]), torch.tensor([0, 9, 5, total])):
        with pytest.raises(ValueError, match="cu_seq_lens"):
            model(ids, cu_seq_lens_q=bad.to(torch.int32))


@pytest.mark.parametrize("name", ["mamba", "mamba2", "hybrid"])
def test_packed_loss_never_predicts_a_sequence_start_from_the_previous_sequence(name, one_thread):
    # the collator puts -100 at each sequence's first label; labels = input_ids (as the docstrings say to pass
    # them) with position_ids or seq_idx must give the same loss: the last token of one sequence is never
    # trained to predict the first token of the next
    model = _model(name)
    seqs = _sequences(model.config.vocab_size)
    feats = [{"input_ids": s.tolist()} for s in seqs]
    batch = DataCollatorWithFlattening()(feats)
    expected = model(**batch).loss
    ids = batch["input_ids"]
    assert (batch["labels"] != ids).sum() == len(seqs)  # the collator masked exactly the starts
    seq_idx = DataCollatorWithFlattening(return_seq_idx=True)(feats)["seq_idx"]
    for packing in (dict(position_ids=batch["position_ids"]), dict(seq_idx=seq_idx)):
        loss = model(ids, labels=ids.clone(), **packing).loss
        assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6), packing.keys()
        # Trainer may pass the labels already shifted (shift_labels): same rule
        shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
        loss = model(ids, labels=ids.clone(), shift_labels=shifted, **packing).loss
        assert math.isclose(loss.item(), expected.item(), rel_tol=1e-6), packing.keys()
    # the caller's labels are not modified in place
    labels = ids.clone()
    model(ids, labels=labels, position_ids=batch["position_ids"])
    assert torch.equal(labels, ids)


@pytest.mark.parametrize("name", ["mamba", "hybrid"])
def test_packed_gradients_with_gradient_checkpointing(name, one_thread):
    model = _model(name).train()
    seqs = _sequences(model.config.vocab_size)
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    model(**batch).loss.backward()
    plain = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.activation_checkpointing_enable()  # gradient_checkpointing_enable's name from transformers 5.x
    calls = []
    # a pre-hook: the recomputation stops once it has what the backward needs, before the mixer returns
    hook = model.backbone.layers[0].mixer.register_forward_pre_hook(lambda *args: calls.append(1))
    model(**batch).loss.backward()
    hook.remove()
    assert len(calls) == 2  # the block ran again in the backward pass
    for key, param in model.named_parameters():
        if key in plain:
            assert_close_to_scale(param.grad, plain[key], 1e-5)


@pytest.mark.parametrize("name", ["mamba", "mamba2", "hybrid"])
def test_packed_under_bf16_autocast(name, one_thread):
    # the packed row under autocast stays as close to the sequences alone as bf16 rounding allows (leaking
    # across a boundary moves the logits by tens of percent of their scale, see the plain test above)
    model = _model(name)
    seqs = _sequences(model.config.vocab_size)
    batch = DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**batch)
        alone = torch.cat([model(s[None]).logits for s in seqs], dim=1)
    assert torch.isfinite(out.loss)
    assert_close_to_scale(out.logits, alone, 6e-2)


def test_seq_idx_ids_under_compile_are_read_where_they_change(monkeypatch, one_thread):
    # under torch.compile the ids are not checked (no host synchronisation): ids that repeat an earlier sequence's
    # (A B A) must still mean three sequences in every layer, attention included
    model = _model("hybrid")
    ids = torch.randint(1, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    canonical = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3]]).repeat(2, 1)
    expected = model(ids, seq_idx=canonical).logits
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    odd = torch.tensor([[4, 4, 4, 9, 9, 4, 4, 4, 4, 2**40, 2**40, 2**40]]).repeat(2, 1)
    assert_close_to_scale(model(ids, seq_idx=odd).logits, expected, 1e-6)


KERNEL_CASES = ["conv-torch", "conv-triton", "selective-chunked", "selective-triton", "ssd-chunked", "ssd-triton"]


def _kernel_run(case: str, seq_idx: torch.Tensor, batch: int = 2, seqlen: int = 12):
    g = torch.Generator().manual_seed(5)
    r = lambda *shape: torch.randn(*shape, generator=g).to(DEVICE)  # noqa: E731
    if case.startswith("conv"):
        fn = causal_conv1d_torch.causal_conv1d if case == "conv-torch" else causal_conv1d_triton.causal_conv1d_triton
        return fn(r(batch, seqlen, 4), r(4, 4), r(4), r(batch, 4, 3), seq_idx=seq_idx.to(DEVICE))
    if case.startswith("selective"):
        fn = (kernels.selective_scan_chunked if case == "selective-chunked"
              else selective_scan_triton.selective_scan_triton)
        y, h = fn(r(batch, seqlen, 4), r(batch, seqlen, 4), -r(4, 3).abs(), r(batch, seqlen, 3), r(batch, seqlen, 3),
                  delta_softplus=True, initial_state=r(batch, 4, 3), return_final_state=True,
                  seq_idx=seq_idx.to(DEVICE))
        return torch.cat([y.flatten(), h.flatten()])
    fn = kernels.ssd_scan_chunked if case == "ssd-chunked" else ssd_scan_triton
    y, h = fn(r(batch, seqlen, 2, 3), r(batch, seqlen, 2), -r(2).abs(), r(batch, seqlen, 1, 5), r(batch, seqlen, 1, 5),
              chunk_size=8, dt_softplus=True, initial_state=r(batch, 2, 3, 5), return_final_state=True,
              seq_idx=seq_idx.to(DEVICE))
    return torch.cat([y.flatten(), h.flatten()])


@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernels_read_seq_idx_where_it_changes_and_share_one_row(case):
    # what counts is where the id changes (packing.py): ids that go back to an earlier sequence's value or do not
    # fit in int32 give the same result as 0, 1, 2, ...; a (1, seqlen) seq_idx is shared by every row, as the
    # PyTorch forms broadcast it (the Triton kernels read past the end of it before)
    canonical = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2, 3, 3, 3], [0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]])
    odd = torch.tensor([[7, 7, 7, 3, 3, 7, 7, 7, 7, 2**32 + 3, 2**32 + 3, 2**32 + 3],
                        [2**33, 5, 5, 5, 5, 5, 5, 5, 2**33 + 5, 2**33 + 5, 2**33 + 5, 2**33 + 5]])
    expected = _kernel_run(case, canonical)
    assert_close_to_scale(_kernel_run(case, odd).cpu(), expected.cpu(), 1e-6)
    assert_close_to_scale(_kernel_run(case, canonical[:1]).cpu(), _kernel_run(case, canonical[:1].expand(2, -1)).cpu(),
                          1e-6)
    with pytest.raises(ValueError, match="seq_idx"):
        _kernel_run(case, canonical[:, :-1])
