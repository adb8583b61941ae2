"""Loads models with `trust_remote_code=True` in a Python where ssm_hf (and Triton) cannot be imported.

The tests call `run_without_ssm_hf`, which runs this file as `python remote_code_runner.py JOBS.json OUT.pt` in a
fresh Python. JOBS.json is a list of
{"model": folder or Hub repo id, "revision": branch or null, "input_ids": [[...]], "new_tokens": n}; OUT.pt gets,
per job, the logits of `input_ids`, the greedy continuation and the loaded class's module, plus what
`import ssm_hf` / `import triton` raised here. The environment (HF_ENDPOINT, HF_HOME) comes from the caller.
"""

import importlib.abc
import json
import os
import sys

BLOCKED = ("ssm_hf", "triton")


class _Blocked(importlib.abc.MetaPathFinder):
    """As if these packages were not installed (covers the editable install's own finder, which sys.path misses)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


def _sanitize() -> dict:
    # no source checkout on the path either (the tests run from the repository root)
    sys.path[:] = [entry for entry in sys.path
                   if not os.path.isdir(os.path.join(entry or os.getcwd(), "ssm_hf"))]
    sys.meta_path.insert(0, _Blocked())
    errors = {}
    for name in BLOCKED:
        try:
            __import__(name)
            errors[name] = None
        except ImportError as err:
            errors[name] = f"{type(err).__name__}: {err}"
    return errors


def run_without_ssm_hf(jobs: list[dict], workdir, env: dict | None = None) -> dict:
    """Run the jobs in a fresh Python (HF_HOME under `workdir`, plus `env`) and return what it saved."""
    import subprocess
    from pathlib import Path

    import torch

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    jobs_path, out_path = workdir / "jobs.json", workdir / "results.pt"
    jobs_path.write_text(json.dumps(jobs))
    full_env = {key: value for key, value in os.environ.items()
                if not key.startswith(("HF_", "HUGGING", "PYTHONPATH"))}
    # one thread: tiny models gain nothing from more, and a busy machine makes spinning thread pools crawl
    full_env.update(HF_HOME=str(workdir / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1",
                    **(env or {}))
    result = subprocess.run([sys.executable, __file__, str(jobs_path), str(out_path)], cwd=workdir, env=full_env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out_path, weights_only=False)


def main(jobs_path: str, out_path: str) -> None:
    import_errors = _sanitize()
    if any(error is None for error in import_errors.values()):
        raise SystemExit(f"could not hide packages: {import_errors}")
    import torch
    from transformers import AutoModelForCausalLM

    results = []
    for job in json.load(open(jobs_path)):
        model = AutoModelForCausalLM.from_pretrained(job["model"], revision=job.get("revision"),
                                                     trust_remote_code=True).eval()
        ids = torch.tensor(job["input_ids"])
        with torch.no_grad():
            logits = model(ids).logits
            tokens = model.generate(ids, max_new_tokens=job["new_tokens"], do_sample=False)
        results.append({"logits": logits, "tokens": tokens, "module": type(model).__module__,
                        "auto_map": dict(model.config.auto_map)})
    loaded = sorted(name for name in sys.modules if name.split(".")[0] in BLOCKED)
    torch.save({"results": results, "import_errors": import_errors, "loaded": loaded}, out_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
