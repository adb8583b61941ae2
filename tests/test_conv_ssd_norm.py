"""Mamba-2's conv → SSD → gated norm as one op (`kernels.conv_ssd_norm`): the Triton form (one autograd op, run by
Triton's interpreter on CPU tensors) against the three ops one after the other on the PyTorch path."""

import pytest
import torch
import transformers
from test_kernels import _rel_err
from torch.utils._python_dispatch import TorchDispatchMode

from ssm_hf import kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(shape, batch, seqlen, dtype, g, conv_bias=True, width=4):
    """Leaves of one call: in_proj's output and the parameters, fresh random values (Δ's raw values spread so that
    softplus sees both signs)."""
    zxbcdt = torch.randn(batch, seqlen, shape.width, generator=g)
    zxbcdt[..., -shape.heads:] = 2.0 * torch.randn(batch, seqlen, shape.heads, generator=g) - 1.0
    params = dict(
        conv_weight=0.5 * torch.randn(shape.conv_dim, 1, width, generator=g),
        conv_bias=0.1 * torch.randn(shape.conv_dim, generator=g) if conv_bias else None,
        dt_bias=0.5 * torch.randn(shape.heads, generator=g),
        A_log=torch.log(torch.rand(shape.heads, generator=g) * 4 + 0.5),
        D=torch.randn(shape.heads, generator=g),
        norm_weight=1 + 0.3 * torch.randn(shape.d_inner, generator=g),
    )
    leaves = {"zxbcdt": zxbcdt, **{k: v for k, v in params.items() if v is not None}}
    return {k: v.to(DEVICE, dtype).requires_grad_(True) for k, v in leaves.items()}


def _run(leaves, shape, dout, dt_limit, seq_idx, norm_groups=1):
    for v in leaves.values():
        v.grad = None
    zxbcdt = leaves["zxbcdt"]
    if zxbcdt.shape[1] != dout.shape[1]:  # a buffer of twice the tokens: its even tokens
        zxbcdt = zxbcdt[:, ::2]
    out = kernels.conv_ssd_norm(
        zxbcdt, shape, leaves["conv_weight"], leaves.get("conv_bias"), "silu", leaves["dt_bias"],
        leaves["A_log"], leaves["D"], dt_limit, leaves["norm_weight"], shape.d_inner // norm_groups, 1e-5, 8,
        seq_idx)
    out.backward(dout)
    return out.detach(), {k: v.grad for k, v in leaves.items()}


@pytest.mark.parametrize("case", ["plain", "packed_limit_groups", "no_conv_bias", "one_token_strided"])
def test_triton_conv_ssd_norm_equals_the_ops_one_after_the_other(monkeypatch, case):
    """Output and every gradient (in_proj's output, conv weight and bias, Δ bias, A_log, D, norm weight) equal the
    PyTorch path of conv, SSD and gated norm, float32; packed sequences with Δ clamped on both sides and two
    groups of B/C (and of the norm) too; one token of one row, with a 2-D conv weight and in_proj's output a view
    of every other token of a longer buffer."""
    g = torch.Generator().manual_seed(5)
    groups = 2 if case == "packed_limit_groups" else 1
    shape = kernels.Mamba2Shape(heads=4, head_dim=8, groups=groups, d_state=16)
    batch, seqlen = (1, 1) if case == "one_token_strided" else (2, 37)
    leaves = _case(shape, batch, seqlen, torch.float32, g, conv_bias=case != "no_conv_bias")
    if case == "one_token_strided":
        buffer = torch.randn(batch, 2 * seqlen, shape.width, generator=g).to(DEVICE)
        buffer[:, ::2] = leaves["zxbcdt"].detach()
        leaves["zxbcdt"] = buffer.requires_grad_(True)
        leaves["conv_weight"] = leaves["conv_weight"].detach()[:, 0].requires_grad_(True)
    dout = torch.randn(batch, seqlen, shape.d_inner, generator=g).to(DEVICE)
    dt_limit, seq_idx = None, None
    if case == "packed_limit_groups":
        dt_limit = (0.2, 1.5)  # softplus of the raw values above spans about 0.05 to 4: both sides clamp
        seq_idx = torch.tensor([[0] * 11 + [1] * 20 + [2] * 6, [0] * 30 + [1] * 7], device=DEVICE)
    launches = []
    from ssm_hf.kernels import conv_ssd_norm_triton

    original = conv_ssd_norm_triton._ConvSSDNorm.apply
    monkeypatch.setattr(conv_ssd_norm_triton._ConvSSDNorm, "apply",
                        lambda *a: launches.append(1) or original(*a))
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    got = _run(leaves, shape, dout, dt_limit, seq_idx, norm_groups=groups)
    assert launches == [1]
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: False)
    want = _run(leaves, shape, dout, dt_limit, seq_idx, norm_groups=groups)
    assert _rel_err(got[0].cpu(), want[0].double().cpu()) < 1e-5
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        assert got[1][name].dtype == want[1][name].dtype, name
        # (one token from a zero state: A_log's gradient is exactly zero on both paths)
        assert torch.equal(got[1][name], want[1][name]) or \
            _rel_err(got[1][name].cpu(), want[1][name].double().cpu()) < 1e-5, name
    if case == "packed_limit_groups":  # the clamp held somewhere, so the gradient's zeros were tested
        dt = torch.nn.functional.softplus(leaves["zxbcdt"][..., -shape.heads:].detach() + leaves["dt_bias"].detach())
        assert bool((dt < dt_limit[0]).any()) and bool((dt > dt_limit[1]).any())


class _Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_triton_conv_ssd_norm_backward_joins_no_gradients(monkeypatch):
    """The point of one op: the backward writes the gradients of z, xBC and Δ into one tensor for in_proj's output
    (no `cat` of column gradients, as autograd's split backward would run) and copies none of its inputs."""
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    g = torch.Generator().manual_seed(6)
    shape = kernels.Mamba2Shape(heads=2, head_dim=8, groups=1, d_state=16)
    leaves = _case(shape, 1, 16, torch.float32, g)
    out = kernels.conv_ssd_norm(leaves["zxbcdt"], shape, leaves["conv_weight"], leaves["conv_bias"], "silu",
                                leaves["dt_bias"], leaves["A_log"], leaves["D"], None, leaves["norm_weight"],
                                shape.d_inner, 1e-5, 8)
    # one node between the output and the leaves: no split, view or cast of in_proj's output in the graph
    assert type(out.grad_fn).__name__ == "_ConvSSDNormBackward"
    assert {type(fn).__name__ for fn, _ in out.grad_fn.next_functions if fn is not None} == {"AccumulateGrad"}
    with _Ops() as ops:
        out.backward(torch.randn(out.shape, generator=g).to(DEVICE))
    assert "cat" not in ops.names and "clone" not in ops.names, ops.names
    assert leaves["zxbcdt"].grad.shape == leaves["zxbcdt"].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba2_model_trains_the_same_on_the_fused_op(monkeypatch, dtype):
    """A tiny Mamba2ForCausalLM: loss and every parameter's gradient with the fused op equal those of the same
    kernels run op by op (float32 to 1e-6; bf16 to 1e-2: the fused op's backward sums its partials in another order,
    and a bf16 rounding flipped there moves the gradients below it by up to about 0.7%, while both paths stay
    1-3% from a float64 model), and, in float32, those of the PyTorch path (1e-5)."""
    from conftest import tiny_config

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("mamba2")).to(DEVICE, dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), device=DEVICE)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return [loss.detach()] + [p.grad for _, p in model.named_parameters()]

    from ssm_hf.kernels import conv_ssd_norm_triton

    names = ["loss"] + [name for name, _ in model.named_parameters()]
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    calls = []
    original = conv_ssd_norm_triton._ConvSSDNorm.apply
    monkeypatch.setattr(conv_ssd_norm_triton._ConvSSDNorm, "apply", lambda *a: calls.append(1) or original(*a))
    got = run()
    assert len(calls) == model.config.num_hidden_layers  # the mixers took the fused op
    fused = kernels.conv_ssd_norm
    monkeypatch.setattr(kernels, "conv_ssd_norm", kernels.conv_ssd_norm_by_ops)
    by_ops = run()
    for name, a, b in zip(names, got, by_ops):
        assert _rel_err(a.float().cpu(), b.double().cpu()) < (1e-6 if dtype == torch.float32 else 1e-2), name
    if dtype == torch.float32:
        monkeypatch.setattr(kernels, "conv_ssd_norm", fused)
        monkeypatch.setattr(kernels, "use_triton", lambda tensor: False)
        for name, a, b in zip(names, got, run()):
            assert _rel_err(a.cpu(), b.double().cpu()) < 1e-5, name


def test_conv_ssd_norm_refuses_an_input_of_the_wrong_width():
    """An in_proj output that does not match the layout is refused by name on either path, not split wrongly."""
    g = torch.Generator().manual_seed(7)
    shape = kernels.Mamba2Shape(heads=2, head_dim=8, groups=1, d_state=16)
    leaves = _case(shape, 1, 8, torch.float32, g)
    with pytest.raises(ValueError, match="in_proj's output has"):
        kernels.conv_ssd_norm(leaves["zxbcdt"][..., 1:], shape, leaves["conv_weight"], leaves["conv_bias"], "silu",
                              leaves["dt_bias"], leaves["A_log"], leaves["D"], None, leaves["norm_weight"],
                              shape.d_inner, 1e-5, 8)


def test_triton_conv_ssd_norm_refuses_what_the_ops_would(monkeypatch):
    """The fused op checks what the three ops check one by one: the norm's group size and weight, the conv's
    weight (the kernels would leave columns unwritten or read past the end)."""
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    g = torch.Generator().manual_seed(8)
    shape = kernels.Mamba2Shape(heads=2, head_dim=8, groups=1, d_state=16)
    leaves = _case(shape, 1, 8, torch.float32, g)
    args = dict(zxbcdt=leaves["zxbcdt"], shape=shape, conv_weight=leaves["conv_weight"],
                conv_bias=leaves["conv_bias"], activation="silu", dt_bias=leaves["dt_bias"], A_log=leaves["A_log"],
                D=leaves["D"], dt_limit=None, norm_weight=leaves["norm_weight"], norm_group_size=shape.d_inner,
                eps=1e-5, chunk_size=8)
    for change, message in ((dict(norm_group_size=12), "group size"),
                            (dict(norm_weight=leaves["norm_weight"][:-1]), "norm's weight"),
                            (dict(conv_weight=leaves["conv_weight"][1:]), "conv's weight")):
        with pytest.raises(ValueError, match=message):
            kernels.conv_ssd_norm(**{**args, **change})


def test_triton_norm_of_no_rows_has_a_zero_weight_gradient(monkeypatch):
    """No rows, no kernel: dweight is zeros (not an unwritten buffer)."""
    from ssm_hf.kernels.norm_triton import rms_norm_gated_triton

    weight = torch.randn(16, device=DEVICE, requires_grad=True)
    x, z = (torch.randn(2, 0, 16, device=DEVICE) for _ in range(2))
    rms_norm_gated_triton(x, z, weight, 16, 1e-5).sum().backward()
    assert torch.equal(weight.grad, torch.zeros_like(weight))


def _split_run(leaves, shape, split, seq_idx=None):
    """The op over the whole of in_proj's output, and over it in two pieces, the second continued from the first's
    cached state (the conv's last inputs, as a cache keeps them, and the scan's final state). Returns (whole output,
    whole final state, the two pieces' outputs joined, the second piece's final state)."""
    params = (leaves["conv_weight"], leaves["conv_bias"], "silu", leaves["dt_bias"], leaves["A_log"], leaves["D"],
              (0.05, 2.0), leaves["norm_weight"], shape.d_inner, 1e-5, 8)
    zxbcdt = leaves["zxbcdt"]
    whole, whole_final = kernels.conv_ssd_norm(zxbcdt, shape, *params, seq_idx, return_final_state=True)
    first, state = kernels.conv_ssd_norm(zxbcdt[:, :split], shape, *params, return_final_state=True)
    width = leaves["conv_weight"].shape[-1]
    conv_inputs = shape.split(zxbcdt[:, :split])[1]
    past = torch.nn.functional.pad(conv_inputs.transpose(1, 2), (width, 0))[..., -width:].contiguous()
    second, final = kernels.conv_ssd_norm(zxbcdt[:, split:], shape, *params, conv_past=past, initial_state=state,
                                          return_final_state=True)
    return whole, whole_final, torch.cat([first, second], dim=1), final


@pytest.mark.parametrize("split", [1, 2, 13])
def test_triton_conv_ssd_norm_continues_a_cached_state(monkeypatch, split):
    """A prefill that fills a cache and one that continues it (generate()'s prompt, a prompt fed in pieces): the
    fused op without autograd, from the conv's cached inputs and the scan's state, gives the output and final state
    of one call over the whole sequence (float32, 1e-5), on the Triton path (the interpreter) as on the PyTorch
    path, and the two paths agree. Splits inside the conv's window (1, 2 tokens) included."""
    from ssm_hf.kernels import conv_ssd_norm_triton

    g = torch.Generator().manual_seed(9)
    shape = kernels.Mamba2Shape(heads=4, head_dim=8, groups=2, d_state=16)
    leaves = {k: v.detach() for k, v in _case(shape, 2, 29, torch.float32, g).items()}
    results = {}
    for path in ("triton", "torch"):
        monkeypatch.setattr(kernels, "use_triton",
                            (lambda tensor: tensor.dtype != torch.float64) if path == "triton" else (lambda t: False))
        calls = []
        original = conv_ssd_norm_triton._FORWARD
        monkeypatch.setattr(conv_ssd_norm_triton, "_FORWARD", lambda *a: calls.append(1) or original(*a))
        with torch.no_grad():
            results[path] = _split_run(leaves, shape, split)
        assert len(calls) == (3 if path == "triton" else 0)
        whole, whole_final, joined, final = results[path]
        assert final.dtype == torch.float32 and final.shape == (2, shape.heads, shape.head_dim, shape.d_state)
        assert _rel_err(joined.cpu(), whole.double().cpu()) < 1e-5, path
        assert _rel_err(final.cpu(), whole_final.double().cpu()) < 1e-5, path
    for a, b in zip(results["triton"], results["torch"]):
        assert _rel_err(a.cpu(), b.double().cpu()) < 1e-5


def test_conv_ssd_norm_with_a_cached_state_and_gradients_runs_the_ops(monkeypatch):
    """Where a gradient must flow with a cached state the dispatcher runs the three ops (whose autograd carries it
    into the initial state too); the fused Triton op itself refuses, by name, rather than drop that gradient.
    Its checks of the cached state's shapes name what is wrong."""
    from ssm_hf.kernels.conv_ssd_norm_triton import conv_ssd_norm_triton

    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    g = torch.Generator().manual_seed(10)
    shape = kernels.Mamba2Shape(heads=2, head_dim=8, groups=1, d_state=16)
    leaves = _case(shape, 2, 9, torch.float32, g)
    state = torch.randn(2, shape.heads, shape.head_dim, shape.d_state, generator=g).to(DEVICE).requires_grad_(True)
    args = (leaves["zxbcdt"], shape, leaves["conv_weight"], leaves["conv_bias"], "silu", leaves["dt_bias"],
            leaves["A_log"], leaves["D"], None, leaves["norm_weight"], shape.d_inner, 1e-5, 8)
    out, final = kernels.conv_ssd_norm(*args, initial_state=state, return_final_state=True)
    (out.sum() + final.sum()).backward()
    assert state.grad is not None and float(state.grad.abs().sum()) > 0
    assert leaves["A_log"].grad is not None and float(leaves["A_log"].grad.abs().sum()) > 0
    with pytest.raises(NotImplementedError, match="no backward through a cached state"):
        conv_ssd_norm_triton(*args, initial_state=state)
    with torch.no_grad():
        short_past = torch.zeros(2, shape.conv_dim, 2, device=DEVICE)
        wide_past = torch.zeros(2, shape.conv_dim + 1, 4, device=DEVICE)
        for change, message in ((dict(initial_state=state[:1]), "initial_state has shape"),
                                (dict(conv_past=short_past), "conv_past has shape"),
                                (dict(conv_past=wide_past), "conv_past has shape")):
            with pytest.raises(ValueError, match=message):
                conv_ssd_norm_triton(*args, **change)


def test_mamba2_prefill_with_a_cache_takes_the_fused_op(monkeypatch):
    """generate()'s prompt: a forward with a cache and an all-ones attention mask runs every mixer's conv, scan and
    norm as the one fused op (the mask is dropped once per forward, `mixer_padding`), also for a prompt fed in
    two pieces, and its logits, and those of a decoding step from the cache it filled, equal the logits of one
    forward without a cache (float32, the interpreter, 1e-5)."""
    from conftest import tiny_config

    from ssm_hf.kernels import conv_ssd_norm_triton

    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    calls = []
    original = conv_ssd_norm_triton._FORWARD
    monkeypatch.setattr(conv_ssd_norm_triton, "_FORWARD", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(1)
    model = transformers.AutoModelForCausalLM.from_config(tiny_config("mamba2")).to(DEVICE).eval()
    layers = model.config.num_hidden_layers
    ids = torch.randint(0, model.config.vocab_size, (2, 19), device=DEVICE)
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        assert len(calls) == layers
        calls.clear()
        first = model(ids[:, :11], attention_mask=torch.ones_like(ids[:, :11]), use_cache=True)
        second = model(ids[:, 11:18], attention_mask=torch.ones_like(ids[:, :18]), cache=first.cache)
        assert len(calls) == 2 * layers  # both pieces took the fused op
        step = model(ids[:, 18:], cache=second.cache)
        assert len(calls) == 2 * layers  # a decoding step takes the single-token kernels
    got = torch.cat([first.logits, second.logits, step.logits], dim=1)
    assert _rel_err(got.cpu(), want.double().cpu()) < 1e-5
