"""The dependency direction of DESIGN.md: nothing imports upward.

train -> models -> jaxsparse.nn -> jaxsparse.parallel -> jaxsparse.ops -> pallas_kernels -> jax
(jaxsparse.masks sits with the ops: masks and block metadata are what ops consume.)
"""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]

# Layers from bottom to top; a module may import only its own layer or lower ones.
LAYERS = [
    ("pallas_kernels",),
    ("jaxsparse.typing", "jaxsparse.testing", "jaxsparse.masks", "jaxsparse.ops", "jaxsparse.metrics", "jaxsparse.moe",
     "jaxsparse.kv"),
    ("jaxsparse.parallel",),
    ("jaxsparse.nn", "jaxsparse"),
    ("models",),
    ("train",),
    ("benchmarks",),
]
# Third-party packages allowed per layer (anything in the standard library is always allowed).
ALLOWED_THIRD_PARTY = {
    "pallas_kernels": {"jax", "numpy"},
    "jaxsparse.typing": {"jax", "numpy"},
    "jaxsparse.testing": {"jax", "numpy"},
    "jaxsparse.masks": {"jax", "numpy", "matplotlib"},
    "jaxsparse.ops": {"jax", "numpy"},
    "jaxsparse.metrics": {"jax", "numpy"},
    "jaxsparse.moe": {"jax", "numpy"},
    "jaxsparse.kv": {"jax", "numpy"},
    "jaxsparse.parallel": {"jax", "numpy"},
    "jaxsparse.nn": {"jax", "numpy", "flax"},
    "jaxsparse": {"jax", "numpy", "flax"},
}
THIRD_PARTY = {"jax", "numpy", "flax", "optax", "orbax", "matplotlib", "tqdm", "chex", "hypothesis", "pytest"}
FIRST_PARTY = ("jaxsparse", "pallas_kernels", "models", "train", "benchmarks")


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _layer_of(module: str) -> tuple[int, str]:
    """The (layer index, layer key) of the longest key that prefixes ``module``."""
    best = None
    for index, keys in enumerate(LAYERS):
        for key in keys:
            if module == key or module.startswith(key + "."):
                if best is None or len(key) > len(best[1]):
                    best = (index, key)
    if best is None:
        raise AssertionError(f"{module} is in no layer; add it to LAYERS")
    return best


def _imports(source: str, module: str, is_package: bool):
    """Absolute names of everything ``source`` (the text of ``module``) imports."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            # `from a.b import c` may import the submodule a.b.c: judge the most specific name.
            for alias in node.names:
                yield origin if alias.name == "*" else f"{origin}.{alias.name}"


def _source_files():
    for top in FIRST_PARTY:
        folder = ROOT / top
        if folder.is_dir():
            yield from sorted(folder.rglob("*.py"))


def _upward_imports(source: str, module: str, is_package: bool = False) -> list[str]:
    """Messages for each import of ``source`` that breaks the layering."""
    layer, key = _layer_of(module)
    problems = []
    for imported in _imports(source, module, is_package):
        top = imported.split(".")[0]
        if top in FIRST_PARTY:
            imported_layer, imported_key = _layer_of(imported)
            if imported_layer > layer:
                problems.append(f"{module} (layer {key}) imports {imported} (layer {imported_key}): upward")
        elif top in THIRD_PARTY and key in ALLOWED_THIRD_PARTY and top not in ALLOWED_THIRD_PARTY[key]:
            problems.append(f"{module} imports {top}, which the {key} layer may not use")
    return problems


@pytest.mark.parametrize("path", list(_source_files()), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_upward_imports(path):
    module = _module_name(path)
    assert _upward_imports(path.read_text(), module, path.name == "__init__.py") == []


@pytest.mark.parametrize(
    "source, module",
    [
        ("import jaxsparse.ops\n", "pallas_kernels.tpu.probe"),
        ("from jaxsparse import nn\n", "jaxsparse.ops.attention.probe"),
        ("from ..nn import attention\n", "jaxsparse.ops.probe"),
        ("import flax\n", "jaxsparse.ops.probe"),
        ("import models\n", "jaxsparse.nn.probe"),
    ],
)
def test_checker_flags_upward_imports(source, module):
    """The checker itself can fail."""
    assert _upward_imports(source, module) != []
