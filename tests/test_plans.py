"""`kernels.plans.Planned`: an op's allocations and launches replayed per input signature. On the CPU the plans run
against a stand-in kernel whose "launcher" computes from the addresses it is given (ints on a replay, tensors on
the first call), so that a replay's pointers, allocations and outputs are checked by the values they produce; on a
GPU, the fused Mamba-2 op's replays are checked against Triton's own path, bit for bit."""

from __future__ import annotations

import ctypes
import itertools
import types
from types import SimpleNamespace

import pytest
import torch
from conftest import KernelParam

from ssm_hf.kernels import plans
from ssm_hf.kernels.launch import FastLaunch

CUDA = torch.cuda.is_available()


def _floats(address, n: int):
    return (ctypes.c_float * n).from_address(address if isinstance(address, int) else address.data_ptr())


class _AxpyCompiled:
    """Stands in for a compiled kernel out[i] = x[i] + SCALE * w[i], i < n: its launcher reads and writes memory
    at the addresses it is given (tensors or ints), as a GPU kernel would."""

    function, packed_metadata = "function-handle", "packed"

    def __init__(self):
        self.calls = []

        def run(g0, g1, g2, stream, function, metadata, enter, leave, mode, x, w, out, n, SCALE, BLOCK):
            self.calls.append((x, w, out, n))
            xs, ws, outs = _floats(x, n), _floats(w, n), _floats(out, n)
            for i in range(n):
                outs[i] = xs[i] + SCALE * ws[i]

        self.run = run


class _AxpyKernel:
    """Stands in for the JITFunction (x, w, out, n, SCALE, BLOCK): Triton's path computes and returns the
    compiled kernel (which FastLaunch then keeps)."""

    params = [*map(KernelParam, ("x", "w", "out", "n", "SCALE")), KernelParam("BLOCK", 16)]
    pre_run_hooks: list = []
    debug = None

    def __init__(self):
        self.compiled, self.triton_launches = _AxpyCompiled(), 0

    def __getitem__(self, grid):
        def run(x, w, out, n, SCALE, BLOCK=16):
            self.triton_launches += 1
            self.compiled.run(*grid, *(1,) * (3 - len(grid)), 0, None, None, None, None, None, x, w, out, n, SCALE,
                              BLOCK)
            return self.compiled
        return run


@pytest.fixture
def knobs(monkeypatch, stand_in_driver):
    """A stand-in kernel module (SCALE, a TABLE dict, the kernel; watched once a Planned reads it), the stand-in
    driver, and plans on the CPU."""
    monkeypatch.setattr(plans, "_on_current_gpu", lambda t: True)
    module = types.ModuleType("_planned_knobs")
    module.SCALE, module.TABLE = 2.0, {"block": 16}
    module.axpy = FastLaunch(_AxpyKernel())
    return module


def _op(module, calls: list):
    """x, w (rows, cols) float32 -> (out = x + SCALE w as (rows, cols), x itself, w's rows from the second, out's
    second half flat): only allocations, views and one launch."""

    def op(x, w):
        calls.append(1)
        out = torch.empty(x.numel(), dtype=x.dtype, device=x.device)
        module.axpy[(1,)](x, w, out, x.numel(), SCALE=module.SCALE, BLOCK=module.TABLE["block"])
        return out.view(x.shape), x, w[1:], out[x.numel() // 2:]
    return op


def _expected(x, w, scale):
    out = x + scale * w
    return out, x, w[1:], out.flatten()[x.numel() // 2:]


def test_replay_equals_the_function(knobs):
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    compiled = knobs.axpy.fn.compiled
    for step in range(4):
        x, w = torch.randn(4, 6), torch.randn(4, 6)
        got = planned((x, w), ())
        for a, b in zip(got, _expected(x, w, 2.0)):
            assert torch.equal(a, b)
        assert got[1] is x  # an input returned as it is
        assert got[2].data_ptr() == w[1:].data_ptr() and got[3].data_ptr() == got[0].data_ptr() + 48
    # the first call ran the function, the second ran it recording a plan, the others replayed that plan
    assert calls == [1, 1]
    assert knobs.axpy.fn.triton_launches == 1  # FastLaunch's path from the second
    replayed = compiled.calls[-1]
    assert all(type(a) is int for a in replayed[:3])  # addresses as ints
    assert replayed[0] == x.data_ptr() and replayed[1] == w.data_ptr()


def test_a_new_signature_or_knob_records_again(knobs):
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    x, w = torch.randn(4, 6), torch.randn(4, 6)

    def ran(inputs) -> int:
        """How many of three calls ran the function (2 where a plan was made: the first sight and the recording)."""
        before = len(calls)
        for _ in range(3):
            got = planned(inputs, ())
        assert torch.equal(got[0], inputs[0] + knobs.SCALE * inputs[1])
        return len(calls) - before

    assert ran((x, w)) == 2
    assert ran((x, w)) == 0
    assert ran((torch.randn(2, 6), torch.randn(2, 6))) == 2  # another shape
    storage = torch.randn(30)
    assert ran((storage[1:25].view(4, 6), w)) == 2  # the same shape, 4 bytes off a 16-byte boundary
    knobs.SCALE = 4.0  # a module attribute set (a power of two: the stand-in computes exactly)
    assert ran((x, w)) == 2
    knobs.TABLE["block"] = 32  # a dict entry changed in place
    assert ran((x, w)) == 2
    assert ran((x, w)) == 0


def test_a_signature_seen_once_is_not_recorded(knobs):
    """Shapes that never come back (a new length per batch) cost no recording: a signature is recorded at its
    second call."""
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    for rows in range(1, 6):
        planned((torch.randn(rows, 6), torch.randn(rows, 6)), ())
    assert len(calls) == 5 and all(plan is plans._SEEN_ONCE for plan in planned._plans.values())


def test_a_call_that_computes_is_not_replayed(knobs):
    calls = []
    op = _op(knobs, calls)
    planned = plans.Planned(lambda x, w: op(x * 1.0, w), (knobs,))  # a multiplication the plan could not repeat
    x, w = torch.randn(4, 6), torch.randn(4, 6)
    for _ in range(3):
        got = planned((x, w), ())
        assert torch.equal(got[0], x + 2.0 * w)
    assert len(calls) == 3


def test_a_launch_through_tritons_path_is_not_replayed(knobs, monkeypatch):
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    monkeypatch.setattr(knobs.axpy.fn, "pre_run_hooks", [lambda *a, **k: None])  # FastLaunch: Triton's path
    x, w = torch.randn(4, 6), torch.randn(4, 6)
    for _ in range(3):
        assert torch.equal(planned((x, w), ())[0], x + 2.0 * w)
    assert len(calls) == 3 and knobs.axpy.fn.triton_launches == 3


def test_an_argument_inside_two_inputs_is_not_replayed(knobs):
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    x = torch.randn(4, 6)
    w = x[:, :]  # a view of x: the launch's pointers could come from either input
    for _ in range(3):
        assert torch.equal(planned((x, w), ())[0], x + 2.0 * x)
    assert len(calls) == 3


def test_a_kernel_swapped_for_a_stand_in_is_not_planned(knobs, monkeypatch):
    """A recording sees FastLaunch's launches only: with a module's kernel swapped for another callable (a test's
    wrapper, a bench stub), nothing is planned and the function runs as it is."""
    calls = []
    fast = knobs.axpy
    knobs.axpy_kernel = SimpleNamespace(__getitem__=None)  # a `*_kernel` global that is not a FastLaunch
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    x, w = torch.randn(4, 6), torch.randn(4, 6)
    for _ in range(3):
        assert torch.equal(planned((x, w), ())[0], x + 2.0 * w)
    assert len(calls) == 3 and fast.fn.triton_launches == 1


def test_a_tensor_not_allocated_in_the_call_is_not_planned(knobs):
    """A launch that reads a tensor made from Python values (`torch.tensor`: its copy is not seen by the dispatch
    mode) or a module-level buffer would read uninitialised memory in a replay: no plan."""
    buffer = torch.randn(4, 6)
    for make_w in (lambda x: torch.tensor(buffer.tolist()), lambda x: buffer):
        calls = []
        op = _op(knobs, calls)
        planned = plans.Planned(lambda x: op(x, make_w(x)), (knobs,))
        x = torch.randn(4, 6)
        for _ in range(4):
            assert torch.equal(planned((x,), ())[0], x + 2.0 * buffer)
        assert len(calls) == 4 and not any(type(p) is plans._Plan for p in planned._plans.values())


def test_a_planned_function_inside_another(knobs):
    """The inner function runs as it is while the outer records (its launches are noted in the outer's plan);
    the outer's replays then give the same results."""
    calls = []
    inner = plans.Planned(_op(knobs, calls), (knobs,))

    def outer(x, w):
        first = inner((x, w), ())[0]
        return inner((first, w), ())  # x + 2w + 2w

    planned = plans.Planned(outer, (knobs,))
    for _ in range(4):
        x, w = torch.randn(4, 6), torch.randn(4, 6)
        assert torch.equal(planned((x, w), ())[0], x + 2.0 * w + 2.0 * w)


def test_an_unhashable_argument_runs_as_it_is(knobs):
    calls = []
    op = _op(knobs, calls)
    planned = plans.Planned(lambda x, w, limits: op(x, w), (knobs,))
    x, w = torch.randn(4, 6), torch.randn(4, 6)
    for _ in range(3):
        assert torch.equal(planned((x, w), ([0.0, 1.0],))[0], x + 2.0 * w)
    assert len(calls) == 3


def test_a_pre_run_hook_set_after_the_plan_runs(knobs, monkeypatch):
    """A kernel's pre-run hook (added in place to its list) makes FastLaunch take Triton's path: a plan recorded
    before does not replay past it."""
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    x, w = torch.randn(4, 6), torch.randn(4, 6)
    for _ in range(3):
        planned((x, w), ())
    assert len(calls) == 2
    monkeypatch.setattr(knobs.axpy.fn, "pre_run_hooks", [])  # a list of the kernel's own, then a hook added to it
    knobs.axpy.fn.pre_run_hooks.append(lambda *a, **k: None)
    launches = knobs.axpy.fn.triton_launches
    assert torch.equal(planned((x, w), ())[0], x + 2.0 * w)
    assert len(calls) == 3 and knobs.axpy.fn.triton_launches == launches + 1


def test_plans_are_bounded(knobs, monkeypatch):
    calls = []
    planned = plans.Planned(_op(knobs, calls), (knobs,))
    monkeypatch.setattr(plans, "MAX_PLANS", 2)
    for rows in range(1, 6):
        planned((torch.randn(rows, 6), torch.randn(rows, 6)), ())
        assert len(planned._plans) <= 2


def test_no_plans_on_the_cpu_or_when_triton_launches_are_asked(monkeypatch):
    calls = []
    planned = plans.Planned(lambda x: calls.append(1) or (x,), ())
    x = torch.randn(3)
    planned((x,), ())
    planned((x,), ())
    assert len(calls) == 2 and not planned._plans  # CPU tensors: the function itself, every time
    monkeypatch.setattr(plans, "_on_current_gpu", lambda t: True)
    monkeypatch.setenv("SSM_HF_TRITON_LAUNCH_CACHE", "0")
    planned((x,), ())
    assert len(calls) == 3 and not planned._plans


class _StubLaunches:
    """Every `*_kernel` of the given modules replaced by a stub that counts its launches and computes nothing."""

    def __init__(self, monkeypatch, modules):
        self.launches = 0
        for module in modules:
            for name, value in list(vars(module).items()):
                if name.endswith("_kernel") and hasattr(value, "__getitem__"):  # (interpreted: JITFunctions)
                    monkeypatch.setattr(module, name, self)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches += 1
        return launch


def test_planned_forwards_and_backwards_only_allocate_view_and_launch(monkeypatch):
    """What `Planned` needs of the functions it wraps, checked on the CPU for every one of them: a training step
    and a no-gradient forward of tiny Mamba-2 and Mamba models (the fused op, the blocks' add + norm, the
    selective scan's backward) run, inside each planned function, nothing but allocations, views and launches
    (kernels stubbed: what is counted is the wrappers' own PyTorch work)."""
    from conftest import tiny_config

    import ssm_hf
    from ssm_hf import kernels
    from ssm_hf.kernels import (
        causal_conv1d_triton,
        conv_ssd_norm_triton,
        norm_triton,
        selective_scan_triton,
        ssd_triton,
        sums_triton,
    )

    planned = [conv_ssd_norm_triton._FORWARD, conv_ssd_norm_triton._BACKWARD, norm_triton._ADD_NORM_FORWARD,
               norm_triton._ADD_NORM_BACKWARD, selective_scan_triton._BACKWARD]
    names = [f"{p.fn.__module__}.{p.__name__}" for p in planned]
    seen = {name: [] for name in names}
    for p, name in zip(planned, names):
        def checked(*args, _fn=p.fn, _name=name):
            with plans._OnlyAllocationsAndViews() as ops:
                out = _fn(*args)
            seen[_name].append(ops.other)
            return out
        monkeypatch.setattr(p, "fn", checked)
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    stubs = _StubLaunches(monkeypatch, (causal_conv1d_triton, norm_triton, ssd_triton, sums_triton,
                                        selective_scan_triton))
    for family, dtype in itertools.product(("mamba2", "mamba"), (torch.float32, torch.bfloat16)):
        model = ssm_hf.AutoModelForCausalLM.from_config(tiny_config(family)).to(dtype)
        ids = torch.randint(1, model.config.vocab_size, (2, 24))
        model(ids, labels=ids).loss.backward()
        with torch.no_grad():
            model(ids, use_cache=False)
    assert stubs.launches > 0
    for name, others in seen.items():
        assert others and all(other == [] for other in others), (name, others)


@pytest.mark.skipif(not CUDA, reason="needs a GPU: real compiled kernels")
@pytest.mark.parametrize("family", ["mamba2", "mamba"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_models_replay_equal_tritons_path(monkeypatch, dtype, family):
    """Tiny Mamba2ForCausalLM and MambaForCausalLM on CUDA: logits (no gradients) and loss and gradients
    (training) with the planned forwards and backwards replayed equal, bit for bit, those with every launch
    through Triton's own path."""
    from conftest import tiny_config

    import ssm_hf
    from ssm_hf.kernels import causal_conv1d_triton, conv_ssd_norm_triton, norm_triton, selective_scan_triton

    torch.manual_seed(0)
    model = ssm_hf.AutoModelForCausalLM.from_config(tiny_config(family)).to("cuda", dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), device="cuda")

    def run():
        model.zero_grad(set_to_none=True)
        with torch.no_grad():
            logits = model(ids, use_cache=False).logits
        loss = model(ids, labels=ids).loss
        loss.backward()
        return [logits, loss.detach()] + [p.grad for p in model.parameters()]

    run()
    run()  # every signature seen twice: recorded (the blocks' add + norm has one per layer kind and mode)
    mixer_plans = ((conv_ssd_norm_triton._FORWARD, conv_ssd_norm_triton._BACKWARD) if family == "mamba2"
                   else (selective_scan_triton._FORWARD, selective_scan_triton._BACKWARD,
                         causal_conv1d_triton._CONV_FORWARD, causal_conv1d_triton._CONV_BACKWARD))
    # the blocks norm with the add + norm op where the float32 residual stream meets bf16 weights, else with the
    # plain norm
    norm_plans = ((norm_triton._ADD_NORM_FORWARD, norm_triton._ADD_NORM_BACKWARD) if dtype == torch.bfloat16
                  else (norm_triton._NORM_FORWARD, norm_triton._NORM_BACKWARD))
    for planned in mixer_plans + norm_plans:
        assert any(type(plan) is plans._Plan for plan in planned._plans.values()), planned.__name__
    replayed = run()
    monkeypatch.setenv("SSM_HF_TRITON_LAUNCH_CACHE", "0")
    through_triton = run()
    for a, b in zip(replayed, through_triton):
        assert torch.equal(a, b)
