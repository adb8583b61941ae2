"""What a training step asks of the host, per layer, on the Triton path: the PyTorch ops it dispatches (forward and
backward, counted below autograd) and the Triton launches, without running any kernel. CPU only: the Triton kernels
are replaced by counters and `kernels.use_triton` is forced on, so the wrappers' own PyTorch work is what shows.

    python bench/host_ops.py [--models mamba-130m,mamba2-130m] [--top 25]

Per layer = (ops of a 4-layer model - ops of a 2-layer model) / 2, at the preset's widths, batch 2 x 64 tokens.
Views (no kernel, little host time) are counted apart from ops that launch a kernel or allocate; the autograd
nodes the backward runs (each costs the engine host time of its own) apart from both.
"""

from __future__ import annotations

import argparse
import collections

import torch
import triton
from torch.utils._python_dispatch import TorchDispatchMode

import ssm_hf
from ssm_hf import kernels
from ssm_hf.kernels import causal_conv1d_triton, decode_triton, norm_triton, selective_scan_triton, ssd_triton

try:
    from ssm_hf.kernels import sums_triton
except ImportError:  # an ssm_hf from before the backwards' sum kernels (bench/gpu_ab.py's base)
    sums_triton = None

try:
    from ssm_hf.kernels.launch import FastLaunch
except ImportError:  # an ssm_hf from before FastLaunch (bench/gpu_ab.py's base)
    FastLaunch = triton.runtime.jit.JITFunction

VIEWS = {"view", "_unsafe_view", "split", "split_with_sizes", "unflatten", "as_strided", "t", "transpose", "permute",
         "expand", "slice", "select", "squeeze", "unsqueeze", "alias", "detach", "_reshape_alias", "unbind",
         "reshape", "flatten", "view_as", "narrow", "diagonal", "chunk", "_to_copy_noop"}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


class _Launches:
    """Stands in for every `@triton.jit` kernel: counts `kernel[grid](...)` calls by name."""

    def __init__(self):
        self.calls = collections.Counter()
        self.saved = []

    def __enter__(self):
        for module in (causal_conv1d_triton, decode_triton, norm_triton, selective_scan_triton, ssd_triton,
                       *([sums_triton] if sums_triton is not None else [])):
            for name, value in vars(module).items():
                if isinstance(value, (triton.runtime.jit.JITFunction, FastLaunch)) and name.endswith("kernel"):
                    self.saved.append((module, name, value))
                    setattr(module, name, _Stub(self.calls, name))
        return self

    def __exit__(self, *exc):
        for module, name, value in self.saved:
            setattr(module, name, value)


class _Stub:
    def __init__(self, calls, name):
        self.calls, self.name = calls, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls[self.name] += 1
        return launch


def _graph_nodes(loss: torch.Tensor) -> collections.Counter:
    """The autograd nodes (by type) the backward of `loss` runs."""
    seen, stack, nodes = set(), [loss.grad_fn], collections.Counter()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes[type(node).__name__] += 1
        stack.extend(fn for fn, _ in node.next_functions)
    return nodes


def count(preset: str, layers: int) -> tuple[collections.Counter, collections.Counter, collections.Counter]:
    config = ssm_hf.preset_config(preset, num_hidden_layers=layers)
    model = ssm_hf.AutoModelForCausalLM.from_config(config).to(torch.bfloat16).train()
    ids = torch.randint(0, config.vocab_size, (2, 64))
    with _Launches() as launches:
        model(ids, labels=ids, use_cache=False).loss.backward()  # warm (lazy imports, caches)
        launches.calls.clear()
        model.zero_grad(set_to_none=True)
        with _Counter() as mode:
            loss = model(ids, labels=ids, use_cache=False).loss
            nodes = _graph_nodes(loss)
            loss.backward()
    return mode.ops, launches.calls, nodes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="mamba-130m,mamba2-130m")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    kernels.use_triton = lambda tensor: tensor.dtype != torch.float64
    for preset in args.models.split(","):
        (ops4, calls4, nodes4), (ops2, calls2, nodes2) = count(preset, 4), count(preset, 2)
        nodes = {k: (nodes4[k] - nodes2[k]) / 2 for k in nodes4 | nodes2 if nodes4[k] != nodes2[k]}
        per_layer = {k: (ops4[k] - ops2[k]) / 2 for k in ops4 | ops2 if ops4[k] != ops2[k]}
        launches = {k: (calls4[k] - calls2[k]) / 2 for k in calls4 | calls2 if calls4[k] != calls2[k]}
        views = sum(v for k, v in per_layer.items() if k in VIEWS)
        work = {k: v for k, v in per_layer.items() if k not in VIEWS}
        print(f"{preset}: per layer, forward + backward: {sum(work.values()):.0f} PyTorch ops that launch a kernel "
              f"or allocate, {views:.0f} views, {sum(launches.values()):.0f} Triton launches, "
              f"{sum(nodes.values()):.0f} autograd nodes")
        for name, n in sorted(work.items(), key=lambda kv: -kv[1])[:args.top]:
            print(f"  {n:5.1f}  aten::{name}")
        for name, n in sorted(launches.items(), key=lambda kv: -kv[1]):
            print(f"  {n:5.1f}  triton {name}")
        print("  autograd nodes: " + ", ".join(f"{name} {n:.0f}" for name, n in sorted(nodes.items())))


if __name__ == "__main__":
    main()
