"""GPU: mamba2-130m prefill (4 x 2048, bf16, no cache) with the Triton gated RMSNorm against the PyTorch norm in
the same process, then a CUDA-time profile of one forward.

    PYTHONPATH=. python bench/gpu_mamba2_prefill_ab.py
"""

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import ssm_hf
from ssm_hf import kernels
from ssm_hf.kernels import norm_torch

model = ssm_hf.Mamba2ForCausalLM(ssm_hf.preset_config("mamba2-130m")).to("cuda", torch.bfloat16).eval()
ids = torch.randint(0, 50000, (4, 2048), device="cuda")
triton_norm = kernels.rms_norm_gated
with torch.no_grad():
    for label in ("triton norm", "torch norm", "triton norm again"):
        # the layer looks the op up in ssm_hf.kernels at each call, so swapping the attribute swaps the path
        kernels.rms_norm_gated = norm_torch.rms_norm_gated if label == "torch norm" else triton_norm
        ms = do_bench(lambda: model(ids, use_cache=False), return_mode="median", warmup=2, rep=5)
        print(label, "prefill tok/s", ids.numel() / (ms * 1e-3), flush=True)
    kernels.rms_norm_gated = triton_norm
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model(ids, use_cache=False)
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=60))
