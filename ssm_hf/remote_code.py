"""Export of ssm-hf's modeling code into a checkpoint folder, for loading without ssm-hf installed.

transformers loads a model whose config.json has an `auto_map` with `trust_remote_code=True`: it copies the Python
files that `auto_map` names from the repository root, plus the files they import relatively (`from .x import y`,
found by a regular expression over the source), into a package of its own, and imports them there. That loader only
knows flat files at the repository root, while ssm-hf is a package with subpackages. `export_remote_code` therefore
writes a flat copy of exactly the modules the architecture needs, generated from the installed sources at export
time (so it never drifts from them):

- each module `ssm_hf/a/b.py` becomes `ssm_hf_a_b.py` (a package's `__init__.py` becomes `ssm_hf_a.py`), with its
  relative imports rewritten to the flat names (`from ..configs.mamba import X` -> `from .ssm_hf_configs_mamba
  import X`; `from .. import kernels` -> `from . import ssm_hf_kernels as kernels`); nothing else is changed;
- `configuration_ssm_hf.py` and `modeling_ssm_hf.py` re-export the config and model classes that `auto_map` names.
  Modules that are only imported as `from . import X as Y` are invisible to transformers' file discovery, so
  `modeling_ssm_hf.py` also names them in an `if TYPE_CHECKING:` block (never executed);
- top-level imports of optional packages (Triton) are wrapped in a `try` block: transformers' remote-code check
  requires every package a file imports outside `try` blocks, and the Triton kernels are only imported by the
  dispatch when Triton is installed and the tensors are on CUDA, so without Triton the PyTorch path runs.

The exported classes keep their `model_type` (`ssm_mamba`, ...), so the same repository also loads through the
installed package (`import ssm_hf`, no `trust_remote_code`), where the registered classes take precedence.
"""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Iterable
from pathlib import Path

from transformers import PreTrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING,
    MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
    MODEL_MAPPING,
)

PACKAGE = "ssm_hf"
CONFIG_MODULE = "configuration_ssm_hf"
MODELING_MODULE = "modeling_ssm_hf"
# file names the export writes (also what a push replaces or deletes when it pushes without remote code)
EXPORTED_FILE_PATTERNS = (f"{CONFIG_MODULE}.py", f"{MODELING_MODULE}.py", f"{PACKAGE}_*.py")
OPTIONAL_PACKAGES = ("triton",)

_PACKAGE_DIR = Path(__file__).resolve().parent
_MODEL_MAPPINGS = {
    "AutoModel": MODEL_MAPPING,
    "AutoModelForCausalLM": MODEL_FOR_CAUSAL_LM_MAPPING,
    "AutoModelForSequenceClassification": MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING,
}


def auto_classes(config_class: type[PreTrainedConfig]) -> dict[str, type]:
    """Auto class name -> our class for `config_class` (`AutoConfig` -> the config class itself), as registered by
    `import ssm_hf`. Raises ValueError for a config class that is not ssm-hf's."""
    if not config_class.__module__.startswith(f"{PACKAGE}."):
        raise ValueError(f"{config_class.__name__} ({config_class.__module__}) is not an ssm-hf configuration: "
                         "ssm-hf pushes and exports its own architectures only.")
    classes: dict[str, type] = {"AutoConfig": config_class}
    for auto_name, mapping in _MODEL_MAPPINGS.items():
        try:
            model_class = mapping[config_class]
        except KeyError:
            continue
        if model_class.__module__.startswith(f"{PACKAGE}."):
            classes[auto_name] = model_class
    if "AutoModelForCausalLM" not in classes:
        raise ValueError(f"No ssm-hf causal LM is registered for {config_class.__name__}; was ssm_hf imported?")
    return classes


def export_remote_code(folder: str | os.PathLike, config_class: type[PreTrainedConfig] | None = None) -> list[str]:
    """Write the flat modeling code of the checkpoint in `folder` next to it and add `auto_map` to its config.json,
    so that `AutoModelForCausalLM.from_pretrained(folder or its Hub repo, trust_remote_code=True)` loads it without
    ssm-hf installed. `config_class` defaults to the class registered for config.json's `model_type`. Files of
    the same names (an earlier export) are replaced. Returns the names of the files written (config.json included)."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{folder} has no config.json: save the model there first (save_pretrained).")
    config_dict = json.loads(config_path.read_text(encoding="utf-8"))
    if config_class is None:
        model_type = config_dict.get("model_type")
        if model_type not in CONFIG_MAPPING:
            raise ValueError(f"{config_path} has model_type={model_type!r}, which is not a registered architecture "
                             "(import ssm_hf first).")
        config_class = CONFIG_MAPPING[model_type]
    if config_dict.get("model_type") != config_class.model_type:
        raise ValueError(f"{config_path} has model_type={config_dict.get('model_type')!r}, but "
                         f"{config_class.__name__} is {config_class.model_type!r}.")
    classes = auto_classes(config_class)
    files = flat_sources(classes)
    for name, text in files.items():
        (folder / name).write_text(text, encoding="utf-8")
    config_dict["auto_map"] = {
        auto_name: f"{CONFIG_MODULE if auto_name == 'AutoConfig' else MODELING_MODULE}.{cls.__name__}"
        for auto_name, cls in classes.items()
    }
    config_path.write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(files) + ["config.json"]


def flat_sources(classes: dict[str, type]) -> dict[str, str]:
    """File name -> source text of the export for `classes` (as `auto_classes` returns): the two entry modules and
    the flat copy of every ssm-hf module they need."""
    config_class = classes["AutoConfig"]
    model_classes = [cls for name, cls in classes.items() if name != "AutoConfig"]
    modules = _collect([config_class.__module__] + [cls.__module__ for cls in model_classes])
    names = {module: flat_name(module) for module in modules}
    clashes = len(set(names.values())) != len(names)
    if clashes:
        raise ValueError(f"Module names collide once flattened: {sorted(names.items())}")
    files = {f"{names[module]}.py": _flat_module(module, names) for module in modules}

    config_modules = _collect([config_class.__module__])
    files[f"{CONFIG_MODULE}.py"] = _entry_module(
        f"The configuration class of this ssm-hf checkpoint ({config_class.model_type}), for loading with "
        "`trust_remote_code=True`.", [config_class], config_modules, names)
    files[f"{MODELING_MODULE}.py"] = _entry_module(
        f"The model classes of this ssm-hf checkpoint ({config_class.model_type}), for loading with "
        "`trust_remote_code=True`.", model_classes, modules, names)
    return files


def flat_name(module: str) -> str:
    """'ssm_hf.layers.mamba_mixer' -> 'ssm_hf_layers_mamba_mixer'."""
    return module.replace(".", "_")


def _header(source: str) -> str:
    from . import __version__

    return (f"# Generated by ssm-hf {__version__} from {source} for transformers' trust_remote_code loading.\n"
            "# ssm-hf is licensed under the Apache License 2.0. Edit the ssm-hf sources, not this file.\n")


def _module_file(module: str) -> Path | None:
    """The source file of an ssm_hf module (a package's __init__.py), or None if there is none."""
    parts = module.split(".")
    if parts[0] != PACKAGE:
        return None
    base = _PACKAGE_DIR.joinpath(*parts[1:])
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if len(parts) > 1 and base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _is_package(module: str) -> bool:
    path = _module_file(module)
    return path is not None and path.name == "__init__.py"


class _RelativeImport:
    """One `from <relative> import ...` statement: what it names, resolved to absolute module names."""

    def __init__(self, module: str, node: ast.ImportFrom):
        self.node = node
        package = module if _is_package(module) else module.rpartition(".")[0]
        parts = package.split(".")
        if node.level - 1 >= len(parts):
            raise ValueError(f"{module}: relative import beyond the {PACKAGE} package (line {node.lineno})")
        base = ".".join(parts[: len(parts) - (node.level - 1)])
        self.target = f"{base}.{node.module}" if node.module else base
        # names that are submodules are imported as modules, the others are attributes of `target`
        self.submodules = [(f"{self.target}.{alias.name}", alias.asname or alias.name) for alias in node.names
                           if _module_file(f"{self.target}.{alias.name}") is not None]
        submodule_names = {name.rpartition(".")[2] for name, _ in self.submodules}
        self.attributes = [alias for alias in node.names if alias.name not in submodule_names]
        where = f"{module} line {node.lineno}"
        if any(alias.name == "*" for alias in node.names):
            raise ValueError(f"{where}: star imports cannot be exported")
        if self.attributes and (_module_file(self.target) is None or self.target == PACKAGE):
            raise ValueError(f"{where}: imports names from {self.target}, which cannot be exported (the export has "
                             f"no {PACKAGE} package root; import from the submodule that defines them)")

    def dependencies(self) -> list[str]:
        return ([self.target] if self.attributes else []) + [name for name, _ in self.submodules]


def _parse(module: str) -> tuple[str, ast.Module]:
    path = _module_file(module)
    if path is None:
        raise ValueError(f"No source file for module {module}")
    source = path.read_text(encoding="utf-8")
    return source, ast.parse(source, filename=str(path))


def _relative_imports(module: str, tree: ast.Module) -> list[_RelativeImport]:
    imports = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            imports.append(_RelativeImport(module, node))
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            if any(name == PACKAGE or name.startswith(f"{PACKAGE}.") for name in names):
                raise ValueError(f"{module} line {node.lineno}: absolute import of {PACKAGE}; the export needs "
                                 "relative imports")
    return imports


def _reachable(roots: Iterable[str], follow) -> set[str]:
    """`roots` and every module reached from them through `follow(module, import_statement)`, which names the
    modules that one relative import leads to."""
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        if module == PACKAGE:
            raise ValueError(f"The export cannot include the {PACKAGE} package root (it imports everything)")
        seen.add(module)
        _, tree = _parse(module)
        for statement in _relative_imports(module, tree):
            todo.extend(follow(statement))
    return seen


def _collect(roots: Iterable[str]) -> list[str]:
    """The modules `roots` need, through every relative import (function-level ones included), sorted."""
    return sorted(_reachable(roots, lambda statement: statement.dependencies()))


def _flat_module(module: str, names: dict[str, str]) -> str:
    """The source of `module` with relative imports pointing at the flat names and optional packages guarded."""
    source, tree = _parse(module)
    lines = source.splitlines(keepends=True)
    edits: list[tuple[int, int, str]] = []  # (first line index, end line index, replacement text)
    for statement in _relative_imports(module, tree):
        node = statement.node
        indent = _whole_lines(module, lines, node)
        new = []
        if statement.attributes:
            imported = ", ".join(alias.name if alias.asname is None else f"{alias.name} as {alias.asname}"
                                 for alias in statement.attributes)
            new.append(f"{indent}from .{names[statement.target]} import {imported}\n")
        new.extend(f"{indent}from . import {names[name]} as {asname}\n" for name, asname in statement.submodules)
        edits.append((node.lineno - 1, node.end_lineno, "".join(new)))
    edits.extend(_optional_import_guards(module, lines, tree))
    for start, end, text in sorted(edits, reverse=True):
        lines[start:end] = [text]
    return _header(f"{module.replace('.', '/')}{'/__init__' if _is_package(module) else ''}.py") + "".join(lines)


def _whole_lines(module: str, lines: list[str], node: ast.stmt) -> str:
    """The indentation of `node`, after checking that it fills its lines (so they can be replaced whole)."""
    first, last = lines[node.lineno - 1], lines[node.end_lineno - 1]
    before, after = first[: node.col_offset], last[node.end_col_offset:].strip()
    if before.strip() or (after and not after.startswith("#")):
        raise ValueError(f"{module} line {node.lineno}: an import sharing its line with other code cannot be "
                         "exported; put it on its own line")
    return before


def _optional_import_guards(module: str, lines: list[str], tree: ast.Module) -> list[tuple[int, int, str]]:
    """Edits that put each run of consecutive top-level imports of optional packages into a try block."""
    def optional(node: ast.stmt) -> bool:
        if isinstance(node, ast.Import):
            return all(alias.name.split(".")[0] in OPTIONAL_PACKAGES for alias in node.names)
        return isinstance(node, ast.ImportFrom) and node.level == 0 and \
            (node.module or "").split(".")[0] in OPTIONAL_PACKAGES

    runs: list[list[ast.stmt]] = []
    previous = None
    for node in tree.body:
        if optional(node):
            if previous is not None and optional(previous):
                runs[-1].append(node)
            else:
                runs.append([node])
        previous = node
    edits = []
    for run in runs:
        for node in run:
            _whole_lines(module, lines, node)
        body = "".join("    " + line for line in lines[run[0].lineno - 1: run[-1].end_lineno])
        packages = sorted({(alias.name if isinstance(node, ast.Import) else node.module).split(".")[0]
                           for node in run for alias in node.names})
        text = (f"# {', '.join(packages)}: only imported once the dispatch chose this path; inside a try block, "
                "transformers'\n# remote-code check does not require it to be installed.\n"
                f"try:\n{body}except ImportError:\n    raise\n")
        edits.append((run[0].lineno - 1, run[-1].end_lineno, text))
    return edits


def _entry_module(doc: str, classes: list[type], modules: list[str], names: dict[str, str]) -> str:
    by_module: dict[str, list[str]] = {}
    for cls in classes:
        by_module.setdefault(cls.__module__, []).append(cls.__name__)
    imports = [f"from .{names[module]} import {', '.join(sorted(class_names))}\n"
               for module, class_names in sorted(by_module.items())]
    hidden = sorted(set(modules) - _discoverable(list(by_module)))
    text = _header("the ssm-hf package") + f'"""{doc}"""\n\n'
    if hidden:
        text += "from typing import TYPE_CHECKING\n\n"
    text += "".join(imports)
    if hidden:
        text += ("\nif TYPE_CHECKING:\n"
                 "    # Never executed. transformers fetches the files named by `from .X import` lines; these modules "
                 "are\n    # imported only as `from . import X as Y`, which it does not see, so they are named here.\n")
        text += "".join(f"    from .{names[module]} import {_some_name(module)}  # noqa: F401\n" for module in hidden)
    all_names = sorted(cls.__name__ for cls in classes)
    text += "\n__all__ = [" + ", ".join(f'"{name}"' for name in all_names) + "]\n"
    return text


def _discoverable(roots: list[str]) -> set[str]:
    """Modules that transformers' loader finds from `roots`: it follows only `from .X import` statements."""
    return _reachable(roots, lambda statement: [statement.target] if statement.attributes else [])


def _some_name(module: str) -> str:
    """A name defined at the top of `module` (for the TYPE_CHECKING import that names its file)."""
    _, tree = _parse(module)
    defined = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.append(node.name)
        elif isinstance(node, ast.Assign):
            defined.extend(target.id for target in node.targets if isinstance(target, ast.Name))
    if not defined:
        raise ValueError(f"{module} defines nothing at its top level to import")
    return next((name for name in defined if not name.startswith("_")), defined[0])


__all__ = ["CONFIG_MODULE", "EXPORTED_FILE_PATTERNS", "MODELING_MODULE", "auto_classes", "export_remote_code",
           "flat_sources"]
