"""The package's shape: no import circle (counting imports inside functions too), no checks of
model types by name or by attribute, and the registries as the one source of solver lists."""
import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "diffsampler"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules():
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imported(name: str, path: Path, known) -> set:
    """Package modules that ``name`` imports anywhere in its file (function bodies included); a
    submodule import also runs its parent packages' ``__init__``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if not base.startswith("diffsampler"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                targets.add(full if full in known else base)
        elif isinstance(node, ast.Import):
            targets.update(a.name for a in node.names if a.name.startswith("diffsampler"))
    own = {".".join(name.split(".")[:k]) for k in range(1, len(name.split(".")) + 1)}
    closed = set()
    for target in targets:         # the parents of a sibling are this module's own, already importing
        parts = target.split(".")
        closed.update(p for p in (".".join(parts[:k]) for k in range(2, len(parts) + 1)) if p not in own)
    return {t for t in closed if t in known and t != name}


def test_no_import_circle():
    known = modules()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    graph["diffsampler"] = set()          # the top package loads its public names lazily, by name
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):                         # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


# Layers that see every model through the Denoiser contract; models/, pipelines and integrations
# adapt foreign objects (diffusers pipelines, EDM pickles) and may inspect those.
CONTRACT_LAYERS = ("solvers", "learned", "distill", "cli", "analysis", "metrics", "plan.py", "loop.py",
                   "sampling.py", "gits.py", "generate.py", "reference.py")


@pytest.mark.parametrize("pattern", [r"type\([^)]*\)\.__name__\s*(==|!=|in\b)", r"\bhasattr\(",
                                     r"getattr\([^,]+,\s*[\"'][a-z_]+[\"']"])
def test_no_model_type_sniffing(pattern):
    files = [p for layer in CONTRACT_LAYERS for p in ([PACKAGE / layer] if layer.endswith(".py")
                                                      else (PACKAGE / layer).rglob("*.py"))]
    offenders = [f"{p.relative_to(PACKAGE)}:{i}: {line.strip()}" for p in files
                 for i, line in enumerate(p.read_text().splitlines(), 1) if re.search(pattern, line)]
    assert not offenders, offenders
