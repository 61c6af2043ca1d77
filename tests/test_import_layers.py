"""The import graph of ``hf_cage`` has no cycle and never imports upward; ``recipes/`` use only the public API.

The graph is read from the source with :mod:`ast`, nothing is imported: every ``import`` / ``from ... import``
statement counts, at module level or inside a function (a lazy import is still a dependency), and so does
``importlib.import_module("<literal>")``. Only ``if TYPE_CHECKING:`` blocks are left out. ``from pkg import name``
is an edge to ``pkg.name`` when that is a module of the package, else to ``pkg``. An edge goes to the module
named, not to the parent packages Python also runs on the way.

Today's violations are listed in the ``KNOWN_*`` sets: each test fails on a new violation and also on a listed one
that no longer exists, so the lists only shrink (delete the entry when a fix lands).
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "hf_cage"

# Layers, lowest first. A module may import from its own layer or a lower one, never from a higher one. A name
# covers that module and everything under it; a module takes the layer of the longest name that covers it.
LAYERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    # layer      modules (a name covers everything under it)      what sits there
    ("base", ("hf_cage.data", "hf_cage.version", "hf_cage.plots", "hf_cage.workers"), "import nothing of hf_cage"),
    ("kernels", ("hf_cage.kernels",), "QuantSpec, torch twins, Triton kernels, the dispatch seam"),
    ("quant", ("hf_cage.quant",), "QuantConfig, straight-through quantizers"),
    ("layers", ("hf_cage.layers",), "QATLinear, packed layers, packing of weights"),
    ("qat", ("hf_cage.qat", "hf_cage.lora"), "model surgery: quantize_model, checkpoints; LoRA on packed layers"),
    ("optim", ("hf_cage.optim",), "the CAGE correction, schedules, optimizer factory"),
    ("trainer", ("hf_cage.trainer",), "CAGEArguments, the Trainer mixin"),
    ("trl", ("hf_cage.trl",), "TRL trainers with CAGE (optional extra)"),
    ("export", ("hf_cage.export",), "packed export, formats, card, loading, served evaluation"),
    ("cli", ("hf_cage.cli",), "the hf-cage command"),
    ("root", ("hf_cage",), "hf_cage/__init__.py: the public API; nothing inside hf_cage imports it"),
)

# Upward imports allowed, as "importer -> imported" (none): a new one fails the test; add a line only with
# a reason.
KNOWN_UPWARD: set[str] = set()
# Import cycles of today, each as the sorted modules of one strongly connected component (none: the strict-loading
# change broke export.formats <-> export.load).
KNOWN_CYCLES: set[tuple[str, ...]] = set()

# What recipes/ may import: the package root's ``__all__``, or a documented public module (mentioned as
# ``hf_cage.<module>`` in README.md or docs/), names in its ``__all__`` when it has one, else its non-underscore
# names.
PUBLIC_MODULES = (
    "hf_cage",
    "hf_cage.data",
    "hf_cage.export",
    "hf_cage.export.served",
    "hf_cage.kernels",
    "hf_cage.lora",
    "hf_cage.optim",
    "hf_cage.plots",
    "hf_cage.qat",
    "hf_cage.quant",
    "hf_cage.trainer.comparison",
    "hf_cage.trl",
    "hf_cage.workers",
)
# Imports by recipes/ of something outside the public API, as "recipe: module.name".
KNOWN_RECIPE_IMPORTS: set[str] = {
    "recipes/recipe_common.py: hf_cage.optim.defaults.CAGE_PULL_DEFAULTS",
}


def package_modules() -> dict[str, Path]:
    """Every module of hf_cage, by dotted name (a package by its own name, for its ``__init__.py``)."""
    modules = {}
    for path in sorted((REPO / PACKAGE).rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _statements(tree: ast.AST):
    """Every node of the tree outside ``if TYPE_CHECKING:`` bodies (their ``else`` branch does run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, module: str, is_package: bool) -> list[tuple[str, str | None]]:
    """``(module imported, name taken from it or None)`` for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in _statements(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            found += [(source, alias.name) for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value, None))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the hf_cage modules it imports."""
    modules = package_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for source, name in imports_of(path, module, path.name == "__init__.py"):
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            target = f"{source}.{name}" if name and f"{source}.{name}" in modules else source
            if target != module:
                targets.add(target)
        graph[module] = targets
    return graph


def layer_of(module: str) -> int:
    best = None
    for index, (_, names, _) in enumerate(LAYERS):
        for name in names:
            if (module == name or module.startswith(name + ".")) and (best is None or len(name) > best[0]):
                best = (len(name), index)
    assert best is not None, f"{module} is in no layer: add it to LAYERS in {Path(__file__).name}"
    return best[1]


def cycles(graph: dict[str, set[str]]) -> dict[tuple[str, ...], list[str]]:
    """Each strongly connected component of more than one module (sorted) -> one cycle through it."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node: str) -> None:  # Tarjan
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)

    found = {}
    for component in components:  # the shortest cycle through the component's first module, breadth first
        members, start = set(component), component[0]
        parent, frontier = {}, [start]
        while start not in parent:
            reached = []
            for node in frontier:
                for nxt in sorted(graph[node] & members):
                    if nxt not in parent:
                        parent[nxt] = node
                        reached.append(nxt)
            frontier = reached
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(parent[path[-1]])
        found[tuple(component)] = path[::-1]
    return found


def test_the_graph_is_read():
    graph = import_graph()
    assert "hf_cage.quant.config" in graph["hf_cage.layers.qat_linear"]
    assert "hf_cage.kernels.fp4" in graph["hf_cage.kernels.grids.mxfp4"]  # from .. import fp4
    assert "hf_cage.qat" in graph["hf_cage.export.source"]  # function-level import counted
    assert "hf_cage.kernels" not in graph["hf_cage"]  # TYPE_CHECKING block left out
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == {("a", "b", "c"): ["a", "b", "c", "a"]}


def test_every_module_sits_in_a_layer():
    for module in import_graph():
        layer_of(module)


def test_no_import_goes_up_a_layer():
    graph = import_graph()
    upward = {
        f"{importer} -> {imported}"
        for importer, targets in graph.items()
        for imported in targets
        if layer_of(imported) > layer_of(importer)
    }
    new, fixed = sorted(upward - KNOWN_UPWARD), sorted(KNOWN_UPWARD - upward)
    names = [layer for layer, _, _ in LAYERS]
    assert not new, "imports from a lower layer up to a higher one (layers, lowest first: {}):\n{}".format(
        " < ".join(names), "\n".join(new)
    )
    assert not fixed, f"fixed, delete from KNOWN_UPWARD: {fixed}"


def test_no_import_cycle():
    found = cycles(import_graph())
    new = [" -> ".join(path) for component, path in sorted(found.items()) if component not in KNOWN_CYCLES]
    fixed = sorted(KNOWN_CYCLES - set(found))
    assert not new, "import cycles:\n" + "\n".join(new)
    assert not fixed, f"fixed, delete from KNOWN_CYCLES: {fixed}"


def _all_of(module: str) -> set[str] | None:
    modules = package_modules()
    tree = ast.parse(modules[module].read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return None


def test_public_modules_are_documented():
    text = "\n".join(
        p.read_text(encoding="utf-8") for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    )
    modules = package_modules()
    for module in PUBLIC_MODULES:
        assert module in modules, f"{module} is not a module of hf_cage"
        assert module == PACKAGE or module in text, f"{module} is named public but no page of docs/ mentions it"


def test_recipes_use_only_the_public_api():
    modules = package_modules()
    exported = {module: _all_of(module) for module in PUBLIC_MODULES}
    private = set()
    for path in sorted((REPO / "recipes").glob("*.py")):
        where = path.relative_to(REPO).as_posix()
        for source, name in imports_of(path, "recipes." + path.stem, False):
            if source != PACKAGE and not source.startswith(PACKAGE + "."):
                continue
            if name is not None and f"{source}.{name}" in modules:  # from hf_cage import data: a module
                source, name = f"{source}.{name}", None
            if source not in exported:
                private.add(f"{where}: {source}" + (f".{name}" if name else ""))
            elif name is not None and (name not in exported[source] if exported[source] else name.startswith("_")):
                private.add(f"{where}: {source}.{name}")
    new, fixed = sorted(private - KNOWN_RECIPE_IMPORTS), sorted(KNOWN_RECIPE_IMPORTS - private)
    assert not new, f"recipes/ import outside the public API ({PUBLIC_MODULES}):\n" + "\n".join(new)
    assert not fixed, f"fixed, delete from KNOWN_RECIPE_IMPORTS: {fixed}"
