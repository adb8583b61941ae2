"""The remote-code export: a saved checkpoint plus the flat modeling code loads with transformers alone."""

import ast
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from conftest import assert_close_to_scale, tiny_lm
from remote_code_runner import run_without_ssm_hf
from transformers.dynamic_module_utils import get_imports, get_relative_import_files

import ssm_hf
from ssm_hf.remote_code import auto_classes, export_remote_code, flat_sources

PRESETS = {"mamba": "mamba-tiny", "mamba2": "mamba2-tiny", "hybrid": "hybrid-tiny", "s4": "s4-tiny",
           "s4d": "s4d-tiny"}


def expected_outputs(model, input_ids: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        return model(input_ids).logits, model.generate(input_ids, max_new_tokens=new_tokens, do_sample=False)


def test_exported_checkpoints_load_without_ssm_hf(tmp_path, one_thread):
    """mamba, mamba2, hybrid, s4 and s4d: same logits and greedy tokens from the exported code, in a Python where
    neither ssm_hf nor Triton can be imported (the kernels' dispatch falls back to PyTorch)."""
    jobs, expected = [], []
    generator = torch.Generator().manual_seed(1)
    for index, family in enumerate(PRESETS):
        model = tiny_lm(PRESETS[family], seed=index)
        folder = tmp_path / family
        model.save_pretrained(folder)
        written = export_remote_code(folder)
        assert "modeling_ssm_hf.py" in written and "config.json" in written
        input_ids = torch.randint(1, model.config.vocab_size, (2, 9), generator=generator)
        expected.append(expected_outputs(model, input_ids, new_tokens=6))
        jobs.append({"model": str(folder), "revision": None, "input_ids": input_ids.tolist(), "new_tokens": 6})

    out = run_without_ssm_hf(jobs, tmp_path)
    assert out["import_errors"]["ssm_hf"].startswith("ModuleNotFoundError")
    assert out["import_errors"]["triton"].startswith("ModuleNotFoundError")
    assert out["loaded"] == []
    for family, result, (logits, tokens) in zip(PRESETS, out["results"], expected):
        assert result["module"].startswith("transformers_modules."), family
        assert result["auto_map"]["AutoModelForCausalLM"].startswith("modeling_ssm_hf."), family
        assert_close_to_scale(result["logits"], logits)
        assert torch.equal(result["tokens"], tokens), family


@pytest.mark.parametrize("family", list(PRESETS))
def test_export_is_complete_and_needs_only_transformers(tmp_path, family):
    """transformers' own discovery (relative imports from the auto_map modules) finds every exported file, and the
    packages the files require (its check ignores imports inside try blocks) are installed with transformers."""
    model = tiny_lm(PRESETS[family])
    model.save_pretrained(tmp_path)
    written = export_remote_code(tmp_path)
    python_files = sorted(name for name in written if name.endswith(".py"))
    config = json.loads((tmp_path / "config.json").read_text())
    names = {auto: cls.__name__ for auto, cls in auto_classes(type(model.config)).items()}
    assert config["auto_map"] == {
        "AutoConfig": f"configuration_ssm_hf.{type(model.config).__name__}",
        "AutoModel": f"modeling_ssm_hf.{names['AutoModel']}",
        "AutoModelForCausalLM": f"modeling_ssm_hf.{type(model).__name__}",
        "AutoModelForSequenceClassification": f"modeling_ssm_hf.{names['AutoModelForSequenceClassification']}",
    }
    assert config["model_type"] == model.config.model_type  # the exported config class registers the same type
    found = {Path(path).name for path in get_relative_import_files(str(tmp_path / "modeling_ssm_hf.py"))}
    found |= {Path(path).name for path in get_relative_import_files(str(tmp_path / "configuration_ssm_hf.py"))}
    assert sorted(found | {"modeling_ssm_hf.py", "configuration_ssm_hf.py"}) == python_files
    # safetensors (the state snapshots' format) is one of transformers' own requirements
    allowed = set(sys.stdlib_module_names) | {"torch", "transformers", "huggingface_hub", "safetensors"}
    for name in python_files:
        source = (tmp_path / name).read_text()
        compile(source, name, "exec")
        assert set(get_imports(str(tmp_path / name))) <= allowed, (name, get_imports(str(tmp_path / name)))
    triton_files = [name for name in python_files if "import triton" in (tmp_path / name).read_text()]
    assert triton_files, "the Triton kernels are part of the export"


class _DropImports(ast.NodeTransformer):
    """Removes relative imports, and unwraps the try blocks the export puts around optional imports."""

    def visit_ImportFrom(self, node):
        return None if node.level > 0 else node

    def visit_Try(self, node):
        self.generic_visit(node)
        if all(isinstance(child, (ast.Import, ast.ImportFrom)) for child in node.body):
            return node.body
        return node


def _skeleton(text: str) -> str:
    return ast.dump(_DropImports().visit(ast.parse(text)))


@pytest.mark.parametrize("family", list(PRESETS))
def test_flat_modules_differ_from_their_sources_only_in_imports(family):
    files = flat_sources(auto_classes(type(ssm_hf.preset_config(PRESETS[family]))))
    package_root = Path(ssm_hf.__file__).parent.parent
    for name, text in files.items():
        if name.startswith("ssm_hf_"):
            source_path = text.splitlines()[0].split(" from ")[1].split(" for ")[0]
            assert _skeleton(text) == _skeleton((package_root / source_path).read_text()), name


def test_export_refuses_what_it_cannot_export(tmp_path):
    theirs = transformers.MambaForCausalLM(transformers.MambaConfig(hidden_size=16, num_hidden_layers=1,
                                                                    vocab_size=32))
    theirs.save_pretrained(tmp_path / "theirs")
    with pytest.raises(ValueError, match="not an ssm-hf configuration"):
        export_remote_code(tmp_path / "theirs")
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_remote_code(tmp_path / "empty")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text(json.dumps({"model_type": "no_such_type"}))
    with pytest.raises(ValueError, match="no_such_type"):
        export_remote_code(tmp_path / "odd")
