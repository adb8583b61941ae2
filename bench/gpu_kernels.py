"""GPU: the Triton selective scan checked on real shapes and timed, its first-call latency, and end-to-end
training / prefill speed of the 130M models beside a Llama of similar size.

    PYTHONPATH=. python bench/gpu_kernels.py [--sections check,time,latency,e2e]

check    forward on real shapes (lengths 1 to 16k, odd widths; float32, bf16, fp16) against the PyTorch chunked
         scan in float32 (itself tested against a float64 recurrence), and gradients at one medium shape.
time     B8 D1536 T4096 N16 bf16: forward and forward+backward (triton.testing.do_bench medians, two input sets
         rotated), beside the PyTorch chunked scan and transformers' per-token loop, and the HBM floor for the
         forward's bytes (copy bandwidth measured in the same run).
latency  first call (forward+backward) in a fresh process with an empty Triton cache, then with the cache warm.
ssd      (on request) Mamba-2 SSD forward (+backward) beside mamba_ssm's and fla's Triton kernels, when carried.
check_ssd  (on request) the SSD kernels on real shapes (lengths 1 to 16k, odd sizes, groups, packed sequences,
         float32/bf16/fp16) against the PyTorch chunked form in float32: outputs, final states and gradients;
         and Mamba-2 130M's layout (x, B, C, Δ column views read in place; Δ's bias, softplus and limit applied).
ssd_sweep  (on request) SSD forward and forward+backward times for a few chunk / warp / state-storage choices.
ssd_grads_sweep  (on request) SSD forward+backward times for each number of heads per program of the gradient
         kernel (GRADS_HEADS_PER_PROGRAM), at B8 T4096 and B4 T2048.
decode   (on request) greedy decoding tokens/s after long prompts, and peak memory for a 64k-token prompt.
step     (on request) decoding by single-token forward calls (no generate()), and the cache's bytes.
check_mamba2  (on request) Mamba-2's gated-norm and decoding-step kernels against PyTorch, timed beside it.
check_fused  (on request) Mamba-2's conv + SSD + norm as one op on mamba2-130m (4 layers): loss and gradients.
conv     (on request) the Triton causal conv1d against F.conv1d: errors and forward(+backward) times.
conv_sweep  (on request) the conv as the mixers call it: SiLU fused or after, vector or scalar row loads, warps.
conv_tiles  (on request) the conv's kernels alone (profiler) for a few tile shapes and warp counts.
s4       (on request) S4 / S4D on CUDA against the CPU, and prefill speed of the LRA-size presets.
fwd_sweep  (on request) forward times of the Triton scan for a few FORWARD_CONFIG choices.
profile_e2e  (on request) the largest kernels of a training step of each of our 130M models.
host_e2e  (on request) a training step's wall, host-issue and GPU-busy times, and its top host functions.
host_breakdown  (on request) a training step's host time with and without Triton's launches, and its top ops.
launch_ab  (on request) training and eager decoding steps with launch.FastLaunch and with Triton's launch path.
prefill_split  (on request) a prefill forward's wall, host-issue and GPU-busy times, and our largest kernels.
prefill_left_padded  (on request) a left-padded batch's cached prefill and generate()'s first token.
sync_check  (on request) where a prefill forward or a training step of each family synchronises with the GPU.
check_ab  (on request) prefill and training with and without the token-id check's read-back, alternated.
launch_replay  (on request) a prefill's launches replayed with less and less host work per launch.
host_costs  (on request) host time of single PyTorch ops and launches as the wrappers issue them.
check_add_norm  (on request) the add + cast + RMS norm kernel against float64, timed beside the ops it stands for.
bwd_sweep  (on request) forward+backward times of the scan for a few BACKWARD_CONFIG shapes.
e2e_shape_sweep  (on request) at the 130M models' training shape: SSD walker tiles, norm backward programs.
e2e      bf16 weights, AdamW: training step and prefill tokens/s at 4x2048 for our mamba-130m and mamba2-130m and
         transformers' LlamaForCausalLM of the anchors' 130M shape with SDPA.
Prints a table last; writes results.json under $OUT if set.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import transformers
import triton
from llama_peer import llama_130m_config
from triton.testing import do_bench

import ssm_hf
from ssm_hf import kernels
from ssm_hf.kernels.selective_scan_triton import selective_scan_triton

DEV = "cuda"
R: dict = {}


def scan_inputs(batch, seqlen, d_inner, d_state, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    dt_init = torch.exp(torch.rand(d_inner, device=DEV, generator=g) * 4.6 - 6.9)   # 1e-3 .. 1e-1
    return dict(x=r(batch, seqlen, d_inner).to(dtype), delta=(0.5 * r(batch, seqlen, d_inner)).to(dtype),
                A=-torch.exp(torch.rand(d_inner, d_state, device=DEV, generator=g) * 2.8),
                B=r(batch, seqlen, d_state).to(dtype), C=r(batch, seqlen, d_state).to(dtype),
                D=r(d_inner), z=r(batch, seqlen, d_inner).to(dtype),
                delta_bias=dt_init + torch.log(-torch.expm1(-dt_init)))


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def report(section: str, rows: dict) -> None:
    """Keep a section's results for results.json and print them, one line each."""
    R[section] = rows
    for key, value in rows.items():
        print(section, key, value, flush=True)


def greedy_matches_reference(model) -> bool:
    """Whether 16 greedy tokens after 2 random 64-token prompts (float32) are the same with the Triton paths as
    with SSM_HF_FORCE_REFERENCE=1."""
    model = model.to(DEV).eval()
    prompt = torch.randint(1, 50000, (2, 64), device=DEV)
    with torch.no_grad():
        fast = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        os.environ["SSM_HF_FORCE_REFERENCE"] = "1"
        try:
            reference = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=0)
        finally:
            os.environ.pop("SSM_HF_FORCE_REFERENCE")
    return bool(torch.equal(fast, reference))


def report_errors(section: str, rows: list) -> None:
    """Keep rows of (name, output error, state error or NaN) under R[section] and print them."""
    R[section] = rows
    for name, err, err_h in rows:
        print(f"check {name}: rel err {err:.2e}" + ("" if err_h != err_h else f", state {err_h:.2e}"), flush=True)


def check():
    rows = []
    for batch, seqlen, d_inner, d_state in [(2, 1, 64, 16), (2, 7, 1000, 16), (4, 1024, 1536, 16),
                                            (1, 4099, 768, 16), (2, 16384, 256, 16), (2, 300, 96, 32)]:
        ref_in = scan_inputs(batch, seqlen, d_inner, d_state, torch.float32, seed=seqlen)
        y_ref, h_ref = kernels.selective_scan_chunked(**ref_in, delta_softplus=True, return_final_state=True)
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            inp = {k: (v.to(dtype) if v.dim() == 3 else v) for k, v in ref_in.items()}
            y, h = selective_scan_triton(**inp, delta_softplus=True, return_final_state=True)
            torch.cuda.synchronize()
            ref = kernels.selective_scan_chunked(**{k: v.float() for k, v in inp.items()}, delta_softplus=True)
            rows.append((f"fwd {batch}x{seqlen}x{d_inner}x{d_state} {str(dtype)[6:]}", rel(y, ref),
                         rel(h, h_ref) if dtype == torch.float32 else float("nan")))
    inp = {k: v.requires_grad_(True) for k, v in scan_inputs(2, 1024, 256, 16, torch.float32, seed=3).items()}
    ref = {k: v.detach().clone().requires_grad_(True) for k, v in inp.items()}
    w = torch.randn(2, 1024, 256, device=DEV)
    (selective_scan_triton(**inp, delta_softplus=True) * w).sum().backward()
    (kernels.selective_scan_chunked(**ref, delta_softplus=True) * w).sum().backward()
    for k in inp:
        rows.append((f"grad {k} 2x1024x256x16 fp32", rel(inp[k].grad, ref[k].grad), float("nan")))
    report_errors("check", rows)


def check_mamba2_kernels():
    """Mamba-2's gated RMSNorm and decoding-step kernels against their PyTorch twins on real shapes (errors, and
    do_bench medians of both), and greedy tokens of mamba2-130m with the Triton steps against the PyTorch path."""
    from ssm_hf.kernels import norm_torch, ssd_torch
    from ssm_hf.kernels.decode_triton import ssd_state_update_triton
    from ssm_hf.kernels.norm_triton import rms_norm_gated_triton

    rows = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    for shape, group in (((4, 2048, 1536), 1536), ((4, 2048, 1536), 192), ((3, 77, 1000), 250)):
        x, z = (torch.randn(*shape, device=DEV, generator=g) for _ in range(2))
        w = 1 + 0.1 * torch.randn(shape[-1], device=DEV, generator=g)
        leaves = [t.clone().requires_grad_(True) for t in (x, z, w)]
        refs = [t.double().requires_grad_(True) for t in (x, z, w)]
        out = rms_norm_gated_triton(*leaves[:2], leaves[2], group, 1e-5)
        ref = norm_torch.rms_norm_gated(*refs[:2], refs[2], group, 1e-5)
        dy = torch.randn(shape, device=DEV, generator=g)
        out.backward(dy)
        ref.backward(dy.double())
        key = f"norm {'x'.join(map(str, shape))} g{group}"
        rows[key + " fwd fp32"] = rel(out, ref)
        for name, a, b in zip("xzw", leaves, refs):
            rows[f"{key} grad {name} fp32"] = rel(a.grad, b.grad)
        xb, zb = x.bfloat16(), z.bfloat16()
        rows[key + " fwd bf16"] = rel(rms_norm_gated_triton(xb, zb, w.bfloat16(), group, 1e-5),
                                      norm_torch.rms_norm_gated(xb, zb, w.bfloat16(), group, 1e-5))
    xb, zb = (torch.randn(8, 4096, 1536, device=DEV, generator=g).bfloat16().requires_grad_(True) for _ in range(2))
    wb = torch.ones(1536, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(8, 4096, 1536, device=DEV, dtype=torch.bfloat16)
    for name, fn in (("triton", rms_norm_gated_triton), ("torch", norm_torch.rms_norm_gated)):
        rows[f"norm 8x4096x1536 bf16 fwd+bwd us, {name}"] = do_bench(
            lambda: fn(xb, zb, wb, 1536, 1e-5).backward(dy), grad_to_none=[xb, zb, wb], return_mode="median") * 1e3
    b, h, p, n, groups = 64, 24, 64, 128, 1
    r = lambda *size: torch.randn(*size, device=DEV, generator=g)  # noqa: E731
    args = dict(state=r(b, h, p, n), x=r(b, h, p), dt=r(b, h), A=-torch.rand(h, device=DEV, generator=g),
                B=r(b, groups, n), C=r(b, groups, n), D=r(h), dt_bias=r(h))
    kw = dict(dt_softplus=True, dt_limit=(0.0, float("inf")))
    y, new = ssd_state_update_triton(**args, **kw)
    y_ref, new_ref = ssd_torch.ssd_state_update(**{k: v.double() for k, v in args.items()}, **kw)
    rows["ssd step 64x24x64x128 y"], rows["ssd step state"] = rel(y, y_ref), rel(new, new_ref)
    for name, fn in (("triton", ssd_state_update_triton), ("torch", ssd_torch.ssd_state_update)):
        rows[f"ssd step us, {name}"] = do_bench(lambda: fn(**args, **kw), return_mode="median") * 1e3
    rows["mamba2 greedy tokens equal to the PyTorch path"] = greedy_matches_reference(
        ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m")))
    report("check_mamba2", rows)


def check_fused():
    """Mamba-2's conv -> SSD -> norm as one op (`kernels.conv_ssd_norm`) on the real model: mamba2-130m cut to 4
    layers, 2 x 1024 random tokens, loss and every parameter's gradient. float32: the fused op against the PyTorch
    path (SSM_HF_FORCE_REFERENCE); bf16: against the same kernels run op by op (`conv_ssd_norm_by_ops`). Largest
    relative error over the parameters, and the parameter it belongs to."""
    rows = {}
    model = ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m", num_hidden_layers=4)).to(DEV)
    ids = torch.randint(0, 50000, (2, 1024), device=DEV)

    def run():
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids, use_cache=False).loss
        loss.backward()
        return {"loss": loss.detach()} | {n: p.grad.clone() for n, p in model.named_parameters()}

    def worst(a, b):
        errors = {k: rel(a[k].float(), b[k].float()) for k in a}
        name = max(errors, key=errors.get)
        return f"{errors[name]:.2e} ({name})"

    for dtype in (torch.float32, torch.bfloat16):
        model.to(dtype)
        fused = run()
        if dtype == torch.float32:
            os.environ["SSM_HF_FORCE_REFERENCE"] = "1"
            try:
                reference = run()
            finally:
                del os.environ["SSM_HF_FORCE_REFERENCE"]
            rows["float32 fused vs PyTorch path, worst"] = worst(fused, reference)
        saved = kernels.conv_ssd_norm
        kernels.conv_ssd_norm = kernels.conv_ssd_norm_by_ops
        try:
            by_ops = run()
        finally:
            kernels.conv_ssd_norm = saved
        rows[f"{str(dtype)[6:]} fused vs op by op, worst"] = worst(fused, by_ops)
        print("check_fused", rows, flush=True)
    report("check_fused", rows)


def conv():
    """The Triton causal conv1d against the PyTorch form (F.conv1d) on real shapes: errors (forward with and without
    cached inputs, gradients) and do_bench medians of forward+backward for mamba2-130m's conv (4 x 2048 x 1792)."""
    from ssm_hf.kernels import causal_conv1d_torch
    from ssm_hf.kernels.causal_conv1d_triton import causal_conv1d_triton

    rows = {}
    g = torch.Generator(device=DEV).manual_seed(0)
    for batch, seqlen, channels in ((4, 2048, 1792), (2, 4099, 3072), (3, 1, 100)):
        x = torch.randn(batch, seqlen, channels, device=DEV, generator=g)
        w = torch.randn(channels, 4, device=DEV, generator=g)
        bias = torch.randn(channels, device=DEV, generator=g)
        past = torch.randn(batch, channels, 4, device=DEV, generator=g)
        for with_past in (False, True):
            leaves = [t.clone().requires_grad_(True) for t in (x, w, bias)]
            refs = [t.double().requires_grad_(True) for t in (x, w, bias)]
            activation = "silu" if with_past else None  # the mixers' SiLU, fused into the conv
            ours = causal_conv1d_triton(*leaves, past if with_past else None, activation=activation)
            ref = causal_conv1d_torch.causal_conv1d(*refs, past.double() if with_past else None,
                                                    activation=activation)
            dy = torch.randn(ref.shape, device=DEV, generator=g)
            ours.backward(dy)
            ref.backward(dy.double())
            key = f"conv {batch}x{seqlen}x{channels}{' past silu' if with_past else ''}"
            rows[key + " fwd fp32"] = rel(ours, ref)
            for name, a, b in zip(("x", "w", "bias"), leaves, refs):
                rows[f"{key} grad {name}"] = rel(a.grad, b.grad)
        rows[f"conv {batch}x{seqlen}x{channels} fwd bf16"] = rel(
            causal_conv1d_triton(x.bfloat16(), w.bfloat16(), bias.bfloat16()),
            causal_conv1d_torch.causal_conv1d(x.bfloat16(), w.bfloat16(), bias.bfloat16()))
    x = torch.randn(4, 2048, 1792, device=DEV, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(1792, 4, device=DEV, generator=g).bfloat16().requires_grad_(True)
    bias = torch.randn(1792, device=DEV, generator=g).bfloat16().requires_grad_(True)
    dy = torch.randn(4, 2048, 1792, device=DEV, generator=g).bfloat16()
    for name, fn in (("triton", causal_conv1d_triton), ("torch", causal_conv1d_torch.causal_conv1d)):
        rows[f"conv 4x2048x1792 bf16 fwd us, {name}"] = do_bench(lambda: fn(x, w, bias), return_mode="median") * 1e3
        rows[f"conv 4x2048x1792 bf16 fwd+bwd us, {name}"] = do_bench(
            lambda: fn(x, w, bias).backward(dy), grad_to_none=[x, w, bias], return_mode="median") * 1e3
    report("conv", rows)


def conv_sweep():
    """The causal conv as the mixers call it, bf16, forward and forward+backward (do_bench medians), printed as it
    goes: x a column view of in_proj's output (Mamba-2 130M: xBC, 1792 of 3352 columns, rows 8 x 419 elements
    apart; Mamba 130M: x, 1536 of 3072), SiLU fused or applied after, rows read in vectors or (alignment 1) one
    element at a time, backward warps 4 or 8; and the gradients' largest relative error against the fused default."""
    import torch.nn.functional as F

    from ssm_hf.kernels import causal_conv1d_triton as module

    g = torch.Generator(device=DEV).manual_seed(0)
    for name, width, start, channels in (("mamba2-130m xBC", 3352, 1536, 1792), ("mamba-130m x", 3072, 0, 1536)):
        buf = torch.randn(4, 2048, width, device=DEV, generator=g).bfloat16().requires_grad_(True)
        w = (0.5 * torch.randn(channels, 4, device=DEV, generator=g)).bfloat16().requires_grad_(True)
        bias = torch.randn(channels, device=DEV, generator=g).bfloat16().requires_grad_(True)
        dy = torch.randn(4, 2048, channels, device=DEV, generator=g).bfloat16()
        leaves = [buf, w, bias]
        reference = None
        for label, fused, aligned, bwd_warps in (("fused, default", True, True, None),
                                                  ("fused, backward 4 warps", True, True, 4),
                                                  ("SiLU after the conv", False, True, None),
                                                  ("fused, alignment 1", True, False, None)):
            saved = dict(module.WARPS)
            if bwd_warps:
                module.WARPS["backward"] = bwd_warps
            alignment = module.row_alignment
            if not aligned:
                module.row_alignment = lambda *strides: 1

            def fwd():
                x = buf[..., start:start + channels]
                if fused:
                    return module.causal_conv1d_triton(x, w, bias, activation="silu")
                return F.silu(module.causal_conv1d_triton(x, w, bias))
            try:
                t_fwd = do_bench(fwd, return_mode="median") * 1e3
                t_all = do_bench(lambda: fwd().backward(dy), grad_to_none=leaves, return_mode="median") * 1e3
                for leaf in leaves:
                    leaf.grad = None
                fwd().backward(dy)
                grads = [leaf.grad.float() for leaf in leaves]
                if reference is None:
                    reference = grads
                err = max(rel(a, b) for a, b in zip(grads, reference))
                line = f"{name} {label}: fwd {t_fwd:.1f} us, fwd+bwd {t_all:.1f} us, grads vs default {err:.1e}"
            finally:
                module.WARPS.update(saved)
                module.row_alignment = alignment
            R.setdefault("conv_sweep", []).append(line)
            print("conv_sweep", line, flush=True)


def _kernel_times(fn, steps: int = 10) -> dict[str, float]:
    """Device time per call of each kernel fn launches (us), from the profiler: kernels alone, without the host's
    launch overheads that do_bench would count for a short op."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for event in prof.key_averages():  # summed: kernels whose names share a prefix must not overwrite each other
        if event.self_device_time_total:
            times[event.key[:60]] = times.get(event.key[:60], 0.0) + event.self_device_time_total / steps
    return times


def conv_tiles():
    """The conv's kernels alone (profiler device time per call), bf16, with and without SiLU, x as Mamba-2 130M's
    xBC view (4 x 2048 x 1792 of 3352 columns): the forward and backward kernels for a few (BLOCK_T, BLOCK_C,
    forward warps, backward warps, time blocks per backward program), printed as it goes; the gradients' largest
    relative error against the first setting."""
    from ssm_hf.kernels import causal_conv1d_triton as module

    g = torch.Generator(device=DEV).manual_seed(0)
    buf = torch.randn(4, 2048, 3352, device=DEV, generator=g).bfloat16()
    leaf = buf.requires_grad_(True)
    w = (0.5 * torch.randn(1792, 4, device=DEV, generator=g)).bfloat16().requires_grad_(True)
    bias = torch.randn(1792, device=DEV, generator=g).bfloat16().requires_grad_(True)
    dy = torch.randn(4, 2048, 1792, device=DEV, generator=g).bfloat16()
    saved = (module.BLOCK_T, module.BLOCK_C, dict(module.WARPS), module.BACKWARD_BLOCKS_PER_PROGRAM)
    reference = None
    for block_t, block_c, fwd_warps, bwd_warps, walk in (
            (32, 64, 4, 4, 8), (32, 32, 4, 4, 8), (16, 64, 4, 4, 8), (16, 32, 4, 4, 16), (32, 32, 4, 4, 4),
            (32, 32, 4, 4, 1), (64, 32, 4, 8, 4), (32, 64, 4, 8, 8), (16, 128, 4, 8, 8), (8, 64, 4, 2, 16),
            (32, 32, 4, 2, 8), (16, 32, 4, 1, 16)):
        module.BLOCK_T, module.BLOCK_C = block_t, block_c
        module.WARPS.update(forward=fwd_warps, backward=bwd_warps)
        module.BACKWARD_BLOCKS_PER_PROGRAM = walk
        try:
            for activation in ("silu", None):
                def step():
                    leaf.grad = w.grad = bias.grad = None
                    out = module.causal_conv1d_triton(leaf[..., 1536:1536 + 1792], w, bias, activation=activation)
                    out.backward(dy)
                times = _kernel_times(step)
                fwd = sum(v for k, v in times.items() if "_conv_fwd_kernel" in k)
                bwd = sum(v for k, v in times.items() if "_conv_bwd_kernel" in k)
                rest = sum(times.values()) - fwd - bwd
                step()
                grads = [t.grad.float() for t in (leaf, w, bias)]
                err = ""
                if activation == "silu":
                    reference = reference or grads
                    err = f", grads vs first {max(rel(a, b) for a, b in zip(grads, reference)):.1e}"
                line = (f"tiles {block_t}x{block_c} warps {fwd_warps}/{bwd_warps} blocks/program {walk} {activation}: "
                        f"fwd {fwd:.1f} us, bwd {bwd:.1f} us, other kernels {rest:.1f} us{err}")
                R.setdefault("conv_tiles", []).append(line)
                print("conv_tiles", line, flush=True)
        finally:
            module.BLOCK_T, module.BLOCK_C = saved[:2]
            module.WARPS.update(saved[2])
            module.BACKWARD_BLOCKS_PER_PROGRAM = saved[3]


def s4_on_gpu():
    """S4 and S4D on CUDA: logits against the same model on the CPU (float32), greedy tokens equal, bf16 finite,
    and prefill tokens/s of the LRA-size presets at 4 x 4096 in bf16."""
    import copy

    rows = {}
    for name in ("s4-tiny", "s4d-tiny", "s4-lra-text", "s4d-lra-text"):
        torch.manual_seed(0)
        config = ssm_hf.preset_config(name)
        cpu_model = ssm_hf.S4ForCausalLM(config).eval()
        gpu_model = copy.deepcopy(cpu_model).to(DEV)
        ids = torch.randint(1, config.vocab_size, (2, 300))
        with torch.no_grad():
            ref = cpu_model(ids).logits
            out = gpu_model(ids.to(DEV)).logits
            rows[f"{name} logits rel err cuda vs cpu fp32"] = rel(out.cpu(), ref)
            greedy = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
            rows[f"{name} greedy tokens equal cpu"] = bool(torch.equal(
                gpu_model.generate(ids[:, :50].to(DEV), **greedy).cpu(), cpu_model.generate(ids[:, :50], **greedy)))
            half = gpu_model.to(torch.bfloat16)
            rows[f"{name} bf16 logits rel err"] = rel(half(ids.to(DEV)).logits, ref.to(DEV))
            if "lra" in name:
                long_ids = torch.randint(1, config.vocab_size, (4, 4096), device=DEV)
                ms = do_bench(lambda: half(long_ids, use_cache=False), return_mode="median", warmup=100, rep=500)
                rows[f"{name} prefill 4x4096 bf16 tok/s"] = long_ids.numel() / (ms * 1e-3)
    report("s4", rows)


def _sweep_inputs(batch: int, seqlen: int):
    """Scan inputs (D1536 N16 bf16), the same as autograd leaves, and an output gradient."""
    inp = scan_inputs(batch, seqlen, 1536, 16, torch.bfloat16, seed=1)
    leaves = {k: v.clone().requires_grad_(v.is_floating_point()) for k, v in inp.items()}
    return inp, leaves, torch.randn(batch, seqlen, 1536, device=DEV, dtype=torch.bfloat16)


def fwd_sweep():
    """Forward time of the Triton scan for a few FORWARD_CONFIG choices, bf16, at B8 D1536 T4096 N16 and at the e2e
    shape B4 T2048: without gradients (prefill: no states kept) and with (states every block_t tokens stored).
    programs_per_sm 0 walks each sequence in one piece; larger values cut it into chunks walked in parallel."""
    from ssm_hf.kernels import selective_scan_triton as module

    rows = []
    default = dict(module.FORWARD_CONFIG)
    for batch, seqlen in ((8, 4096), (4, 2048)):
        inp, leaves, dy = _sweep_inputs(batch, seqlen)
        for variant in [dict(programs_per_sm=0), dict(programs_per_sm=4), dict(programs_per_sm=8),
                        dict(programs_per_sm=16), dict(programs_per_sm=8, block_d=16),
                        dict(programs_per_sm=8, unroll=2), dict(programs_per_sm=16, unroll=2),
                        dict(programs_per_sm=8, prefetch=False), dict(programs_per_sm=16, prefetch=False)]:
            module.FORWARD_CONFIG.update(default)
            module.FORWARD_CONFIG.update(variant)
            if variant["programs_per_sm"] == 0:
                module.FORWARD_CONFIG["min_programs"] = 1
            try:
                with torch.no_grad():
                    fwd = do_bench(lambda: selective_scan_triton(**inp, delta_softplus=True), return_mode="median")
                fwd_grad = do_bench(lambda: selective_scan_triton(**leaves, delta_softplus=True),
                                    return_mode="median")
                both = do_bench(lambda: selective_scan_triton(**leaves, delta_softplus=True).backward(dy),
                                return_mode="median", grad_to_none=list(leaves.values()))
                rows.append((batch, seqlen, variant, fwd * 1e3, fwd_grad * 1e3, both * 1e3))
            except Exception as err:
                rows.append((batch, seqlen, variant, repr(err)[:160]))
            print("fwd_sweep", rows[-1], flush=True)
    module.FORWARD_CONFIG.clear()
    module.FORWARD_CONFIG.update(default)
    R["fwd_sweep"] = rows


def bwd_sweep():
    """Forward+backward time of the Triton scan, bf16, at B8 D1536 T4096 N16 and at the e2e shape B4 T2048, for a
    few BACKWARD_CONFIG choices (programs_per_sm 0: each sequence in one piece), and their gradients against the
    first's."""
    from ssm_hf.kernels import selective_scan_triton as module

    rows = []
    default = dict(module.BACKWARD_CONFIG)
    for batch, seqlen in ((8, 4096), (4, 2048)):
        inp, leaves, dy = _sweep_inputs(batch, seqlen)
        reference = None
        for variant in (dict(programs_per_sm=0), dict(programs_per_sm=4), dict(programs_per_sm=8),
                        dict(programs_per_sm=16)):
            module.BACKWARD_CONFIG.update(default)
            module.BACKWARD_CONFIG.update(variant, min_programs=1 if variant["programs_per_sm"] == 0 else None)
            try:
                both = do_bench(lambda: selective_scan_triton(**leaves, delta_softplus=True).backward(dy),
                                return_mode="median", grad_to_none=list(leaves.values()))
                for v in leaves.values():
                    v.grad = None
                selective_scan_triton(**leaves, delta_softplus=True).backward(dy)
                got = {k: v.grad.float().clone() for k, v in leaves.items() if v.grad is not None}
                reference = reference or got
                rows.append((batch, seqlen, variant, both * 1e3, max(rel(got[k], reference[k]) for k in got)))
            except Exception as err:
                rows.append((batch, seqlen, variant, repr(err)[:160], None))
            print("bwd_sweep", rows[-1], flush=True)
    module.BACKWARD_CONFIG.clear()
    module.BACKWARD_CONFIG.update(default)
    R["bwd_sweep"] = rows


def ssd_inputs(b, t, h, p, g, n, dtype, seed=0):
    gen = torch.Generator(device=DEV).manual_seed(seed)
    return dict(
        x=torch.randn(b, t, h, p, device=DEV, generator=gen).to(dtype),
        dt=(torch.randn(b, t, h, device=DEV, generator=gen) * 0.5 - 4).to(dtype),
        A=-torch.exp(torch.rand(h, device=DEV, generator=gen) * 2.7),
        B=torch.randn(b, t, g, n, device=DEV, generator=gen).to(dtype),
        C=torch.randn(b, t, g, n, device=DEV, generator=gen).to(dtype),
        D=torch.randn(h, device=DEV, generator=gen),
        initial_state=torch.randn(b, h, p, n, device=DEV, generator=gen),
    )


def packed_reference(inputs: dict, seq_idx: torch.Tensor | None):
    """The PyTorch chunked SSD run on each packed sequence alone (seq_idx equal across rows), joined."""
    seqlen = inputs["x"].shape[1]
    starts = [0] + ([] if seq_idx is None else
                    (torch.nonzero(seq_idx[0, 1:] != seq_idx[0, :-1]).flatten() + 1).tolist()) + [seqlen]
    ys, state = [], None
    for begin, end in zip(starts[:-1], starts[1:]):
        piece = {k: (v[:, begin:end] if k in ("x", "dt", "B", "C") else v) for k, v in inputs.items()}
        if begin > 0:
            piece.pop("initial_state")
        y, state = kernels.ssd_scan_chunked(**piece, chunk_size=64, dt_softplus=True, return_final_state=True)
        ys.append(y)
    return torch.cat(ys, 1), state


def check_ssd():
    """The SSD kernels against the PyTorch chunked form (float32 compute) on real shapes, forward and gradients."""
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    rows = []
    shapes = [(2, 1, 4, 64, 1, 128), (2, 7, 24, 64, 1, 128), (1, 4096, 24, 64, 1, 128), (1, 16384, 8, 64, 1, 128),
              (2, 1000, 6, 48, 2, 64), (2, 300, 8, 64, 8, 16), (1, 517, 4, 32, 1, 256), (1, 300, 4, 128, 1, 128)]
    from ssm_hf.kernels import ssd_triton

    for b, t, h, p, g, n in shapes:
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            inp = ssd_inputs(b, t, h, p, g, n, dtype, seed=t)
            ref, fin_ref = kernels.ssd_scan_chunked(**{k: v.float() for k, v in inp.items()}, chunk_size=64,
                                                    dt_softplus=True, return_final_state=True)
            saved = ssd_triton.FORWARD_CHUNK
            for chunk in (32, 128):  # one and four output row blocks per stored chunk state (see FORWARD_CHUNK)
                ssd_triton.FORWARD_CHUNK = chunk
                y, fin = ssd_scan_triton(**inp, dt_softplus=True, return_final_state=True)
                ssd_triton.FORWARD_CHUNK = saved
                rows.append((f"ssd fwd chunk {chunk} {b}x{t}x{h}x{p} g{g} n{n} {str(dtype)[6:]}", rel(y, ref),
                             rel(fin, fin_ref)))
    for dtype in (torch.float32, torch.bfloat16):
        for packed in (False, True):
            inp = ssd_inputs(2, 2000, 8, 64, 2, 128, dtype, seed=5)
            seq_idx = None
            if packed:
                seq_idx = torch.zeros(2, 2000, dtype=torch.int32, device=DEV)
                for start in (1, 64, 700, 701, 1999):
                    seq_idx[:, start:] += 1
            leaves = {k: v.clone().requires_grad_(True) for k, v in inp.items()}
            ref_leaves = {k: v.float().clone().requires_grad_(True) for k, v in inp.items()}
            w = torch.randn(2, 2000, 8, 64, device=DEV)
            wh = torch.randn(2, 8, 64, 128, device=DEV)
            extra = {"seq_idx": seq_idx} if packed else {}
            y, fin = ssd_scan_triton(**leaves, dt_softplus=True, return_final_state=True, **extra)
            ref, fin_ref = packed_reference(ref_leaves, seq_idx)
            ((y.float() * w).sum() + (fin * wh).sum()).backward()
            ((ref * w).sum() + (fin_ref * wh).sum()).backward()
            tag = f"{str(dtype)[6:]}{' packed' if packed else ''}"
            rows.append((f"ssd fwd 2x2000x8x64 g2 n128 {tag}", rel(y, ref), rel(fin, fin_ref)))
            for k in leaves:
                rows.append((f"ssd grad {k} {tag}", rel(leaves[k].grad, ref_leaves[k].grad), float("nan")))
    rows += _check_ssd_views()
    report_errors("check_ssd", rows)


def _check_ssd_views(b: int = 2, t: int = 2048, h: int = 24, p: int = 64, n: int = 128, width: int = 3352) -> list:
    """Mamba-2 130M's layout: x, B, C column views of the conv's output (b, t, 1792) and raw Δ the last 24
    columns of in_proj's output (b, t, 3352), read in place; Δ's bias, softplus and a limit (clamping on both
    sides) made inside the kernels; against the PyTorch chunked form (ssd_prepare_dt) on float32 copies: outputs,
    final states and every gradient (dt_bias's included)."""
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    rows = []
    for dtype, packed in ((torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        gen = torch.Generator(device=DEV).manual_seed(9)
        conv = torch.randn(b, t, h * p + 2 * n, device=DEV, generator=gen).to(dtype).requires_grad_(True)
        proj = (torch.randn(b, t, width, device=DEV, generator=gen) * 1.5 - 4).to(dtype).requires_grad_(True)
        x, B, C = conv.split([h * p, n, n], -1)
        views = dict(x=x.unflatten(-1, (h, p)), B=B.unflatten(-1, (1, n)), C=C.unflatten(-1, (1, n)),
                     dt=proj[..., -h:])
        common = dict(A=-torch.exp(torch.rand(h, device=DEV, generator=gen) * 2.7),
                      D=torch.randn(h, device=DEV, generator=gen),
                      dt_bias=torch.randn(h, device=DEV, generator=gen) * 0.5,
                      initial_state=torch.randn(b, h, p, n, device=DEV, generator=gen))
        common = {k: v.requires_grad_(True) for k, v in common.items()}
        copies = {k: v.detach().float().contiguous().requires_grad_(True) for k, v in views.items()}
        ref_common = {k: v.detach().clone().requires_grad_(True) for k, v in common.items()}
        seq_idx = None
        if packed:
            seq_idx = torch.zeros(b, t, dtype=torch.int32, device=DEV)
            for start in (1, 64, t // 3, t // 3 + 1, t - 1):
                seq_idx[:, start:] += 1
        options = dict(dt_softplus=True, dt_limit=(1e-3, 0.1), return_final_state=True, seq_idx=seq_idx)
        w = torch.randn(b, t, h, p, device=DEV, generator=gen)
        wh = torch.randn(b, h, p, n, device=DEV, generator=gen)
        y, fin = ssd_scan_triton(**views, **common, **options)
        ref, fin_ref = kernels.ssd_scan_chunked(**copies, **ref_common, chunk_size=64, **options)
        ((y.float() * w).sum() + (fin * wh).sum()).backward()
        ((ref * w).sum() + (fin_ref * wh).sum()).backward()
        tag = f"views+bias+limit {str(dtype)[6:]}{' packed' if packed else ''}"
        rows.append((f"ssd fwd {b}x{t}x{h}x{p} n{n} {tag}", rel(y, ref), rel(fin, fin_ref)))
        got = dict(x=conv.grad[..., :h * p], B=conv.grad[..., h * p:h * p + n], C=conv.grad[..., h * p + n:],
                   dt=proj.grad[..., -h:], **{k: v.grad for k, v in common.items()})
        want = dict(x=copies["x"].grad.flatten(2), B=copies["B"].grad.flatten(2), C=copies["C"].grad.flatten(2),
                    dt=copies["dt"].grad, **{k: v.grad for k, v in ref_common.items()})
        for k in got:
            rows.append((f"ssd grad {k} {tag}", rel(got[k], want[k]), float("nan")))
        rows.append((f"ssd grad outside the views {tag} (must be 0)",
                     float(proj.grad[..., :-h].abs().max()), float("nan")))
    return rows


def _ssd_times(inp: dict, leaves: dict, dy: torch.Tensor, backward: bool) -> tuple[float, float]:
    """(forward, forward+backward) us of our SSD with the module's current knobs; nan for the second unless asked."""
    from ssm_hf.kernels import ssd_triton

    fwd = do_bench(lambda: ssd_triton.ssd_scan_triton(**inp, dt_softplus=True), return_mode="median") * 1e3
    both = float("nan")
    if backward:
        both = do_bench(lambda: ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True).backward(dy),
                        return_mode="median", grad_to_none=[v for v in leaves.values() if v.requires_grad]) * 1e3
    return round(fwd, 1), round(both, 1)


def _restore(module, saved: dict) -> None:
    """Put back module-level knobs saved as {name: value} ("WARPS": a copy of the dict)."""
    for key, value in saved.items():
        if key == "WARPS":
            module.WARPS.update(value)
        else:
            setattr(module, key, value)


def ssd_sweep():
    """Forward and forward+backward times of our SSD at the bench shape for a few kernel choices."""
    from ssm_hf.kernels import ssd_triton

    inp = ssd_inputs(8, 4096, 24, 64, 1, 128, torch.bfloat16)
    inp.pop("initial_state")
    leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    dy = torch.randn_like(inp["x"])
    knobs = ("CHUNK", "N_BLOCK", "STATE_TILE", "STATES_16BIT", "WALK_PREFETCH")
    saved = {k: getattr(ssd_triton, k) for k in knobs} | {"WARPS": dict(ssd_triton.WARPS)}
    rows = {}
    for chunk, n_block, tile, warps, states16, prefetch in [
            (32, 64, (64, 64), 4, True, True), (32, 64, (64, 64), 4, True, False), (32, 64, (32, 64), 4, True, True),
            (32, 64, (64, 32), 4, True, True), (32, 64, (32, 32), 4, True, True), (32, 32, (64, 64), 4, True, True),
            (32, 128, (64, 64), 4, True, True), (32, 64, (64, 64), 2, True, True), (16, 64, (64, 64), 4, True, True),
            (64, 32, (64, 64), 4, True, True)]:
        ssd_triton.CHUNK, ssd_triton.N_BLOCK, ssd_triton.STATE_TILE, ssd_triton.STATES_16BIT = \
            chunk, n_block, tile, states16
        ssd_triton.WALK_PREFETCH = prefetch
        ssd_triton.WARPS.update(output=warps, grads=warps)
        name = (f"chunk {chunk} n {n_block} tile {tile[0]}x{tile[1]} warps {warps} states {16 if states16 else 32}"
                f" walk look-ahead {prefetch}")
        try:
            rows[name] = _ssd_times(inp, leaves, dy, backward=True)
        except Exception as err:
            rows[name] = repr(err)[:200]
        print("ssd_sweep", name, rows[name], flush=True)
    _restore(ssd_triton, saved)
    # where the default's forward+backward time goes, kernel by kernel
    from torch.profiler import ProfilerActivity, profile

    ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True).backward(dy)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True).backward(dy)
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
    print(table, flush=True)
    rows["profile"] = table
    R["ssd_sweep"] = rows


def ssd_forward_sweep():
    """Our SSD forward (bf16, one group) at a few (batch, length, heads, head_dim, d_state) shapes for a few forward
    chunks (tokens per stored chunk state), walker tiles and walker / output warps; with each one's relative
    difference from chunk 32. Forward+backward only at the bench shape for the default and chunk 32."""
    from ssm_hf.kernels import ssd_triton

    knobs = ("FORWARD_CHUNK", "OUTPUT_ROWS", "STATE_TILE", "N_BLOCK")
    saved = {k: getattr(ssd_triton, k) for k in knobs} | {"WARPS": dict(ssd_triton.WARPS)}
    rows = {}
    for b, t, h, p, n in ((8, 4096, 24, 64, 128), (4, 2048, 24, 64, 128), (2, 2048, 24, 64, 128),
                          (16, 1024, 24, 64, 128), (1, 16384, 24, 64, 128), (4, 2048, 12, 128, 128),
                          (4, 2048, 24, 64, 64), (4, 2048, 48, 64, 128), (4, 2048, 24, 64, 256)):
        inp = ssd_inputs(b, t, h, p, 1, n, torch.bfloat16)
        inp.pop("initial_state")
        leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        dy = torch.randn_like(inp["x"])
        ssd_triton.FORWARD_CHUNK = 32
        ref = ssd_triton.ssd_scan_triton(**inp, dt_softplus=True)
        for chunk, tile, walk_warps in ((None, None, 4), (32, (64, 64), 4), (64, (64, 64), 4), (64, (64, 128), 4),
                                        (64, (64, 128), 8), (64, (32, 128), 4), (128, (64, 32), 4)):
            ssd_triton.FORWARD_CHUNK = chunk
            ssd_triton.STATE_TILE = tile or ssd_triton.STATE_TILE
            ssd_triton.WARPS.update(states=walk_warps)
            plan = ssd_triton._forward_plan(inp["x"], n)
            name = (f"B{b} T{t} H{h} P{p} N{n} chunk {chunk} walker tile {tile} walker warps {walk_warps}"
                    + (f" (auto: {plan})" if chunk is None else ""))
            try:
                err = rel(ssd_triton.ssd_scan_triton(**inp, dt_softplus=True), ref)
                rows[name] = _ssd_times(inp, leaves, dy, backward=b * t == 8 * 4096 and chunk in (None, 32)) + (err,)
            except Exception as error:
                rows[name] = repr(error)[:200]
            print("ssd_forward_sweep", name, rows[name], flush=True)
            _restore(ssd_triton, saved)
    R["ssd_forward_sweep"] = rows


def ssd_grads_sweep():
    """Our SSD forward+backward (bf16, 24 heads of dim 64, one group, d_state 128) at B8 T4096 and B4 T2048 for each
    GRADS_HEADS_PER_PROGRAM (heads of a group whose dB and dC one program of the gradient kernel sums; None = the
    default plan) and gradient-kernel warps, with the relative differences of dx, dB and dC from one head per program
    at 4 warps (float summation order only). Each row is printed as it is measured."""
    from ssm_hf.kernels import ssd_triton

    saved = {"GRADS_HEADS_PER_PROGRAM": ssd_triton.GRADS_HEADS_PER_PROGRAM, "WARPS": dict(ssd_triton.WARPS)}
    rows = {}
    for b, t in ((8, 4096), (4, 2048)):
        inp = ssd_inputs(b, t, 24, 64, 1, 128, torch.bfloat16)
        inp.pop("initial_state")
        leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        dy = torch.randn_like(inp["x"])
        ref = None
        for per_program, warps in ((1, 4), (2, 4), (4, 4), (8, 4), (None, 4), (1, 8), (2, 8), (4, 8)):
            if warps == 8 and b != 8:
                continue
            ssd_triton.GRADS_HEADS_PER_PROGRAM = per_program
            ssd_triton.WARPS.update(grads=warps)
            plan = ssd_triton._grads_heads_per_program(inp["x"], 1)
            name = (f"B{b} T{t} heads per program {per_program} grads warps {warps}"
                    + (f" (auto: {plan})" if per_program is None else ""))
            try:
                for v in leaves.values():
                    v.grad = None
                ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True).backward(dy)
                grads = {k: leaves[k].grad.clone() for k in ("x", "B", "C")}
                ref = ref or grads
                errors = " ".join(f"d{k} {rel(grads[k], ref[k]):.1e}" for k in grads)
                rows[name] = _ssd_times(inp, leaves, dy, backward=True)[1:] + (errors,)
            except Exception as error:
                rows[name] = repr(error)[:200]
            print("ssd_grads_sweep", name, "(fwd+bwd us, rel diff from 1 head at 4 warps):", rows[name], flush=True)
            _restore(ssd_triton, saved)
    R["ssd_grads_sweep"] = rows


def e2e_shape_sweep():
    """At the 130M models' training shape (4 x 2048, bf16): our SSD (24 heads of dim 64, one group, d_state 128)
    forward and forward+backward for a few walker tiles (STATE_TILE), and the norm backward's kernel time for a
    few programs per multiprocessor (norm_triton.BACKWARD_PROGRAMS_PER_SM), gated (Mamba-2's, width 1536) and
    plain (the blocks' RMSNorm, width 768). Each row printed as it is measured."""
    from ssm_hf.kernels import norm_triton, ssd_triton

    rows = {}
    inp = ssd_inputs(4, 2048, 24, 64, 1, 128, torch.bfloat16)
    inp.pop("initial_state")
    leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
    dy = torch.randn_like(inp["x"])
    saved = {"STATE_TILE": ssd_triton.STATE_TILE}
    for tile in ((64, 64), (64, 32), (32, 64), (32, 32)):
        ssd_triton.STATE_TILE = tile
        name = f"ssd B4 T2048 walker tile {tile[0]}x{tile[1]} (fwd us, fwd+bwd us)"
        try:
            rows[name] = _ssd_times(inp, leaves, dy, backward=True)
            kernel_us = _kernel_times(lambda: ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True).backward(dy))
            rows[name + " kernels"] = {k: round(v, 1) for k, v in kernel_us.items() if v > 5}
        except Exception as err:
            rows[name] = repr(err)[:200]
        print("e2e_shape_sweep", name, rows[name], rows.get(name + " kernels"), flush=True)
    _restore(ssd_triton, saved)
    per_sm = norm_triton.BACKWARD_PROGRAMS_PER_SM
    for width, group, gated in ((1536, 1536, True), (768, 768, False)):
        x = torch.randn(8192, width, device=DEV, dtype=torch.bfloat16, requires_grad=True)
        z = torch.randn(8192, width, device=DEV, dtype=torch.bfloat16, requires_grad=True) if gated else None
        w = torch.randn(width, device=DEV, requires_grad=True)
        dout = torch.randn(8192, width, device=DEV, dtype=torch.bfloat16)
        for programs in (2, 4, 8, 16, 32):
            norm_triton.BACKWARD_PROGRAMS_PER_SM = programs
            times = _kernel_times(lambda: kernels.rms_norm_gated(x, z, w, group, 1e-5).backward(dout))
            name = f"norm {'gated' if gated else 'plain'} 8192x{width} backward programs per SM {programs}"
            rows[name] = {k: round(v, 1) for k, v in times.items()}
            print("e2e_shape_sweep", name, rows[name], flush=True)
    norm_triton.BACKWARD_PROGRAMS_PER_SM = per_sm
    R["e2e_shape_sweep"] = rows


def ssd_long_rows():
    """Our SSD's forward+backward kernel time (profiler, per call) on few long rows against the 130M training
    shape, for a few walker tiles (STATE_TILE: the backward's two walks, and the forward's where its walker has
    programs enough for the multiprocessors): 24 heads of dim 64, one group, state 128, bf16, Δ through softplus.
    Prints the total and the chunk walker's share per (shape, tile)."""
    from ssm_hf.kernels import ssd_triton

    saved = {"STATE_TILE": ssd_triton.STATE_TILE}
    rows = {}
    for batch, seqlen in ((1, 8192), (1, 16384), (2, 4096), (4, 2048), (8, 4096)):
        inp = ssd_inputs(batch, seqlen, 24, 64, 1, 128, torch.bfloat16)
        inp.pop("initial_state")
        leaves = {k: (v.clone().requires_grad_(True) if k in ("x", "dt", "B", "C") else v) for k, v in inp.items()}
        dy = torch.randn_like(inp["x"])
        for tile in ((64, 64), (64, 32), (32, 32)):
            ssd_triton.STATE_TILE = tile
            name = f"B{batch} T{seqlen} tile {tile[0]}x{tile[1]}"
            try:
                times = _kernel_times(lambda: ssd_triton.ssd_scan_triton(**leaves, dt_softplus=True).backward(dy), 5)
                walk = sum(v for k, v in times.items() if "walk" in k)
                rows[name] = dict(total_us=round(sum(times.values()), 1), walker_us=round(walk, 1))
            except Exception as err:
                rows[name] = repr(err)[:200]
            print("ssd_long_rows", name, rows[name], flush=True)
    _restore(ssd_triton, saved)
    R["ssd_long_rows"] = rows


def ssd():
    """Mamba-2's SSD at B8 T4096 H24 P64 N128, one group, bf16: our Triton forward and forward+backward beside
    mamba_ssm's and flash-linear-attention's Triton kernels, if they are importable (carried, see `anchors_gpu.py`)."""
    from ssm_hf.kernels.ssd_triton import ssd_scan_triton

    b, t, h, p, n = 8, 4096, 24, 64, 128
    g = torch.Generator(device=DEV).manual_seed(0)
    x = torch.randn(b, t, h, p, device=DEV, generator=g).bfloat16()
    dt = (torch.randn(b, t, h, device=DEV, generator=g) * 0.5 - 4).bfloat16()
    A = -torch.exp(torch.rand(h, device=DEV, generator=g) * 2.7)
    B = torch.randn(b, t, 1, n, device=DEV, generator=g).bfloat16()
    C = torch.randn(b, t, 1, n, device=DEV, generator=g).bfloat16()
    D = torch.randn(h, device=DEV, generator=g)
    rows = {}
    start = time.perf_counter()
    y = ssd_scan_triton(x, dt, A, B, C, D=D, dt_softplus=True)
    torch.cuda.synchronize()
    rows["ours_first_call_s"] = time.perf_counter() - start
    first = [v.clone().requires_grad_(True) for v in (x, dt, B, C)]
    start = time.perf_counter()
    ssd_scan_triton(first[0], first[1], A, first[2], first[3], D=D, dt_softplus=True).sum().backward()
    torch.cuda.synchronize()
    rows["ours_first_backward_call_s"] = time.perf_counter() - start
    ref = kernels.ssd_scan_chunked(x.float(), dt.float(), A, B.float(), C.float(), 64, D, dt_softplus=True)
    rows["ours_rel_err_vs_torch_fp32"] = rel(y, ref)
    print("ssd", rows, flush=True)
    rows["ours_fwd_us"] = do_bench(lambda: ssd_scan_triton(x, dt, A, B, C, D=D, dt_softplus=True),
                                   return_mode="median") * 1e3
    leaves = [v.clone().requires_grad_(True) for v in (x, dt, B, C)]
    dy = torch.randn_like(x)
    rows["ours_fwd_bwd_us"] = do_bench(
        lambda: ssd_scan_triton(leaves[0], leaves[1], A, leaves[2], leaves[3], D=D, dt_softplus=True).backward(dy),
        return_mode="median", grad_to_none=leaves, warmup=5, rep=50) * 1e3
    try:
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined

        start = time.perf_counter()
        y_m = mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D, dt_softplus=True)
        torch.cuda.synchronize()
        rows["mamba_ssm_first_call_s"] = time.perf_counter() - start
        rows["mamba_ssm_rel_err_vs_ours"] = rel(y, y_m)
        rows["mamba_ssm_fwd_us"] = do_bench(lambda: mamba_chunk_scan_combined(x, dt, A, B, C, 256, D=D,
                                                                              dt_softplus=True),
                                            return_mode="median") * 1e3
        rows["mamba_ssm_fwd_bwd_us"] = do_bench(
            lambda: mamba_chunk_scan_combined(leaves[0], leaves[1], A, leaves[2], leaves[3], 256, D=D,
                                              dt_softplus=True).backward(dy),
            return_mode="median", grad_to_none=leaves) * 1e3
        print("ssd", rows, flush=True)
    except Exception as err:
        rows["mamba_ssm_error"] = repr(err)[:200]
    try:
        from fla.ops.simple_gla import chunk_simple_gla

        q = torch.randn(b, t, h, n, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(b, t, h, n, device=DEV, dtype=torch.bfloat16)
        v = torch.randn(b, t, h, p, device=DEV, dtype=torch.bfloat16)
        gate = -torch.rand(b, t, h, device=DEV).mul(0.1).float()
        chunk_simple_gla(q, k, v, gate)
        rows["fla_simple_gla_fwd_us"] = do_bench(lambda: chunk_simple_gla(q, k, v, gate), return_mode="median") * 1e3
        print("ssd", rows, flush=True)
    except Exception as err:
        rows["fla_error"] = repr(err)[:200]
    if os.environ.get("SSM_HF_BENCH_FLA_BACKWARD") == "1":  # fla 0.6's backward needs Triton >= 3.7.1
        try:
            fla_leaves = [v_.clone().requires_grad_(True) for v_ in (q, k, v, gate)]
            rows["fla_simple_gla_fwd_bwd_us"] = do_bench(lambda: chunk_simple_gla(*fla_leaves)[0].backward(dy),
                                                         return_mode="median", grad_to_none=fla_leaves) * 1e3
        except Exception as err:
            rows["fla_backward_error"] = repr(err)[:200]
    R["ssd"] = rows
    print("ssd", rows, flush=True)


def decode():
    """Greedy decoding speed and memory, bf16: 64 new tokens after a 16k-token prompt at batch 1, after a 1k-token
    prompt at batch 64, and peak memory for a 64k-token prompt (batch 1, 8 new tokens)."""
    llama = llama_130m_config()
    rows = {}
    # the Triton decode steps give the tokens of the PyTorch steps (float32, greedy)
    rows["triton_decode_equals_reference_tokens"] = greedy_matches_reference(
        ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-130m")))
    print("decode tokens equal to the reference path:", rows["triton_decode_equals_reference_tokens"], flush=True)
    for name, build in (("llama-130m sdpa", lambda: transformers.LlamaForCausalLM(llama)),
                        ("ours mamba-130m", lambda: ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-130m"))),
                        ("ours mamba2-130m", lambda: ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m")))):
        model = build().to(DEV, torch.bfloat16).eval()
        row = {}
        for batch, prompt_len, new in ((1, 16384, 64), (64, 1024, 64), (1, 65536, 8)):
            ids = torch.randint(1, 50000, (batch, prompt_len), device=DEV)
            kwargs = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                with torch.no_grad():
                    model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kwargs)  # warm-up
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kwargs)
                    torch.cuda.synchronize()
                    prefill = time.perf_counter() - start
                    start = time.perf_counter()
                    model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kwargs)
                    torch.cuda.synchronize()
                    total = time.perf_counter() - start
                key = f"b{batch}_p{prompt_len}"
                row[key + "_decode_tok_s"] = batch * (new - 1) / max(total - prefill, 1e-9)
                row[key + "_peak_GB"] = (torch.cuda.max_memory_allocated() - base) / 1e9
            except torch.cuda.OutOfMemoryError:
                row[f"b{batch}_p{prompt_len}_error"] = "out of memory"
        rows[name] = row
        print("decode", name, row, flush=True)
        model = None
        torch.cuda.empty_cache()
    R["decode"] = rows


def graphed_steps(model, cache, nxt: torch.Tensor, steps: int) -> dict:
    """The same decoding step captured once in a CUDA graph and replayed: checks its logits against an eager step
    from a copy of the cache, then times `steps` replays with greedy feedback."""
    import copy

    from ssm_hf.models.cache_names import CACHE_NAME  # transformers' keyword for the cache (5.24: `cache`)

    static_in = nxt.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up on a side stream, as graph capture requires
            model(static_in, **{CACHE_NAME: cache}, use_cache=True)
    torch.cuda.current_stream().wait_stream(side)
    twin = copy.deepcopy(cache)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model(static_in, **{CACHE_NAME: cache}, use_cache=True).logits
    # capture does not run the step: replay it once and compare with an eager step from the same state
    graph.replay()
    eager = model(static_in, **{CACHE_NAME: twin}, use_cache=True).logits
    err = ((static_logits.float() - eager.float()).norm() / eager.float().norm()).item()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        graph.replay()
        static_in.copy_(static_logits[:, -1:].argmax(-1))
    torch.cuda.synchronize()
    return {"graph_tok_s": static_in.shape[0] * steps / (time.perf_counter() - start), "graph_rel_err": err}


def step():
    """Decoding without generate(): after a prompt, time `model(next_token, cache)` calls in a loop (eager, greedy
    feedback), bf16; for our models also the step captured in a CUDA graph; and the bytes the cache holds after
    the prompt."""
    from ssm_hf.models.cache_names import CACHE_NAME, output_cache  # (not at the top: gpu_ab.py's base may lack it)

    llama = llama_130m_config()
    rows = {}
    for name, build in (("llama-130m sdpa", lambda: transformers.LlamaForCausalLM(llama)),
                        ("ours mamba-130m", lambda: ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-130m"))),
                        ("ours mamba2-130m", lambda: ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m")))):
        model = build().to(DEV, torch.bfloat16).eval()
        row = {}
        for batch, prompt_len in ((1, 16384), (64, 1024), (1, 65536)):
            key = f"b{batch}_p{prompt_len}"
            try:
                torch.cuda.empty_cache()
                with torch.no_grad():
                    ids = torch.randint(1, 50000, (batch, prompt_len), device=DEV)
                    out = model(ids, use_cache=True, logits_to_keep=1)
                    cache = output_cache(out)
                    nxt = out.logits[:, -1:].argmax(-1)
                    row[key + "_cache_GB"] = sum(t.numel() * t.element_size() for layer in cache.layers
                                                 for t in vars(layer).values()
                                                 if isinstance(t, torch.Tensor)) / 1e9 + sum(
                        t.numel() * t.element_size() for layer in cache.layers
                        for states in (getattr(layer, "conv_states", {}), getattr(layer, "recurrent_states", {}))
                        for t in states.values() if isinstance(t, torch.Tensor)) / 1e9
                    steps = 32
                    for i in range(steps + 8):
                        if i == 8:
                            torch.cuda.synchronize()
                            start = time.perf_counter()
                        out = model(nxt, **{CACHE_NAME: cache}, use_cache=True)
                        nxt = out.logits[:, -1:].argmax(-1)
                    torch.cuda.synchronize()
                    row[key + "_tok_s"] = batch * steps / (time.perf_counter() - start)
                    if name.startswith("ours") and DEV == "cuda":
                        row.update({f"{key}_{k}": v for k, v in graphed_steps(model, cache, nxt, steps).items()})
            except torch.cuda.OutOfMemoryError:
                row[key + "_error"] = "out of memory"
            cache = out = None
        rows[name] = row
        print("step", name, row, flush=True)
        model = None
        torch.cuda.empty_cache()
    R["step"] = rows


def copy_bandwidth() -> float:
    """Bytes per second of a 2 GiB device-to-device copy, counting bytes read and written."""
    x = torch.empty(1024**3, dtype=torch.bfloat16, device=DEV).normal_()
    copy_ms = do_bench(lambda: x.clone(), return_mode="median")
    return 2 * x.numel() * 2 / (copy_ms * 1e-3)


def time_scan():
    batch, seqlen, d_inner, d_state = 8, 4096, 1536, 16
    sets = [scan_inputs(batch, seqlen, d_inner, d_state, torch.bfloat16, seed=s) for s in range(2)]
    bandwidth = copy_bandwidth()
    # the forward's bytes: read x, delta, z (bf16, 3 x B*T*D), B and C, write y (bf16)
    fwd_bytes = 2 * (4 * batch * seqlen * d_inner + 2 * batch * seqlen * d_state)
    it = iter(range(10**9))
    pick = lambda: sets[next(it) % 2]  # noqa: E731
    fwd = do_bench(lambda: selective_scan_triton(**pick(), delta_softplus=True), return_mode="median")
    grads = [{k: v.requires_grad_(v.is_floating_point()) for k, v in s.items()} for s in sets]
    dy = torch.randn(batch, seqlen, d_inner, device=DEV, dtype=torch.bfloat16)

    def fwd_bwd():
        y = selective_scan_triton(**grads[next(it) % 2], delta_softplus=True)
        y.backward(dy)

    fwd_bwd_ms = do_bench(fwd_bwd, return_mode="median", grad_to_none=[t for s in grads for t in s.values()])
    torch_ms = do_bench(lambda: kernels.selective_scan_chunked(**pick(), delta_softplus=True), return_mode="median",
                        warmup=1, rep=1)
    from transformers.models.mamba import modeling_mamba
    s = sets[0]
    loop_ms = do_bench(lambda: modeling_mamba.mamba_selective_scan(
        s["x"].transpose(1, 2), s["delta"].transpose(1, 2), s["A"], s["B"].transpose(1, 2), s["C"].transpose(1, 2),
        s["D"], s["z"].transpose(1, 2), delta_bias=s["delta_bias"], delta_softplus=True), return_mode="median",
        warmup=1, rep=1)
    R["time"] = dict(copy_TBps=bandwidth / 1e12, floor_us=fwd_bytes / bandwidth * 1e6, triton_fwd_us=fwd * 1e3,
                     triton_fwd_bwd_us=fwd_bwd_ms * 1e3, torch_chunked_fwd_us=torch_ms * 1e3,
                     transformers_loop_fwd_us=loop_ms * 1e3)
    print("time", R["time"], flush=True)


LATENCY_SNIPPET = """
import time, torch, sys
sys.path.insert(0, '.')
start = time.perf_counter()
from ssm_hf.kernels.selective_scan_triton import selective_scan_triton
x = torch.randn(2, 512, 256, device='cuda', requires_grad=True)
dt = torch.randn(2, 512, 256, device='cuda'); A = -torch.rand(256, 16, device='cuda')
B = torch.randn(2, 512, 16, device='cuda'); C = torch.randn(2, 512, 16, device='cuda')
selective_scan_triton(x, dt, A, B, C, delta_softplus=True).sum().backward()
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


SSD_LATENCY_SNIPPET = """
import time, torch, sys
sys.path.insert(0, '.')
start = time.perf_counter()
from ssm_hf.kernels.ssd_triton import ssd_scan_triton
x = torch.randn(2, 512, 8, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
dt = torch.randn(2, 512, 8, device='cuda'); A = -torch.rand(8, device='cuda')
B = torch.randn(2, 512, 1, 128, device='cuda', dtype=torch.bfloat16)
C = torch.randn(2, 512, 1, 128, device='cuda', dtype=torch.bfloat16)
ssd_scan_triton(x, dt, A, B, C, dt_softplus=True).float().sum().backward()
torch.cuda.synchronize()
print(time.perf_counter() - start)
"""


def latency():
    """First call (forward + backward) of the selective scan and of the SSD in fresh processes: the first with an
    empty Triton cache, the second with the cache the first filled."""
    R["latency"] = {}
    for name, snippet in (("scan", LATENCY_SNIPPET), ("ssd", SSD_LATENCY_SNIPPET)):
        with tempfile.TemporaryDirectory() as cache:
            env = dict(os.environ, TRITON_CACHE_DIR=cache)
            runs = [float(subprocess.run([sys.executable, "-c", snippet], env=env, capture_output=True,
                                         text=True, check=True).stdout.split()[-1]) for _ in range(2)]
        R["latency"] |= {f"{name}_cold_s": runs[0], f"{name}_warm_s": runs[1]}
    print("latency", R["latency"], flush=True)


def _llama_and_ours() -> tuple:
    """(name, build) of the e2e peer, transformers' Llama 130M with SDPA, and of our 130M models."""
    llama = llama_130m_config(max_position_embeddings=4096)
    return (("llama-130m sdpa", lambda: transformers.LlamaForCausalLM(llama)),
            ("ours mamba-130m", lambda: ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-130m"))),
            ("ours mamba2-130m", lambda: ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m"))))


def e2e():
    """Prefill and training tokens/s at 4 x 2048, bf16 weights, AdamW. Llama runs first and again last: the two
    bracket our models, so that a machine whose speed drifts during the process shows it (one early call measured
    Llama 153K and 176K tokens/s in two processes of the same code)."""
    rows = {}
    models = _llama_and_ours()
    for name, build in (*models, ("llama-130m sdpa again", models[0][1])):
        model = build().to(DEV, torch.bfloat16)
        ids = torch.randint(0, 50000, (4, 2048), device=DEV)
        model.eval()
        with torch.no_grad():
            prefill = do_bench(lambda: model(ids, use_cache=False), return_mode="median", warmup=200, rep=1000)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

        def step():
            model(ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        torch.cuda.reset_peak_memory_stats()
        train = do_bench(step, return_mode="median", warmup=500, rep=2000)
        rows[name] = dict(prefill_tok_s=ids.numel() / (prefill * 1e-3), train_tok_s=ids.numel() / (train * 1e-3),
                          train_peak_GB=torch.cuda.max_memory_allocated() / 1e9)
        print("e2e", name, rows[name], flush=True)
        model = opt = None
        torch.cuda.empty_cache()
    R["e2e"] = rows


def _warm_training_step(build):
    """A training step (4 x 2048 random tokens, bf16 weights, AdamW) of the model `build()` makes, after 5 steps
    of warm-up; the model and optimiser live in the returned function (drop it to free them)."""
    model = build().to(DEV, torch.bfloat16).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, 50000, (4, 2048), device=DEV)

    def step():
        model(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    return step


def _wall_ms(fn, n: int) -> float:
    """Synchronised wall time per call of `fn` over n calls in a row, ms."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / n * 1e3


def _alternate_env(variable: str, settings: dict, timed: dict, rounds: int) -> dict:
    """Synchronised wall ms per call (`_wall_ms`) of each of `timed` ({name: (fn, calls)}) under each of `settings`
    ({label: the environment variable's value, None for unset}), alternated `rounds` times in this process, one
    untimed call after each switch; the variable is unset afterwards. Returns {(name, label): [ms, one per round]}."""
    times = {(name, label): [] for name in timed for label in settings}
    try:
        for _ in range(rounds):
            for label, value in settings.items():
                if value is None:
                    os.environ.pop(variable, None)
                else:
                    os.environ[variable] = value
                for name, (fn, calls) in timed.items():
                    fn()
                    times[name, label].append(_wall_ms(fn, calls))
    finally:
        os.environ.pop(variable, None)
    return times


def _issue_ms(step, n: int) -> float:
    """Median over n steps of the host's time to issue one step after a synchronise (its Python returning), ms."""
    import statistics

    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    torch.cuda.synchronize()
    return statistics.median(times)


def host_e2e():
    """Whether a training step (4 x 2048, bf16 weights, AdamW) waits on the host: per step, the wall time
    (synchronised), the host's time to issue it (the step's Python returns before the GPU finishes when the GPU is
    the limit) and the GPU's busy time (profiler, kernels alone); then the host functions that take most of one
    step's issue time (cProfile, by own time), each line printed as it comes."""
    for name, build in _llama_and_ours():
        step = _warm_training_step(build)
        wall = _wall_ms(step, 10)
        issue = _issue_ms(step, 10)
        busy = sum(_kernel_times(step, 5).values()) / 1e3
        line = (f"wall {wall:.1f} ms, host issue {issue:.1f} ms, GPU busy {busy:.1f} ms per step "
                f"({8192 / wall * 1e3:,.0f} tokens/s)")
        R.setdefault("host_e2e", {})[name] = line
        print("host_e2e", name, line, flush=True)
        _print_host_profile(f"host_e2e {name}", step, calls=1, top=22)
        step = None
        torch.cuda.empty_cache()


def _warm_prefill(build):
    """A prefill forward (4 x 2048 random tokens, bf16, no gradients, use_cache=False) of the model `build()` makes,
    after 5 of warm-up; the model lives in the returned function (drop it to free the model)."""
    model = build().to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 50000, (4, 2048), device=DEV)

    def forward():
        with torch.no_grad():
            model(ids, use_cache=False)

    for _ in range(5):
        forward()
    return forward


def prefill_split():
    """Whether prefill (4 x 2048, bf16, forward with use_cache=False, no gradients) waits on the host: per forward,
    the wall time (synchronised), the host's time to issue it and the GPU's busy time (profiler, kernels alone),
    for Llama and our two 130M models in one process; and the largest kernels of ours."""
    for name, build in _llama_and_ours():
        forward = _warm_prefill(build)
        wall = _wall_ms(forward, 20)
        issue = _issue_ms(forward, 20)
        kernels_us = _kernel_times(forward, 5)
        busy = sum(kernels_us.values()) / 1e3
        line = (f"wall {wall:.2f} ms, host issue {issue:.2f} ms, GPU busy {busy:.2f} ms per forward "
                f"({8192 / wall * 1e3:,.0f} tokens/s)")
        R.setdefault("prefill_split", {})[name] = line
        print("prefill_split", name, line, flush=True)
        for key, us in sorted(kernels_us.items(), key=lambda kv: -kv[1])[:10]:
            print(f"prefill_split {name} {us:9.1f} us  {key}", flush=True)
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                forward()
        ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        for event in ops[:14]:  # host time per forward, by op (self time: without the ops it calls)
            print(f"prefill_split {name} host {event.self_cpu_time_total / 3e3:7.2f} ms "
                  f"{event.count / 3:6.0f} calls  {event.key[:60]}", flush=True)
        forward = None
        torch.cuda.empty_cache()


def _first_token_ms(model, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """generate()'s wall ms to its first token (max_new_tokens=1, greedy) for ids and mask: median of 10 after 3."""
    import statistics

    def first_token():
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)

    for _ in range(3):
        first_token()
    return statistics.median(_wall_ms(first_token, 1) for _ in range(10))


def prefill_cache():
    """A prompt as generate() runs it (bf16, no gradients, an all-ones attention mask, a new cache filled): wall ms
    per forward (synchronised, median of 20) against the same forward with use_cache=False, at 4 x 2048 and 1 x 512
    tokens; then generate()'s time to the first token (max_new_tokens=1, greedy) at 1 x 512, median of 10; for
    Llama and our two 130M models in one process."""
    import statistics

    for name, build in _llama_and_ours():
        model = build().to(DEV, torch.bfloat16).eval()
        for batch, seqlen in ((4, 2048), (1, 512)):
            ids = torch.randint(0, 50000, (batch, seqlen), device=DEV)
            mask = torch.ones_like(ids)
            timed = {}
            for label, kwargs in (("no cache", dict(use_cache=False)),
                                  ("cache + mask", dict(use_cache=True, attention_mask=mask))):
                def forward(kwargs=kwargs):
                    with torch.no_grad():
                        model(ids, **kwargs)

                for _ in range(5):
                    forward()
                timed[label] = statistics.median(_wall_ms(forward, 1) for _ in range(20))
            line = ", ".join(f"{label} {ms:.2f} ms" for label, ms in timed.items())
            R.setdefault("prefill_cache", {})[f"{name} {batch}x{seqlen}"] = timed
            print("prefill_cache", name, f"{batch}x{seqlen}:", line, flush=True)
        ids = torch.randint(0, 50000, (1, 512), device=DEV)
        ttft = _first_token_ms(model, ids, torch.ones_like(ids))
        R["prefill_cache"][f"{name} ttft"] = ttft
        print("prefill_cache", name, f"generate() first token after 1x512: {ttft:.2f} ms", flush=True)
        model = None
        torch.cuda.empty_cache()


def _padded_batch(lengths: tuple, width: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), (len(lengths), width) on the GPU: random ids, rows of `lengths` real tokens padded on
    `side` ("left" or "right") with id 0."""
    ids = torch.randint(1, 50000, (len(lengths), width), device=DEV)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, slice(width - n, width) if side == "left" else slice(0, n)] = 1
    return ids * mask, mask


def train_padded():
    """A training step on a batch padded on the right, as a training collator gives it (bf16 weights, AdamW, labels
    -100 at the padding): 4 x 2048 with rows of 2048, 1792, 1536 and 1024 real tokens, beside the same step with no
    mask; wall ms per step (synchronised, median of 10 single steps after 5 of warm-up) and GPU busy ms (the
    profiler's kernel time per step); Llama and our two 130M models in one process."""
    import statistics

    for name, build in _llama_and_ours():
        model = build().to(DEV, torch.bfloat16).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids, mask = _padded_batch((2048, 1792, 1536, 1024), 2048, "right")
        labels = ids.masked_fill(mask == 0, -100)
        timed = {}
        for label, attention_mask in (("unpadded", None), ("right-padded", mask)):
            def step(attention_mask=attention_mask):
                model(ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

            for _ in range(5):
                step()
            wall = statistics.median(_wall_ms(step, 1) for _ in range(10))
            busy = sum(_kernel_times(step, 5).values()) / 1e3
            timed[label] = dict(wall_ms=round(wall, 2), gpu_ms=round(busy, 2))
        R.setdefault("train_padded", {})[name] = timed
        print("train_padded", name, "4x2048:", ", ".join(f"{k} wall {v['wall_ms']:.2f} ms, GPU {v['gpu_ms']:.2f} ms"
                                                          for k, v in timed.items()), flush=True)
        model = opt = None
        torch.cuda.empty_cache()


def _prefill_and_step(model, opt, ids: torch.Tensor) -> tuple:
    """(prefill, step): a forward of `ids` in eval mode without gradients or cache, and a training step on them
    (labels = ids, no cache, `opt` stepped, gradients dropped)."""
    def prefill():
        with torch.no_grad():
            model.eval()(ids, use_cache=False)

    def step():
        model.train()(ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return prefill, step


def e2e_lengths():
    """Where Mamba overtakes attention: prefill and training at a fixed 8,192 tokens per step as 4 x 2048,
    2 x 4096 and 1 x 8192, then 1 x 16384 (bf16 weights, AdamW, no cache): per step the wall ms (synchronised,
    median of 5 single steps after 3 of warm-up) and the GPU busy ms (the profiler's kernel time, which the host's
    noise does not reach); Llama (positions up to 16k) and our two 130M models in one process."""
    import statistics

    llama = llama_130m_config(max_position_embeddings=16384)
    builds = (("llama-130m sdpa", lambda: transformers.LlamaForCausalLM(llama)), *_llama_and_ours()[1:])
    for name, build in builds:
        model = build().to(DEV, torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        for batch, seqlen in ((4, 2048), (2, 4096), (1, 8192), (1, 16384)):
            ids = torch.randint(0, 50000, (batch, seqlen), device=DEV)
            prefill, step = _prefill_and_step(model, opt, ids)
            row = {}
            for label, fn in (("prefill", prefill), ("training", step)):
                for _ in range(3):
                    fn()
                wall = statistics.median(_wall_ms(fn, 1) for _ in range(5))
                busy = sum(_kernel_times(fn, 3).values()) / 1e3
                row[label] = dict(wall_ms=round(wall, 2), gpu_ms=round(busy, 2),
                                  gpu_tok_s=round(ids.numel() / busy * 1e3))
            if batch == 1 and seqlen == 16384:
                torch.cuda.reset_peak_memory_stats()
                step()
                row["training_peak_GB"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
            R.setdefault("e2e_lengths", {})[f"{name} {batch}x{seqlen}"] = row
            print("e2e_lengths", name, f"{batch}x{seqlen}", row, flush=True)
        model = opt = None
        torch.cuda.empty_cache()


def prefill_left_padded():
    """A left-padded batch as generate() runs its first step (bf16, no gradients, a new cache filled): wall ms per
    forward (synchronised, median of 20) at 4 x 2048 with rows of 2048, 1792, 1536 and 1024 real tokens, beside the
    same forward unpadded (an all-ones mask); then generate()'s time to the first token (max_new_tokens=1, greedy)
    for rows of 512, 448, 384 and 256 tokens, median of 10; Llama and our two 130M models in one process."""
    import statistics

    for name, build in _llama_and_ours():
        model = build().to(DEV, torch.bfloat16).eval()
        ids, mask = _padded_batch((2048, 1792, 1536, 1024), 2048, "left")
        timed = {}
        for label, attention_mask in (("unpadded", torch.ones_like(mask)), ("left-padded", mask)):
            def forward(attention_mask=attention_mask):
                with torch.no_grad():
                    model(ids, attention_mask=attention_mask, use_cache=True)

            for _ in range(5):
                forward()
            timed[label] = statistics.median(_wall_ms(forward, 1) for _ in range(20))
        R.setdefault("prefill_left_padded", {})[f"{name} 4x2048"] = timed
        print("prefill_left_padded", name, "4x2048:", ", ".join(f"{k} {v:.2f} ms" for k, v in timed.items()),
              flush=True)
        ids, mask = _padded_batch((512, 448, 384, 256), 512, "left")
        ttft = _first_token_ms(model, ids, mask)
        R["prefill_left_padded"][f"{name} ttft"] = ttft
        print("prefill_left_padded", name, f"generate() first token, left-padded 4x512: {ttft:.2f} ms", flush=True)
        model = None
        torch.cuda.empty_cache()


def sync_check():
    """Device synchronisations in a prefill forward (eval, no gradients, use_cache=False) and a training step
    (4 x 512, bf16, AdamW) of each family: with torch.cuda.set_sync_debug_mode("error") the first one raises, and
    its innermost frames are printed; "none" when a forward or step runs without one."""
    import traceback

    for preset in ("mamba-130m", "mamba2-130m", "hybrid-130m", "s4d-130m"):
        model = ssm_hf.AutoModelForCausalLM.from_config(ssm_hf.preset_config(preset)).to(DEV, torch.bfloat16)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
        ids = torch.randint(0, 50000, (4, 512), device=DEV)
        forward, step = _prefill_and_step(model, opt, ids)

        for name, fn in (("prefill", forward), ("training step", step)):
            fn()  # warm: first calls compile and look up what they may, outside the check
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
            try:
                fn()
                found = "none"
            except RuntimeError as err:
                frames = [f"{f.filename.split('site-packages/')[-1]}:{f.lineno} {f.name}"
                          for f in traceback.extract_tb(err.__traceback__)][-4:]
                found = f"{str(err).splitlines()[0][:80]} at " + " <- ".join(reversed(frames))
            finally:
                torch.cuda.set_sync_debug_mode("default")
            R.setdefault("sync_check", {})[f"{preset} {name}"] = found
            print("sync_check", preset, name, found, flush=True)
        model = opt = None
        torch.cuda.empty_cache()


def check_ab(rounds: int = 5):
    """The token-id range check's device synchronisation, A/B in one process: prefill forwards (4 x 2048, bf16, no
    gradients, use_cache=False; synchronised wall per forward over 20) and training steps (AdamW; over 10) with
    SSM_HF_CHECK_TOKEN_IDS=1 (the check reads the ids back in every forward, as before the eleventh session) and
    unset (no read-back in cache-less forwards on the GPU), alternated `rounds` times; medians, and how many pairs
    were faster without the read-back."""
    import statistics

    for preset in ("mamba2-130m", "mamba-130m"):
        def build(preset=preset):
            return ssm_hf.AutoModelForCausalLM.from_config(ssm_hf.preset_config(preset))

        step = _warm_training_step(build)
        model = build().to(DEV, torch.bfloat16).eval()
        ids = torch.randint(0, 50000, (4, 2048), device=DEV)

        def forward():
            with torch.no_grad():
                model(ids, use_cache=False)

        times = _alternate_env("SSM_HF_CHECK_TOKEN_IDS", {"check": "1", "no check": None},
                               {"prefill": (forward, 20), "training step": (step, 10)}, rounds)
        for name in ("prefill", "training step"):
            check, no_check = times[name, "check"], times[name, "no check"]
            wins = sum(b < a for a, b in zip(check, no_check))
            line = (f"{preset} {name}: check {statistics.median(check):.2f} ms, no check "
                    f"{statistics.median(no_check):.2f} ms per call (median of {rounds}); faster without in {wins} "
                    f"of {rounds} pairs; " + ", ".join(f"{a:.1f}/{b:.1f}" for a, b in zip(check, no_check)))
            R.setdefault("check_ab", {})[f"{preset} {name}"] = line
            print("check_ab", line, flush=True)
        step = model = None
        torch.cuda.empty_cache()


@contextlib.contextmanager
def _plans_off():
    """Inside, the ops' forwards run as Python, not replayed from their plans (`kernels.plans`; nothing to turn off
    on an ssm_hf from before plans, as bench/gpu_ab.py's base may be)."""
    try:
        from ssm_hf.kernels import plans
    except ImportError:
        yield
        return
    on_gpu, plans._on_current_gpu = plans._on_current_gpu, lambda tensor: False
    try:
        yield
    finally:
        plans._on_current_gpu = on_gpu


def _print_host_profile(label: str, fn, calls: int, top: int) -> None:
    """The `top` host functions by own time over `calls` calls of fn (cProfile, after a synchronise), a line each
    after `label`."""
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    torch.cuda.synchronize()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    for row in text.getvalue().splitlines():
        if row.strip():
            print(label, row[:180].replace("/tmp/site/", ""), flush=True)


def launch_replay():
    """What a prefill forward's Triton launches cost the host (4 x 2048, bf16, no gradients, use_cache=False), per
    forward, for each of our 130M models: the forward's host issue as it is and with every launch a no-op (the
    rest: our wrappers' Python and the PyTorch ops), and the forward's launches alone, captured once and replayed
    (a) through FastLaunch, (b) straight to each compiled kernel's launcher with the captured tensors, (c) the same
    with the tensors' addresses as ints: a floor for an op that keeps its whole launch plan per input signature
    (what `kernels.plans` does; plans are off in this section, whose capture sees FastLaunch's launches only)."""
    from host_ops import _Launches

    from ssm_hf.kernels.launch import FastLaunch, _argument_key

    with _plans_off():  # replayed plans launch past FastLaunch, unseen by the capture
        for name, build in _llama_and_ours()[1:]:
            forward = _warm_prefill(build)
            captured = _captured_launches(FastLaunch, forward)
            issue = _issue_ms(forward, 20)
            with _Launches():
                forward()
                stubbed = _issue_ms(forward, 20)
                if os.environ.get("LAUNCH_REPLAY_PROFILE"):  # the host functions of a stubbed forward, by own time
                    _print_host_profile(f"launch_replay {name}", forward, calls=5, top=40)
            device = torch.cuda.current_device()
            stream = torch.cuda.current_stream().cuda_stream
            entries = []
            for kernel, grid, args, kwargs in captured:
                _, run, function, metadata, tail = kernel._kernels[(device, _argument_key(args), tuple(kwargs.items()))]
                grid3 = (*grid, 1, 1)[:3]
                as_ints = tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)
                entries.append((run, grid3, function, metadata, args, as_ints, tail))

            def via_fast_launch():
                for kernel, grid, args, kwargs in captured:
                    kernel[grid](*args, **kwargs)

            def direct():
                for run, g, function, metadata, args, _, tail in entries:
                    run(g[0], g[1], g[2], stream, function, metadata, None, None, None, *args, *tail)

            def direct_ints():
                for run, g, function, metadata, _, args, tail in entries:
                    run(g[0], g[1], g[2], stream, function, metadata, None, None, None, *args, *tail)

            line = (f"{len(captured)} launches; host issue {issue:.2f} ms, launches stubbed {stubbed:.2f} ms; "
                    f"launches replayed: FastLaunch {_issue_ms(via_fast_launch, 20):.2f} ms, "
                    f"launcher with tensors {_issue_ms(direct, 20):.2f} ms")
            try:
                line += f", launcher with int addresses {_issue_ms(direct_ints, 20):.2f} ms"
            except Exception as err:  # a Triton whose launcher takes no int for a pointer
                line += f", launcher with int addresses failed: {err!r}"[:200]
            print("launch_replay", name, line, flush=True)
            R.setdefault("launch_replay", {})[name] = line
            forward = captured = entries = None
            torch.cuda.empty_cache()


def host_costs():
    """Host time of single PyTorch and launch operations as a mixer's wrapper issues them (us per call, the best of
    three loops of 2000; no synchronisation inside a loop): what each line of glue costs on this host."""
    from ssm_hf.kernels import ssd_triton
    from ssm_hf.kernels.launch import on_device_of

    big = torch.randn(4, 2048, 3352, device=DEV, dtype=torch.bfloat16)
    a_log = torch.randn(24, device=DEV, dtype=torch.bfloat16)
    a32 = a_log.float()
    w = torch.randn(3352, 768, device=DEV, dtype=torch.bfloat16)
    h = torch.randn(2, 16, 768, device=DEV, dtype=torch.bfloat16)

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x

        @staticmethod
        def backward(ctx, g):
            return g

    made = torch.empty(4 * 2048 * 24, device=DEV, dtype=torch.float32)
    raw = big[..., -24:]

    def dt_launch():
        ssd_triton._dt_make_kernel[(96,)](raw, raw, made, made, made.numel(), 2048, 24, *raw.stride()[:2], 0.0, 0.0,
                                          HAS_BIAS=False, SOFTPLUS=True, HAS_LIMIT=False, STORE_DERIV=False,
                                          BLOCK=1024, num_warps=4)

    def no_grad_apply():
        with torch.no_grad():
            Identity.apply(big)

    def device_context():
        with on_device_of(big):
            pass

    cases = {
        "torch.empty (4, 2048, 1792) bf16": lambda: torch.empty(4, 2048, 1792, device=DEV, dtype=torch.bfloat16),
        "torch.empty_like": lambda: torch.empty_like(big),
        "on_device_of enter+exit": device_context,
        "torch.cuda.current_device()": torch.cuda.current_device,
        "torch._C._cuda_getDevice()": torch._C._cuda_getDevice,
        "a_log.float() (bf16 -> f32)": a_log.float,
        "a32.float() (no-op)": a32.float,
        "torch.exp(a32)": lambda: torch.exp(a32),
        "-a32": lambda: -a32,
        "big.view(-1, 3352)": lambda: big.view(-1, 3352),
        "big.split(3 parts)": lambda: big.split([1536, 1792, 24], dim=-1),
        "big.unflatten": lambda: big.unflatten(-1, (2, 1676)),
        "big.stride()": big.stride,
        "big.data_ptr()": big.data_ptr,
        "Function.apply (grad on, input no grad)": lambda: Identity.apply(big),
        "Function.apply under no_grad (incl. context)": no_grad_apply,
        "torch.no_grad() enter+exit": lambda: torch.no_grad().__enter__() or torch.set_grad_enabled(True),
        "F.linear (2, 16, 768) x (3352, 768)": lambda: torch.nn.functional.linear(h, w),
        "h + h": lambda: h + h,
        "_dt_make_kernel launch (FastLaunch)": dt_launch,
    }
    for name, fn in cases.items():
        best = float("inf")
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(2000):
                fn()
            best = min(best, (time.perf_counter() - start) / 2000 * 1e6)
            torch.cuda.synchronize()
        R.setdefault("host_costs", {})[name] = best
        print(f"host_costs {best:7.2f} us  {name}", flush=True)


def check_add_norm():
    """The residual add + cast + RMS norm op (`kernels.add_rms_norm`, one Triton kernel each way) at the 130M models'
    training shape (4 x 2048 x 768, weight bf16), as the blocks use it (a float32 stream normed in bf16, "cast")
    and with a bf16 input added to a float32 residual ("add"): y, h and the gradients against its PyTorch form in
    float64 on the same values, beside the separate ops it stands for (add, cast, the norm kernel); then forward
    and forward+backward times (do_bench medians) of both in the same process."""
    from ssm_hf.kernels import norm_torch
    from ssm_hf.kernels.norm_triton import add_rms_norm_triton, rms_norm_gated_triton

    g = torch.Generator(device=DEV).manual_seed(0)
    w = (1 + 0.3 * torch.randn(768, device=DEV, generator=g)).bfloat16()
    rows = {}
    for case in ("cast", "add"):
        x = 3 * torch.randn(4, 2048, 768, device=DEV, generator=g)
        r = None
        if case == "add":
            x, r = x.bfloat16(), 3 * torch.randn(4, 2048, 768, device=DEV, generator=g)
        dy = torch.randn(4, 2048, 768, device=DEV, generator=g).bfloat16()
        dh = torch.randn(4, 2048, 768, device=DEV, generator=g)

        def fused(x, r, w):
            return add_rms_norm_triton(x, r, w, 1e-5, None, torch.bfloat16)

        def by_ops(x, r, w):  # h = residual + x, the norm kernel on h cast to the weight's dtype
            h = x if r is None else r + x
            return rms_norm_gated_triton(h.to(torch.bfloat16), None, w, 768, 1e-5), h

        def run(fn, x, r, w):
            leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (x, r, w)]
            y, h = fn(*leaves)
            torch.autograd.backward([y, h], [dy.to(y.dtype), dh.to(h.dtype)])
            return [y, h] + [t.grad if t is not None else None for t in leaves], leaves

        got, _ = run(fused, x, r, w)
        ops, _ = run(by_ops, x, r, w)
        exact, _ = run(lambda *t: norm_torch.add_rms_norm(*t, 1e-5, None, torch.bfloat16), x.double(),
                       r.double() if r is not None else None, w.double())
        for name, a, b, e in zip(("y", "h", "dx", "dresidual", "dweight"), got, ops, exact):
            if e is not None:
                rows[f"{case} {name}"] = dict(fused=rel(a.double(), e), by_ops=rel(b.double(), e), dtype=str(a.dtype))
                print("check_add_norm", case, name, rows[f"{case} {name}"], flush=True)
        for name, fn in (("fused", fused), ("by ops", by_ops)):
            fwd = do_bench(lambda: fn(x, r, w), return_mode="median") * 1e3
            _, leaves = run(fn, x, r, w)
            live = [t for t in leaves if t is not None]

            def both():
                y, h = fn(*leaves)
                torch.autograd.backward([y, h], [dy, dh.to(h.dtype)])

            fwd_bwd = do_bench(both, return_mode="median", grad_to_none=live) * 1e3
            rows[f"{case} {name}"] = dict(forward_us=round(fwd, 1), forward_backward_us=round(fwd_bwd, 1))
            print("check_add_norm", case, name, rows[f"{case} {name}"], flush=True)
    R["check_add_norm"] = rows


def _captured_launches(FastLaunch, fn) -> list:
    """(kernel, grid, args, kwargs) of each FastLaunch launch one call of `fn` makes, in order (launched as usual)."""
    captured = []
    original = FastLaunch._launch

    def capture(self, grid, args, kwargs):
        captured.append((self, grid, args, kwargs))
        return original(self, grid, args, kwargs)

    FastLaunch._launch = capture
    try:
        fn()
    finally:
        FastLaunch._launch = original
    torch.cuda.synchronize()
    return captured


def _launch_costs(step, launches: int = 200) -> dict[str, tuple[float, float, int]]:
    """Host time per launch of each FastLaunch kernel one training step launches (its first launch's arguments,
    relaunched `launches` times): through Triton's `JITFunction.run`, then through the cache. {} on an ssm_hf
    without FastLaunch."""
    try:
        from ssm_hf.kernels.launch import FastLaunch
    except ImportError:
        return {}
    captured = {}
    for kernel, grid, args, kwargs in _captured_launches(FastLaunch, step):
        captured.setdefault(kernel.__name__, (kernel, grid, args, kwargs))
    costs = {}
    for name, (kernel, grid, args, kwargs) in captured.items():
        times = []
        for launch in (kernel.fn[grid], kernel[grid]):
            launch(*args, **kwargs)
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(launches):
                launch(*args, **kwargs)
            times.append((time.perf_counter() - start) / launches * 1e6)
            torch.cuda.synchronize()
        costs[name] = (*times, len(args))
    return costs


def launch_ab():
    """`launch.FastLaunch` against Triton's own launch path (SSM_HF_TRITON_LAUNCH_CACHE=0), alternated six times in
    one process: the wall time of 10 training steps (4 x 2048, bf16, AdamW) and of 64 eager single-token decoding
    steps at batch 1 (bf16, after a 64-token prompt), per step, for each of our 130M models."""
    import statistics

    from ssm_hf.models.cache_names import CACHE_NAME, output_cache

    for name, build in (("mamba2-130m", lambda: ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m"))),
                        ("mamba-130m", lambda: ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-130m")))):
        step = _warm_training_step(build)
        model = build().to(DEV, torch.bfloat16).eval()
        prompt = torch.randint(0, 50000, (1, 64), device=DEV)
        with torch.no_grad():
            prefilled = output_cache(model(prompt, use_cache=True))
        token = prompt[:, -1:]

        def decode_step():
            with torch.no_grad():
                model(token, use_cache=True, **{CACHE_NAME: prefilled})

        times = _alternate_env("SSM_HF_TRITON_LAUNCH_CACHE", {"0": "0", "1": "1"},
                               {"train": (step, 10), "decode": (decode_step, 64)}, rounds=6)
        for (kind, setting), values in times.items():
            print("launch_ab", name, f"{kind} {setting}: median {statistics.median(values):.2f} ms per step "
                  f"({', '.join(f'{v:.1f}' for v in values)})", flush=True)
        step = model = prefilled = None
        torch.cuda.empty_cache()


def host_breakdown():
    """Where a training step's host time goes (4 x 2048, bf16 weights, AdamW): the host-issue time per step as it
    is, then with every Triton launch of ours replaced by a no-op (the difference is what Triton's launches cost the
    host; the numbers the step computes are then garbage, only its host time counts), and the PyTorch ops that
    take the most host time (profiler, CPU only, self time per step). With FastLaunch, also each kernel's host time
    per launch through it and through Triton (`_launch_costs`); whole steps on both paths are `launch_ab`'s."""
    from host_ops import _Launches
    from torch.profiler import ProfilerActivity, profile

    for name, build in _llama_and_ours():
        step = _warm_training_step(build)
        line = f"host issue {_issue_ms(step, 15):.1f} ms per step"
        if name.startswith("ours"):
            for kernel_name, (triton_us, cached_us, n_args) in _launch_costs(step).items():
                print("host_breakdown", name, f"{kernel_name} ({n_args} arguments): {triton_us:.1f} us per launch "
                      f"through Triton, {cached_us:.1f} us through FastLaunch", flush=True)
            with _Launches() as launches:
                step()
                launches.calls.clear()
                stubbed = _issue_ms(step, 15)
                per_step = sum(launches.calls.values()) / 15
            line += f"; Triton launches stubbed {stubbed:.1f} ms ({per_step:.0f} launches per step)"
        print("host_breakdown", name, line, flush=True)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
        total = sum(e.self_cpu_time_total for e in events) / 3e3
        print("host_breakdown", name, f"profiled self CPU {total:.1f} ms per step", flush=True)
        for event in events[:28]:
            print("host_breakdown", name, f"{event.self_cpu_time_total / 3e3:7.2f} ms {event.count / 3:7.0f}x "
                  f"{event.key[:90]}", flush=True)
        step = None
        torch.cuda.empty_cache()


def profile_e2e():
    """Where a training step's GPU time goes (4 x 2048, bf16 weights, AdamW): the 12 largest kernels by self CUDA
    time over 5 steps after 5 warm-up steps, for each of our 130M models."""
    from torch.profiler import ProfilerActivity, profile

    rows = {}
    for name, build in (("mamba-130m", lambda: ssm_hf.MambaForCausalLM(ssm_hf.preset_config("mamba-130m"))),
                        ("mamba2-130m", lambda: ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m")))):
        step = _warm_training_step(build)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step()
            torch.cuda.synchronize()
        events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in events)
        rows[name] = dict(step_ms=total / 5e3, top=[(e.key[:70], round(e.self_device_time_total / 5e3, 2),
                                                     round(100 * e.self_device_time_total / total, 1))
                                                    for e in events[:12]])
        print("profile_e2e", name, f"{rows[name]['step_ms']:.1f} ms GPU per step", flush=True)
        for key, ms, share in rows[name]["top"]:  # each line names the section: gpu_ab.py keeps those
            print(f"profile_e2e {name} {ms:8.2f} ms {share:5.1f}%  {key}", flush=True)
        step = None
        torch.cuda.empty_cache()
    R["profile_e2e"] = rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sections", default="check,time,latency,e2e")
    args = parser.parse_args()
    R["device"] = torch.cuda.get_device_name()
    R["versions"] = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__)
    print(R["device"], R["versions"], flush=True)
    for name in args.sections.split(","):
        start = time.time()
        try:
            {"check": check, "check_mamba2": check_mamba2_kernels, "check_fused": check_fused, "time": time_scan,
             "s4": s4_on_gpu, "conv": conv, "latency": latency, "e2e": e2e, "ssd": ssd,
             "check_ssd": check_ssd, "ssd_sweep": ssd_sweep, "ssd_forward_sweep": ssd_forward_sweep,
             "conv_sweep": conv_sweep, "conv_tiles": conv_tiles, "ssd_grads_sweep": ssd_grads_sweep,
             "fwd_sweep": fwd_sweep, "bwd_sweep": bwd_sweep,
             "profile_e2e": profile_e2e, "host_e2e": host_e2e, "host_breakdown": host_breakdown,
             "launch_ab": launch_ab, "prefill_split": prefill_split,
             "prefill_cache": prefill_cache, "prefill_left_padded": prefill_left_padded,
             "train_padded": train_padded, "e2e_lengths": e2e_lengths, "ssd_long_rows": ssd_long_rows,
             "sync_check": sync_check,
             "check_ab": check_ab,
             "check_add_norm": check_add_norm, "launch_replay": launch_replay, "host_costs": host_costs,
             "e2e_shape_sweep": e2e_shape_sweep,
             "decode": decode, "step": step}[name]()
        except Exception as err:  # a failing section is reported and the others still run
            R[f"{name}.error"] = repr(err)[:400]
            print(f"[{name}] failed: {err!r}", flush=True)
        print(f"[{name}] {time.time() - start:.1f}s", flush=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "results.json"), "w") as f:
            json.dump(R, f, indent=2, default=str)
    if "time" in R:
        t = R["time"]
        print("\n| B8 D1536 T4096 N16 bf16 | us |\n| --- | --- |")
        for key in ("floor_us", "triton_fwd_us", "triton_fwd_bwd_us", "torch_chunked_fwd_us",
                    "transformers_loop_fwd_us"):
            print(f"| {key} | {t[key]:,.0f} |")


if __name__ == "__main__":
    main()
