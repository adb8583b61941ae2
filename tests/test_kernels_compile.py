"""Every Triton kernel launch of ssm_hf compiles for real NVIDIA GPUs (H100: sm_90, A100: sm_80), on the CPU.

The other kernel tests run the kernels in Triton's interpreter, which accepts code the GPU compiler rejects (a
loop-carried variable that changes type, a `tl.dot` of the wrong shape, too much shared memory...). Here
`tests/kernel_launches.py`, in a process without TRITON_INTERPRET, drives every public op of `ssm_hf.kernels` (and
a Mamba and a Mamba-2 layer) with the variants the launchers specialise on, records each launch's specialisation
instead of launching it, and compiles each one to cubin, ptxas included, for both targets (see its docstring).

The default set (80 variants) takes 30 s on two idle cores, about 90 s on two busy ones; with
`SSM_HF_COMPILE_CHECK=full` every scenario is compiled for both targets (480 variants, about 10 minutes on two busy
cores): each optional input alone on and alone off, the other tile shapes, the models in every dtype and under
autocast. The Triton cache goes to a fresh directory, so every run compiles everything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ARCHS = (90, 80)  # the first also compiles the PRIMARY scenarios (see kernel_launches.py)


def _skip_reason() -> str | None:
    """Why the compile check cannot run here, or None."""
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed"
    from triton.backends import backends

    if "nvidia" not in backends:
        return "the installed Triton has no CUDA backend"
    from triton.backends.nvidia.compiler import get_ptxas

    for arch in ARCHS:
        try:
            path = get_ptxas(arch).path
        except Exception as error:  # Triton raises RuntimeError or others when ptxas is missing
            return f"no ptxas for sm_{arch}: {error}"
        if not os.access(path, os.X_OK):
            return f"ptxas for sm_{arch} ({path}) is not executable"
    return None


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    tmp = tmp_path_factory.mktemp("kernel_compile")
    out = tmp / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "SSM_HF_FORCE_REFERENCE")}
    env.update(TRITON_CACHE_DIR=str(tmp / "triton_cache"), TRITON_DEFAULT_FP_FUSION="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, str(ROOT / "tests" / "kernel_launches.py"), str(out)]
    command += [f"--arch={arch}" for arch in ARCHS]
    if os.environ.get("SSM_HF_COMPILE_CHECK", "") == "full":
        command.append("--full")
    proc = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0 and out.exists(), (
        f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(out.read_text())


def test_every_driver_ran(report):
    """The op drivers themselves ran through (a driver that raises would leave its kernels unchecked)."""
    assert not report["drive_errors"], "\n\n".join(report["drive_errors"])


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_site_is_driven(report, arch):
    """Each `kernel[grid](...)` in the package's source was reached by some driver for this target: a new kernel, or
    a launch moved behind a new condition, fails here until a driver in kernel_launches.py calls it."""
    assert report["sites"], "no `kernel[grid](...)` launch found in ssm_hf: the source scan is broken"
    compiled = {result["kernel"] for result in report["results"] if result["arch"] == arch}
    missing = {kernel: sites for kernel, sites in report["sites"].items() if kernel not in compiled}
    if missing:
        pytest.fail(f"sm_{arch}: no driver in tests/kernel_launches.py launched these kernels, so they were not "
                    f"compiled (kernel: launch sites): {json.dumps(missing, indent=1)}", pytrace=False)


@pytest.mark.parametrize("arch", ARCHS)
def test_every_launch_compiles(report, arch):
    """Every recorded variant compiles to cubin for this target and fits its shared memory."""
    results = [result for result in report["results"] if result["arch"] == arch]
    assert results, f"nothing was compiled for sm_{arch}"
    failures: dict[tuple[str, str], list[dict]] = {}  # (kernel, error) -> its failed variants: each error once
    for result in results:
        if "error" in result:
            failures.setdefault((result["kernel"], result["error"]), []).append(result)
    if failures:
        blocks = []
        for (kernel, error), failed in failures.items():
            variants = "\n".join(f"  - {r['variant']}\n    launched by: {'; '.join(r['scenarios'])}"
                                 + (f" (and {r['n_scenarios'] - 3} more)" if r["n_scenarios"] > 3 else "")
                                 for r in failed)
            blocks.append(f"sm_{arch} {kernel}: {len(failed)} variant(s) fail to compile:\n{variants}\n"
                          f"  error:\n{error}")
        pytest.fail(f"{sum(map(len, failures.values()))} of {len(results)} kernel variants do not compile for "
                    f"sm_{arch}:\n\n" + "\n\n".join(blocks), pytrace=False)
