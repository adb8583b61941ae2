"""S4 / S4D: HiPPO-LegS and its DPLR form, kernels against explicit float64 powers, the convolution view against the
recurrent view, gradients, chunked continuation, heads, training, config errors.

Generation with and without the cache, left-padded batches, save/load through the Auto classes, the
text-generation pipeline and padding anywhere run for the `s4` and `s4d` families in the generic tests
(tests/conftest.py FAMILIES)."""

import copy
import math

import pytest
import torch
from conftest import assert_close_to_scale, spread_weights, tiny_config
from huggingface_hub.errors import StrictDataclassError
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, DynamicCache

import ssm_hf
from ssm_hf.kernels import s4_torch as ops
from ssm_hf.layers.s4_mixer import S4Kernel

KERNEL_CASES = [("diag", "s4d_lin", "zoh"), ("diag", "s4d_lin", "bilinear"), ("diag", "s4d_inv", "zoh"),
                ("diag", "s4d_inv", "bilinear"), ("diag", "legs", "zoh"), ("dplr", "legs", "bilinear")]


def _kernel_module(kernel="dplr", init="legs", discretization="bilinear", seed=0, **overrides) -> S4Kernel:
    fields = dict(hidden_size=4, state_size=16, kernel=kernel, init=init, discretization=discretization, l_max=64,
                  time_step_min=0.01, time_step_max=0.2)
    fields.update(overrides)
    torch.manual_seed(seed)
    module = S4Kernel(ssm_hf.S4Config(**fields))
    module.reset_ssm_parameters()
    with torch.no_grad():  # move away from the init's symmetries: every SSM different, P not the LegS one
        for name, param in module.named_parameters():
            param.add_(0.05 * torch.randn_like(param) * (name != "log_A_real"))
    return module


def _explicit_system(module: S4Kernel):
    """Float64 (Ā, B̄, C) of the full conjugate-symmetric system, built densely from the parameters without the
    library's kernel code: ZOH by the matrix exponential, bilinear by a solve, C from C̃ for DPLR. Differentiable."""
    d = {name: p.double() for name, p in module.named_parameters()}
    cplx = lambda t: torch.complex(t[..., 0], t[..., 1])  # noqa: E731
    full = lambda x: torch.cat([x, x.conj()], -1)  # noqa: E731
    dt = torch.exp(d["log_dt"])
    A = torch.diag_embed(full(torch.complex(-torch.exp(d["log_A_real"]), d["A_imag"])))
    if "P" in d:
        P = full(cplx(d["P"]))                                    # (R, S, N)
        A = A - torch.einsum("rsn,rsm->snm", P, P.conj())
    B, C = full(cplx(d["B"])), full(cplx(d["C"]))
    eye = torch.eye(A.shape[-1], dtype=A.dtype)
    dtA = dt[:, None, None] * A
    if module.discretization == "zoh":
        Abar = torch.linalg.matrix_exp(dtA)
        Bbar = torch.linalg.solve(A, ((Abar - eye) @ B.unsqueeze(-1))).squeeze(-1)
    else:
        Abar = torch.linalg.solve(eye - dtA / 2, eye + dtA / 2)
        Bbar = dt[:, None] * torch.linalg.solve(eye - dtA / 2, B.unsqueeze(-1)).squeeze(-1)
    if module.kernel_type == "dplr":  # C is C̃ = C (I - Ā^l_max)
        C = torch.linalg.solve((eye - torch.linalg.matrix_power(Abar, module.l_max)).mT, C.unsqueeze(-1)).squeeze(-1)
    return Abar, Bbar, C


def _explicit_kernel(module: S4Kernel, length: int) -> torch.Tensor:
    Abar, Bbar, C = _explicit_system(module)
    taps, x = [], Bbar
    for _ in range(length):
        taps.append((C * x).sum(-1))
        x = torch.einsum("snm,sm->sn", Abar, x)
    taps = torch.stack(taps, -1)
    assert taps.imag.abs().max() < 1e-9 * taps.real.detach().abs().max()  # conjugate symmetry: a real kernel
    return taps.real


def test_hippo_legs_closed_form():
    N = 12
    A, B = ops.hippo_legs(N)
    for n in range(N):
        assert B[n].item() == pytest.approx(math.sqrt(2 * n + 1), rel=1e-15)
        for k in range(N):
            expected = -math.sqrt((2 * n + 1) * (2 * k + 1)) if n > k else (-(n + 1) if n == k else 0.0)
            assert A[n, k].item() == pytest.approx(expected, rel=1e-15, abs=0), (n, k)


@pytest.mark.parametrize("state_size", [2, 16, 64])
def test_dplr_decomposition_reproduces_legs_in_float32(state_size):
    A, B = ops.hippo_legs(state_size)
    nplr = ops.hippo_legs_nplr(state_size)
    assert torch.allclose(nplr.Lambda.real, torch.full_like(nplr.Lambda.real, -0.5))
    assert (nplr.Lambda.imag > 0).all()
    # Rebuild A = V (Λ - P̃ P̃*) V* with the float32 values a model stores, over the full basis [V, conj(V)].
    Lambda, P, Bt, V = (t.to(torch.complex64) for t in nplr)
    full_V = torch.cat([V, V.conj()], 1)
    full = lambda x: torch.cat([x, x.conj()])  # noqa: E731
    rebuilt = full_V @ (torch.diag(full(Lambda)) - torch.outer(full(P), full(P).conj())) @ full_V.conj().T
    assert_close_to_scale(rebuilt.real, A.float(), tol=2e-6)
    assert rebuilt.imag.abs().max() < 2e-6 * A.abs().max()
    assert_close_to_scale((full_V @ full(Bt)).real, B.float(), tol=2e-6)
    assert_close_to_scale((full_V @ full(P)).real, torch.sqrt(torch.arange(state_size) + 0.5), tol=2e-6)


def test_s4d_initialisations():
    lin, B, P = ops.ssm_init("s4d_lin", 8)
    assert torch.allclose(lin, torch.tensor([-0.5 + 1j * math.pi * n for n in range(4)], dtype=lin.dtype))
    assert torch.equal(B, torch.ones_like(B)) and torch.equal(P, torch.zeros_like(P))
    inv, _, _ = ops.ssm_init("s4d_inv", 8)
    assert torch.allclose(inv.imag, torch.tensor([8 / math.pi * (8 / (2 * n + 1) - 1) for n in range(4)],
                                                 dtype=torch.float64))


@pytest.mark.parametrize("kernel,init,discretization", KERNEL_CASES)
@pytest.mark.parametrize("length", [50, 200])
def test_kernel_equals_explicit_powers(kernel, init, discretization, length):
    # DPLR: l_max is 64, so length 200 also checks the extension of C̃ to 256
    module = _kernel_module(kernel, init, discretization)
    with torch.no_grad():
        got = module.convolution_kernel(length)
    assert got.dtype == torch.float32
    assert_close_to_scale(got, _explicit_kernel(module, length))


def test_dplr_rank_two_kernel_and_step():
    module = _kernel_module("dplr", "s4d_inv", "bilinear", rank=2, seed=3)
    with torch.no_grad():
        assert_close_to_scale(module.convolution_kernel(80), _explicit_kernel(module, 80))
        u = torch.randn(2, 4, 30)
        assert_close_to_scale(_run_steps(module, u), ops.fft_conv(u, module.convolution_kernel(30)), tol=1e-5)


def _run_steps(module: S4Kernel, u: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
    h = torch.zeros(u.shape[0], module.num_ssms, module.modes, dtype=torch.complex64) if h is None else h
    outputs = []
    for t in range(u.shape[-1]):
        y, h = module.step(u[..., t], h)
        outputs.append(y)
    return torch.stack(outputs, -1)


@pytest.mark.parametrize("kernel,init,discretization", [("diag", "s4d_lin", "zoh"), ("diag", "s4d_inv", "bilinear"),
                                                        ("dplr", "legs", "bilinear")])
def test_convolution_view_equals_recurrent_view(kernel, init, discretization):
    module = _kernel_module(kernel, init, discretization, hidden_size=2, time_step_min=0.001, time_step_max=0.1)
    u = torch.randn(1, 2, 4096, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        stepped = _run_steps(module, u)
        for length in (1, 7, 1024, 4096):
            conv = ops.fft_conv(u[..., :length], module.convolution_kernel(length))
            assert_close_to_scale(conv, stepped[..., :length])


@pytest.mark.parametrize("kernel,init,discretization", [("diag", "s4d_lin", "zoh"), ("dplr", "legs", "bilinear")])
def test_chunk_state_and_continuation_equal_the_recurrence(kernel, init, discretization):
    module = _kernel_module(kernel, init, discretization)
    g = torch.Generator().manual_seed(2)
    u = torch.randn(2, 4, 150, generator=g)
    h0 = torch.randn(2, 4, 8, dtype=torch.complex64, generator=g)
    with torch.no_grad():
        stepped = _run_steps(module, u, h0)
        conv = ops.fft_conv(u, module.convolution_kernel(150)) + module.state_output(h0, 150)  # 150 > l_max
        assert_close_to_scale(conv, stepped)
        state = module.final_state(u, h0, None)
        assert_close_to_scale(_run_steps(module, torch.ones(2, 4, 3), state), _run_steps(module, torch.cat(
            [u, torch.ones(2, 4, 3)], -1), h0)[..., -3:])


@pytest.mark.parametrize("kernel,init,discretization", [("diag", "s4d_inv", "zoh"), ("dplr", "legs", "bilinear")])
def test_fft_path_gradients_match_float64_reference(kernel, init, discretization, monkeypatch):
    monkeypatch.setattr(ops, "_BLOCK_ELEMENTS", 64)  # several blocks, each recomputed in the backward pass
    module = _kernel_module(kernel, init, discretization, l_max=16)
    u = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(3))
    weights = torch.randn(2, 4, 40, generator=torch.Generator().manual_seed(4))
    (ops.fft_conv(u, module.convolution_kernel(40)) * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in module.named_parameters()}
    module.zero_grad()
    K = _explicit_kernel(module, 40)                       # float64, through dense matrices
    y = torch.stack([(K[:, :t + 1].flip(-1) * u[..., :t + 1].double()).sum(-1) for t in range(40)], -1)
    (y * weights.double()).sum().backward()
    for name, p in module.named_parameters():
        assert_close_to_scale(ours[name], p.grad, tol=3e-5)  # gradients sum many float32 terms


def test_long_inputs_beyond_l_max_are_not_truncated():
    module = _kernel_module("dplr", l_max=16)
    with torch.no_grad():
        long = module.convolution_kernel(100)
    assert long.shape == (4, 100) and long[:, 64:].abs().max() > 0
    assert_close_to_scale(long, _explicit_kernel(module, 100))


def _s4(family="s4", **overrides):
    torch.manual_seed(0)
    config = tiny_config(family, **overrides)
    return spread_weights(ssm_hf.S4ForCausalLM(config), seed=2).eval()


@pytest.mark.parametrize("family", ["s4", "s4d"])
def test_model_chunks_across_l_max_equal_one_forward(family):
    model = _s4(family, num_ssm_copies=2)                   # s4-tiny: l_max 64
    ids = torch.randint(1, 512, (2, 200), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids).logits
        cache, pieces, start = DynamicCache(config=model.config), [], 0
        for size in (70, 1, 1, 100, 28):
            pieces.append(model(ids[:, start:start + size], past_key_values=cache).logits)
            start += size
    assert_close_to_scale(torch.cat(pieces, 1), full)
    state = cache.layers[0].recurrent_states[0]
    assert state.shape == (2, 2 * 32, 8, 2) and state.dtype == torch.float32


def test_parameter_names_and_shapes():
    model = ssm_hf.S4ForCausalLM(tiny_config("s4", num_ssm_copies=2, rank=2))
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters() if ".layers.0." in name}
    assert shapes == {
        "backbone.layers.0.norm.weight": (32,), "backbone.layers.0.norm.bias": (32,),
        "backbone.layers.0.mixer.kernel.log_dt": (64,), "backbone.layers.0.mixer.kernel.log_A_real": (64, 8),
        "backbone.layers.0.mixer.kernel.A_imag": (64, 8), "backbone.layers.0.mixer.kernel.B": (64, 8, 2),
        "backbone.layers.0.mixer.kernel.C": (64, 8, 2), "backbone.layers.0.mixer.kernel.P": (2, 64, 8, 2),
        "backbone.layers.0.mixer.D": (64,), "backbone.layers.0.mixer.output_linear.weight": (64, 64),
        "backbone.layers.0.mixer.output_linear.bias": (64,),
    }
    assert "backbone.layers.0.mixer.kernel.P" not in dict(ssm_hf.S4ForCausalLM(tiny_config("s4d")).named_parameters())


def test_half_precision_keeps_ssm_parameters_in_float32(tmp_path):
    model = _s4()
    model.save_pretrained(tmp_path)
    for half in (model.to(torch.bfloat16), AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)):
        dtypes = {name: p.dtype for name, p in half.named_parameters()}
        assert all(dtype == torch.float32 for name, dtype in dtypes.items() if ".kernel." in name)
        assert dtypes["backbone.layers.0.mixer.D"] == torch.bfloat16
        ids = torch.randint(1, 512, (1, 20))
        assert half(ids).logits.isfinite().all()


def test_decoding_uses_the_memoized_step_until_the_parameters_change():
    model = _s4()
    mixer = model.backbone.layers[0].mixer
    ids = torch.randint(1, 512, (1, 6))
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache_params
        model(ids[:, :1], cache_params=cache)
        first = mixer.kernel._memo["step"][-1]
        model(ids[:, :1], cache_params=cache)
        assert mixer.kernel._memo["step"][-1] is first
        mixer.kernel.log_dt.add_(0.1)
        model(ids[:, :1], cache_params=cache)
        assert mixer.kernel._memo["step"][-1] is not first


def _copy_under_no_grad(model, name, new):
    with torch.no_grad():
        model.get_parameter(name).copy_(new)


def _copy_in_inference_mode(model, name, new):
    with torch.inference_mode():
        model.get_parameter(name).copy_(new)


def _optimizer_step(model, name, new):
    param = model.get_parameter(name)
    param.grad = param.detach() - new                  # one SGD step of rate 1 lands exactly on `new`
    torch.optim.SGD([param], lr=1.0).step()
    param.grad = None


def _replaced_at_a_reused_address(model, name, new):
    # `param.data = t` keeps the parameter's own version counter; the allocator may hand t the freed storage's
    # address (torch.Tensor.data_ptr reads 0 for every tensor in this test, so every address is "reused")
    model.get_parameter(name).data = new.clone()


PARAMETER_EDITS = {
    "copy_ under no_grad": _copy_under_no_grad,
    "copy_ in inference_mode": _copy_in_inference_mode,
    "optimizer step": _optimizer_step,
    "load_state_dict": lambda model, name, new: model.load_state_dict({name: new}, strict=False),
    "load_state_dict(assign=True)": lambda model, name, new: model.load_state_dict({name: new.clone()}, strict=False,
                                                                                   assign=True),
    "replaced at a reused address": _replaced_at_a_reused_address,
}


@pytest.mark.parametrize("edit", list(PARAMETER_EDITS))
@pytest.mark.parametrize("family", ["s4", "s4d"])
def test_parameter_edits_between_decoding_steps_change_the_output_as_in_a_fresh_model(family, edit, monkeypatch):
    """The decoding step reuses values derived from the SSM parameters (`S4Kernel._memoized`); an edit of any
    parameter between two steps must give what a freshly built model with the edited weights gives."""
    if edit == "replaced at a reused address":
        monkeypatch.setattr(torch.Tensor, "data_ptr", lambda self: 0)
    model = _s4(family)
    generator = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 512, (2, 9), generator=generator)
    names = [name for name, _ in model.named_parameters() if ".layers.1.mixer.kernel." in name]
    assert len(names) == (6 if family == "s4" else 5)
    for name in names:
        with torch.no_grad():
            cache = model(ids[:, :6], use_cache=True).cache_params
            model(ids[:, 6:7], cache_params=cache)            # a decoding step: derives and keeps the step values
            before = copy.deepcopy(cache)
            unchanged = model(ids[:, 7:8], cache_params=copy.deepcopy(cache)).logits
        old = model.get_parameter(name).detach().clone()
        new = old + 0.05 * torch.randn(old.shape, generator=generator)
        PARAMETER_EDITS[edit](model, name, new)
        assert torch.equal(model.get_parameter(name), new)
        with torch.no_grad():
            got = model(ids[:, 7:8], cache_params=cache).logits
            fresh = ssm_hf.S4ForCausalLM(model.config).eval()
            fresh.load_state_dict(model.state_dict())
            expected = fresh(ids[:, 7:8], cache_params=before).logits
        assert not torch.equal(expected, unchanged), name
        assert torch.equal(got, expected), f"{name}: the step used values derived from the old weights"
        PARAMETER_EDITS[edit](model, name, old)               # back to the weights the next parameter starts from


def test_decoding_a_model_made_in_inference_mode():
    """Parameters made under inference_mode are inference tensors, which have no version counter: the step
    values are then derived at every step (an in-place edit is still seen)."""
    with torch.inference_mode():
        model = _s4("s4d")
        ids = torch.randint(1, 512, (1, 8), generator=torch.Generator().manual_seed(12))
        cache = model(ids[:, :6], use_cache=True).cache_params
        step = model(ids[:, 6:7], cache_params=cache).logits
        assert model.backbone.layers[0].mixer.kernel.log_dt.is_inference()
        assert_close_to_scale(step[:, 0], model(ids[:, :7]).logits[:, -1])
        before = copy.deepcopy(cache)
        model.backbone.layers[0].mixer.kernel.log_dt.add_(0.2)
        after = model(ids[:, 7:8], cache_params=cache).logits
        fresh = ssm_hf.S4ForCausalLM(model.config).eval()   # never stepped: derives its step values afresh
        fresh.load_state_dict(model.state_dict())
        assert torch.equal(after, fresh(ids[:, 7:8], cache_params=before).logits)


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_sequence_classification_pooling(pooling):
    config = tiny_config("s4d", num_labels=3, classifier_pooling=pooling)
    torch.manual_seed(0)
    model = spread_weights(AutoModelForSequenceClassification.from_config(config)).eval()
    assert type(model) is ssm_hf.S4ForSequenceClassification
    a, b = torch.randint(1, 512, (1, 5)), torch.randint(1, 512, (1, 9))
    with torch.no_grad():
        hidden = [model.backbone(x).last_hidden_state[0] for x in (a, b)]
        pooled = torch.stack([h.mean(0) if pooling == "mean" else h[-1] for h in hidden])
        expected = model.score(pooled)
        for padded in (torch.cat([torch.zeros(1, 4, dtype=torch.long), a], 1),
                       torch.cat([a, torch.zeros(1, 4, dtype=torch.long)], 1)):
            batch = torch.cat([padded, b])
            assert_close_to_scale(model(batch, attention_mask=(batch != 0).long()).logits, expected)
    out = model(batch, attention_mask=(batch != 0).long(), labels=torch.tensor([2, 0]))
    out.loss.backward()
    assert model.backbone.layers[0].mixer.kernel.log_dt.grad.isfinite().all()


def test_classifier_pooling_is_checked_for_every_family():
    with pytest.raises(ValueError, match="classifier_pooling"):
        AutoModelForSequenceClassification.from_config(tiny_config("mamba", classifier_pooling="max"))


@pytest.mark.parametrize("family,checkpointing", [("s4", False), ("s4d", True)])
def test_trainer_steps_lower_the_loss(tmp_path, family, checkpointing):
    from transformers import Trainer, TrainingArguments

    torch.manual_seed(0)
    ids = torch.randint(1, 64, (32, 32)) % torch.arange(2, 34)   # learnable: each position has its own range
    data = [{"input_ids": row, "labels": row} for row in ids]
    model = ssm_hf.S4ForCausalLM(tiny_config(family, vocab_size=64, dropout=0.1, prenorm=family == "s4"))
    with torch.no_grad():
        before = model.eval()(ids, labels=ids).loss.item()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, learning_rate=1e-2, max_steps=12,
                             report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0,
                             activation_checkpointing=checkpointing)
    Trainer(model=model, args=args, train_dataset=data).train()
    with torch.no_grad():
        after = model.eval()(ids, labels=ids).loss.item()
    assert after < before - 0.3, (before, after)


@pytest.mark.parametrize("fields,error,message", [
    (dict(state_size=15), StrictDataclassError, "even"),
    (dict(state_size=0), StrictDataclassError, "state_size"),
    (dict(hidden_size=-1), StrictDataclassError, "hidden_size"),
    (dict(num_ssm_copies=0), StrictDataclassError, "num_ssm_copies"),
    (dict(l_max=0), StrictDataclassError, "l_max"),
    (dict(init="s4d_quad"), StrictDataclassError, "init"),
    (dict(discretization="euler"), StrictDataclassError, "discretization"),
    (dict(kernel="dense"), StrictDataclassError, "kernel"),
    (dict(output_activation="relu"), StrictDataclassError, "output_activation"),
    (dict(classifier_pooling="max"), StrictDataclassError, "classifier_pooling"),
    (dict(time_step_min=0.2, time_step_max=0.1), StrictDataclassError, "time_step_min"),
    (dict(kernel="dplr", discretization="zoh"), NotImplementedError, "bilinear"),
])
def test_config_errors(fields, error, message):
    with pytest.raises(error, match=message):
        ssm_hf.S4Config(**fields)


def test_presets_and_auto_classes():
    assert {"s4-tiny", "s4d-tiny", "s4-lra-text", "s4d-lra-text"} <= set(ssm_hf.list_presets())
    s4, s4d = ssm_hf.preset_config("s4-tiny"), ssm_hf.preset_config("s4d-tiny")
    assert (s4.kernel, s4.init, s4.discretization) == ("dplr", "legs", "bilinear")
    assert (s4d.kernel, s4d.init) == ("diag", "s4d_lin")
    assert s4.model_type == "ssm_s4" and s4.layer_types == ["linear_attention"] * s4.num_hidden_layers
    assert type(AutoModelForCausalLM.from_config(s4d)) is ssm_hf.S4ForCausalLM
