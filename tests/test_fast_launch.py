"""`kernels.launch.FastLaunch`: Triton launches that reuse the compiled kernel of an earlier launch with the same
specialisation. On the CPU the cache's logic runs against a stand-in kernel and driver (Triton's interpreter has no
compiled kernels); on a GPU, real launches after the first are checked against Triton's own path. Also
`launch.apply_function` (the ops' autograd Functions without `apply` where gradients are off) and
`launch.on_device_of`."""

from __future__ import annotations

import contextlib

import pytest
import torch
import triton
from conftest import KernelParam
from triton import knobs

import ssm_hf
from ssm_hf.kernels import launch
from ssm_hf.kernels.launch import FastLaunch, _argument_key, fast_launch

CUDA = torch.cuda.is_available()


def test_key_separates_what_the_installed_triton_specialises():
    launch._keys_separate_triton_specialisations.cache_clear()
    assert launch._keys_separate_triton_specialisations()


def test_argument_key():
    storage = torch.empty(64, dtype=torch.uint8)
    aligned, misaligned = storage[16:].view(torch.float32), storage[4:20].view(torch.float32)
    assert _argument_key((aligned,)) != _argument_key((misaligned,))
    assert _argument_key((aligned,)) != _argument_key((storage[16:].view(torch.bfloat16),))
    keys = [_argument_key((value,)) for value in (1, 2, 16, 1 << 31, 1 << 63, True, False, 0.5, None)]
    assert len(set(keys)) == len(keys)  # True and 1 (equal in a tuple) apart: Triton specialises them apart
    assert _argument_key((0.5,)) == _argument_key((2.0,))  # floats are not specialised
    assert _argument_key((16,)) == _argument_key((48,)) and _argument_key((2,)) == _argument_key((3,))
    assert _argument_key(((1, 2),)) is None  # a tuple argument: Triton's own path
    # the key is flat (one or two entries per argument): argument lists that differ only in order stay apart
    pairs = [(True, 1), (1, True), (None, 1), (1, None), (aligned, 1), (1, aligned), (0.5, 1), (1, 0.5)]
    assert len({_argument_key(pair) for pair in pairs}) == len(pairs)


class _Compiled:
    """Stands in for Triton's CompiledKernel: records what its launcher is called with."""

    function, packed_metadata = "function-handle", "packed"

    def __init__(self):
        self.launches = []
        self.run = lambda *args: self.launches.append(args)


class _Kernel:
    """Stands in for a JITFunction with parameters (x, n, BLOCK, FLAG=False): `kernel[grid](...)` is Triton's path."""

    params = [KernelParam("x"), KernelParam("n"), KernelParam("BLOCK"), KernelParam("FLAG", False)]
    pre_run_hooks: list = []
    debug = None

    def __init__(self, compiled):
        self.compiled, self.triton_launches = compiled, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.triton_launches.append((grid, args, kwargs))
            return self.compiled
        return run


def test_second_launch_reuses_the_compiled_kernel(stand_in_driver):
    compiled = _Compiled()
    kernel = FastLaunch(_Kernel(compiled))
    x = torch.randn(32)
    kernel[(3,)](x, 64, BLOCK=16)
    assert len(kernel.fn.triton_launches) == 1 and not compiled.launches
    y = torch.randn(32)
    kernel[(5, 2)](y, 96, BLOCK=16)  # same key: another tensor of the same dtype and alignment, 96 % 16 == 0
    assert len(kernel.fn.triton_launches) == 1
    (launched,) = compiled.launches
    assert launched[:9] == (5, 2, 1, 1234, "function-handle", "packed", None, None, None)
    assert launched[9] is y and launched[10:] == (96, 16, False)  # positional, keyword, then the default


@pytest.mark.parametrize("second", ["misaligned", "int class", "constexpr", "dtype"])
def test_a_different_specialisation_goes_through_triton(stand_in_driver, second):
    compiled = _Compiled()
    kernel = FastLaunch(_Kernel(compiled))
    storage = torch.empty(256, dtype=torch.uint8)
    x = storage[:128].view(torch.float32)
    kernel[(1,)](x, 64, BLOCK=16)
    args, kwargs = {"misaligned": ((storage[4:132].view(torch.float32), 64), {"BLOCK": 16}),
                    "int class": ((x, 65), {"BLOCK": 16}),
                    "constexpr": ((x, 64), {"BLOCK": 32}),
                    "dtype": ((storage[:128].view(torch.bfloat16), 64), {"BLOCK": 16})}[second]
    kernel[(1,)](*args, **kwargs)
    assert len(kernel.fn.triton_launches) == 2 and not compiled.launches
    kernel[(1,)](*args, **kwargs)
    assert len(kernel.fn.triton_launches) == 2 and len(compiled.launches) == 1


def test_triton_path_when_asked_or_hooked(stand_in_driver, monkeypatch):
    compiled = _Compiled()
    kernel = FastLaunch(_Kernel(compiled))
    x = torch.randn(32)
    kernel[(1,)](x, 64, BLOCK=16)
    kernel[lambda meta: (1,)](x, 64, BLOCK=16)  # a callable grid
    monkeypatch.setenv("SSM_HF_TRITON_LAUNCH_CACHE", "0")
    kernel[(1,)](x, 64, BLOCK=16)
    monkeypatch.delenv("SSM_HF_TRITON_LAUNCH_CACHE")
    hook = lambda metadata: None  # noqa: E731
    if hasattr(knobs.runtime.launch_enter_hook, "add"):
        knobs.runtime.launch_enter_hook.add(hook)
        try:
            kernel[(1,)](x, 64, BLOCK=16)
        finally:
            knobs.runtime.launch_enter_hook.remove(hook)
    else:
        with monkeypatch.context() as patch:
            patch.setattr(knobs.runtime, "launch_enter_hook", hook)
            kernel[(1,)](x, 64, BLOCK=16)
    assert len(kernel.fn.triton_launches) == 4 and not compiled.launches
    kernel[(1,)](x, 64, BLOCK=16)
    assert len(compiled.launches) == 1


def test_a_launch_triton_did_not_compile_is_not_kept(stand_in_driver):
    kernel = FastLaunch(_Kernel(None))  # Triton returned no kernel (a compile hook skipped it)
    x = torch.randn(32)
    kernel[(1,)](x, 64, BLOCK=16)
    kernel[(1,)](x, 64, BLOCK=16)
    assert len(kernel.fn.triton_launches) == 2


def test_missing_or_runtime_keyword_argument_is_not_kept(stand_in_driver):
    compiled = _Compiled()
    kernel = FastLaunch(_Kernel(compiled))
    x = torch.randn(32)
    kernel[(1,)](x, 64)  # BLOCK neither given nor defaulted: Triton's own path reports it, we keep nothing
    kernel[(1,)](x, 64)
    kernel[(1,)](x, n=64, BLOCK=16)  # a runtime argument by keyword: its value must not be kept for later launches
    kernel[(1,)](x, n=64, BLOCK=16)
    assert len(kernel.fn.triton_launches) == 4 and not compiled.launches


def test_kernel_attributes_are_the_kernels(stand_in_driver):
    kernel = FastLaunch(_Kernel(_Compiled()))
    assert kernel.params is _Kernel.params and kernel.debug is None  # as a JITFunction's (arg_names, params, ...)
    with pytest.raises(AttributeError):
        kernel.no_such_attribute


def test_interpreted_kernels_are_left_as_they_are():
    def body(x):
        pass
    jitted = triton.jit(body)
    wrapped = fast_launch(jitted)
    if isinstance(jitted, triton.runtime.jit.JITFunction):
        assert isinstance(wrapped, FastLaunch) and wrapped.fn is jitted
    else:
        assert wrapped is jitted


@pytest.mark.skipif(not CUDA, reason="needs a GPU: real compiled kernels")
def test_gpu_launches_equal_tritons_path(monkeypatch):
    """The gated norm and the conv run through the cache (second launch on) and through Triton's path: equal
    outputs, for aligned inputs and then for inputs one element off 16 bytes (a different specialisation)."""
    from ssm_hf.kernels.causal_conv1d_triton import causal_conv1d_triton
    from ssm_hf.kernels.norm_triton import rms_norm_gated_triton

    torch.manual_seed(0)

    def ops(offset):
        storage = torch.randn(2 * 37 * 64 + offset, device="cuda", dtype=torch.bfloat16)
        x = storage[offset:].view(2, 37, 64)
        gate, weight = torch.randn_like(x), torch.randn(64, device="cuda", dtype=torch.bfloat16)
        conv_w, conv_b = torch.randn(64, 4, device="cuda"), torch.randn(64, device="cuda")
        return (rms_norm_gated_triton(x, gate, weight, 16, 1e-5),
                causal_conv1d_triton(x, conv_w, conv_b, None, None, "silu"))

    from ssm_hf.kernels import causal_conv1d_triton as conv_module
    from ssm_hf.kernels import norm_triton as norm_module

    assert launch.launch_cache_enabled()
    for offset in (0, 1, 0, 1):
        monkeypatch.setenv("SSM_HF_TRITON_LAUNCH_CACHE", "1")
        torch.manual_seed(offset)
        cached = ops(offset)
        monkeypatch.setenv("SSM_HF_TRITON_LAUNCH_CACHE", "0")
        torch.manual_seed(offset)
        reference = ops(offset)
        for a, b in zip(cached, reference):
            assert torch.equal(a, b)
    # both alignments were kept, and later launches took them
    for kernel in (norm_module._norm_fwd_kernel, conv_module._conv_fwd_kernel):
        assert len({key[1] for key in kernel._kernels}) >= 2, kernel


def test_cache_is_bounded(stand_in_driver, monkeypatch):
    """Constexprs are keyed by value: values that keep changing must not grow the cache without end."""
    monkeypatch.setattr(launch, "MAX_CACHED_LAUNCHES", 3)
    compiled = _Compiled()
    kernel = FastLaunch(_Kernel(compiled))
    x = torch.randn(32)
    for block in range(1, 8):
        kernel[(1,)](x, 64, BLOCK=block)
        assert len(kernel._kernels) <= 3
    kernel[(1,)](x, 64, BLOCK=7)  # the latest is still kept
    assert len(compiled.launches) == 1


@pytest.mark.parametrize("case", ["positional constexpr", "unhashable keyword", "pre-run hook", "debug", "compiling",
                                  "not nvidia"])
def test_other_cases_keep_tritons_path(stand_in_driver, monkeypatch, case):
    compiled = _Compiled()
    kernel = FastLaunch(_Kernel(compiled))
    x = torch.randn(32)
    args, kwargs = (x, 64), {"BLOCK": 16}
    if case == "positional constexpr":  # Triton keys it by value; the key here would not
        args, kwargs = (x, 64, 16), {}
    elif case == "unhashable keyword":
        kwargs = {"BLOCK": [16]}
    elif case == "pre-run hook":
        monkeypatch.setattr(kernel.fn, "pre_run_hooks", [lambda *a, **k: None], raising=False)
    elif case == "debug":
        monkeypatch.setattr(kernel.fn, "debug", True, raising=False)
    elif case == "compiling":
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    else:
        stand_in_driver.backend = "hip"
    for _ in range(3):
        kernel[(1,)](*args, **kwargs)
    assert len(kernel.fn.triton_launches) == 3 and not compiled.launches


class _Scale(torch.autograd.Function):
    """x * scale, keeping what a Function of ours keeps (saved tensors, attributes, needs_input_grad)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        ctx.scale, ctx.asked = scale, any(ctx.needs_input_grad)
        return x * scale

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def test_apply_function_calls_the_forward_alone_without_gradients(monkeypatch):
    calls = []
    original = _Scale.apply
    monkeypatch.setattr(_Scale, "apply", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(5, requires_grad=True)
    with torch.no_grad():
        y = launch.apply_function(_Scale, x, 3.0)
    assert calls == [] and y.grad_fn is None and torch.equal(y, x.detach() * 3.0)
    with torch.inference_mode():
        y = launch.apply_function(_Scale, x, 3.0)
    assert calls == [] and torch.equal(y, x.detach() * 3.0)
    y = launch.apply_function(_Scale, x, 3.0)  # gradients on: autograd's apply, and its backward
    assert calls == [1] and y.grad_fn is not None
    y.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 3.0))
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        launch.apply_function(_Scale, x, 3.0)  # under torch.compile the graph sees the Function itself
    assert calls == [1, 1]


@pytest.mark.parametrize("family", ["mamba", "mamba2"])
def test_models_without_gradients_give_the_same_logits(monkeypatch, family):
    """The ops' Functions run without `apply` under no_grad (prefill, generation): the logits equal those of a
    forward with gradients on, where every Function goes through `apply`: bit for bit in Triton's interpreter; on a
    GPU to 1e-6 (with gradients on, Mamba's scan also stores its tile states: another compiled variant)."""
    from conftest import tiny_config

    from ssm_hf import kernels

    device = "cuda" if CUDA else "cpu"
    monkeypatch.setattr(kernels, "use_triton", lambda tensor: tensor.dtype != torch.float64)
    torch.manual_seed(0)
    model = ssm_hf.AutoModelForCausalLM.from_config(tiny_config(family)).to(device).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), device=device)
    with_grad = model(ids, use_cache=False).logits
    assert with_grad.grad_fn is not None
    with torch.no_grad():
        without = model(ids, use_cache=False).logits
    if CUDA:
        assert ((without - with_grad.detach()).norm() / with_grad.norm()).item() < 1e-6
    else:
        assert torch.equal(without, with_grad.detach())


def test_on_device_of_a_cpu_tensor_switches_nothing():
    context = launch.on_device_of(torch.randn(2))
    assert isinstance(context, contextlib.nullcontext)
    with context:  # reusable: one instance serves every launch site
        with launch.on_device_of(torch.randn(3)):
            pass


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_on_device_of_switches_only_to_another_device():
    x = torch.randn(2, device="cuda")
    assert isinstance(launch.on_device_of(x), contextlib.nullcontext)
    if torch.cuda.device_count() > 1:
        other = torch.randn(2, device="cuda:1")
        with launch.on_device_of(other):
            assert torch.cuda.current_device() == 1
        assert torch.cuda.current_device() == 0
