"""DESIGN.md's import direction, enforced on the source: pallas_kernels <- jaxsys core <- serve, train.

Every module of the four packages is parsed (never imported) and each module it names is checked:

- `jaxsys.pallas_kernels` imports only itself, jax, numpy and the standard library;
- the core (`jaxsys`, with `jaxsys.models`, `jaxsys.sharding`, `jaxsys.gnn`, ...) imports the
  kernel package and itself, never `jaxsys.serve` or `jaxsys.train`;
- `jaxsys.serve` and `jaxsys.train` import the core and the kernel package, never each other;
- outside the kernel package, a kernel op is used through its public package
  (`jaxsys.pallas_kernels.<op>`), never through its implementation modules (`.xla`, `.kernel`);
- nobody imports another module's private (underscore) names;
- nothing imports the bare top-level names `serve`, `train` or `pallas_kernels` (they exist
  only inside the `jaxsys` namespace).

A module counts as imported when it appears in an `import` statement (anywhere, including inside
functions), as a string literal given to `importlib.import_module` / `__import__`, or as a
string literal that spells one of our modules (the lazy-export tables, registries): an arrow
hidden in a string is still an arrow. The one exception is `jaxsys/cli.py`, whose tables name
subcommand modules and demo sections by string so that the command can load them on demand.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# import name -> source folder (pyproject's package-dir mapping)
PACKAGES = {
    "jaxsys": ROOT / "jaxsys",
    "jaxsys.pallas_kernels": ROOT / "pallas_kernels",
    "jaxsys.serve": ROOT / "serve",
    "jaxsys.train": ROOT / "train",
}
LAYERS = {"jaxsys.pallas_kernels": "kernels", "jaxsys.serve": "serve", "jaxsys.train": "train",
          "jaxsys.configs": "configs", "jaxsys": "core"}
MAY_IMPORT = {
    "kernels": {"kernels"},
    "core": {"kernels", "core", "configs"},
    "serve": {"kernels", "core", "serve", "configs"},
    "train": {"kernels", "core", "train", "configs"},
}
KERNEL_THIRD_PARTY = {"jax", "jaxlib", "numpy"}
BARE_NAMES = {"serve", "train", "pallas_kernels"}
REGISTRY = ROOT / "jaxsys" / "cli.py"  # the one module allowed to name others by string
_MODULE_STRING = re.compile(r"jaxsys(\.[A-Za-z_]\w*)+(:[A-Za-z_]\w*)?")


def module_files() -> dict[str, Path]:
    """Every module of the four packages: dotted name -> file."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> str | None:
    """The layer a module of ours belongs to, None for a third-party or standard module."""
    for prefix, layer in LAYERS.items():
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


@dataclass(frozen=True)
class Ref:
    """One module named by a source file: `names` are the names taken from it (from-imports)."""

    module: str
    line: int
    how: str  # "import", "import_module", "string"
    names: tuple[str, ...] = ()


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def _resolve_relative(module: str, path: Path, level: int, target: str | None) -> str:
    base = _package_of(module, path).split(".")
    base = base[:len(base) - (level - 1)] if level > 1 else base
    return ".".join(base + ([target] if target else []))


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                ids.add(id(body[0].value))
    return ids


def _is_import_call(func: ast.expr) -> bool:
    if isinstance(func, ast.Name):
        return func.id in ("import_module", "__import__")
    return isinstance(func, ast.Attribute) and func.attr == "import_module"


def references(module: str, path: Path) -> list[Ref]:
    """Every module the file names: import statements, import_module/__import__ literals, and
    string literals spelling one of our modules."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    docstrings = _docstring_nodes(tree)
    refs: list[Ref] = []
    import_args: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            refs += [Ref(a.name, node.lineno, "import") for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = node.module
            if node.level:
                target = _resolve_relative(module, path, node.level, node.module)
            if target == "__future__":
                continue
            plain = []
            for a in node.names:
                sub = f"{target}.{a.name}"
                if sub in MODULES:  # `from pkg import submodule`
                    refs.append(Ref(sub, node.lineno, "import"))
                else:
                    plain.append(a.name)
            if plain or not node.names:
                refs.append(Ref(target, node.lineno, "import", tuple(plain)))
        elif isinstance(node, ast.Call) and _is_import_call(node.func) and node.args:
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                refs.append(Ref(arg.value, node.lineno, "import_module"))
                import_args.add(id(arg))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
                and id(node) not in import_args and _MODULE_STRING.fullmatch(node.value)):
            named = node.value.split(":")[0]
            if layer_of(named) is not None:
                refs.append(Ref(named, node.lineno, "string"))
    return refs


def violations_of(module: str, path: Path, root: Path = ROOT) -> list[str]:
    """What `module` (source at `path`) imports against the rules, one line each."""
    layer = layer_of(module)
    out = []
    for ref in references(module, path):
        where = f"{path.relative_to(root)}:{ref.line}"
        top = ref.module.split(".")[0]
        target = layer_of(ref.module)
        if ref.how == "string" and path == REGISTRY:
            continue
        if top in BARE_NAMES:
            out.append(f"{where}: imports bare `{ref.module}`; use `jaxsys.{ref.module}`")
            continue
        if target is None:
            if layer == "kernels" and top not in KERNEL_THIRD_PARTY and top not in sys.stdlib_module_names:
                out.append(f"{where}: the kernel package imports `{ref.module}` (only jax, numpy and "
                           f"the standard library are allowed)")
            continue
        if target not in MAY_IMPORT[layer]:
            how = {"import": "imports", "import_module": "imports (import_module)",
                   "string": "names by string"}[ref.how]
            out.append(f"{where}: {layer} {how} {target} (`{ref.module}`)")
            continue
        if layer != "kernels" and target == "kernels" and len(ref.module.split(".")) > 3:
            out.append(f"{where}: reaches into the kernel op's implementation `{ref.module}`; import it "
                       f"from `{'.'.join(ref.module.split('.')[:3])}`")
        private = [n for n in ref.names if n.startswith("_") and not n.startswith("__")]
        if private:
            out.append(f"{where}: imports private name(s) {', '.join(private)} from `{ref.module}`")
    return out


def test_every_package_is_walked():
    layers = {layer_of(m) for m in MODULES}
    assert layers == {"kernels", "core", "serve", "train"}
    assert "jaxsys.serve.engine.engine" in MODULES and "jaxsys.pallas_kernels.shapes" in MODULES


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_import_direction(package):
    found = []
    for module, path in MODULES.items():
        if layer_of(module) == layer_of(package) and (module == package or module.startswith(package + ".")):
            found += violations_of(module, path)
    assert not found, "imports against DESIGN.md's direction:\n  " + "\n  ".join(found)


# ------------------------------------------------------------------------------ the checker itself

def _check_source(tmp_path, module: str, source: str) -> list[str]:
    pkg_dir = tmp_path / module.replace(".", "/")
    pkg_dir.parent.mkdir(parents=True, exist_ok=True)
    path = pkg_dir.with_suffix(".py")
    path.write_text(source)
    return violations_of(module, path, root=tmp_path)


@pytest.mark.parametrize("module,source,expect", [
    ("jaxsys.models.x", "import jaxsys.serve.llm\n", "core imports serve"),
    ("jaxsys.models.x", "def f():\n    from jaxsys.train import trainer\n", "core imports train"),
    ("jaxsys.models.x", "import importlib\nimportlib.import_module('jaxsys.serve')\n", "(import_module)"),
    ("jaxsys.models.x", "__import__('jaxsys.train.cli')\n", "core imports (import_module) train"),
    ("jaxsys.models.x", "TABLE = {'f': 'jaxsys.serve.llm'}\n", "core names by string serve"),
    ("jaxsys.serve.x", "from jaxsys.train.config import load_config\n", "serve imports train"),
    ("jaxsys.train.x", "import jaxsys.serve\n", "train imports serve"),
    ("jaxsys.pallas_kernels.op.x", "from jaxsys.models import decoder\n", "kernels imports core"),
    ("jaxsys.pallas_kernels.op.x", "import scipy\n", "only jax, numpy"),
    ("jaxsys.serve.x", "from jaxsys.pallas_kernels.shared_prefix_attention.xla import f\n", "implementation"),
    ("jaxsys.train.x", "from jaxsys.train.trainer import Trainer, _progress\n", "private name(s) _progress"),
    ("jaxsys.serve.x", "from serve.engine import engine\n", "bare `serve.engine`"),
])
def test_checker_flags(tmp_path, module, source, expect):
    found = _check_source(tmp_path, module, source)
    assert any(expect in v for v in found), found


@pytest.mark.parametrize("module,source", [
    ("jaxsys.serve.x", "import jax\nfrom jaxsys.models import decoder\nfrom jaxsys.pallas_kernels.shapes import pow2_bucket\n"),
    ("jaxsys.serve.x", "from jaxsys.pallas_kernels.shared_prefix_attention import plan_step\n"),
    ("jaxsys.train.x", "import jaxsys.configs\nfrom jaxsys.train import trainer\n"),
    ("jaxsys.pallas_kernels.op.x", "import functools\nimport jax.numpy as jnp\nimport numpy as np\n"
                                   "from .balancer import plan_step\n"),
    ("jaxsys.models.x", '"""Mentions jaxsys.serve.llm in a docstring."""\nimport jaxsys.sharding\n'),
])
def test_checker_allows(tmp_path, module, source):
    assert _check_source(tmp_path, module, source) == []
