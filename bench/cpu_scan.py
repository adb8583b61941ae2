"""CPU timings of the selective scan and of a whole Mamba forward, beside transformers' torch path.

    python bench/cpu_scan.py [--repeats 5]

1. Scan at batch 1, length 2048, d_inner 1536 (hidden 768), d_state 16, float32: our chunked scan against the
   per-token loop of transformers' `mamba_selective_scan` (the path its Mamba takes without CUDA extensions).
2. Forward of the backbone of a 2-layer, 768-wide Mamba at 1x2048: ours against transformers' MambaModel with
   the same weights (max difference of the outputs printed as a check).
Prints median seconds and the ratio, as a Markdown table, with the machine and versions.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time

import torch
import transformers
from transformers.models.mamba import modeling_mamba

import ssm_hf
from ssm_hf import kernels


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    batch, seqlen, d_inner, d_state = 1, 2048, 1536, 16
    x = torch.randn(batch, seqlen, d_inner)
    # Δ as a freshly initialised Mamba produces it: softplus(bias + noise), bias the inverse softplus of a
    # log-uniform draw in [1e-3, 1e-1] (time_step_min/max), noise standing in for the input-dependent part.
    dt_init = torch.exp(torch.rand(d_inner) * (math.log(0.1) - math.log(0.001)) + math.log(0.001))
    bias = dt_init + torch.log(-torch.expm1(-dt_init))
    dt = 0.5 * torch.randn(batch, seqlen, d_inner)
    A = -torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
    B, C = torch.randn(batch, seqlen, d_state), torch.randn(batch, seqlen, d_state)
    D, z = torch.randn(d_inner), torch.randn(batch, seqlen, d_inner)

    rows = []
    with torch.no_grad():
        ours = lambda: kernels.selective_scan(x, dt, A, B, C, D, z, bias, True)  # noqa: E731
        theirs = lambda: modeling_mamba.mamba_selective_scan(  # noqa: E731
            x.transpose(1, 2), dt.transpose(1, 2), A, B.transpose(1, 2), C.transpose(1, 2), D, z.transpose(1, 2),
            delta_bias=bias, delta_softplus=True)
        diff = (ours() - theirs().transpose(1, 2)).abs().max().item()
        t_ours, t_theirs = median_seconds(ours, args.repeats), median_seconds(theirs, args.repeats)
        rows.append(("selective scan, B1 L2048 D1536 N16 fp32", t_ours, "transformers per-token loop", t_theirs,
                     diff))

        config = ssm_hf.MambaConfig(hidden_size=768, num_hidden_layers=2, vocab_size=50280)
        ours_model = ssm_hf.MambaForCausalLM(config).eval()
        fields = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "scan_chunk_size")}
        theirs_model = transformers.MambaForCausalLM(transformers.MambaConfig(**fields)).eval()
        theirs_model.load_state_dict(ours_model.state_dict())
        ids = torch.randint(0, config.vocab_size, (1, 2048))
        # the backbones: the LM head (2048 x 768 x 50280) is the same matmul in both and would hide the mixers
        f_ours = lambda: ours_model.backbone(ids, use_cache=False).last_hidden_state  # noqa: E731
        f_theirs = lambda: theirs_model.backbone(ids, use_cache=False).last_hidden_state  # noqa: E731
        diff = (f_ours() - f_theirs()).abs().max().item()
        rows.append(("2-layer 768-wide Mamba backbone forward, 1x2048 fp32", median_seconds(f_ours, args.repeats),
                     "transformers MambaModel (torch path)", median_seconds(f_theirs, args.repeats), diff))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print("| what | ours (s) | peer | peer (s) | speed-up | max abs diff |")
    print("| --- | --- | --- | --- | --- | --- |")
    for what, ours_s, peer, peer_s, diff in rows:
        print(f"| {what} | {ours_s:.3f} | {peer} | {peer_s:.3f} | {peer_s / ours_s:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
