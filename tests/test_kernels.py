"""The scan and conv ops against the float64 token-by-token recurrence."""

import pytest
import torch

from ssm_hf import kernels


def _inputs(batch, seqlen, d_inner, d_state, dtype=torch.float64, dt_scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        x=r(batch, seqlen, d_inner), delta=r(batch, seqlen, d_inner) * dt_scale,
        A=-torch.rand(d_inner, d_state, generator=g, dtype=torch.float64) * 16 - 0.1,
        B=r(batch, seqlen, d_state), C=r(batch, seqlen, d_state), D=r(d_inner), z=r(batch, seqlen, d_inner),
        delta_bias=r(d_inner), initial_state=r(batch, d_inner, d_state),
    )


def _cast(inputs, dtype):
    return {k: v.to(dtype) for k, v in inputs.items()}


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("seqlen,chunk", [(1, 32), (7, 4), (37, 8), (64, 32), (130, 32), (300, 64)])
def test_chunked_scan_matches_float64_recurrence(seqlen, chunk):
    inputs = _inputs(2, seqlen, 6, 5)
    y_ref, h_ref = kernels.selective_scan_sequential(**inputs, delta_softplus=True, return_final_state=True)
    y, h = kernels.selective_scan_chunked(**_cast(inputs, torch.float32), delta_softplus=True,
                                          return_final_state=True, chunk_size=chunk)
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(h, h_ref) < 1e-5


def test_chunked_scan_exact_in_float64_without_optional_terms():
    inputs = _inputs(1, 50, 4, 3)
    for key in ("D", "z", "delta_bias", "initial_state"):
        inputs.pop(key)
    inputs["delta"] = inputs["delta"].abs()
    y_ref = kernels.selective_scan_sequential(**inputs)
    y = kernels.selective_scan_chunked(**inputs, chunk_size=16)
    assert y.dtype == torch.float64
    assert _rel_err(y, y_ref) < 1e-12


def test_chunked_scan_large_steps_stay_finite_and_exact():
    # Δ up to ~60 makes exp(-A Σ Δ) overflow float32 if a chunk were not split: the split path must be taken.
    inputs = _inputs(2, 96, 4, 4, dt_scale=30.0, seed=3)
    y_ref, h_ref = kernels.selective_scan_sequential(**inputs, delta_softplus=True, return_final_state=True)
    y, h = kernels.selective_scan_chunked(**_cast(inputs, torch.float32), delta_softplus=True,
                                          return_final_state=True, chunk_size=32)
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5


def test_state_update_steps_equal_the_scan():
    inputs = _inputs(3, 9, 5, 4)
    y_ref, h_ref = kernels.selective_scan_sequential(**inputs, delta_softplus=True, return_final_state=True)
    state = inputs["initial_state"].float()
    f = _cast(inputs, torch.float32)
    for t in range(9):
        y_t, state = kernels.selective_state_update(
            state, f["x"][:, t], f["delta"][:, t], f["A"], f["B"][:, t], f["C"][:, t], f["D"], f["z"][:, t],
            delta_bias=f["delta_bias"], delta_softplus=True)
        assert _rel_err(y_t, y_ref[:, t]) < 1e-5
    assert _rel_err(state, h_ref) < 1e-5


def test_scan_split_in_two_calls_equals_one_call():
    inputs = _cast(_inputs(2, 40, 6, 4), torch.float32)
    y_full, h_full = kernels.selective_scan_chunked(**inputs, delta_softplus=True, return_final_state=True)
    first = {k: (v[:, :17] if v.dim() == 3 and v.shape[1] == 40 else v) for k, v in inputs.items()}
    second = {k: (v[:, 17:] if v.dim() == 3 and v.shape[1] == 40 else v) for k, v in inputs.items()}
    y1, h1 = kernels.selective_scan_chunked(**first, delta_softplus=True, return_final_state=True)
    second["initial_state"] = h1
    y2, h2 = kernels.selective_scan_chunked(**second, delta_softplus=True, return_final_state=True)
    assert _rel_err(torch.cat([y1, y2], 1), y_full) < 1e-5 and _rel_err(h2, h_full) < 1e-5


@pytest.mark.parametrize("recompute", [True, False])
def test_chunked_scan_gradients_match_recurrence(recompute):
    inputs = _inputs(1, 21, 3, 2)
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    weight = torch.randn(1, 21, 3, dtype=torch.float64)
    y = kernels.selective_scan_chunked(**leaves, delta_softplus=True, chunk_size=8, recompute_in_backward=recompute)
    (y * weight).sum().backward()
    (kernels.selective_scan_sequential(**leaves_ref, delta_softplus=True) * weight).sum().backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad, leaves_ref[key].grad) < 1e-10, key


def test_chunked_scan_bfloat16_inputs():
    inputs = _inputs(2, 64, 8, 4)
    y_ref = kernels.selective_scan_sequential(**inputs, delta_softplus=True)
    y = kernels.selective_scan_chunked(**_cast(inputs, torch.bfloat16), delta_softplus=True)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, y_ref) < 3e-2


def test_causal_conv1d_with_past_equals_full_sequence():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 6, generator=g)
    weight, bias = torch.randn(6, 4, generator=g), torch.randn(6, generator=g)
    full = kernels.causal_conv1d(x, weight, bias)
    # explicit definition: out[t] = bias + Σ_k w[k] x[t - (width-1) + k], zeros before the start
    padded = torch.nn.functional.pad(x, (0, 0, 3, 0))
    expected = bias + sum(weight[:, k] * padded[:, k:k + 13] for k in range(4))
    torch.testing.assert_close(full, expected, rtol=1e-5, atol=1e-5)
    past = x[:, 5:9].transpose(1, 2)  # the 4 inputs before position 9
    tail = kernels.causal_conv1d(x[:, 9:], weight, bias, past=past)
    torch.testing.assert_close(tail, full[:, 9:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dt_scale,dt_shift", [(0.1, -4.0), (1.0, -2.0), (4.0, 0.0)])
def test_chunked_scan_float32_gradients(dt_scale, dt_shift):
    # small Δ's: every chunk in the relative form; medium: some channels per chunk fall back to recursive doubling;
    # large: all of them do.
    inputs = _inputs(2, 80, 6, 4, dt_scale=dt_scale, seed=7)
    inputs["delta"] = inputs["delta"] + dt_shift
    weight = torch.randn(2, 80, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    leaves = {k: v.float().requires_grad_(True) for k, v in inputs.items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    (kernels.selective_scan_chunked(**leaves, delta_softplus=True) * weight.float()).sum().backward()
    (kernels.selective_scan_sequential(**leaves_ref, delta_softplus=True) * weight).sum().backward()
    for key in inputs:
        assert torch.isfinite(leaves[key].grad).all(), key
        assert _rel_err(leaves[key].grad, leaves_ref[key].grad) < 1e-4, key


@pytest.mark.parametrize("first_step", [1e2, 1e4, 1e7])
def test_large_step_at_a_chunk_start_keeps_later_steps_exact(first_step):
    # A large Δ on a chunk's first token only decays the carried-in state; the small steps after it must not be
    # rounded away (they would be if the chunk's times were differences of prefix sums including that Δ).
    inputs = _inputs(1, 96, 4, 4, seed=9)
    delta = torch.full_like(inputs["delta"], 0.01)
    delta[:, ::32] = first_step
    inputs.update(delta=delta)
    for key in ("delta_bias", "z"):
        inputs.pop(key)
    y_ref, h_ref = kernels.selective_scan_sequential(**inputs, return_final_state=True)
    y, h = kernels.selective_scan_chunked(**_cast(inputs, torch.float32), return_final_state=True, chunk_size=32)
    assert _rel_err(y, y_ref) < 1e-5 and _rel_err(h, h_ref) < 1e-5
