"""The Triton selective-scan kernels against the float64 recurrence: forward and every gradient.

Without a GPU they run in Triton's interpreter (tiny shapes: it executes the kernels element by element); on a
GPU, `bench/gpu_kernels.py` checks real shapes and times them.
"""

import pytest
import torch
import torch.nn.functional as F
import transformers
from test_kernels import _cast, _inputs, _rel_err

from ssm_hf import kernels
from ssm_hf.kernels.launch import row_alignment

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from ssm_hf.kernels import triton_math  # noqa: E402
from ssm_hf.kernels.selective_scan_triton import selective_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(params=[32, 64, 128])
def ssd_forward(request, monkeypatch) -> int:
    """The SSD forward with chunks of one (the default with many rows), two and four (with few long rows, and the
    walker tile used then) output row blocks: `FORWARD_CHUNK`."""
    from ssm_hf.kernels import ssd_triton

    monkeypatch.setattr(ssd_triton, "FORWARD_CHUNK", request.param)
    monkeypatch.setattr(ssd_triton, "OUTPUT_ROWS", 32)
    if request.param == ssd_triton.LONG_CHUNK:
        monkeypatch.setattr(ssd_triton, "STATE_TILE", ssd_triton.LONG_CHUNK_TILE)
    return request.param


def _to(inputs, dtype):
    return {k: v.to(DEVICE, dtype) for k, v in _cast(inputs, dtype).items()}


@pytest.mark.parametrize("batch,seqlen,d_inner,d_state,optional", [
    (2, 1, 5, 3, True), (1, 19, 20, 5, True), (2, 37, 16, 16, False), (1, 33, 9, 20, True),
])
def test_triton_scan_forward_and_gradients(batch, seqlen, d_inner, d_state, optional):
    inputs = _inputs(batch, seqlen, d_inner, d_state, seed=seqlen)
    if not optional:  # no softplus then: Δ must be given non-negative, as it is in a model
        for key in ("D", "z", "delta_bias", "initial_state"):
            inputs.pop(key)
        inputs["delta"] = inputs["delta"].abs()
    weight = torch.randn(batch, seqlen, d_inner, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    weight_h = torch.randn(batch, d_inner, d_state, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = selective_scan_triton(**leaves, delta_softplus=optional, return_final_state=True)
    y_ref, h_ref = kernels.selective_scan_sequential(**leaves_ref, delta_softplus=optional, return_final_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(h.cpu(), h_ref) < 1e-5
    ((y * weight.to(y)).sum() + (h * weight_h.to(h)).sum()).backward()
    ((y_ref * weight).sum() + (h_ref * weight_h).sum()).backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < 1e-4, key


@pytest.mark.parametrize("tile_t,forward,backward", [
    (8, {"block_d": 4}, {"block_d": 4}),
    (8, {"block_d": 4, "unroll": 2, "prefetch": False}, {"block_d": 8}),
    (4, {"block_d": 8, "unroll": 4, "prefetch": True}, {"block_d": 2}),
    # every tile its own chunk, forward and backward
    (4, {"block_d": 4, "unroll": 2, "min_programs": 10**6}, {"block_d": 4, "min_programs": 10**6}),
    # two chunks, the last one ragged; the backward in two chunks of its own shape
    (8, {"block_d": 8, "unroll": 4, "min_programs": 6}, {"block_d": 4, "min_programs": 12}),
])
def test_triton_scan_many_tiles(monkeypatch, tile_t, forward, backward):
    # several tiles and channel blocks per row, a ragged last tile, an initial and a final state; the forward's
    # unrolled steps with and without loading ahead
    from ssm_hf.kernels import selective_scan_triton as module

    monkeypatch.setattr(module, "TILE_CONFIG", {"block_t": tile_t})
    monkeypatch.setattr(module, "FORWARD_CONFIG", {**module.FORWARD_CONFIG, **forward})
    monkeypatch.setattr(module, "BACKWARD_CONFIG", {**module.BACKWARD_CONFIG, **backward})
    inputs = _inputs(2, 29, 10, 6, seed=11)
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = selective_scan_triton(**leaves, delta_softplus=True, return_final_state=True)
    y_ref, h_ref = kernels.selective_scan_sequential(**leaves_ref, delta_softplus=True, return_final_state=True)
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(h.cpu(), h_ref) < 1e-5
    weight = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ((y * weight.to(y)).sum() + h.sum()).backward()
    ((y_ref * weight).sum() + h_ref.sum()).backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < 1e-4, key


def _ids_starting_at(batch, seqlen, starts):
    """seq_idx (batch, seqlen) whose sequences start at the given tokens."""
    flags = torch.zeros(batch, seqlen, dtype=torch.int64)
    flags[:, list(starts)] = 1
    return flags.cumsum(1)


@pytest.mark.parametrize("case", [
    # (fwd_programs and bwd_programs are min_programs: 3 rows x 3 channel blocks = 9 programs by default, so 18
    # gives chunks of two tiles; `chunks` is the (forward, backward) chunk count the case must run with)
    dict(seqlen=1, chunks=(1, 1)), dict(seqlen=5, chunks=(1, 1)),
    dict(seqlen=17, fwd_programs=18, bwd_programs=18, chunks=(2, 2)),  # chunks of two tiles, the last one token
    # unroll = tile: chunks of whole tiles (forward 16 + 8 tokens, backward one tile each)
    dict(seqlen=24, fwd_programs=18, unroll=8, chunks=(2, 3)),
    dict(seqlen=29, dy=False), dict(seqlen=29, final=False),  # a gradient of the final state alone; of y alone
    # padded state (BLOCK_N 32: 2 channels per program, 19 blocks, 57 programs), a ragged last chunk forward
    dict(seqlen=21, d_inner=37, d_state=17, fwd_programs=100, chunks=(2, 3)),
    dict(seqlen=21, d_inner=5, d_state=32),  # a state wider than 16 with no padding
    dict(seqlen=21, d_inner=5, d_state=1),
    dict(seqlen=29, starts=(1, 8, 16, 20)),  # sequence starts at token 1, at chunk and tile edges, inside a tile
    dict(seqlen=17, starts=(15, 16)),  # on a chunk's last token; on the last token, alone in the last chunk
    dict(seqlen=29, starts=(8, 13), shared_ids=True),  # seq_idx (1, seqlen) for every row
    dict(seqlen=29, bare=True), dict(seqlen=29, dt_scale=200.0), dict(seqlen=29, dtype=torch.bfloat16),
])
def test_triton_scan_in_chunks_edge_cases(monkeypatch, case):
    # the forward and backward cut into chunks walked in parallel (by default every 8-token tile its own chunk)
    # against the float64 recurrence: values, final state and every gradient, also h0's through the chunks
    from ssm_hf.kernels import selective_scan_triton as module

    batch, seqlen = 3, case["seqlen"]
    monkeypatch.setattr(module, "TILE_CONFIG", {"block_t": 8})
    chunk_counts = []  # (forward, backward): a case meant for chunks must not run in one piece
    time_chunks = module._time_chunks

    def counted(*args):
        chunk_len, n_chunks = time_chunks(*args)
        chunk_counts.append(n_chunks)
        return chunk_len, n_chunks

    monkeypatch.setattr(module, "_time_chunks", counted)
    monkeypatch.setattr(module, "FORWARD_CONFIG", {**module.FORWARD_CONFIG, "block_d": 4,
                                                   "unroll": case.get("unroll", 4),
                                                   "min_programs": case.get("fwd_programs", 10**6)})
    monkeypatch.setattr(module, "BACKWARD_CONFIG", {**module.BACKWARD_CONFIG, "block_d": 4,
                                                    "min_programs": case.get("bwd_programs", 10**6)})
    inputs = _inputs(batch, seqlen, case.get("d_inner", 10), case.get("d_state", 6),
                     dt_scale=case.get("dt_scale", 1.0), seed=seqlen)
    softplus = not case.get("bare", False)
    if not softplus:  # no z, D, bias or h0; Δ given non-negative
        for key in ("D", "z", "delta_bias", "initial_state"):
            inputs.pop(key)
        inputs["delta"] = inputs["delta"].abs()
    seq_idx = None
    if "starts" in case:
        seq_idx = _ids_starting_at(1 if case.get("shared_ids") else batch, seqlen, case["starts"]).to(DEVICE)
    dtype = case.get("dtype", torch.float32)
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, dtype).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = selective_scan_triton(**leaves, delta_softplus=softplus, return_final_state=True, seq_idx=seq_idx)
    y_ref, h_ref = kernels.selective_scan_sequential(**leaves_ref, delta_softplus=softplus, return_final_state=True,
                                                     seq_idx=seq_idx if seq_idx is None else seq_idx.cpu())
    tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (2e-2, 3e-2)
    assert _rel_err(y.cpu(), y_ref) < tol and _rel_err(h.cpu(), h_ref) < tol
    g = torch.Generator().manual_seed(4)
    loss, loss_ref = 0.0, 0.0
    if case.get("dy", True):
        weight = torch.randn(y_ref.shape, dtype=torch.float64, generator=g)
        loss, loss_ref = loss + (y * weight.to(y)).sum(), loss_ref + (y_ref * weight).sum()
    if case.get("final", True):
        weight = torch.randn(h_ref.shape, dtype=torch.float64, generator=g)
        loss, loss_ref = loss + (h * weight.to(h)).sum(), loss_ref + (h_ref * weight).sum()
    loss.backward()
    loss_ref.backward()
    n_tiles = -(-seqlen // 8)
    assert tuple(chunk_counts) == case.get("chunks", (n_tiles, n_tiles))
    for key in inputs:
        if leaves_ref[key].grad is None:  # y unused: C, D and z get no gradient in the reference, zeros here
            assert leaves[key].grad is None or not leaves[key].grad.any(), key
        else:
            assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < grad_tol, key


@pytest.mark.parametrize("batch,d_inner", [(0, 4), (2, 0)])
def test_triton_scan_empty_batch_or_channels(batch, d_inner):
    # nothing to compute, but the call (and its backward) must work as the reference's does
    inputs = _inputs(batch, 5, d_inner, 3, seed=1)
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    y, h = selective_scan_triton(**leaves, delta_softplus=True, return_final_state=True)
    y_ref, h_ref = kernels.selective_scan_sequential(**inputs, delta_softplus=True, return_final_state=True)
    assert y.shape == y_ref.shape and h.shape == h_ref.shape
    (y.sum() + h.sum()).backward()
    for key, leaf in leaves.items():
        assert leaf.grad.shape == leaf.shape and not leaf.grad.any(), key


def test_triton_scan_backward_uses_the_forwards_tiles(monkeypatch):
    # the backward walks the tiles the forward stored: a TILE_CONFIG changed in between must not change them
    from ssm_hf.kernels import selective_scan_triton as module

    inputs = _inputs(2, 21, 6, 4, seed=2)
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    monkeypatch.setattr(module, "TILE_CONFIG", {"block_t": 8})
    y = selective_scan_triton(**leaves, delta_softplus=True)
    monkeypatch.setattr(module, "TILE_CONFIG", {"block_t": 4})
    weight = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    (y * weight.to(y)).sum().backward()
    (kernels.selective_scan_sequential(**leaves_ref, delta_softplus=True) * weight).sum().backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < 1e-4, key


def test_triton_scan_bfloat16_and_large_steps():
    inputs = _inputs(1, 24, 8, 4, dt_scale=20.0, seed=5)
    y_ref = kernels.selective_scan_sequential(**inputs, delta_softplus=True)
    y = selective_scan_triton(**_to(inputs, torch.bfloat16), delta_softplus=True)
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert _rel_err(y.cpu(), y_ref) < 3e-2


def test_dispatch_picks_triton_only_for_cuda(monkeypatch):
    cpu = torch.zeros(1, 2, 3)
    assert not kernels.use_triton(cpu)
    if torch.cuda.is_available():
        assert kernels.use_triton(cpu.cuda())
        monkeypatch.setenv("SSM_HF_FORCE_REFERENCE", "1")
        assert not kernels.use_triton(cpu.cuda())


@pytest.mark.parametrize("batch,seqlen,heads,head_dim,groups,d_state", [(2, 1, 4, 3, 2, 5), (1, 70, 4, 8, 1, 16),
                                                                         (2, 130, 6, 16, 3, 8)])
def test_triton_ssd_forward_and_gradients(batch, seqlen, heads, head_dim, groups, d_state, ssd_forward):
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    inputs = ssd_inputs(batch, seqlen, heads, head_dim, groups, d_state, seed=seqlen)
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    weight = torch.randn(batch, seqlen, heads, head_dim, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(4))
    y, h = ssd_scan_triton(**leaves, dt_softplus=True, dt_limit=(0.0, 5.0), return_final_state=True)
    y_ref, h_ref = kernels.ssd_scan_sequential(**leaves_ref, dt_softplus=True, dt_limit=(0.0, 5.0),
                                               return_final_state=True)
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(h.cpu(), h_ref) < 1e-5
    ((y * weight.to(y)).sum() + h.sum()).backward()
    ((y_ref * weight).sum() + h_ref.sum()).backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < 1e-4, key


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("width,cached", [(4, 4), (2, 2), (4, 3), (1, 1)])
def test_triton_conv_update_matches_torch(width, cached, activation):
    from ssm_hf.kernels import causal_conv1d_torch
    from ssm_hf.kernels.decode_triton import causal_conv1d_update_triton

    g = torch.Generator().manual_seed(width)
    x, state = torch.randn(3, 37, generator=g), torch.randn(3, 37, cached, generator=g)
    weight, bias = torch.randn(37, width, generator=g), torch.randn(37, generator=g)
    state_ref = state.clone()
    state_t = state.clone().to(DEVICE)
    out = causal_conv1d_update_triton(x.to(DEVICE), state_t, weight.to(DEVICE), bias.to(DEVICE), activation)
    out_ref = causal_conv1d_torch.causal_conv1d_update(x, state_ref, weight, bias, activation)
    torch.testing.assert_close(out.cpu(), out_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state_t.cpu(), state_ref)
    # and the step equals the full causal conv over the cached inputs followed by x, then the activation
    full = kernels.causal_conv1d(torch.cat([state.transpose(1, 2), x[:, None]], 1), weight, bias)
    torch.testing.assert_close(out_ref, full[:, -1] if activation is None else F.silu(full[:, -1]),
                               rtol=1e-5, atol=1e-5)


def test_triton_state_update_matches_torch():
    from ssm_hf.kernels import selective_scan_torch
    from ssm_hf.kernels.decode_triton import selective_state_update_triton

    inputs = _inputs(3, 1, 40, 12, seed=7)
    f = _to(inputs, torch.float32)
    args = (f["initial_state"], f["x"][:, 0], f["delta"][:, 0], f["A"], f["B"][:, 0], f["C"][:, 0], f["D"],
            f["z"][:, 0], f["delta_bias"], True)
    y, new = selective_state_update_triton(*args)
    y_ref, new_ref = selective_scan_torch.selective_state_update(*[a.cpu() if torch.is_tensor(a) else a
                                                                   for a in args])
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(new.cpu(), new_ref) < 1e-5
    torch.testing.assert_close(args[0].cpu(), inputs["initial_state"].float())  # the input state is untouched


def test_decoding_steps_write_the_new_state_in_place_when_asked():
    """state_out=state (what the mixers pass when decoding outside autograd): the same results as a new state,
    written into the given tensor, for the Triton steps and their PyTorch twins; a strided state_out is written
    through a copy."""
    from ssm_hf.kernels import selective_scan_torch, ssd_torch
    from ssm_hf.kernels.decode_triton import selective_state_update_triton, ssd_state_update_triton

    f = _to(_inputs(2, 1, 24, 6, seed=11), torch.float32)
    mamba = (f["x"][:, 0], f["delta"][:, 0], f["A"], f["B"][:, 0], f["C"][:, 0], f["D"], f["z"][:, 0],
             f["delta_bias"], True)
    g = torch.Generator().manual_seed(12)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    ssd = (r(2, 4, 3), r(2, 4), -torch.rand(4, generator=g).to(DEVICE), r(2, 2, 5), r(2, 2, 5), r(4), r(4), True,
           (1e-3, 0.5))
    cases = [(selective_state_update_triton, selective_scan_torch.selective_state_update, f["initial_state"], mamba),
             (ssd_state_update_triton, ssd_torch.ssd_state_update, r(2, 4, 3, 5), ssd)]
    for triton_step, torch_step, state, args in cases:
        for step in (triton_step, torch_step):
            y_new, expected = step(state, *args)
            in_place = state.clone()
            y, new = step(in_place, *args, state_out=in_place)
            assert new is in_place and torch.equal(y, y_new) and torch.equal(new, expected), step.__name__
            strided = torch.zeros(*state.shape[:-1], 2 * state.shape[-1], device=DEVICE)[..., ::2]
            _, new = step(state, *args, state_out=strided)
            assert new is strided and torch.equal(strided, expected), step.__name__


def test_triton_edge_cases_empty_sequence_strided_states_wide_ssd_state():
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.decode_triton import causal_conv1d_update_triton, selective_state_update_triton
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    # an empty sequence: the state and its gradient pass straight through
    h0 = torch.randn(2, 4, 3, device=DEVICE, requires_grad=True)
    empty = torch.zeros(2, 0, 4, device=DEVICE)
    y, h = selective_scan_triton(empty, empty, -torch.rand(4, 3, device=DEVICE), torch.zeros(2, 0, 3, device=DEVICE),
                                 torch.zeros(2, 0, 3, device=DEVICE), initial_state=h0, return_final_state=True)
    h.sum().backward()
    assert y.shape == (2, 0, 4) and torch.equal(h0.grad, torch.ones_like(h0))
    # strided conv state (a view into a longer buffer) and a transposed input
    g = torch.Generator().manual_seed(3)
    buffer, x = torch.randn(2, 8, 6, generator=g), torch.randn(8, 2, generator=g).t()
    weight = torch.randn(8, 4, generator=g)
    view, ref_state = buffer.to(DEVICE)[..., 2:], buffer[..., 2:].clone()
    out = causal_conv1d_update_triton(x.to(DEVICE), view, weight.to(DEVICE))
    from ssm_hf.kernels import causal_conv1d_torch
    ref = causal_conv1d_torch.causal_conv1d_update(x.contiguous(), ref_state, weight)
    torch.testing.assert_close(out.cpu(), ref)
    torch.testing.assert_close(view.cpu(), ref_state)
    state = torch.randn(5, 2, 3, generator=g).transpose(0, 1)  # (2, 5, 3), not row-major
    args = (state, torch.randn(2, 5, generator=g), torch.rand(2, 5, generator=g), -torch.rand(5, 3, generator=g),
            torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g))
    y, new = selective_state_update_triton(*[a.to(DEVICE) for a in args])
    y_ref, new_ref = kernels.selective_scan_torch.selective_state_update(*args)
    torch.testing.assert_close(new.cpu(), new_ref)
    torch.testing.assert_close(y.cpu(), y_ref, rtol=1e-5, atol=1e-5)
    # a state wider than 128 takes the narrower tiles
    inputs = ssd_inputs(1, 40, 2, 4, 1, 130, seed=9)
    y_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True)
    y = ssd_scan_triton(**_to(inputs, torch.float32), dt_softplus=True)
    assert _rel_err(y.cpu(), y_ref) < 1e-5


@pytest.mark.parametrize("options", [dict(dt_bias=True, dt_softplus=True, dt_limit=(1e-3, 0.5), D=True),
                                     dict(dt_bias=False, dt_softplus=False, dt_limit=None, D=False)])
def test_triton_ssd_state_update_matches_reference(options):
    from ssm_hf.kernels import ssd_torch
    from ssm_hf.kernels.decode_triton import ssd_state_update_triton

    g = torch.Generator().manual_seed(7)
    batch, heads, head_dim, groups, d_state = 2, 6, 5, 3, 7
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    args = dict(state=r(batch, heads, head_dim, d_state), x=r(batch, heads, head_dim),
                dt=r(batch, heads) if options["dt_softplus"] else r(batch, heads).abs(),
                A=-torch.rand(heads, dtype=torch.float64, generator=g) * 3, B=r(batch, groups, d_state),
                C=r(batch, groups, d_state), D=r(heads) if options["D"] else None,
                dt_bias=r(heads) if options["dt_bias"] else None)
    kw = dict(dt_softplus=options["dt_softplus"], dt_limit=options["dt_limit"])
    y_ref, new_ref = ssd_torch.ssd_state_update(**args, **kw)
    ours = {k: (v.to(DEVICE, torch.float32) if v is not None else None) for k, v in args.items()}
    state_before = ours["state"].clone()
    y, new = ssd_state_update_triton(**ours, **kw)
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(new.cpu(), new_ref) < 1e-5
    assert torch.equal(ours["state"], state_before)  # the state passed in is left as it was
    ours["x"] = ours["x"].bfloat16()
    y16, _ = ssd_state_update_triton(**ours, **kw)
    assert y16.dtype == torch.bfloat16 and _rel_err(y16.cpu(), y_ref) < 2e-2


@triton.jit
def _softplus_kernel(v_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, triton_math.softplus(tl.load(v_ptr + offs, mask=offs < n)), mask=offs < n)


def test_triton_softplus_keeps_tiny_values():
    v = torch.cat([torch.linspace(-60.0, 40.0, 57), torch.tensor([-17.5, -20.0, 19.9, 20.1, 0.0, 1e-3])])
    v = v.to(DEVICE)
    out = torch.empty_like(v)
    _softplus_kernel[(1,)](v, out, v.numel(), BLOCK=64)
    reference = F.softplus(v.cpu().double())
    # tiny values included, not 0 (on a GPU exp(v) of float32 v ≈ -50 carries v's rounding: ~3e-6 relative)
    assert (out.cpu().double() - reference).abs().div(reference).max() < 1e-5


@pytest.mark.parametrize("step", ["mamba", "mamba2"])
def test_triton_decode_steps_keep_tiny_softplus_steps(step):
    """Δ = softplus(-25) ≈ 1.4e-11: a plain log(1 + exp(v)) makes it 0 in float32; with x ~ 1e9 the step is seen."""
    from ssm_hf.kernels import selective_scan_torch, ssd_torch
    from ssm_hf.kernels.decode_triton import selective_state_update_triton, ssd_state_update_triton

    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, dtype=torch.float64, generator=g)  # noqa: E731
    if step == "mamba":
        batch, d_inner, d_state = 2, 6, 4
        args = (r(batch, d_inner, d_state), r(batch, d_inner) * 1e9, -25.0 + r(batch, d_inner) * 0.5,
                -torch.rand(d_inner, d_state, dtype=torch.float64, generator=g), r(batch, d_state), r(batch, d_state))
        kw = dict(delta_softplus=True)
        pair = selective_state_update_triton, selective_scan_torch.selective_state_update
    else:
        batch, heads, head_dim, groups, d_state = 2, 4, 3, 2, 5
        args = (r(batch, heads, head_dim, d_state), r(batch, heads, head_dim) * 1e9, -25.0 + r(batch, heads) * 0.5,
                -torch.rand(heads, dtype=torch.float64, generator=g), r(batch, groups, d_state),
                r(batch, groups, d_state))
        kw = dict(dt_softplus=True)
        pair = ssd_state_update_triton, ssd_torch.ssd_state_update
    y_ref, new_ref = pair[1](*args, **kw)
    y, new = pair[0](*[a.to(DEVICE, torch.float32) for a in args], **kw)
    assert _rel_err(new.cpu(), new_ref) < 1e-5 and _rel_err(y.cpu(), y_ref) < 1e-5


@pytest.mark.parametrize("hidden,group_size,gated", [(12, 12, True), (12, 4, True), (15, 5, False), (16, 16, False)])
def test_triton_rms_norm_gated_forward_and_gradients(hidden, group_size, gated):
    from ssm_hf.kernels import norm_torch
    from ssm_hf.kernels.norm_triton import rms_norm_gated_triton

    g = torch.Generator().manual_seed(hidden + group_size)
    x = torch.randn(2, 5, hidden, dtype=torch.float64, generator=g)
    gate = torch.randn(2, 5, hidden, dtype=torch.float64, generator=g) if gated else None
    weight = 1 + 0.3 * torch.randn(hidden, dtype=torch.float64, generator=g)
    leaves = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in (x, gate, weight) if t is not None]
    refs = [t.clone().requires_grad_(True) for t in (x, gate, weight) if t is not None]
    ours = rms_norm_gated_triton(leaves[0], leaves[1] if gated else None, leaves[-1], group_size, 1e-5)
    ref = norm_torch.rms_norm_gated(refs[0], refs[1] if gated else None, refs[-1], group_size, 1e-5)
    assert _rel_err(ours.detach().cpu(), ref) < 1e-5
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (ours * w.to(ours)).sum().backward()
    (ref * w).sum().backward()
    for leaf, r in zip(leaves, refs):
        assert _rel_err(leaf.grad.cpu(), r.grad) < 1e-4
    # bf16 input with a float32 weight: the result is float32, as the reference's type promotion gives
    half = [t.detach().bfloat16() if i < len(leaves) - 1 else t.detach() for i, t in enumerate(leaves)]
    out16 = rms_norm_gated_triton(half[0], half[1] if gated else None, half[-1], group_size, 1e-5)
    ref16 = norm_torch.rms_norm_gated(half[0].cpu(), half[1].cpu() if gated else None, half[-1].cpu(),
                                      group_size, 1e-5)
    assert out16.dtype == ref16.dtype == torch.float32 and _rel_err(out16.cpu(), ref16.double()) < 1e-2
    # and its gradients come back in the inputs' dtypes, stored so by the kernel, close to the float64 ones
    half = [t.requires_grad_(True) for t in half]
    out16 = rms_norm_gated_triton(half[0], half[1] if gated else None, half[-1], group_size, 1e-5)
    (out16 * w.to(out16)).sum().backward()
    for leaf, r in zip(half, refs):
        assert leaf.grad.dtype == leaf.dtype and _rel_err(leaf.grad.double().cpu(), r.grad) < 2e-2


@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("batch,seqlen,channels,width,with_past,with_bias", [
    (2, 1, 5, 4, True, True), (1, 37, 70, 4, False, True), (2, 9, 3, 2, True, False), (1, 3, 8, 4, False, False),
    (2, 19, 6, 3, True, True), (2, 11, 5, 1, True, True),
])
def test_triton_causal_conv1d_forward_and_gradients(monkeypatch, batch, seqlen, channels, width, with_past, with_bias,
                                                    activation):
    """Against the PyTorch form in float64; with SiLU the backward recomputes the pre-activations of the W - 1
    outputs after each block from x: blocks of 8 tokens make those reach into the next block, and backward programs
    of two blocks each sum dw and dbias over several programs."""
    from ssm_hf.kernels import causal_conv1d_torch
    from ssm_hf.kernels import causal_conv1d_triton as module
    from ssm_hf.kernels.causal_conv1d_triton import causal_conv1d_triton

    monkeypatch.setattr(module, "BLOCK_T", 8)
    monkeypatch.setattr(module, "BACKWARD_BLOCKS_PER_PROGRAM", 2)
    g = torch.Generator().manual_seed(seqlen * 10 + width)
    x = torch.randn(batch, seqlen, channels, dtype=torch.float64, generator=g)
    weight = torch.randn(channels, width, dtype=torch.float64, generator=g)
    bias = torch.randn(channels, dtype=torch.float64, generator=g) if with_bias else None
    past = torch.randn(batch, channels, width + 1, dtype=torch.float64, generator=g) if with_past else None
    leaves = [t.to(DEVICE, torch.float32).requires_grad_(True) for t in (x, weight, bias) if t is not None]
    refs = [t.clone().requires_grad_(True) for t in (x, weight, bias) if t is not None]
    ours = causal_conv1d_triton(leaves[0], leaves[1], leaves[2] if with_bias else None,
                                past.to(DEVICE, torch.float32) if with_past else None, activation=activation)
    ref = causal_conv1d_torch.causal_conv1d(refs[0], refs[1], refs[2] if with_bias else None, past,
                                            activation=activation)
    if activation == "silu":  # the reference is the conv, then SiLU
        plain = causal_conv1d_torch.causal_conv1d(x, weight, bias, past)
        assert torch.equal(ref.detach(), F.silu(plain))
    assert ours.dtype == torch.float32 and _rel_err(ours.detach().cpu(), ref) < 1e-5
    w = torch.randn(ref.shape, dtype=torch.float64, generator=g)
    (ours * w.to(ours)).sum().backward()
    (ref * w).sum().backward()
    for leaf, r in zip(leaves, refs):
        assert _rel_err(leaf.grad.cpu(), r.grad) < 1e-5
    half = causal_conv1d_triton(leaves[0].detach().bfloat16(), leaves[1].detach(), None, None,
                                activation=activation)
    assert half.dtype == torch.bfloat16
    # bf16 x and bias with a float32 weight: each gradient in its own input's dtype
    mixed = [leaves[0].detach().bfloat16().requires_grad_(True), leaves[1].detach().clone().requires_grad_(True),
             torch.randn(channels, generator=g).bfloat16().to(DEVICE).requires_grad_(True)]
    causal_conv1d_triton(*mixed, activation=activation).float().sum().backward()
    assert [t.grad.dtype for t in mixed] == [torch.bfloat16, torch.float32, torch.bfloat16]
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(leaves[0], leaves[1], activation="gelu")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_torch.causal_conv1d(refs[0], refs[1], activation="relu")


def _segments_separately(inputs, seq_idx):
    """The float64 recurrence run on each packed sequence alone (the initial state only for the first), joined."""
    ys, state = [], None
    row_inputs = {k: v for k, v in inputs.items()}
    starts = [0] + [t for t in range(1, seq_idx.shape[1]) if seq_idx[0, t] != seq_idx[0, t - 1]] + [seq_idx.shape[1]]
    for begin, end in zip(starts[:-1], starts[1:]):
        piece = {k: (v[:, begin:end] if k in ("x", "dt", "B", "C") else v) for k, v in row_inputs.items()}
        if begin > 0:
            piece.pop("initial_state", None)
        y, state = kernels.ssd_scan_sequential(**piece, dt_softplus=True, return_final_state=True)
        ys.append(y)
    return torch.cat(ys, 1), state


@pytest.mark.parametrize("seqlen,d_state,boundaries", [(70, 16, (1, 5, 64, 65)), (45, 136, (30, 32)),
                                                       (130, 8, ())])
def test_triton_ssd_packed_sequences_and_gradients(seqlen, d_state, boundaries, ssd_forward):
    """seq_idx resets the state at each sequence start (also at a chunk's first token): values, final state and
    every gradient equal the float64 recurrence run on each sequence alone."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    inputs = ssd_inputs(1, seqlen, 4, 8, 2, d_state, seed=seqlen + d_state)
    seq_idx = torch.zeros(1, seqlen, dtype=torch.int32)
    for t in boundaries:
        seq_idx[:, t:] += 1
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    weight = torch.randn(1, seqlen, 4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y, h = ssd_scan_triton(**leaves, dt_softplus=True, return_final_state=True, seq_idx=seq_idx.to(DEVICE))
    y_ref, h_ref = _segments_separately(leaves_ref, seq_idx)
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(h.cpu(), h_ref) < 1e-5
    ((y * weight.to(y)).sum() + (h * h.detach()).sum()).backward()
    ((y_ref * weight).sum() + (h_ref * h_ref.detach()).sum()).backward()
    for key in inputs:
        assert torch.isfinite(leaves[key].grad).all(), key
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < 1e-4, key


def test_triton_ssd_gradient_of_final_state_alone_without_initial_state(ssd_forward):
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    inputs = ssd_inputs(2, 67, 2, 16, 1, 16, seed=11)
    inputs.pop("initial_state")
    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    _, h = ssd_scan_triton(**leaves, dt_softplus=True, return_final_state=True)
    _, h_ref = kernels.ssd_scan_sequential(**leaves_ref, dt_softplus=True, return_final_state=True)
    (h * h_ref.detach().to(h)).sum().backward()
    (h_ref * h_ref.detach()).sum().backward()
    unseen = {"C", "D"}   # the state does not depend on them: their gradients are exact zeros
    assert all(leaves_ref[key].grad is None and not leaves[key].grad.any() for key in unseen)
    for key in inputs.keys() - unseen:
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < 1e-4, key


def test_triton_ssd_bf16_inputs_and_gradients(ssd_forward):
    """16-bit inputs: loads, stores and gradient dtypes (the interpreter multiplies in float32; the GPU check in
    bench/gpu_kernels.py --sections check_ssd covers 16-bit products)."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    inputs = ssd_inputs(2, 100, 4, 16, 2, 32, seed=3)
    half = {k: (v.to(torch.bfloat16) if k in ("x", "B", "C") else v.float()).to(DEVICE) for k, v in inputs.items()}
    leaves = {k: v.clone().requires_grad_(True) for k, v in half.items()}
    leaves_ref = {k: v.cpu().double().requires_grad_(True) for k, v in half.items()}
    y, h = ssd_scan_triton(**leaves, dt_softplus=True, return_final_state=True)
    y_ref, h_ref = kernels.ssd_scan_sequential(**leaves_ref, dt_softplus=True, return_final_state=True)
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    # the interpreter multiplies in float32 (the state is then float32-exact); a GPU multiplies in bf16
    assert _rel_err(y.cpu(), y_ref) < 1e-2 and _rel_err(h.cpu(), h_ref) < (1e-5 if DEVICE == "cpu" else 1e-2)
    weight = torch.randn(y_ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    (y.float() * weight.to(DEVICE, torch.float32)).sum().backward()
    (y_ref * weight).sum().backward()
    for key in inputs:
        assert leaves[key].grad.dtype == half[key].dtype, key
        # bf16 products on a GPU: Δ's bias sums 200 rounded terms per head
        assert _rel_err(leaves[key].grad.cpu(), leaves_ref[key].grad) < (1e-2 if DEVICE == "cpu" else 3e-2), key


@pytest.mark.parametrize("case", ["odd_sizes_packed", "no_D_no_initial_state", "only_A_and_h0_need_grad",
                                  "projection_slices"])
def test_triton_ssd_edge_cases_against_the_recurrence(case, ssd_forward):
    """Cases the tests above leave out: head_dim not a power of 2 with d_state not a multiple of 16, groups > 1,
    int64 seq_idx and starts on a chunk's first and last tokens; no D and no initial state; gradients wanted only
    for A and an initial state whose final state is not used (dfinal None); x, Δ, B and C as slices of one
    projection (not contiguous), as the mixer passes them, with a (1, seqlen) seq_idx shared by both rows."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    shapes = {"odd_sizes_packed": (2, 70, 6, 5, 3, 20), "no_D_no_initial_state": (1, 40, 2, 16, 1, 16),
              "only_A_and_h0_need_grad": (2, 45, 4, 3, 2, 5), "projection_slices": (2, 37, 4, 3, 2, 5)}[case]
    batch, seqlen = shapes[:2]
    inputs = ssd_inputs(*shapes, seed=len(case))
    if case == "no_D_no_initial_state":
        del inputs["D"], inputs["initial_state"]
    seq_idx = None
    if case in ("odd_sizes_packed", "only_A_and_h0_need_grad"):
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int64)
        for t in (1, 31, 32, 64):
            seq_idx[:, t:] += 1
        seq_idx[1:, 50:] += 1
    elif case == "projection_slices":
        seq_idx = torch.zeros(1, seqlen, dtype=torch.int64)
        seq_idx[:, 5:] += 1
        seq_idx[:, 33:] += 1
    wants_grad = {"A", "initial_state"} if case == "only_A_and_h0_need_grad" else set(inputs)
    refs = {k: v.clone().requires_grad_(k in wants_grad) for k, v in inputs.items()}
    leaves = {k: v.to(DEVICE, torch.float32).requires_grad_(k in wants_grad) for k, v in inputs.items()}
    args = dict(leaves)
    if case == "projection_slices":
        # one (batch, seqlen, 5 + width) projection, x, B, C and Δ views into it at an odd offset
        parts = [leaves["x"].flatten(2), leaves["B"].flatten(2), leaves["C"].flatten(2), leaves["dt"]]
        proj = torch.cat([torch.zeros(batch, seqlen, 5, device=DEVICE)] + [p.detach() for p in parts], -1)
        proj.requires_grad_(True)
        x, B, C, dt = proj[..., 5:].split([p.shape[-1] for p in parts], -1)
        args.update(x=x.unflatten(-1, leaves["x"].shape[2:]), B=B.unflatten(-1, leaves["B"].shape[2:]),
                    C=C.unflatten(-1, leaves["C"].shape[2:]), dt=dt)
        assert not args["x"].is_contiguous() and not args["B"].is_contiguous()
    with_final = case != "only_A_and_h0_need_grad"
    seq = seq_idx.to(DEVICE) if seq_idx is not None else None
    out = ssd_scan_triton(**args, dt_softplus=True, return_final_state=with_final, seq_idx=seq)
    ref = kernels.ssd_scan_sequential(**refs, dt_softplus=True, return_final_state=with_final,
                                      seq_idx=seq_idx.expand(batch, -1) if seq_idx is not None else None)
    out, ref = (out, ref) if with_final else ((out,), (ref,))   # (y, final state) or (y,)
    g = torch.Generator().manual_seed(6)
    weights = [torch.randn(want.shape, dtype=torch.float64, generator=g) for want in ref]
    for got, want in zip(out, ref):
        assert _rel_err(got.cpu(), want) < 1e-5
    sum((got * w.to(got)).sum() for got, w in zip(out, weights)).backward()
    sum((want * w).sum() for want, w in zip(ref, weights)).backward()
    for key in inputs:
        if key not in wants_grad:
            assert leaves[key].grad is None, key
        elif case == "projection_slices" and key in ("x", "B", "C", "dt"):
            continue
        else:
            assert _rel_err(leaves[key].grad.cpu(), refs[key].grad) < 1e-4, key
    if case == "projection_slices":
        grads = proj.grad[..., 5:].split([p.shape[-1] for p in parts], -1)
        for key, grad in zip(("x", "B", "C", "dt"), grads):
            assert _rel_err(grad.reshape(refs[key].shape).cpu(), refs[key].grad) < 1e-4, key
        assert not proj.grad[..., :5].any()


@pytest.mark.parametrize("seqlen", [200, 70])
def test_triton_ssd_sequence_starts_across_row_blocks(seqlen, ssd_forward):
    """Sequence starts seen from a chunk's later row blocks: inside an earlier block (its tokens before the start
    must not reach), inside a block in between, on a row block's first and last tokens and a chunk's, and on the
    last token; the last chunk ends inside a row block and (seqlen 70 and 200 at chunk 128) has row blocks wholly
    past the end. Weak decays, so that a token leaking past a start 100 tokens back would show."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    batch = 3
    inputs = ssd_inputs(batch, seqlen, 2, 5, 2, 20, seed=seqlen + 17)
    inputs["A"] = inputs["A"] / 100  # a = Δ A of about -0.01 per token
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for row, starts in enumerate([(40, 127, 150), (63, 96, 170, 199), (5, 128, 161)]):
        for t in starts:
            seq_idx[row, t:] += 1
    y, h = ssd_scan_triton(**_to(inputs, torch.float32), dt_softplus=True, return_final_state=True,
                           seq_idx=seq_idx.to(DEVICE))
    y_ref, h_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True, return_final_state=True, seq_idx=seq_idx)
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(h.cpu(), h_ref) < 1e-5


@pytest.mark.parametrize("seqlen", [70, 200, 128, 1])
def test_triton_ssd_output_programs_stop_at_the_sequence_end(monkeypatch, seqlen):
    """With chunks of four row blocks, the output kernel runs one program per row block up to the one holding the
    last token (none for blocks wholly past the end of a short last chunk), and every output is still written."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels import ssd_triton

    monkeypatch.setattr(ssd_triton, "FORWARD_CHUNK", 128)
    monkeypatch.setattr(ssd_triton, "OUTPUT_ROWS", 32)
    monkeypatch.setattr(ssd_triton, "STATE_TILE", ssd_triton.LONG_CHUNK_TILE)
    grids, kernel = [], ssd_triton._chunk_output_kernel

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return kernel[grid]

    monkeypatch.setattr(ssd_triton, "_chunk_output_kernel", Recorded())
    inputs = ssd_inputs(2, seqlen, 2, 5, 1, 20, seed=seqlen)
    y, h = ssd_triton.ssd_scan_triton(**_to(inputs, torch.float32), dt_softplus=True, return_final_state=True)
    y_ref, h_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True, return_final_state=True)
    assert [grid[1] for grid in grids] == [-(-seqlen // 32)]
    assert _rel_err(y.cpu(), y_ref) < 1e-5 and _rel_err(h.cpu(), h_ref) < 1e-5


def _column_views(batch, seqlen, heads, head_dim, groups, d_state, seed, dt_dtype=torch.float32):
    """x, B, C as column views of one (batch, seqlen, width) tensor with columns before, between and after them
    (as the mixer's conv output, wider), and raw Δ as a column view of another: (wide tensors, views). Raw Δ is
    spread (3 x randn) so that softplus and a limit of (0.05, 1.5) clamp some tokens on each side."""
    g = torch.Generator().manual_seed(seed)
    widths = [3, heads * head_dim, 2, groups * d_state, 1, groups * d_state, 5]
    xbc = torch.randn(batch, seqlen, sum(widths), generator=g).to(DEVICE).requires_grad_(True)
    _, x, _, B, _, C, _ = xbc.split(widths, -1)
    dt_wide = (torch.randn(batch, seqlen, heads + 7, generator=g) * 3).to(DEVICE, dt_dtype).requires_grad_(True)
    views = dict(x=x.unflatten(-1, (heads, head_dim)), B=B.unflatten(-1, (groups, d_state)),
                 C=C.unflatten(-1, (groups, d_state)), dt=dt_wide[..., 4:4 + heads])
    return (xbc, dt_wide), views


def _ssd_common(heads, head_dim, d_state, batch, seed, bias):
    g = torch.Generator().manual_seed(seed + 1)
    common = dict(A=-torch.rand(heads, generator=g) * 4 - 0.1, D=torch.randn(heads, generator=g),
                  initial_state=torch.randn(batch, heads, head_dim, d_state, generator=g))
    if bias:
        common["dt_bias"] = torch.randn(heads, generator=g) * 0.5
    return {k: v.to(DEVICE).requires_grad_(True) for k, v in common.items()}


@pytest.mark.parametrize("dt_dtype,bias,packed", [(torch.float32, True, False), (torch.float32, False, True),
                                                  (torch.bfloat16, True, True), (torch.bfloat16, False, False)])
@pytest.mark.parametrize("in_kernels", [False, True])
def test_triton_ssd_reads_column_views_in_place(monkeypatch, dt_dtype, bias, packed, in_kernels):
    """x, B, C as column views of one wide tensor and raw Δ (float32 or bf16) as a column view of another, Δ's bias,
    softplus and limit made by the Triton code (once per token by `_dt_make_kernel`, or, `in_kernels`, inside the
    chunk kernels): the same outputs and gradients (dt_bias's too) as contiguous copies, the same as the PyTorch
    chunked form (which prepares Δ with ssd_prepare_dt), and exact zero gradients for the stored Δ where the clamp
    holds, on both sides."""
    from ssm_hf.kernels import ssd_triton
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    monkeypatch.setattr(ssd_triton, "MAKE_DT_IN_KERNELS", in_kernels)

    batch, seqlen, heads, head_dim, groups, d_state = 2, 45, 4, 8, 2, 8
    (xbc, dt_wide), views = _column_views(batch, seqlen, heads, head_dim, groups, d_state, seed=21, dt_dtype=dt_dtype)
    assert not views["x"].is_contiguous() and views["dt"].stride(1) == heads + 7
    common = _ssd_common(heads, head_dim, d_state, batch, 21, bias)
    seq_idx = None
    if packed:
        seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
        seq_idx[:, 20:] += 1
        seq_idx[1:, 32:] += 1
        seq_idx = seq_idx.to(DEVICE)
    options = dict(dt_softplus=True, dt_limit=(0.05, 1.5), return_final_state=True, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(22)
    wy = torch.randn(batch, seqlen, heads, head_dim, generator=g).to(DEVICE)
    wh = torch.randn(batch, heads, head_dim, d_state, generator=g).to(DEVICE)

    def run(scan, inputs, leaves):
        y, h = scan(**inputs, **options)
        grads = torch.autograd.grad((y * wy).sum() + (h * wh).sum(), leaves)
        return [y, h, *grads]

    strided = run(ssd_scan_triton, {**views, **common}, [xbc, dt_wide, *common.values()])
    copies = {k: v.detach().contiguous().requires_grad_(True) for k, v in views.items()}
    packed_out = run(ssd_scan_triton, {**copies, **common}, [*copies.values(), *common.values()])
    reference = run(kernels.ssd_scan_chunked, {**copies, **common}, [*copies.values(), *common.values()])
    for got in (packed_out, reference):  # the wide tensors' gradients in the copies' layout
        xbc_grad = torch.zeros_like(xbc)
        _, x, _, B, _, C, _ = xbc_grad.split([3, heads * head_dim, 2, groups * d_state, 1, groups * d_state, 5], -1)
        x.copy_(got[2].flatten(2)), B.copy_(got[3].flatten(2)), C.copy_(got[4].flatten(2))
        dt_grad = torch.zeros_like(dt_wide)
        dt_grad[..., 4:4 + heads] = got[5]
        got[2:6] = [xbc_grad, dt_grad]
    names = ["y", "final", "xBC", "dt", *common]
    assert strided[3].dtype == dt_dtype and (not bias or strided[-1].dtype == torch.float32)
    for name, a, b, ref in zip(names, strided, packed_out, reference):
        assert torch.equal(a, b), name  # the same kernels on the same values: only the addresses differ
        tolerance = 1e-2 if name == "dt" and dt_dtype == torch.bfloat16 else 1e-5
        assert _rel_err(a.cpu(), ref.cpu()) < tolerance, name
    v = views["dt"].detach().float() + (common["dt_bias"].detach() if bias else 0)
    sp = F.softplus(v)
    low, high = sp < 0.05, sp > 1.5
    assert low.any() and high.any() and (~low & ~high).any()
    d_raw = strided[3][..., 4:4 + heads]
    assert not d_raw[low | high].any() and d_raw[~low & ~high].all()
    assert not strided[3][..., :4].any() and not strided[3][..., 4 + heads:].any()


@pytest.mark.parametrize("in_kernels", [False, True])
def test_triton_ssd_softplus_keeps_tiny_steps(monkeypatch, in_kernels):
    """Softplus made by the Triton code (`_dt_make_kernel`, or inside the chunk kernels) equals torch's F.softplus
    (threshold 20) from very negative inputs (-30: Δ ~ 1e-13, which log(1 + exp(v)) would round to 0) to above the
    threshold, and so does its gradient: one token, no D or state, so y = (C·B) Δ x exactly."""
    from ssm_hf.kernels import ssd_triton
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    monkeypatch.setattr(ssd_triton, "MAKE_DT_IN_KERNELS", in_kernels)

    raw = torch.tensor([-30.0, -17.0, -8.0, -1e-3, 0.0, 3.0, 20.0, 25.0])
    heads = raw.numel()
    g = torch.Generator().manual_seed(31)
    x = torch.rand(1, 1, heads, 2, generator=g) + 0.5
    B, C = torch.rand(1, 1, 1, 4, generator=g) + 0.5, torch.rand(1, 1, 1, 4, generator=g) + 0.5
    A = -torch.rand(heads, generator=g) - 0.1
    dt = raw.view(1, 1, heads).to(DEVICE).requires_grad_(True)
    y = ssd_scan_triton(x.to(DEVICE), dt, A.to(DEVICE), B.to(DEVICE), C.to(DEVICE), dt_softplus=True)
    y.sum().backward()
    raw_ref = raw.view(1, 1, heads).clone().requires_grad_(True)
    step = F.softplus(raw_ref)
    step.backward((C * B).sum() * x.sum(-1))
    got_step = (y.cpu() / ((C * B).sum() * x))[0, 0, :, 0]
    assert step[0, 0, 0] > 0 and got_step[0] > 0
    torch.testing.assert_close(got_step, step.detach()[0, 0], rtol=2e-6, atol=0)
    torch.testing.assert_close(dt.grad.cpu(), raw_ref.grad, rtol=2e-6, atol=0)


def test_triton_ssd_launches_read_the_callers_tensors(monkeypatch):
    """No copy of x, B, C or Δ when they are column views with packed inner dimensions: every kernel launch gets the
    caller's storage (their data pointers; Δ's, the kernel that makes Δ once), forward and backward; a copy (other
    strides inside a token) only then."""
    from ssm_hf.kernels import ssd_triton

    launches = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel.__name__, {a.data_ptr() for a in args if torch.is_tensor(a)}))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in ("_chunk_walk_kernel", "_chunk_walk_pair_kernel", "_chunk_output_kernel", "_chunk_grads_kernel",
                 "_dt_make_kernel"):
        monkeypatch.setattr(ssd_triton, name, Recorded(getattr(ssd_triton, name)))
    batch, heads, head_dim, groups, d_state = 2, 2, 4, 1, 4
    (xbc, dt_wide), views = _column_views(batch, 19, heads, head_dim, groups, d_state, seed=41)
    common = _ssd_common(heads, head_dim, d_state, batch, 41, True)
    y = ssd_triton.ssd_scan_triton(**views, **common, dt_softplus=True, dt_limit=(0.01, 2.0))
    y.sum().backward()
    reads = ("x", "B", "C")
    pointers = {"x": views["x"].data_ptr(), "B": views["B"].data_ptr(), "C": views["C"].data_ptr(),
                "Δ": views["dt"].data_ptr()}
    walks = [ptrs for name, ptrs in launches if name.startswith("_chunk_walk")]
    # forward: Δ made, walk, output; backward: Δ made again (with its derivative), both walks in one launch,
    # gradients
    names = [name for name, _ in launches]
    assert names.count("_dt_make_kernel") == 2 and names.count("_chunk_walk_pair_kernel") == 1
    assert len(walks) == 2 and len(launches) == 6
    assert all(pointers["Δ"] in ptrs for name, ptrs in launches if name == "_dt_make_kernel")
    assert {pointers["x"], pointers["B"]} <= walks[0] and {pointers["x"], pointers["B"], pointers["C"]} <= walks[1]
    for name, ptrs in launches:
        if name in ("_chunk_output_kernel", "_chunk_grads_kernel"):  # they read all three
            assert all(pointers[key] in ptrs for key in reads), name
    # heads not packed within a token (a transposed view): that input alone is copied
    launches.clear()
    x_t = views["x"].transpose(-1, -2).contiguous().transpose(-1, -2)
    ssd_triton.ssd_scan_triton(**{**views, "x": x_t.detach()}, **common, dt_softplus=True)
    output_ptrs = [ptrs for name, ptrs in launches if name == "_chunk_output_kernel"][0]
    assert x_t.data_ptr() not in output_ptrs and pointers["B"] in output_ptrs


def test_ssd_forward_plan(monkeypatch):
    """Long chunks only for 16-bit inputs whose walker programs would leave multiprocessors idle; a forced chunk or
    output row block the output kernel cannot use is refused by name, not computed wrongly."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels import ssd_triton

    # 48 and 384 walker tiles at d_state 128
    few, many = torch.empty(1, 8, 24, 64, dtype=torch.bfloat16), torch.empty(8, 8, 24, 64, dtype=torch.bfloat16)
    assert ssd_triton._forward_plan(few, 128) == (32, 32, ssd_triton.STATE_TILE)  # no GPU: nothing to fill
    monkeypatch.setattr(ssd_triton, "multiprocessors", lambda x: 132)
    assert ssd_triton._forward_plan(few, 128) == (ssd_triton.LONG_CHUNK, 32, ssd_triton.LONG_CHUNK_TILE)
    assert ssd_triton._forward_plan(many, 128) == (32, 32, ssd_triton.STATE_TILE)
    assert ssd_triton._forward_plan(few.float(), 128) == (32, 32, ssd_triton.STATE_TILE)  # float32 would spill
    monkeypatch.setattr(ssd_triton, "FORWARD_CHUNK", 64)
    assert ssd_triton._forward_plan(few, 128) == (64, 32, ssd_triton.STATE_TILE)
    inputs = _to(ssd_inputs(1, 8, 2, 4, 1, 5), torch.float32)
    for chunk in (48, 8):
        monkeypatch.setattr(ssd_triton, "FORWARD_CHUNK", chunk)
        with pytest.raises(ValueError, match="FORWARD_CHUNK"):
            ssd_triton.ssd_scan_triton(**inputs)
    monkeypatch.setattr(ssd_triton, "FORWARD_CHUNK", 64)
    for rows in (8, 24, 48, 0):  # too short for a tl.dot, or not cutting the chunk into equal blocks
        monkeypatch.setattr(ssd_triton, "OUTPUT_ROWS", rows)
        with pytest.raises(ValueError, match="OUTPUT_ROWS"):
            ssd_triton.ssd_scan_triton(**inputs)


def test_triton_ssd_refuses_groups_that_do_not_divide_the_heads():
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    inputs = _to(ssd_inputs(1, 8, 3, 4, 2, 5), torch.float32)  # 3 heads, 2 groups: head 2 would read group 2
    with pytest.raises(ValueError, match="groups"):
        ssd_scan_triton(**inputs, dt_softplus=True)


@pytest.mark.parametrize("heads,groups,per_program", [(8, 1, 1), (8, 1, 2), (8, 1, 8), (8, 2, 2), (8, 2, 4),
                                                      (6, 3, 2)])
def test_triton_ssd_gradients_with_several_heads_per_program(monkeypatch, heads, groups, per_program):
    """The gradient kernel with GRADS_HEADS_PER_PROGRAM heads of a group per program, which sums their dB and dC
    (one head, a part of a group's heads, all of them; one group and several): every gradient equals the float64
    recurrence's, with packed sequences (starts on a chunk's first token, inside chunks, different per row) and a
    length that ends inside a chunk."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels import ssd_triton

    monkeypatch.setattr(ssd_triton, "GRADS_HEADS_PER_PROGRAM", per_program)
    launches = _record_launches(monkeypatch, ssd_triton, ("_chunk_grads_kernel",))
    batch, seqlen = 2, 77
    inputs = ssd_inputs(batch, seqlen, heads, 4, groups, 20, seed=heads + groups + per_program)
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    for row, starts in enumerate([(1, 32, 50), (20, 64, 76)]):
        for t in starts:
            seq_idx[row, t:] += 1
    _assert_packed_ssd_gradients(inputs, seq_idx, seed=7)
    assert [kwargs["HEADS_PER_PROGRAM"] for _, kwargs in launches] == [per_program]


@pytest.mark.parametrize("initial", [True, False])
@pytest.mark.parametrize("pair", [True, False])
def test_triton_ssd_backward_walks_in_one_launch_or_two(monkeypatch, pair, initial):
    """The backward's two walks, in one launch (few walker programs for the GPU; always on the CPU) or two: with
    or without an initial state, a used final state and packed sequences, every gradient equals the float64
    recurrence's."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels import ssd_triton

    monkeypatch.setattr(ssd_triton, "WALK_PAIR_BELOW_PROGRAMS_PER_SM", 10**9 if pair else 0)
    monkeypatch.setattr(ssd_triton, "multiprocessors", lambda tensor: 1)
    launches = _record_launches(monkeypatch, ssd_triton, ("_chunk_walk_kernel", "_chunk_walk_pair_kernel"))
    batch, seqlen = 2, 45
    inputs = ssd_inputs(batch, seqlen, 4, 4, 2, 8, seed=11 + pair)
    if not initial:
        inputs.pop("initial_state")
    seq_idx = torch.zeros(batch, seqlen, dtype=torch.int32)
    seq_idx[0, 17:] += 1
    seq_idx[1, 32:] += 1
    _assert_packed_ssd_gradients(inputs, seq_idx, seed=3)
    backward = [name for name, _ in launches][1:]   # the first walk is the forward's
    assert backward == (["_chunk_walk_pair_kernel"] if pair else ["_chunk_walk_kernel"] * 2)


def test_ssd_grads_heads_per_program_plan_and_refusal(monkeypatch):
    """The default plan: the most heads per program of (8, 4, 2, 1) that divides the heads of a group while the
    programs still fill the multiprocessors GRADS_MIN_PROGRAMS_PER_SM times, one for float32 on a GPU (without a
    GPU: the most that divides); a forced count that does not divide the heads of a group is refused by name,
    before anything runs."""
    from test_kernels_ssd import _inputs as ssd_inputs

    from ssm_hf.kernels import ssd_triton

    plan = ssd_triton._grads_heads_per_program
    shaped = lambda *shape: torch.empty(*shape, dtype=torch.bfloat16, device="meta")  # noqa: E731
    big, mid, small = shaped(8, 4096, 24, 64), shaped(4, 2048, 24, 64), shaped(1, 64, 24, 64)  # 24,576 6,144 48
    assert plan(big, 1) == 8 and plan(small, 1) == 8 and plan(big, 3) == 8 and plan(big, 6) == 4
    assert plan(shaped(1, 64, 6, 64), 2) == 1 and plan(big.float(), 1) == 8  # 3 heads per group; float32
    monkeypatch.setattr(ssd_triton, "multiprocessors", lambda x: 132)
    assert plan(big, 1) == 8 and plan(mid, 1) == 4 and plan(small, 1) == 1  # mid: 768 programs at 8 heads
    assert plan(big.float(), 1) == 1  # float32 tiles spill already at one head
    inputs = _to(ssd_inputs(1, 8, 4, 4, 2, 5), torch.float32)  # 2 heads per group
    for bad in (3, 4, 0):
        monkeypatch.setattr(ssd_triton, "GRADS_HEADS_PER_PROGRAM", bad)
        with pytest.raises(ValueError, match="GRADS_HEADS_PER_PROGRAM"):
            ssd_triton.ssd_scan_triton(**inputs)


@pytest.mark.parametrize("op", ["ssd_scan", "selective_scan", "causal_conv1d", "selective_update", "ssd_update",
                                "rms_norm_gated"])
def test_triton_ops_read_strided_parameter_vectors(op):
    """Per-channel vectors (D, Δ's bias, the conv bias, the norm weight) that are views with a stride (every other
    element of a longer tensor) give what the PyTorch forms give: the kernels index them as if contiguous."""
    from ssm_hf.kernels import causal_conv1d_torch, norm_torch, ssd_torch
    from ssm_hf.kernels.causal_conv1d_triton import causal_conv1d_triton
    from ssm_hf.kernels.decode_triton import selective_state_update_triton, ssd_state_update_triton
    from ssm_hf.kernels.norm_triton import rms_norm_gated_triton
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    g = torch.Generator().manual_seed(9)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    strided = lambda n: r(2 * n)[::2]  # noqa: E731
    batch, seqlen, heads, head_dim, d_state, d_inner = 2, 11, 4, 3, 5, 6
    if op == "ssd_scan":
        args = (r(batch, seqlen, heads, head_dim), r(batch, seqlen, heads), -r(heads).abs(),
                r(batch, seqlen, 2, d_state), r(batch, seqlen, 2, d_state))
        kwargs = dict(D=strided(heads), dt_bias=strided(heads), dt_softplus=True)
        pair = ssd_scan_triton, kernels.ssd_scan_chunked
    elif op == "selective_scan":
        args = (r(batch, seqlen, d_inner), r(batch, seqlen, d_inner), -r(d_inner, d_state).abs(),
                r(batch, seqlen, d_state), r(batch, seqlen, d_state), strided(d_inner), r(batch, seqlen, d_inner))
        kwargs = dict(delta_bias=strided(d_inner), delta_softplus=True)
        pair = selective_scan_triton, kernels.selective_scan_chunked
    elif op == "causal_conv1d":
        args, kwargs = (r(batch, seqlen, d_inner), r(d_inner, 4), strided(d_inner)), {}
        pair = causal_conv1d_triton, causal_conv1d_torch.causal_conv1d
    elif op == "selective_update":
        args = (r(batch, d_inner, d_state), r(batch, d_inner), r(batch, d_inner), -r(d_inner, d_state).abs(),
                r(batch, d_state), r(batch, d_state), strided(d_inner), r(batch, d_inner))
        kwargs = dict(delta_bias=strided(d_inner), delta_softplus=True)
        pair = selective_state_update_triton, kernels.selective_scan_torch.selective_state_update
    elif op == "ssd_update":
        args = (r(batch, heads, head_dim, d_state), r(batch, heads, head_dim), r(batch, heads), -r(heads).abs(),
                r(batch, 2, d_state), r(batch, 2, d_state), strided(heads), strided(heads))
        kwargs = dict(dt_softplus=True)
        pair = ssd_state_update_triton, ssd_torch.ssd_state_update
    else:
        args, kwargs = (r(batch, seqlen, 8), r(batch, seqlen, 8), strided(8), 4, 1e-5), {}
        pair = rms_norm_gated_triton, norm_torch.rms_norm_gated
    triton_op, torch_op = pair
    got = triton_op(*[a.to(DEVICE) if torch.is_tensor(a) else a for a in args],
                    **{k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in kwargs.items()})
    want = torch_op(*args, **kwargs)
    for a, b in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
        assert _rel_err(a.cpu(), b) < 1e-5


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_reads_column_slices_of_one_projection(monkeypatch, dtype, chunked):
    """As a Mamba block passes them: x and z halves of one in_proj output, B and C column slices of one x_proj
    output (row stride dt_rank + 2 d_state, not d_state). The kernels copy what they index as contiguous (all but
    z, which they read in place: `test_triton_scan_reads_z_in_place`); a float32 slice must be copied too (it once
    was not: `.to(float32)` keeps a float32 view as it is). Also with both directions in time chunks (two 16-token
    tiles), as a GPU runs them."""
    if chunked:
        from ssm_hf.kernels import selective_scan_triton as module

        monkeypatch.setitem(module.FORWARD_CONFIG, "min_programs", 10**6)
        monkeypatch.setitem(module.BACKWARD_CONFIG, "min_programs", 10**6)
    g = torch.Generator().manual_seed(11)
    batch, seqlen, d_inner, d_state, dt_rank = 2, 21, 12, 8, 3
    xz = torch.randn(batch, seqlen, 2 * d_inner, generator=g).to(DEVICE, dtype)
    proj = torch.randn(batch, seqlen, dt_rank + 2 * d_state, generator=g).to(DEVICE, dtype)
    delta = torch.randn(batch, seqlen, d_inner, generator=g).to(DEVICE, dtype)
    A = -torch.rand(d_inner, d_state, generator=g).to(DEVICE) - 0.5
    leaves = [t.requires_grad_(True) for t in (xz, proj, delta)]

    def run(scan):
        x, z = xz[..., :d_inner], xz[..., d_inner:]
        B, C = proj[..., dt_rank:dt_rank + d_state], proj[..., dt_rank + d_state:]
        y = scan(x, delta, A, B, C, z=z, delta_softplus=True)
        grads = torch.autograd.grad((y.float() * torch.linspace(-1, 1, y.numel(), device=DEVICE).view_as(y)).sum(),
                                    leaves)
        return [y.float().cpu()] + [gr.float().cpu() for gr in grads]

    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for got, want in zip(run(selective_scan_triton), run(kernels.selective_scan_chunked)):
        assert _rel_err(got, want) < tol



def _record_scan_launches(monkeypatch) -> list[tuple[str, dict]]:
    """Make the selective scan's kernels record each launch, (kernel name, arguments by name), then launch."""
    from ssm_hf.kernels import selective_scan_triton as module

    return _record_launches(monkeypatch, module, ("_fwd_kernel", "_bwd_local_kernel", "_bwd_kernel"))


def _assert_packed_ssd_gradients(inputs: dict, seq_idx: torch.Tensor, seed: int) -> None:
    """The Triton SSD (float32, Δ through softplus, packed sequences `seq_idx`) and the float64 recurrence, each
    backward through random weights on y and on the final state: every input's gradient within 1e-4."""
    from ssm_hf.kernels import ssd_triton

    leaves = {k: v.requires_grad_(True) for k, v in _to(inputs, torch.float32).items()}
    refs = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True, return_final_state=True, seq_idx=seq_idx.to(DEVICE))
    y_ref, h_ref = kernels.ssd_scan_sequential(**refs, dt_softplus=True, return_final_state=True, seq_idx=seq_idx)
    g = torch.Generator().manual_seed(seed)
    w, wh = torch.randn(y_ref.shape, dtype=torch.float64, generator=g), torch.randn(h_ref.shape, dtype=torch.float64,
                                                                                  generator=g)
    ((y * w.to(y)).sum() + (h * wh.to(h)).sum()).backward()
    ((y_ref * w).sum() + (h_ref * wh).sum()).backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad.cpu(), refs[key].grad) < 1e-4, key


def _record_launches(monkeypatch, module, names) -> list[tuple[str, dict]]:
    """Make the kernels `names` of `module` record each launch, (kernel name, arguments by name), then launch."""
    launches = []

    class Recorded:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.name, {**dict(zip(self.kernel.arg_names, args)), **kwargs}))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in names:
        monkeypatch.setattr(module, name, Recorded(name, getattr(module, name)))
    return launches


def _force_scan_time_chunks(monkeypatch, chunked: bool = True) -> None:
    """Both directions in time chunks (every 16-token tile its own), as a GPU runs them at training shapes, or in
    one piece (which a GPU would otherwise not choose for these tiny shapes: it fills its multiprocessors)."""
    from ssm_hf.kernels import selective_scan_triton as module

    monkeypatch.setitem(module.FORWARD_CONFIG, "min_programs", 10**6 if chunked else 1)
    monkeypatch.setitem(module.BACKWARD_CONFIG, "min_programs", 10**6 if chunked else 1)


def _column_view(t: torch.Tensor, layout: str, width: int, offset: int, seqlen: int) -> torch.Tensor:
    """`width` columns of t (batch, rows, wider) from column `offset`: "slice" as a block passes a part of in_proj's
    output (rows of t apart), "rows" the same out of tokens 3.. of a longer buffer (batch stride not seqlen x row
    stride), "channels" every other column from `offset` (strided channels)."""
    if layout == "slice":
        return t[..., offset:offset + width]
    if layout == "rows":
        return t[:, 3:3 + seqlen, offset:offset + width]
    return t[..., offset:offset + 2 * width:2]


def _wide_buffer(layout: str, batch: int, seqlen: int, columns: int, dtype, g) -> torch.Tensor:
    rows = seqlen + 5 if layout == "rows" else seqlen
    return torch.randn(batch, rows, columns, generator=g).to(DEVICE, dtype).requires_grad_(True)


def _only_the_view_got_a_gradient(buf: torch.Tensor, view) -> bool:
    outside = buf.grad.clone()
    view(outside).zero_()
    return not outside.any()


def _assert_kernels_got(launches: list, ptr: str, strides: tuple[str, str], view: torch.Tensor,
                        copied: bool) -> None:
    """Every recorded launch got `view` itself (its storage and strides, its batch and row strides passed as the
    `strides` arguments) or, where `copied` (strided channels: the kernels read channels contiguously), a contiguous
    copy of it."""
    for name, args in launches:
        passed = args[ptr]
        if copied:
            assert passed.is_contiguous() and passed.data_ptr() != view.data_ptr(), name
        else:
            assert (passed.data_ptr(), passed.stride()) == (view.data_ptr(), view.stride()), name
            assert (args[strides[0]], args[strides[1]]) == view.stride()[:2], name


@pytest.mark.parametrize("layout", ["slice", "rows", "channels"])
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_scan_reads_z_in_place(monkeypatch, dtype, chunked, layout):
    """z as a view of a wider tensor gives exactly what a contiguous copy of it gives (outputs, final state and every
    gradient, bitwise), and every kernel that reads z (forward, the backward and its chunk pass) gets the view
    itself, not a copy: "slice" is z as a Mamba block passes it (the columns after x's, like `xz.chunk(2, -1)[1]`);
    "rows" takes the tokens out of a longer buffer (batch stride not seqlen x row stride). Where the channels are
    strided ("channels", every other column), the kernels get a contiguous copy instead."""
    _force_scan_time_chunks(monkeypatch, chunked)
    g = torch.Generator().manual_seed(12)
    batch, seqlen, d_inner, d_state = 2, 21, 12, 8
    inputs = _to(_inputs(batch, seqlen, d_inner, d_state, seed=12), dtype)
    inputs["A"] = inputs["A"].float()
    zbuf = _wide_buffer(layout, batch, seqlen, 2 * d_inner + 1, dtype, g)
    dy = torch.randn(batch, seqlen, d_inner, generator=g).to(DEVICE, dtype)
    dh = torch.randn(batch, d_inner, d_state, generator=g).to(DEVICE)

    def view(t):  # z's part of the wider tensor (and of its gradient): the columns after x's
        return _column_view(t, layout, d_inner, 1 if layout == "channels" else d_inner, seqlen)

    def run(z):
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in inputs.items() if k != "z"}
        y, h = selective_scan_triton(**leaves, z=z, delta_softplus=True, return_final_state=True)
        torch.autograd.backward([y, h], [dy, dh])
        return [y, h] + [leaves[k].grad for k in sorted(leaves)]

    launches = _record_scan_launches(monkeypatch)
    got = run(view(zbuf))
    kernels_run = sorted({name for name, _ in launches})
    assert kernels_run == (["_bwd_kernel", "_bwd_local_kernel", "_fwd_kernel"] if chunked
                           else ["_bwd_kernel", "_fwd_kernel"])
    _assert_kernels_got(launches, "z_ptr", ("stride_zb", "stride_zl"), view(zbuf), copied=layout == "channels")
    assert zbuf.grad.dtype == dtype and _only_the_view_got_a_gradient(zbuf, view)
    z_copy = view(zbuf).detach().contiguous().requires_grad_(True)
    want = run(z_copy)
    for a, b in zip(got + [view(zbuf.grad)], want + [z_copy.grad]):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("dtype,delta_dtype,chunked", [
    (torch.bfloat16, torch.bfloat16, False), (torch.bfloat16, torch.float32, True),
    (torch.float16, torch.float16, False), (torch.float16, torch.float16, True),
])
def test_triton_scan_gradients_in_the_inputs_dtypes(monkeypatch, dtype, delta_dtype, chunked):
    """dx, dΔ, dz come out of the kernel in x's, Δ's and z's dtypes (no float32 buffers cast afterwards), each equal
    to the gradient the same scan computes from the same values in float32, cast to that dtype. The kernels compute
    in float32 either way, so only the rounding at the store could differ: on a GPU (and for float16 everywhere)
    it rounds to nearest even as torch's cast does, so the match is bitwise. Triton's interpreter instead
    truncates float32 to bfloat16 (`_convert_float` with no rounding mode), so there the bfloat16 gradients are
    the float32 ones truncated: still bitwise, against that cast. (Δ in float32 beside bfloat16 x is what a Mamba
    block passes under an attention mask.)"""
    _force_scan_time_chunks(monkeypatch, chunked)
    batch, seqlen, d_inner, d_state = 2, 21, 12, 8
    base = _inputs(batch, seqlen, d_inner, d_state, seed=13)
    dtypes = dict(x=dtype, delta=delta_dtype, z=dtype, B=dtype, C=dtype, D=dtype, A=torch.float32,
                  delta_bias=torch.float32, initial_state=torch.float32)
    low = {k: v.to(DEVICE, dtypes[k]).requires_grad_(True) for k, v in base.items()}
    high = {k: v.detach().float().requires_grad_(True) for k, v in low.items()}  # the same values in float32
    g = torch.Generator().manual_seed(14)
    dy = torch.randn(batch, seqlen, d_inner, generator=g).to(DEVICE, dtype)
    dh = torch.randn(batch, d_inner, d_state, generator=g).to(DEVICE)
    launches = _record_scan_launches(monkeypatch)
    y, h = selective_scan_triton(**low, delta_softplus=True, return_final_state=True)
    torch.autograd.backward([y, h], [dy, dh])
    (args,) = [args for name, args in launches if name == "_bwd_kernel"]
    assert (args["dx_ptr"].dtype, args["ddt_ptr"].dtype, args["dz_ptr"].dtype) == (dtype, delta_dtype, dtype)
    y32, h32 = selective_scan_triton(**high, delta_softplus=True, return_final_state=True)
    torch.autograd.backward([y32, h32], [dy.float(), dh])

    def truncated(v):  # float32 -> bfloat16 by dropping the low 16 bits, as the interpreter casts
        return (v.view(torch.int32) >> 16).to(torch.int16).view(torch.bfloat16)

    for key, leaf in low.items():
        got, want = leaf.grad, high[key].grad
        assert got.dtype == leaf.dtype, key
        # (B's, C's and D's gradients are cast by the kernels that sum their partials: `sums_triton`)
        if key in ("x", "delta", "z", "B", "C", "D") and got.dtype == torch.bfloat16 and DEVICE == "cpu":
            assert torch.equal(got, truncated(want)) or torch.equal(got, want.to(got.dtype)), key
        else:
            assert torch.equal(got, want.to(got.dtype)), key


@pytest.mark.parametrize("layout", ["slice", "rows", "channels"])
@pytest.mark.parametrize("with_past,with_seq,activation", [(False, False, None), (True, False, "silu"),
                                                           (False, True, "silu"), (True, True, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_conv_reads_x_in_place(monkeypatch, dtype, with_past, with_seq, activation, layout):
    """x as a view of a wider tensor gives exactly what a contiguous copy of it gives (output and the gradients of
    x, the weight and the bias, bitwise), and both kernels get the view itself, not a copy, so the backward keeps
    the view too: "slice" is x as the mixers pass it, columns of in_proj's output (Mamba's x half, Mamba-2's xBC;
    here from column 1, so the view does not start aligned either), "rows" takes the tokens out of a longer
    buffer. Where the channels are strided ("channels"), the kernels get a contiguous copy instead. The PyTorch
    form takes the same views."""
    from ssm_hf.kernels import causal_conv1d_torch
    from ssm_hf.kernels import causal_conv1d_triton as module

    # several time and channel blocks, the last of each ragged; backward programs of two time blocks
    monkeypatch.setattr(module, "BLOCK_T", 8)
    monkeypatch.setattr(module, "BLOCK_C", 8)
    monkeypatch.setattr(module, "BACKWARD_BLOCKS_PER_PROGRAM", 2)
    g = torch.Generator().manual_seed(15)
    batch, seqlen, channels, width = 2, 21, 20, 4
    xbuf = _wide_buffer(layout, batch, seqlen, 2 * channels + 1, dtype, g)
    weight = torch.randn(channels, width, generator=g).to(DEVICE, dtype)
    bias = torch.randn(channels, generator=g).to(DEVICE, dtype)
    past = torch.randn(batch, channels, width, generator=g).to(DEVICE, dtype) if with_past else None
    seq_idx = _ids_starting_at(batch, seqlen, (5, 13)).to(DEVICE) if with_seq else None
    dout = torch.randn(batch, seqlen, channels, generator=g).to(DEVICE, dtype)

    def view(t):
        return _column_view(t, layout, channels, 1, seqlen)

    def run(conv, x):
        leaves = [t.detach().clone().requires_grad_(True) for t in (weight, bias)]
        out = conv(x, *leaves, past=past, seq_idx=seq_idx, activation=activation)
        out.backward(dout)
        return [out] + [t.grad for t in leaves]

    launches = _record_launches(monkeypatch, module, ("_conv_fwd_kernel", "_conv_bwd_kernel"))
    got = run(module.causal_conv1d_triton, view(xbuf))
    assert sorted(name for name, _ in launches) == ["_conv_bwd_kernel", "_conv_fwd_kernel"]
    _assert_kernels_got(launches, "x_ptr", ("stride_xb", "stride_xl"), view(xbuf), copied=layout == "channels")
    for _, args in launches:  # the alignment promised to the compiler is the one of the strides passed
        assert args["X_ALIGN"] == row_alignment(args["stride_xb"], args["stride_xl"])
    assert xbuf.grad.dtype == dtype and _only_the_view_got_a_gradient(xbuf, view)
    x_copy = view(xbuf).detach().contiguous().requires_grad_(True)
    want = run(module.causal_conv1d_triton, x_copy)
    for a, b in zip(got + [view(xbuf.grad)], want + [x_copy.grad]):
        assert a.dtype == b.dtype and torch.equal(a, b)

    # the PyTorch form (CPU) on the same view: as on the copy, and what the kernels give
    xbuf.grad = None
    ref = run(causal_conv1d_torch.causal_conv1d, view(xbuf))
    x_copy.grad = None
    ref_copy = run(causal_conv1d_torch.causal_conv1d, x_copy)
    assert _only_the_view_got_a_gradient(xbuf, view)
    for a, b in zip(ref + [view(xbuf.grad)], ref_copy + [x_copy.grad]):
        assert torch.equal(a, b)
    for a, b in zip(got + [x_copy.grad], ref + [view(xbuf.grad)]):
        assert _rel_err(a.float().cpu(), b.double().cpu()) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_layer_on_the_triton_kernels_equals_its_pytorch_form(monkeypatch, dtype):
    """The models' RMSNorm (residual stream, final norm) runs the gated norm's kernels without a gate: output and
    gradients as on the PyTorch path, which is transformers' formula (float32, rounded to the input's dtype before
    the weight)."""
    from ssm_hf.kernels import norm_triton
    from ssm_hf.layers.norm import RMSNorm

    g = torch.Generator().manual_seed(17)
    norm = RMSNorm(24, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.3 * torch.randn(24, generator=g))
    norm = norm.to(DEVICE, dtype)
    x = (3 * torch.randn(2, 7, 24, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(2, 7, 24, generator=g).to(DEVICE, dtype)

    def run():
        norm.weight.grad = None
        leaf = x.clone().requires_grad_(True)
        y = norm(leaf)
        y.backward(dy)
        return y, leaf.grad, norm.weight.grad

    launches = _record_launches(monkeypatch, norm_triton, ("_norm_fwd_kernel", "_norm_bwd_kernel"))
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    ours = run()
    assert sorted(name for name, _ in launches) == ["_norm_bwd_kernel", "_norm_fwd_kernel"]
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: False)
    want = run()
    variance = x.float().pow(2).mean(-1, keepdim=True)
    assert torch.equal(want[0], norm.weight * (x.float() * torch.rsqrt(variance + 1e-5)).to(dtype))
    for a, b in zip(ours, want):
        assert a.dtype == b.dtype
        assert _rel_err(a.float().cpu(), b.double().cpu()) < (1e-5 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="weight has shape"):
        norm_triton.rms_norm_gated_triton(x, None, norm.weight[:-1], 24, 1e-5)


@pytest.mark.parametrize("x_dtype,residual,residual_dtype,norm_dtype,w_dtype", [
    (torch.float32, None, None, None, torch.float32),                    # a norm alone
    (torch.float32, None, None, torch.bfloat16, torch.bfloat16),         # a block's norm of its float32 stream
    (torch.float32, torch.float32, None, torch.float32, torch.float32),  # add + norm, float32
    (torch.bfloat16, None, torch.float32, torch.bfloat16, torch.bfloat16),       # cast to a float32 stream + norm
    (torch.bfloat16, torch.float32, None, torch.bfloat16, torch.bfloat16),       # add to a float32 stream + norm
    (torch.bfloat16, torch.float32, None, None, torch.bfloat16),                 # ... the norm reading it uncast
    (torch.bfloat16, torch.bfloat16, None, torch.bfloat16, torch.bfloat16),      # a bf16 stream
    (torch.bfloat16, torch.float32, None, torch.float32, torch.float32),         # a float32 norm weight
])
def test_triton_add_rms_norm_forward_and_gradients(monkeypatch, x_dtype, residual, residual_dtype, norm_dtype,
                                                   w_dtype):
    """The residual add + cast + RMS norm op (one kernel each way) against its PyTorch form in the same dtypes
    (the ops it stands for: h = residual + x, norm(h cast to norm_dtype)): y, h and the gradients of x, the
    residual and the weight, with gradients arriving at both outputs. float32 also against float64. Several rows
    per backward program."""
    from ssm_hf.kernels import norm_torch, norm_triton

    monkeypatch.setattr(norm_triton, "BACKWARD_PROGRAMS_NO_GPU", 3)
    g = torch.Generator().manual_seed(18)
    hidden = 20
    x = 2 * torch.randn(2, 7, hidden, dtype=torch.float64, generator=g)
    r = 3 * torch.randn(2, 7, hidden, dtype=torch.float64, generator=g) if residual is not None else None
    weight = 1 + 0.3 * torch.randn(hidden, dtype=torch.float64, generator=g)

    def run(fn, device, dtypes):
        leaves = [t.to(device, dt).requires_grad_(True) if t is not None else None
                  for t, dt in zip((x, r, weight), dtypes)]
        y, h = fn(leaves[0], leaves[1], leaves[2], 1e-5, residual_dtype, norm_dtype)
        dy = torch.randn(y.shape, generator=g).to(device, y.dtype)
        dh = torch.randn(h.shape, generator=g).to(device, h.dtype)
        torch.autograd.backward([y, h], [dy, dh])
        return [y, h] + [t.grad if t is not None else None for t in leaves], (dy, dh)

    # the backward keeps h, or only the norm's input where h is float32 and the norm rounds it to a 16-bit weight's
    # dtype (half the bytes; the stream is not kept by anything else)
    y, _ = norm_triton.add_rms_norm_triton(x.to(DEVICE, x_dtype).requires_grad_(True), None, weight.to(DEVICE, w_dtype),
                                           1e-5, residual_dtype, norm_dtype)
    (kept, _) = y.grad_fn.saved_tensors
    narrow = norm_dtype == w_dtype != torch.float32 and (residual_dtype or x_dtype) == torch.float32
    assert kept.dtype == (w_dtype if narrow else residual_dtype or x_dtype)
    g.manual_seed(19)
    ours, _ = run(norm_triton.add_rms_norm_triton, DEVICE, (x_dtype, residual, w_dtype))
    g.manual_seed(19)
    want, _ = run(norm_torch.add_rms_norm, "cpu", (x_dtype, residual, w_dtype))
    tol = 1e-5 if x_dtype == torch.float32 and w_dtype == torch.float32 else 2e-2
    for name, a, b in zip(("y", "h", "dx", "dresidual", "dweight"), ours, want):
        if b is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, name
        assert _rel_err(a.float().cpu(), b.double()) < tol, name
    if tol == 1e-5:  # and the same function in float64
        g.manual_seed(19)
        exact, _ = run(norm_torch.add_rms_norm, "cpu", (torch.float64, torch.float64, torch.float64))
        for name, a, b in zip(("y", "h", "dx", "dresidual", "dweight"), ours, exact):
            if b is not None:
                assert _rel_err(a.double().cpu(), b) < 1e-5, name
    with pytest.raises(ValueError, match="weight has shape"):
        norm_triton.add_rms_norm_triton(x.float(), None, weight[:-1].float(), 1e-5)
    with pytest.raises(ValueError, match="residual has shape"):
        norm_triton.add_rms_norm_triton(x.float(), x.float()[:, :3], weight.float(), 1e-5)


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_blocks_on_the_add_norm_kernel_equal_their_pytorch_form(monkeypatch, family, dtype):
    """A whole model's loss, hidden states per layer and every gradient with the blocks' cast + norm on the Triton
    kernel (`kernels.add_rms_norm`; the interpreter on the CPU; the mixers' ops on PyTorch) and on its PyTorch form:
    in float32 equal to rounding; in bf16 no further from the same model in float64 than the PyTorch form is (the
    interpreter truncates to bf16 where a GPU rounds)."""
    import copy

    import ssm_hf
    from ssm_hf.kernels import norm_torch
    from ssm_hf.kernels.norm_triton import add_rms_norm_triton

    torch.manual_seed(0)
    config = ssm_hf.preset_config(f"{family}-tiny", num_hidden_layers=3)
    base = ssm_hf.AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, config.vocab_size, (2, 9))

    def run(op, run_dtype, device):
        monkeypatch.setattr(kernels, "add_rms_norm", op)
        model = copy.deepcopy(base).to(device, run_dtype)
        out = model(ids.to(device), labels=ids.to(device), output_hidden_states=True)
        out.loss.backward()
        grads = torch.cat([p.grad.double().flatten().cpu() for p in model.parameters()])
        return [out.loss.detach(), *[h.detach() for h in out.hidden_states]], grads

    ours, ours_grads = run(add_rms_norm_triton, dtype, DEVICE)
    want, want_grads = run(norm_torch.add_rms_norm, dtype, "cpu")
    assert len(ours) == len(want) == config.num_hidden_layers + 2
    for a, b in zip(ours, want):
        assert a.dtype == b.dtype
    if dtype == torch.float32:
        for a, b in zip(ours + [ours_grads], want + [want_grads]):
            assert _rel_err(a.double().cpu(), b.double().cpu()) < 1e-5
        return
    exact, exact_grads = run(norm_torch.add_rms_norm, torch.float64, "cpu")
    for a, b, e in zip(ours + [ours_grads], want + [want_grads], exact + [exact_grads]):
        assert _rel_err(a.double().cpu(), e) <= 1.5 * _rel_err(b.double().cpu(), e) + 2e-3


@pytest.mark.parametrize("layout", ["slice", "rows", "channels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_rms_norm_gated_reads_the_gate_in_place(monkeypatch, dtype, layout):
    """The gate as Mamba-2's norm gets it, z = the first d_inner columns of in_proj's output ("slice"), gives
    exactly what a contiguous copy gives (output and every gradient, bitwise), and both kernels get the view (rows
    flattened, one row stride). Tokens of a longer buffer ("rows": batch and row strides do not flatten into one)
    and strided channels ("channels") are copied."""
    from ssm_hf.kernels import norm_triton as module

    g = torch.Generator().manual_seed(16)
    batch, seqlen, hidden, group_size = 2, 7, 24, 8
    zbuf = _wide_buffer(layout, batch, seqlen, 2 * hidden + 3, dtype, g)
    x = torch.randn(batch, seqlen, hidden, generator=g).to(DEVICE, dtype)
    weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(DEVICE, dtype)
    dy = torch.randn(batch, seqlen, hidden, generator=g).to(DEVICE, dtype)

    def view(t):
        return _column_view(t, layout, hidden, 0, seqlen)

    def run(gate):
        leaves = [t.detach().clone().requires_grad_(True) for t in (x, weight)]
        y = module.rms_norm_gated_triton(leaves[0], gate, leaves[1], group_size, 1e-5)
        y.backward(dy)
        return [y] + [t.grad for t in leaves]

    launches = _record_launches(monkeypatch, module, ("_norm_fwd_kernel", "_norm_bwd_kernel"))
    got = run(view(zbuf))
    z = view(zbuf)
    assert sorted(name for name, _ in launches) == ["_norm_bwd_kernel", "_norm_fwd_kernel"]
    for name, args in launches:
        passed = args["z_ptr"]
        if layout == "slice":
            assert (passed.data_ptr(), args["stride_z"]) == (z.data_ptr(), z.stride(1)), name
        else:
            assert passed.is_contiguous() and passed.data_ptr() != z.data_ptr(), name
    assert zbuf.grad.dtype == dtype and _only_the_view_got_a_gradient(zbuf, view)
    z_copy = view(zbuf).detach().contiguous().requires_grad_(True)
    want = run(z_copy)
    for a, b in zip(got + [view(zbuf.grad)], want + [z_copy.grad]):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _saved_storages(module: torch.nn.Module, *inputs) -> dict[int, tuple]:
    """Run module(*inputs) under autograd, then its backward; the distinct storages saved for the backward, the
    parameters' aside (held anyway): address -> (bytes, shape, dtype of the first tensor saved in it)."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    saved = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            saved.setdefault(storage.data_ptr(), (storage.nbytes(), tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = module(*inputs)
    out.float().sum().backward()  # the saved views serve the backward
    return saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_mixer_training_forward_saves_in_proj_output_once(monkeypatch, family, dtype):
    """One mixer's training forward through the Triton kernels (the interpreter on the CPU) saves no more than the
    bound below: in_proj's output once, the ops that read parts of it (Mamba: the conv its x half, the scan its z
    half; Mamba-2: the conv xBC, the gated norm z) keeping views of it rather than copies. Two copies of
    batch x seqlen x d_inner elements (the conv's x and the scan's z, or Mamba-2's xBC and z) once sat beside it:
    a copy, or in_proj's output beside a copy, exceeds the bound. Under a padding mask x (xBC) is a new tensor, and
    z then a copy too: nothing keeps in_proj's output."""
    from conftest import tiny_config

    from ssm_hf.kernels import selective_scan_triton

    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    torch.manual_seed(0)
    config = tiny_config(family)
    model = transformers.AutoModelForCausalLM.from_config(config).to(DEVICE, dtype)
    mixer = model.backbone.layers[0].mixer
    projected = []  # in_proj's output, held here so that no other tensor takes its address once it is freed
    mixer.in_proj.register_forward_hook(lambda module, args, out: projected.append(out))
    batch, seqlen = 2, 20
    hidden = torch.randn(batch, seqlen, config.hidden_size, device=DEVICE, dtype=dtype, requires_grad=True)
    storages = _saved_storages(mixer, hidden)
    saved = sum(nbytes for nbytes, _, _ in storages.values())
    assert projected[0].untyped_storage().data_ptr() in storages

    e, f32, tokens = hidden.element_size(), 4, batch * seqlen
    d = mixer.intermediate_size
    if family == "mamba":
        rank, n = mixer.time_step_rank, mixer.ssm_state_size
        n_tiles = -(-seqlen // selective_scan_triton.TILE_CONFIG["block_t"])
        bound = (tokens * e * (config.hidden_size   # in_proj's input
                               + 2 * d              # in_proj's output [x | z], once
                               + d                  # the conv's output after SiLU (x_proj's input, the scan's x)
                               + rank + 2 * n       # x_proj's output (dt_proj reads a slice of it)
                               + d                  # dt_proj's output (the scan's Δ)
                               + 2 * triton.next_power_of_2(n)   # the scan's copies of B and C, padded
                               + d)                 # the scan's output (out_proj's input)
                 + 2 * d * n * f32                  # A = -exp(A_log) (exp's result), the scan's A transposed
                 + batch * n_tiles * n * d * f32    # the scan's states at its tile starts
                 + (d * f32 if e != f32 else 0))    # Δ's bias in float32 (a copy of a low-precision one)
    else:
        heads, gn = mixer.num_heads, mixer.n_groups * mixer.ssm_state_size
        bound = (tokens * e * (config.hidden_size   # in_proj's input
                               + 2 * d + 2 * gn + heads   # in_proj's output [z | xBC | Δ], once
                               + d + 2 * gn         # the conv's output: the scan keeps its x, B, C views
                               + d                  # the norm's input (the scan's output)
                               + d)                 # the norm's output (out_proj's input)
                 + 2 * heads * f32)                 # A_log's exp and A = -exp
        # Before the conv and the norm read in place, their copies of xBC and z took tokens x (d + 2 gn + d)
        # elements: `heads` per token fewer than in_proj's output, whose Δ columns now stay alive with it. Before
        # the scan made Δ itself (bias, softplus, limit), Δ in float32 was kept twice more (softplus's input and
        # the scan's Δ).
    assert saved <= bound, f"{saved} bytes saved, {bound} expected at most: {sorted(storages.values())}"

    mask = torch.ones(batch, seqlen, dtype=torch.long, device=DEVICE)
    mask[0, :3] = 0  # left padding
    projected.clear()
    storages = _saved_storages(mixer, hidden, None, mask)
    assert projected[0].untyped_storage().data_ptr() not in storages

def test_mamba2_mixer_passes_views_and_raw_dt_to_the_scan(monkeypatch):
    """Without a padding mask the mixer hands the scan x, B, C as views of the conv's output, raw Δ as a view of
    in_proj's output, and Δ's bias, softplus and limit (the scan makes Δ and reads all four in place); with one, Δ
    made and masked by the mixer. (The Triton conv's output is token-major; the PyTorch conv's is not.) The
    unmasked path is `conv_ssd_norm`, here its op-by-op form (the fused one reads the same views itself)."""
    from conftest import tiny_config

    calls = []
    scan = kernels.ssd_scan
    monkeypatch.setattr(kernels, "conv_ssd_norm", kernels.conv_ssd_norm_by_ops)

    def recorded(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, **kwargs):
        calls.append(dict(x=x, dt=dt, B=B, C=C, dt_bias=dt_bias, dt_softplus=dt_softplus, dt_limit=dt_limit))
        return scan(x, dt, A, B, C, chunk_size, D, dt_bias, dt_softplus, dt_limit, **kwargs)

    monkeypatch.setattr(kernels, "ssd_scan", recorded)
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)  # the Triton conv
    torch.manual_seed(0)
    config = tiny_config("mamba2", time_step_limit=(0.01, 0.5))
    mixer = transformers.AutoModelForCausalLM.from_config(config).backbone.layers[0].mixer.to(DEVICE)
    projected = []
    mixer.in_proj.register_forward_hook(lambda module, args, out: projected.append(out))
    hidden = torch.randn(2, 9, config.hidden_size, device=DEVICE, requires_grad=True)
    mixer(hidden).sum().backward()
    call = calls[0]
    conv_width = mixer.conv_dim
    for key in ("x", "B", "C"):
        assert call[key].stride(1) == conv_width and call[key].untyped_storage().data_ptr() \
            == call["x"].untyped_storage().data_ptr(), key
    assert call["dt"].untyped_storage().data_ptr() == projected[0].untyped_storage().data_ptr()
    assert call["dt"].stride(1) == projected[0].shape[-1]
    assert call["dt_bias"] is mixer.dt_bias and call["dt_softplus"] and tuple(call["dt_limit"]) == (0.01, 0.5)
    mask = torch.ones(2, 9, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0
    mixer(hidden, None, mask)
    assert calls[1]["dt_bias"] is None and not calls[1]["dt_softplus"] and calls[1]["dt_limit"] is None
    assert not calls[1]["dt"][0, :2].any()


def test_row_alignment_is_the_largest_power_of_two_up_to_16_dividing_every_stride():
    assert row_alignment(3352) == 8          # Mamba-2 130M's in_proj width: 8 x 419
    assert row_alignment(3072, 2048 * 3072) == 16
    assert row_alignment(41) == 1
    assert row_alignment(6, 4) == 2
    assert row_alignment(12, 0) == 4         # a batch of one may have any batch stride


def test_triton_rows_too_long_for_one_launch_grid_axis_are_refused(monkeypatch):
    """One program per 32 tokens on a grid axis that CUDA caps at 65535: a longer row must raise a clear error
    before launching (on a GPU the launch fails with 'invalid argument'; the interpreter has no such cap)."""
    from ssm_hf.kernels import causal_conv1d_triton as causal_conv1d_triton_module
    from ssm_hf.kernels.causal_conv1d_triton import causal_conv1d_triton
    from ssm_hf.kernels.launch import MAX_GRID_YZ
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    seqlen = MAX_GRID_YZ * 32 + 1
    x = torch.zeros(1, seqlen, 1, 1, device=DEVICE)
    with pytest.raises(NotImplementedError, match="split the row"):
        ssd_scan_triton(x, x[..., 0], -torch.ones(1, device=DEVICE), x, x)
    # the conv's forward puts (row, time block) pairs on the uncapped axis; its backward's programs per row (one per
    # BACKWARD_BLOCKS_PER_PROGRAM time blocks) go on a capped one: one token per block and per program here
    monkeypatch.setattr(causal_conv1d_triton_module, "BLOCK_T", 1)
    monkeypatch.setattr(causal_conv1d_triton_module, "BACKWARD_BLOCKS_PER_PROGRAM", 1)
    with pytest.raises(NotImplementedError, match="65536 tokens.*split the row"):
        causal_conv1d_triton(torch.zeros(1, MAX_GRID_YZ + 1, 1, device=DEVICE), torch.ones(1, 4, device=DEVICE))


def test_scan_time_chunks_respect_the_grid_and_the_tiles():
    from ssm_hf.kernels.selective_scan_triton import _time_chunks

    x = torch.zeros(1)
    for wanted, programs, n_tiles in ((10**9, 1, 10**6), (10**6, 3, 7), (5, 2, 1), (1, 0, 4), (64, 4, 100)):
        chunk_len, n_chunks = _time_chunks({"min_programs": wanted}, x, programs, n_tiles, 16)
        assert chunk_len % 16 == 0 and 1 <= n_chunks <= min(n_tiles, 65535)
        assert (n_chunks - 1) * chunk_len < n_tiles * 16 <= n_chunks * chunk_len  # every chunk holds a token


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sum_parts_equals_torchs_sums(dtype):
    """`sums_triton.sum_parts`: (rows, kept) partials summed over their rows, and (batch, heads, chunks) ones over
    batch and chunks, three in one launch, against float64 sums of the same float32 partials (rows past one tile
    of the kernel, kept columns past one program's)."""
    from ssm_hf.kernels.sums_triton import SUM_BLOCK_J, SUM_BLOCK_K, sum_parts

    rows, kept = 2 * SUM_BLOCK_K + 5, SUM_BLOCK_J + 7
    a, b = (torch.randn(rows, n, device=DEVICE) for n in (kept, 3))
    out_a, out_b = sum_parts([(a, kept, dtype), (b, 3, torch.float32)], 1, rows, kept_stride=1)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert out_a.dtype == dtype and out_a.shape == (kept,) and out_b.dtype == torch.float32
    assert _rel_err(out_a.double(), a.double().sum(0)) < tol
    assert _rel_err(out_b.double(), b.double().sum(0)) < 1e-6
    parts = [torch.randn(3, 5, 9, device=DEVICE) for _ in range(3)]
    sums = sum_parts([(p, 5, dtype) for p in parts], 3, 9, kept_stride=9)
    for p, s in zip(parts, sums):
        assert _rel_err(s.double(), p.double().sum((0, 2))) < tol
    assert torch.equal(sum_parts([(torch.empty(0, device=DEVICE), 4, dtype)], 1, 0, kept_stride=1)[0],
                       torch.zeros(4, device=DEVICE, dtype=dtype))
    with pytest.raises(ValueError, match="contiguous"):
        sum_parts([(a.t(), kept, dtype)], 1, rows, kept_stride=1)
    with pytest.raises(ValueError, match="kept_stride"):
        sum_parts([(parts[0], 5, dtype)], 3, 9, kept_stride=3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_middle_equals_torchs_sum(dtype):
    """`sums_triton.sum_middle`: two (outer, middle, *inner) partials summed over their middle axis in one launch
    (inner sizes past one program's block), against float64 sums."""
    from ssm_hf.kernels.sums_triton import sum_middle

    parts = [torch.randn(3, 7, 37, 40, device=DEVICE) for _ in range(2)]
    outs = sum_middle([(p, dtype) for p in parts])
    for p, out in zip(parts, outs):
        assert out.shape == (3, 37, 40) and out.dtype == dtype and out.is_contiguous()
        assert _rel_err(out.double(), p.double().sum(1)) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="contiguous"):
        sum_middle([(parts[0].transpose(2, 3), dtype)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sum_splits_into_writes_a_column_slice(dtype):
    """`sums_triton.sum_splits_into`: each group's splits summed into (groups, d_state) columns of a wider tensor
    (any batch and token strides), the columns beside them untouched."""
    from ssm_hf.kernels.sums_triton import sum_splits_into

    batch, seqlen, groups, splits, d_state = 2, 37, 3, 2, 5
    wide = [torch.randn(batch, seqlen, 40, device=DEVICE).to(dtype) for _ in range(2)]
    before = [w.clone() for w in wide]
    outs = [w[:, :, 4:4 + groups * d_state].unflatten(2, (groups, d_state)) for w in wide]
    parts = [torch.randn(batch, seqlen, groups * splits, d_state, device=DEVICE) for _ in range(2)]
    sum_splits_into(list(zip(parts, outs)))
    for p, out, w, b in zip(parts, outs, wide, before):
        expected = p.double().unflatten(2, (groups, splits)).sum(3)
        assert _rel_err(out.double(), expected) < (1e-6 if dtype == torch.float32 else 1e-2)
        assert torch.equal(w[:, :, :4], b[:, :, :4]) and torch.equal(w[:, :, 4 + groups * d_state:],
                                                                       b[:, :, 4 + groups * d_state:])
    with pytest.raises(ValueError, match="packed within a token"):
        sum_splits_into([(parts[0], outs[0].transpose(2, 3))])
    with pytest.raises(ValueError, match="packed within a token"):  # two partials of different splits
        sum_splits_into([(parts[0], outs[0]), (parts[1][:, :, :groups], outs[1])])
    # one group: the groups dimension (size 1) may have any stride, as `ssd_backward` accepts it
    one = torch.randn(batch, seqlen, splits, d_state, device=DEVICE)
    out = torch.empty(batch, seqlen, d_state, 1, device=DEVICE, dtype=dtype).transpose(2, 3)
    sum_splits_into([(one, out)])
    assert _rel_err(out.double(), one.double().sum(2, keepdim=True)) < (1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA's grid limits: the interpreter has none")
def test_gpu_scan_backward_on_a_row_past_a_grid_axis_limit():
    """Mamba's backward on one row of 4,194,320 tokens (d_state 16): its dB and dC partials have more column blocks
    than CUDA's 65,535 on a grid's second axis, where `sums_triton.sum_middle` once put them ("invalid argument")."""
    from ssm_hf.kernels.sums_triton import sum_middle

    parts = torch.randn(2, 3, 65535 * 1024 + 16, device=DEVICE)
    assert torch.equal(sum_middle([(parts, torch.float32)])[0], parts[:, 0] + parts[:, 1] + parts[:, 2])
    seqlen = 4194320
    x, delta, B, C = (torch.randn(1, seqlen, 16, device=DEVICE, requires_grad=True) for _ in range(4))
    A = (-torch.rand(16, 16, device=DEVICE) - 0.5).requires_grad_()
    selective_scan_triton(x, delta, A, B, C, delta_softplus=True).sum().backward()
    assert B.grad.shape == B.shape and torch.isfinite(B.grad).all() and torch.isfinite(C.grad).all()
