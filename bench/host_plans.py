"""CPU: the host time of the planned forwards (`kernels.plans.Planned`) as Python and as replays, with every
Triton launcher a stand-in that returns at once (so only our Python and PyTorch's allocations and views count).
Compare within a run (the CPU machines' speed drifts).

    python bench/host_plans.py [--calls 3000]

Prints, per op at mamba2-130m's widths (batch 2 x 64 tokens, bf16): us per call of its launches' Python run as is
(FastLaunch's cache hit included) and replayed from its plan, and whether the replayed launches got the recorded
ones' arguments: the same values and input addresses, and new tensors at the same offsets from each other.
"""

from __future__ import annotations

import argparse
import os
import timeit
from types import SimpleNamespace

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions (FastLaunch), launched through the stand-ins below

import torch  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

import ssm_hf  # noqa: E402
from ssm_hf.kernels import causal_conv1d_triton, conv_ssd_norm_triton, norm_triton, plans, ssd_triton  # noqa: E402
from ssm_hf.kernels.launch import FastLaunch  # noqa: E402


class _Driver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return 0

    def get_current_target(self):
        return SimpleNamespace(backend="cuda")


class _Compiled:
    function, packed_metadata = "function", "metadata"

    def __init__(self, name: str, launched: list):
        self.run = lambda *args: launched.append((name, args[9:]))


class _Jit:
    """Stands in for a kernel's JITFunction: Triton's path "compiles" a stand-in that records its launches."""

    def __init__(self, name: str, params, launched: list):
        self.name, self.params, self.launched = name, params, launched
        self.debug, self.pre_run_hooks = None, []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.launched.append((self.name, args))
            return _Compiled(self.name, self.launched)
        return run


def _agree(recorded: list, replayed: list, inputs: tuple) -> bool:
    """Whether the replayed launches repeat the recorded ones: the same kernels and non-pointer arguments, the same
    addresses where the recorded tensor lies in an input, and, for new tensors, one shift per storage (a tensor's
    offsets within its allocation kept)."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs if t is not None}
    shifts: dict = {}
    if [name for name, _ in recorded] != [name for name, _ in replayed]:
        return False
    for (_, before), (_, after) in zip(recorded, replayed):
        for a, b in zip(before, after):
            if not isinstance(a, torch.Tensor):
                if a != b:
                    return False
                continue
            storage = a.untyped_storage().data_ptr()
            if storage in input_storages:
                if b != a.data_ptr():
                    return False
            elif shifts.setdefault(storage, b - a.data_ptr()) != b - a.data_ptr():
                return False
    return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    driver._active = _Driver()
    plans._on_current_gpu = lambda t: True  # the plans' GPU-only gate, opened for CPU tensors
    launched: list = []
    for module in (ssd_triton, causal_conv1d_triton, norm_triton):
        for name, value in vars(module).items():
            if isinstance(value, FastLaunch):
                value.fn = _Jit(name, value.fn.params, launched)

    config = ssm_hf.preset_config("mamba2-130m", num_hidden_layers=1, vocab_size=512)
    mixer = ssm_hf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).backbone.layers[0].mixer
    zxbcdt = torch.randn(2, 64, mixer.layout.width, dtype=torch.bfloat16)
    fused = ((zxbcdt, mixer.conv1d.weight, mixer.conv1d.bias, mixer.dt_bias, mixer.A_log, mixer.D, mixer.norm.weight,
              None), (mixer.layout, "silu", mixer.time_step_limit, mixer.norm.group_size, mixer.norm.variance_epsilon))
    stream = torch.randn(2, 64, config.hidden_size)
    add_norm = ((stream, None, torch.randn(config.hidden_size, dtype=torch.bfloat16)),
                (1e-5, torch.float32, True, False))
    with torch.no_grad():
        for name, planned, (tensors, extras) in (("conv + SSD + norm (5 launches)", conv_ssd_norm_triton._FORWARD,
                                                  fused),
                                                 ("add + norm (1 launch)", norm_triton._ADD_NORM_FORWARD, add_norm)):
            planned(tensors, extras)  # a first sight: run as it is (through Triton's path: the stand-in)
            launched.clear()
            planned(tensors, extras)  # recorded
            planned(tensors, extras)  # replayed
            half = len(launched) // 2
            same = _agree(launched[:half], launched[half:], tensors)
            times = []
            for fn in (lambda: planned.fn(*tensors, *extras), lambda: planned(tensors, extras)):
                fn()
                times.append(min(timeit.repeat(fn, number=args.calls, repeat=3)) / args.calls * 1e6)
                launched.clear()
            print(f"{name}: {times[0]:.1f} us per call as Python, {times[1]:.1f} us replayed; recorded and replayed "
                  f"launches agree where they must: {same}")


if __name__ == "__main__":
    main()
