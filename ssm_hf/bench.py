"""`ssm-hf bench`: how speed and memory grow with context length, measured on this machine.

For each model (zoo presets at random init, local checkpoint folders, and optionally a Llama baseline of about
the same size) and each context length, one *point* measures

- prefill tokens/s: one forward over the prompt with `use_cache=True` (logits of the last position only), median
  of `repeats` runs after `warmup` runs, timed between device synchronisations;
- decode tokens/s: single-token forward calls from the cache left by the prompt (greedy feedback, the model's own
  forward in a loop rather than `generate()`, so that the step itself is timed), after two warm-up steps;
- peak memory: on CUDA `torch.cuda.max_memory_allocated` over the point (reset at its start; weights,
  activations and cache); on Linux CPUs the weights' bytes plus how far the process's peak resident set size
  (VmHWM, reset through /proc/self/clear_refs at the point's start) rose above its resident size then;
- cache bytes: the bytes of the tensors the cache holds after the prompt (an SSM's state is flat in the length,
  a KV cache grows with it).

Points run in ascending length per model. A point that does not fit is recorded as skipped with the reason and
the sweep goes on: out of memory, an estimated peak above the memory available (or `max_memory_gb`), or an
estimated time above the per-point budget; longer points of that model are then skipped too. Results go to
`bench.csv` (rewritten after each point), `meta.json` (device, versions, command, the baseline's config),
`table.md`, and PNG plots (matplotlib, imported only when plotting).
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import ctypes.util
import datetime
import gc
import inspect
import json
import math
import os
import platform
import re
import statistics
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, PreTrainedConfig

from . import __version__
from .configs import list_presets, preset_config
from .models.cache_names import CACHE_NAME, output_cache
from .zoo import format_count, parameter_count

COLUMNS = (
    "model", "model_type", "params", "device", "dtype", "batch_size", "context_length", "status",
    "prefill_tokens_per_s", "decode_tokens_per_s", "peak_memory_bytes", "weights_bytes", "cache_bytes",
    "decode_tokens", "repeats", "memory_measure", "reason",
)
BASELINES = ("llama", "none")
DECODE_WARMUP_STEPS = 2
# hidden width of the Llama baseline by parameter count, as in the Mamba / GPT-3 size ladder
_LLAMA_WIDTHS = ((250e6, 768), (600e6, 1024), (1.1e9, 1536), (2e9, 2048), (math.inf, 2560))


# ---------------------------------------------------------------------------------------------------------------
# parsing


def parse_lengths(text: str) -> list[int]:
    """'1k,4k,16k,64k' or '16,64' -> sorted distinct token counts (k = 1024)."""
    lengths = []
    for item in text.split(","):
        item = item.strip()
        match = re.fullmatch(r"(\d+)([kK]?)", item)
        if not match or int(match.group(1)) == 0:
            raise ValueError(f"bad context length {item!r}: use positive integers, optionally with k (= 1024), "
                             f"e.g. 1k,4k,16k or 128,512")
        lengths.append(int(match.group(1)) * (1024 if match.group(2) else 1))
    return sorted(set(lengths))


def parse_count(text: str) -> int:
    """'130m' -> 130_000_000, '1.3b' -> 1_300_000_000, '500k', or a plain integer."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kKmMbB]?)\s*", text)
    if not match:
        raise ValueError(f"bad parameter count {text!r}: use e.g. 130m, 1.3b, 500k or a plain integer")
    scale = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9}[match.group(2).lower()]
    return int(round(float(match.group(1)) * scale))


def format_length(n: int) -> str:
    """4096 -> '4k', 1000 -> '1000'."""
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def format_rate(n: float) -> str:
    """Tokens/s for axis labels: 1500 -> '1.5k'."""
    for unit, size in (("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.3g}"


def format_bytes(n: float) -> str:
    """Decimal units, as on the plots' decade ticks: 1.5e9 -> '1.5 GB'."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n:.3g} B"


# ---------------------------------------------------------------------------------------------------------------
# models


@dataclass
class ModelSpec:
    """One model of the sweep: a zoo preset or the baseline (`config`, random init) or a local folder (`path`)."""

    label: str
    config: PreTrainedConfig
    path: Path | None = None
    attn_implementation: str | None = None

    def build(self, device: torch.device, dtype: torch.dtype) -> nn.Module:
        if self.path is not None:
            model = AutoModelForCausalLM.from_pretrained(self.path, dtype=dtype)
            return model.to(device).eval()
        extra = {"attn_implementation": self.attn_implementation} if self.attn_implementation else {}
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype, **extra)
        return model.eval()


def resolve_models(names: list[str]) -> list[ModelSpec]:
    """Zoo preset names or local checkpoint folders (with a config.json) -> specs; raises a ValueError naming an
    unknown one and listing the presets. (Importing this module imported `ssm_hf`, which registered our
    architectures with the Auto classes, so our checkpoints load like transformers' own.)"""
    presets = list_presets()
    specs = []
    for name in names:
        folder = Path(name).expanduser()
        if name in presets:
            specs.append(ModelSpec(name, preset_config(name)))
        elif (folder / "config.json").is_file():
            specs.append(ModelSpec(folder.resolve().name, AutoConfig.from_pretrained(folder), path=folder))
        elif folder.exists():
            raise ValueError(f"{name!r} is a path but has no config.json: not a checkpoint folder")
        else:
            raise ValueError(f"unknown model {name!r}: not a zoo preset nor a checkpoint folder; available presets: "
                             f"{', '.join(presets)}")
    labels = [spec.label for spec in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"models given twice: {sorted({x for x in labels if labels.count(x) > 1})}")
    return specs


def llama_baseline_config(target_params: int, vocab_size: int, hidden_size: int | None = None,
                          tie_word_embeddings: bool = True, max_position_embeddings: int = 4096) -> LlamaConfig:
    """A transformers `LlamaConfig` with about `target_params` parameters.

    Width `hidden_size` (default: by size, 768 up to 250M, then 1024, 1536, 2048, 2560 as in the Mamba / GPT-3
    ladder), multi-head attention with heads of 64 (fewer and wider heads below 128), an MLP of 4 x hidden
    (SwiGLU), RMSNorm, RoPE; the number of layers is the one that comes closest to `target_params` (at least 1).
    """
    if hidden_size is None:
        hidden_size = next(width for limit, width in _LLAMA_WIDTHS if target_params < limit)
    heads = max(1, hidden_size // 64)
    while hidden_size % heads:
        heads -= 1
    fields = dict(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=4 * hidden_size,
                  num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_position_embeddings,
                  tie_word_embeddings=tie_word_embeddings, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    one, two = (parameter_count(LlamaConfig(num_hidden_layers=n, **fields)) for n in (1, 2))
    per_layer, rest = two - one, 2 * one - two
    layers = max(1, round((target_params - rest) / per_layer))
    return LlamaConfig(num_hidden_layers=layers, **fields)


def baseline_spec(kind: str, first: ModelSpec | None, size: int | None, max_length: int) -> ModelSpec | None:
    """The baseline model (`llama` or `none`), sized like `first` unless `size` (parameters) is given."""
    if kind == "none":
        return None
    if kind != "llama":
        raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(BASELINES)}")
    config = first.config if first is not None else None
    vocab = getattr(config, "vocab_size", None) or 50280
    tie = bool(getattr(config, "tie_word_embeddings", True)) if config is not None else True
    if size is None and config is None:
        raise ValueError("the llama baseline needs --baseline-size when no model is given")
    hidden = None if size is not None else getattr(config, "hidden_size", None)
    target = size if size is not None else parameter_count(config)
    llama = llama_baseline_config(target, vocab, hidden, tie, max_position_embeddings=max_length)
    return ModelSpec(f"llama-{format_count(parameter_count(llama)).lower()}", llama, attn_implementation="sdpa")


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers); tied weights counted once."""
    params = list(model.parameters())
    tensors = {t.data_ptr(): t for t in [*params, *model.buffers()]}
    return sum(p.numel() for p in params), sum(t.numel() * t.element_size() for t in tensors.values())


def cache_nbytes(cache) -> int:
    """Bytes of the distinct tensor storages a cache holds (walks its layers' attributes, dicts and lists)."""
    seen: set[tuple[str, int]] = set()
    total = 0

    def visit(obj, hops: int) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            key = (str(obj.device), storage.data_ptr())
            if obj.numel() and key not in seen:
                seen.add(key)
                total += storage.nbytes()
        elif isinstance(obj, dict):
            for value in obj.values():
                visit(value, hops)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                visit(value, hops)
        elif hops < 3 and hasattr(obj, "__dict__") and not isinstance(obj, (type, torch.device, torch.dtype)):
            for value in vars(obj).values():
                visit(value, hops + 1)

    visit(cache, 0)
    return total


def returned_cache(output):
    """The cache a causal LM returned (under the installed transformers' name, `cache_names`)."""
    cache = output_cache(output)
    if cache is None:
        raise ValueError("the model returned no cache with use_cache=True")
    return cache


# ---------------------------------------------------------------------------------------------------------------
# measurement


class PointSkipped(Exception):
    """A point that does not fit (memory or time); its message is the reason recorded."""


class PeakMemory:
    """Peak memory of one point; see the module docstring for what each device measures."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base = 0
        if device.type == "cuda":
            self.measure = "torch.cuda.max_memory_allocated over the point (weights + activations + cache)"
        elif device.type == "cpu" and _reset_peak_rss():
            self.measure = "weights + rise of the process's peak RSS (VmHWM) over its RSS at the point's start"
        else:
            self.measure = "not measured on this platform"

    @property
    def available(self) -> bool:
        return not self.measure.startswith("not")

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.available:
            _release_free_heap()
            _reset_peak_rss()
            self.base = _proc_status_bytes("VmRSS")

    def peak(self, weights_bytes: int) -> int | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.available:
            return weights_bytes + max(0, _proc_status_bytes("VmHWM") - self.base)
        return None


def _proc_status_bytes(key: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{key}:\s+(\d+) kB", text, flags=re.M).group(1)) * 1024


def _reset_peak_rss() -> bool:
    """Reset the process's peak RSS to its current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc's malloc_trim), so that the RSS a point starts from holds live
    memory only and the next point's rise is its own."""
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass


def available_ram() -> int | None:
    """Bytes of RAM the next point may still take: MemAvailable, or less where a cgroup (v2) memory limit leaves
    less (Linux); None where unknown."""
    free = None
    try:
        text = Path("/proc/meminfo").read_text()
        free = int(re.search(r"^MemAvailable:\s+(\d+) kB", text, flags=re.M).group(1)) * 1024
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    except (OSError, AttributeError, ValueError):
        pass
    return free


def extrapolate(history: list[tuple[int, float]], length: int) -> float | None:
    """Value at `length` from measured (length, value) pairs in ascending length: a power law through the last two
    (exponent clipped to [1, 2]: from linear to quadratic), or proportional to the length from one."""
    if not history:
        return None
    l2, v2 = history[-1]
    exponent = 1.0
    if len(history) > 1:
        l1, v1 = history[-2]
        if v1 > 0 and v2 > 0 and l2 > l1:
            exponent = min(2.0, max(1.0, math.log(v2 / v1) / math.log(l2 / l1)))
    return v2 * (length / l2) ** exponent


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return time.perf_counter() - start, result


def _is_out_of_memory(err: BaseException) -> bool:
    if isinstance(err, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(err, RuntimeError) and ("out of memory" in str(err) or "can't allocate memory" in str(err))


@dataclass
class Budget:
    """Limits a point must fit in: memory (bytes; None = what the device has free) and time (seconds)."""

    max_memory: int | None = None
    time_budget: float | None = None


@dataclass
class ModelHistory:
    """Measured points of one model so far, for estimating the next (length, value) pairs."""

    working_memory: list[tuple[int, float]] = field(default_factory=list)
    point_seconds: list[tuple[int, float]] = field(default_factory=list)
    stopped: str | None = None  # reason that also rules out longer points


def measure_point(model: nn.Module, length: int, batch_size: int, decode_tokens: int, repeats: int, warmup: int,
                  device: torch.device, weights_bytes: int, memory: PeakMemory, budget: Budget,
                  history: ModelHistory, generator: torch.Generator) -> dict:
    """Prefill and decode one prompt of `length` tokens (batch `batch_size`); returns the measured columns.
    Raises PointSkipped when the point does not fit the budget."""
    runs = warmup + repeats
    # memory: the limit asked for, and on CPU the RAM still free (the weights are already in);
    # on CUDA an out-of-memory error skips the point instead
    limits = [] if budget.max_memory is None else [(budget.max_memory, "the limit asked for")]
    free = available_ram() if device.type == "cpu" else None
    if free is not None:
        limits.append((free + weights_bytes, "the RAM available"))
    estimate = weights_bytes + (extrapolate(history.working_memory, length) or 0)
    for limit, what in limits:
        if estimate > limit:
            raise PointSkipped(f"estimated peak memory {format_bytes(estimate)} is above {what}, "
                               f"{format_bytes(limit)}")
    seconds = extrapolate(history.point_seconds, length)
    if budget.time_budget is not None and seconds is not None and seconds > budget.time_budget:
        raise PointSkipped(f"estimated time {seconds:.0f}s is over the {budget.time_budget:g}s budget per point")

    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (batch_size, length), generator=generator).to(device)
    extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    started = time.perf_counter()
    memory.start()
    times, output = [], None
    with torch.no_grad():
        for run in range(runs):
            output = None  # let the previous run's cache go before the next prefill
            seconds, output = _timed(lambda: model(ids, use_cache=True, **extra), device)
            times.append(seconds)
            if run == 0 and budget.time_budget is not None and seconds * runs > budget.time_budget:
                raise PointSkipped(f"a prefill of {format_length(length)} tokens took {seconds:.1f}s: {runs} of "
                                   f"them are over the {budget.time_budget:g}s budget per point")
        prefill = statistics.median(times[warmup:])
        cache = returned_cache(output)
        cache_bytes = cache_nbytes(cache)
        token = output.logits[:, -1:].argmax(-1)

        def steps(count: int) -> torch.Tensor:
            nonlocal output, token
            for _ in range(count):
                output = model(token, use_cache=True, **{CACHE_NAME: cache})
                token = output.logits[:, -1:].argmax(-1)
            return token

        steps(DECODE_WARMUP_STEPS)
        decode = statistics.median(_timed(lambda: steps(decode_tokens), device)[0] for _ in range(repeats))
        peak = memory.peak(weights_bytes)
    output = cache = token = None
    elapsed = time.perf_counter() - started
    if peak is not None:
        history.working_memory.append((length, max(0, peak - weights_bytes)))
    history.point_seconds.append((length, elapsed))
    return {"prefill_tokens_per_s": batch_size * length / prefill,
            "decode_tokens_per_s": batch_size * decode_tokens / decode,
            "peak_memory_bytes": peak, "cache_bytes": cache_bytes}


# ---------------------------------------------------------------------------------------------------------------
# the sweep


@dataclass
class BenchOptions:
    """What `ssm-hf bench` runs; the fields mirror its command-line options."""

    models: list[str]
    lengths: list[int]
    baseline: str = "llama"
    baseline_size: int | None = None
    batch_size: int = 1
    decode_tokens: int = 32
    dtype: str | None = None
    device: str = "auto"
    out: Path = Path("bench-out")
    repeats: int = 3
    warmup: int = 1
    time_budget: float | None = 600.0
    max_memory_gb: float | None = None
    seed: int = 0
    threads: int | None = None
    plots: bool = True
    progress: bool = True


_DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
           "half": torch.float16, "float32": torch.float32, "fp32": torch.float32, "float": torch.float32}


def resolve_device_and_dtype(device: str, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """'auto' -> CUDA when available, else CPU; default dtype bfloat16 on CUDA, float32 elsewhere."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but torch sees no CUDA device")
    if dtype is None:
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}")
    return dev, _DTYPES[dtype]


def device_description(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' or 'AMD EPYC (2 cores, 2 threads)' (threads: torch's)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M)
        name = match.group(1).strip() if match else name
    except OSError:
        pass
    threads = torch.get_num_threads()
    return f"{name} ({os.cpu_count()} cores, {threads} thread{'s' if threads > 1 else ''})"


def command_line(options: BenchOptions) -> str:
    """The `ssm-hf bench` command that runs `options` (recorded in meta.json)."""
    parts = ["ssm-hf bench", f"--models {','.join(options.models)}" if options.models else "",
             f"--baseline {options.baseline}",
             f"--baseline-size {options.baseline_size}" if options.baseline_size else "",
             f"--lengths {','.join(format_length(n) for n in options.lengths)}",
             f"--batch-size {options.batch_size}", f"--decode-tokens {options.decode_tokens}",
             f"--dtype {options.dtype}" if options.dtype else "", f"--device {options.device}",
             f"--repeats {options.repeats}", f"--warmup {options.warmup}",
             f"--time-budget {options.time_budget:g}" if options.time_budget is not None else "",
             f"--max-memory-gb {options.max_memory_gb:g}" if options.max_memory_gb is not None else "",
             f"--threads {options.threads}" if options.threads else "", f"--seed {options.seed}",
             f"--out {options.out}"]
    return " ".join(part for part in parts if part)


def run_bench(options: BenchOptions) -> list[dict]:
    """Run the sweep, write bench.csv / meta.json / table.md (and the plots) under `options.out`; returns the rows
    (one per model and length, in CSV column order)."""
    if not options.lengths:
        raise ValueError("no context lengths given")
    for name in ("batch_size", "decode_tokens", "repeats"):
        if getattr(options, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(options, name)}")
    if options.warmup < 0:
        raise ValueError(f"warmup must be 0 or more, got {options.warmup}")
    if options.plots:
        _import_matplotlib()  # fail before the sweep, not after it
    if options.threads is not None and options.threads < 1:
        raise ValueError(f"threads must be at least 1, got {options.threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(options.threads or previous_threads)
    try:
        return _run_bench(options)
    finally:
        torch.set_num_threads(previous_threads)


def _run_bench(options: BenchOptions) -> list[dict]:
    from tqdm import tqdm

    device, dtype = resolve_device_and_dtype(options.device, options.dtype)
    specs = resolve_models(options.models)
    max_length = max(options.lengths) + DECODE_WARMUP_STEPS + options.repeats * options.decode_tokens + 8
    baseline = baseline_spec(options.baseline, specs[0] if specs else None, options.baseline_size, max_length)
    if baseline is not None:
        specs.append(baseline)
    if not specs:
        raise ValueError("no models to measure: give --models and/or a --baseline")
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    memory = PeakMemory(device)
    budget = Budget(None if options.max_memory_gb is None else int(options.max_memory_gb * 1e9), options.time_budget)
    meta = {
        "date": datetime.date.today().isoformat(), "command": command_line(options), "device": str(device),
        "device_name": device_description(device), "dtype": str(dtype).removeprefix("torch."),
        "batch_size": options.batch_size, "decode_tokens": options.decode_tokens, "repeats": options.repeats,
        "warmup": options.warmup, "memory_measure": memory.measure, "versions": _versions(),
        "models": {}, "baseline_config": baseline.config.to_diff_dict() if baseline else None,
    }
    def write_meta() -> None:
        (out / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")

    write_meta()  # now, so that a sweep cut short still says what it measured; again at the end with the models
    rows: list[dict] = []
    generator = torch.Generator().manual_seed(options.seed)
    bar = tqdm(total=len(specs) * len(options.lengths), desc="bench", unit="point", disable=not options.progress)
    # Objects alive now (modules, transformers' registries) are left out of the collections between points, which
    # would otherwise walk all of them each time (a third of a second here).
    gc.collect()
    gc.freeze()
    try:
        for spec in specs:
            _sweep_model(spec, options, device, dtype, memory, budget, generator, meta, rows, out, bar)
    finally:
        gc.unfreeze()
        bar.close()
        write_meta()
    (out / "table.md").write_text(markdown_table(rows), encoding="utf-8")
    if options.plots:
        plot_results(rows, out, meta)
    return rows


def _sweep_model(spec: ModelSpec, options: BenchOptions, device: torch.device, dtype: torch.dtype,
                 memory: PeakMemory, budget: Budget, generator: torch.Generator, meta: dict, rows: list[dict],
                 out: Path, bar) -> None:
    """Build one model and measure it at every length; appends to `rows` and rewrites bench.csv after each point."""
    common = {"model": spec.label, "device": str(device), "dtype": meta["dtype"], "batch_size": options.batch_size,
              "decode_tokens": options.decode_tokens, "repeats": options.repeats, "memory_measure": memory.measure}
    model, history, weights_bytes = None, ModelHistory(), 0
    try:
        torch.manual_seed(options.seed)
        model = spec.build(device, dtype)
        params, weights_bytes = count_parameters(model)
        common.update(model_type=model.config.model_type, params=params, weights_bytes=weights_bytes)
        meta["models"][spec.label] = {"model_type": model.config.model_type, "params": params,
                                      "source": str(spec.path) if spec.path else "random init"}
        _touch(model, device)
    except Exception as err:  # a model that cannot be built fails its points, the others still run
        model = None
        history.stopped = f"the model could not be built: {_short(err)}"
        _release(device)
    for length in options.lengths:
        bar.set_postfix_str(f"{spec.label} @ {format_length(length)}")
        row = {**common, "context_length": length}
        if history.stopped is not None:
            row.update(status="failed" if model is None else "skipped", reason=history.stopped)
        else:
            try:
                row.update(measure_point(model, length, options.batch_size, options.decode_tokens, options.repeats,
                                         options.warmup, device, weights_bytes, memory, budget, history, generator),
                           status="ok", reason="")
            except PointSkipped as err:
                row.update(status="skipped", reason=str(err))
                history.stopped = f"longer than {format_length(length)}, which was skipped"
            except Exception as err:
                if _is_out_of_memory(err):
                    row.update(status="skipped", reason=f"out of memory: {_short(err)}")
                    history.stopped = f"longer than {format_length(length)}, which ran out of memory"
                else:
                    row.update(status="failed", reason=_short(err))
                _release(device)
        if row["status"] != "ok":
            bar.write(f"{row['status']}: {spec.label} at {format_length(length)} tokens: {row['reason']}")
        rows.append({column: row.get(column) for column in COLUMNS})
        write_csv(rows, out / "bench.csv")
        bar.update(1)
    model = None
    _release(device)


def _touch(model: nn.Module, device: torch.device) -> None:
    """A short forward after building: first-use costs (lazy init, kernel compilation, weight pages) stay out of
    the first point."""
    ids = torch.zeros(1, 8, dtype=torch.long, device=device)
    with torch.no_grad():
        model(ids, use_cache=True)
    _sync(device)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _short(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:300]


def _versions() -> dict:
    import transformers

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__, "ssm_hf": __version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return versions


# ---------------------------------------------------------------------------------------------------------------
# output


def write_csv(rows: list[dict], path: Path) -> None:
    """One row per (model, length); empty cells where a point was not measured."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})


def markdown_table(rows: list[dict]) -> str:
    """The rows as a Markdown table (rates rounded, bytes in decimal units)."""
    lines = ["| model | params | context | prefill tokens/s | decode tokens/s | peak memory | cache / state |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        cells = [row["model"], format_count(row["params"]) if row.get("params") else "",
                 format_length(row["context_length"])]
        if row["status"] == "ok":
            cells += [f"{row['prefill_tokens_per_s']:,.0f}", f"{row['decode_tokens_per_s']:,.1f}",
                      format_bytes(row["peak_memory_bytes"]) if row["peak_memory_bytes"] is not None else "",
                      format_bytes(row["cache_bytes"])]
        else:
            cells += [f"{row['status']}: {row['reason']}", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _import_matplotlib() -> None:
    try:
        import matplotlib.figure  # noqa: F401
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install 'ssm-hf[bench]' (or pass --no-plots)") from err


def plot_results(rows: list[dict], out: Path, meta: dict) -> list[Path]:
    """memory.png (peak memory, and cache/state bytes), decode.png and prefill.png (tokens/s) against context
    length, log-log, one line per model; the title names the device, dtype, batch and date."""
    _import_matplotlib()
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter, NullLocator

    models = list(dict.fromkeys(row["model"] for row in rows))
    lengths = sorted({row["context_length"] for row in rows})
    subtitle = f"{meta['device_name']}, {meta['dtype']}, batch {meta['batch_size']}, {meta['date']}"
    skipped = []  # per model, the first point not measured (longer ones follow from it)
    for name in models:
        missing = [row for row in rows if row["model"] == name and row["status"] != "ok"]
        if missing:
            first = missing[0]
            skipped.append(f"{name} from {format_length(first['context_length'])} ({first['status']}: "
                           f"{first['reason']})" if len(missing) > 1 else
                           f"{name} at {format_length(first['context_length'])} ({first['status']}: {first['reason']})")

    def draw(ax, key: str, ylabel: str, bytes_axis: bool) -> None:
        values = []
        for index, name in enumerate(models):
            points = [(row["context_length"], row[key]) for row in rows
                      if row["model"] == name and row["status"] == "ok" and row[key]]
            if points:
                xs, ys = zip(*points)
                values += ys
                ax.plot(xs, ys, marker="o", color=f"C{index}", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_locator(FixedLocator(lengths))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_length(int(round(x)))))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlim(lengths[0] / 1.25, lengths[-1] * 1.25)  # every length asked for, measured or not
        if values:  # whole decades, so that the labelled ticks are powers of ten and a flat line looks flat
            ax.set_ylim(10 ** math.floor(math.log10(min(values))), 10 ** math.ceil(math.log10(max(values)) + 1e-9))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: format_bytes(y) if bytes_axis else format_rate(y)))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
        if values:
            ax.legend(fontsize=8)

    def save(fig, name: str) -> Path:
        lines = textwrap.wrap("not measured: " + "; ".join(skipped), width=int(fig.get_figwidth() * 19)) \
            if skipped else []
        if lines:
            lines = lines[:4] + (["... (the reasons are in bench.csv)"] if len(lines) > 4 else [])
            fig.text(0.01, 0.01, "\n".join(lines), fontsize=6.5, color="0.35", va="bottom")
        fig.tight_layout(rect=(0, 0.025 * len(lines) * 4.6 / fig.get_figheight(), 1, 1))
        path = out / name
        fig.savefig(path, dpi=100)
        return path

    paths = []
    fig = Figure(figsize=(11, 4.6))
    left, right = fig.subplots(1, 2)
    draw(left, "peak_memory_bytes", "peak memory (lower is better)", True)
    left.set_title("peak memory (weights + activations + cache)", fontsize=10)
    draw(right, "cache_bytes", "cache / state bytes after the prompt", True)
    right.set_title("cache: SSM state vs KV cache", fontsize=10)
    fig.suptitle(f"Memory vs context length: {subtitle}", fontsize=11)
    paths.append(save(fig, "memory.png"))
    for key, name, what in (("decode_tokens_per_s", "decode.png", "decode"),
                            ("prefill_tokens_per_s", "prefill.png", "prefill")):
        fig = Figure(figsize=(7, 4.6))
        ax = fig.subplots()
        draw(ax, key, f"{what} tokens/s (higher is better)", False)
        fig.suptitle(f"{what.capitalize()} speed vs context length\n{subtitle}", fontsize=10)
        paths.append(save(fig, name))
    return paths


# ---------------------------------------------------------------------------------------------------------------
# command line


def _option(parse):
    """argparse shows an ArgumentTypeError's own message (it replaces a ValueError's with a generic one)."""
    def parse_option(text: str):
        try:
            return parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err

    parse_option.__name__ = parse.__name__
    return parse_option


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `ssm-hf bench`."""
    parser.add_argument("--models", default="mamba-130m,mamba2-130m,hybrid-130m",
                        help="comma list of zoo presets (`ssm-hf zoo`) or local checkpoint folders")
    parser.add_argument("--baseline", default="llama", choices=BASELINES,
                        help="a transformers LlamaForCausalLM at random init (SDPA) of about the first model's size")
    parser.add_argument("--baseline-size", type=_option(parse_count), default=None,
                        help="the baseline's parameter count instead, e.g. 130m or 1.3b")
    parser.add_argument("--lengths", type=_option(parse_lengths), default=parse_lengths("1k,4k,16k,64k"),
                        help="context lengths, e.g. 1k,4k,16k,64k (k = 1024) or plain integers")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--decode-tokens", type=int, default=32, help="decode steps timed per repeat")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", type=Path, default=Path("bench-out"), help="folder for bench.csv and the PNGs")
    parser.add_argument("--repeats", type=int, default=3, help="timed prefills / decode runs per point (median)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed prefills per point before the timed ones")
    parser.add_argument("--time-budget", type=float, default=600.0,
                        help="seconds per point; a point estimated (or found) to take longer is skipped; 0: no limit")
    parser.add_argument("--max-memory-gb", type=float, default=None,
                        help="skip points whose estimated peak memory is above this (on CPU the free RAM is one too)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--no-plots", dest="plots", action="store_false", help="write the CSV only")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run_from_args(args: argparse.Namespace) -> int:
    """`ssm-hf bench`: 0 when every point ran or was skipped, 1 when a point failed, 2 on bad options."""
    options = BenchOptions(
        models=[name.strip() for name in args.models.split(",") if name.strip()], lengths=args.lengths,
        baseline=args.baseline, baseline_size=args.baseline_size, batch_size=args.batch_size,
        decode_tokens=args.decode_tokens, dtype=args.dtype, device=args.device, out=args.out, repeats=args.repeats,
        warmup=args.warmup, time_budget=args.time_budget or None, max_memory_gb=args.max_memory_gb, seed=args.seed,
        threads=args.threads, plots=args.plots, progress=args.progress)
    try:
        rows = run_bench(options)
    except (ValueError, ImportError) as err:
        print(f"ssm-hf bench: {err}", file=sys.stderr)
        return 2
    print(markdown_table(rows), end="")
    print(f"wrote {options.out / 'bench.csv'}" + (", memory.png, decode.png, prefill.png" if options.plots else ""))
    return 1 if any(row["status"] == "failed" for row in rows) else 0
