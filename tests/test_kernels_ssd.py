"""Mamba-2's SSD scan against the float64 token-by-token recurrence."""

import pytest
import torch

from ssm_hf import kernels


def _inputs(batch, seqlen, heads, head_dim, groups, d_state, seed=0, dt_shift=0.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(
        x=r(batch, seqlen, heads, head_dim), dt=r(batch, seqlen, heads) + dt_shift,
        A=-torch.rand(heads, generator=g, dtype=torch.float64) * 8 - 0.05,
        B=r(batch, seqlen, groups, d_state), C=r(batch, seqlen, groups, d_state), D=r(heads), dt_bias=r(heads),
        initial_state=r(batch, heads, head_dim, d_state),
    )


def _cast(inputs, dtype):
    return {k: v.to(dtype) for k, v in inputs.items()}


def _rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.parametrize("seqlen,chunk,groups", [(1, 8, 1), (7, 8, 2), (16, 8, 4), (37, 8, 2), (100, 32, 1),
                                                  (130, 64, 2)])
def test_ssd_chunked_matches_float64_recurrence(seqlen, chunk, groups):
    inputs = _inputs(2, seqlen, 4, 3, groups, 5)
    y_ref, h_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True, return_final_state=True)
    y, h = kernels.ssd_scan_chunked(**_cast(inputs, torch.float32), chunk_size=chunk, dt_softplus=True,
                                    return_final_state=True)
    assert y.dtype == torch.float32 and h.dtype == torch.float32 and h.shape == (2, 4, 3, 5)
    assert _rel_err(y, y_ref) < 1e-5
    assert _rel_err(h, h_ref) < 1e-5


def test_ssd_float64_exact_and_dt_limit():
    inputs = _inputs(1, 45, 6, 4, 3, 8, seed=2, dt_shift=1.0)
    kwargs = dict(dt_softplus=True, dt_limit=(0.05, 0.6), return_final_state=True)
    y_ref, h_ref = kernels.ssd_scan_sequential(**inputs, **kwargs)
    y, h = kernels.ssd_scan_chunked(**inputs, chunk_size=16, **kwargs)
    assert _rel_err(y, y_ref) < 1e-12 and _rel_err(h, h_ref) < 1e-12
    unclamped = kernels.ssd_scan_sequential(**inputs, dt_softplus=True)
    assert _rel_err(unclamped, y_ref) > 1e-3  # the limit is applied


def test_ssd_large_steps_stay_finite():
    inputs = _inputs(2, 64, 4, 2, 1, 4, seed=3, dt_shift=20.0)  # Δ ≈ 20: decays of e^-160 within a chunk
    y_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True)
    y = kernels.ssd_scan_chunked(**_cast(inputs, torch.float32), chunk_size=32, dt_softplus=True)
    assert torch.isfinite(y).all()
    assert _rel_err(y, y_ref) < 1e-5


def test_ssd_state_update_steps_equal_the_scan():
    inputs = _inputs(3, 6, 4, 2, 2, 3)
    y_ref, h_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True, return_final_state=True)
    f = _cast(inputs, torch.float32)
    state = f["initial_state"]
    for t in range(6):
        y_t, state = kernels.ssd_state_update(state, f["x"][:, t], f["dt"][:, t], f["A"], f["B"][:, t],
                                              f["C"][:, t], f["D"], f["dt_bias"], True)
        assert _rel_err(y_t, y_ref[:, t]) < 1e-5
    assert _rel_err(state, h_ref) < 1e-5


@pytest.mark.parametrize("recompute", [True, False])
def test_ssd_gradients_match_recurrence(recompute):
    inputs = _inputs(1, 19, 4, 2, 2, 3, seed=4)
    weight = torch.randn(1, 19, 4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    leaves = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    leaves_ref = {k: v.clone().requires_grad_(True) for k, v in inputs.items()}
    y, h = kernels.ssd_scan_chunked(**leaves, chunk_size=8, dt_softplus=True, return_final_state=True,
                                    recompute_in_backward=recompute)
    ((y * weight).sum() + h.sum()).backward()
    y_ref, h_ref = kernels.ssd_scan_sequential(**leaves_ref, dt_softplus=True, return_final_state=True)
    ((y_ref * weight).sum() + h_ref.sum()).backward()
    for key in inputs:
        assert _rel_err(leaves[key].grad, leaves_ref[key].grad) < 1e-10, key


def test_ssd_bfloat16_inputs():
    inputs = _inputs(2, 40, 4, 4, 2, 8)
    y_ref = kernels.ssd_scan_sequential(**inputs, dt_softplus=True)
    y = kernels.ssd_scan_chunked(**_cast(inputs, torch.bfloat16), chunk_size=16, dt_softplus=True)
    assert y.dtype == torch.bfloat16
    assert _rel_err(y, y_ref) < 3e-2


def test_ssd_empty_sequence():
    inputs = _cast(_inputs(2, 0, 4, 3, 2, 5), torch.float32)
    y, h = kernels.ssd_scan_chunked(**inputs, chunk_size=8, dt_softplus=True, return_final_state=True)
    assert y.shape == (2, 0, 4, 3)
    torch.testing.assert_close(h, inputs["initial_state"])


def test_ssd_small_steps_after_a_large_one_stay_exact():
    inputs = _inputs(1, 64, 2, 2, 1, 4, seed=6)
    inputs["A"] = torch.tensor([-128.0, -8.0], dtype=torch.float64)
    dt = torch.full_like(inputs["dt"], 1e-3)
    dt[:, 0] = 100.0
    inputs["dt"] = dt
    inputs.pop("dt_bias")
    y_ref = kernels.ssd_scan_sequential(**inputs)
    y = kernels.ssd_scan_chunked(**_cast(inputs, torch.float32), chunk_size=64)
    for head in range(2):
        assert _rel_err(y[:, 1:, head], y_ref[:, 1:, head]) < 1e-5, head
