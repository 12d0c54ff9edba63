"""The rules of mha_xp's structure, checked on its source (nothing is imported).

One place for each concept, and imports that run one way:

1. **Ranks.** Every module has a rank, low to high: ``_lib`` (helpers) and
   ``typing`` (the public type aliases) 0; ``_config``, ``_checks``,
   ``_porting``, ``_spec`` (the settings, validation, porting hints, the call
   spec) 1; ``_core`` (computes on validated input) 2; ``_model`` (the
   layer's pieces) and ``_run`` (plan, memory check, core: what both public
   faces call) 3; ``_attention``, ``_layer`` (the public faces) 4; ``_io``
   (weight files) 5; ``__init__``, ``__main__`` 6. A module imports only
   modules of its own rank or lower (imports inside functions included), and
   the modules of one rank import each other without cycles. A module the
   table does not place fails, so a new module must be given a rank. Low
   modules then never depend on high ones: the core can be read, tested and
   replaced without the layer, and a helper without anything.
2. **The core raises nothing of its own.** Input is validated by the public
   faces (with ``_checks``) before the core runs, so every error message a
   user sees is written in one place; ``_core/`` only re-raises (bare
   ``raise``).
3. **Size.** No function or method over 80 lines of code, no class over 500,
   counting neither docstrings, comments nor blank lines; a nested function
   counts within its enclosing function and on its own.
4. **Backend checks in one module.** Asking which library an array or a
   namespace belongs to (``is_<lib>_array``, ``is_<lib>_namespace`` of
   array_api_compat, ``type(x) is np.ndarray``) happens only in
   ``_lib/_backends.py``; the rest of the library asks it a question with a
   meaning ("does it write in place?").
5. **Benchmarks use the public API** (and the block planner,
   ``mha_xp._core._plan``, whose choices they report), as installed: they
   import no other private module and do not edit ``sys.path``.

Each rule is a function from parsed sources to a list of violations, one line
each (``file:line: what``); the ``test_rules_catch_*`` tests run them on small
packages written to ``tmp_path``.
"""

from __future__ import annotations

import ast
import io
import re
import tokenize
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

RANKS = {"_lib": 0, "typing": 0, "_config": 1, "_checks": 1, "_porting": 1, "_spec": 1, "_core": 2, "_model": 3, "_run": 3, "_hf": 3,
         "_attention": 4, "_blocks": 4, "_statistics": 4, "_layer": 4, "_io": 5, "__init__": 6, "__main__": 6}
FUNCTION_LINES, CLASS_LINES = 80, 500
BACKENDS_MODULE = "mha_xp._lib._backends"
BENCHMARK_ALLOWED = {"mha_xp._core._plan"}

# array_api_compat's "which library is it?" checks; is_lazy_array and
# is_writeable_array ask about capabilities and may be used anywhere.
BACKEND_CHECK = re.compile(
    r"is_(numpy|cupy|torch|jax|dask|array_api_strict|ndonnx|pydata_sparse|dpnp|mparray)_(array|namespace)")
SYS_PATH_EDITS = {"insert", "append", "extend", "remove", "pop", "clear"}


@dataclass(frozen=True)
class Source:
    """One parsed file; ``name`` is its dotted module name."""

    name: str
    path: Path  # relative to the directory it was parsed from
    is_package: bool
    tree: ast.Module
    text: str

    def at(self, node: ast.AST) -> str:
        return f"{self.path.as_posix()}:{node.lineno}"


def _in_order(violations: list[str]) -> list[str]:
    """Sorted by file, then line (``ast.walk`` goes breadth first)."""
    def key(v: str) -> tuple[str, int, str]:
        file, _, line = v.split(": ", 1)[0].partition(":")
        return file, int(line or 0), v
    return sorted(violations, key=key)


def parse(file: Path, base: Path) -> Source:
    text = file.read_text(encoding="utf-8")
    rel = file.relative_to(base)
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return Source(".".join(parts), rel, file.name == "__init__.py", ast.parse(text, str(rel)), text)


def package_sources(package: Path) -> dict[str, Source]:
    return {s.name: s for s in (parse(f, package.parent) for f in sorted(package.rglob("*.py")))}


def in_core(name: str) -> bool:
    return name.split(".")[1:2] == ["_core"]


def rank(name: str) -> int | None:
    """The rank of a module of the package: by its first part below the package."""
    parts = name.split(".")
    return RANKS.get(parts[1] if len(parts) > 1 else "__init__")


def imports(src: Source, known: set[str]) -> Iterator[tuple[ast.AST, str]]:
    """Every (statement, module) of the package that ``src`` imports, anywhere
    in it; ``from p import x`` imports module ``p.x`` where that is one."""
    top = src.name.split(".")[0]
    here = src.name.split(".") if src.is_package else src.name.split(".")[:-1]
    for node in ast.walk(src.tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == top:
                    yield node, alias.name
        elif isinstance(node, ast.ImportFrom):
            parent = here[: len(here) - node.level + 1] if node.level else []
            base = ".".join(parent + ([node.module] if node.module else []))
            if base.split(".")[0] != top:
                continue
            subs = (f"{base}.{alias.name}" for alias in node.names)
            for target in dict.fromkeys(sub if sub in known else base for sub in subs):
                yield node, target


def _edges(sources: dict[str, Source]) -> Iterator[tuple[Source, ast.AST, str]]:
    for src in sources.values():
        for node, target in imports(src, set(sources)):
            if target != src.name:
                yield src, node, target


def unranked(sources: dict[str, Source]) -> list[str]:
    return _in_order([f"{s.path.as_posix()}: module {s.name} has no rank" for s in sources.values()
                      if rank(s.name) is None])


def upward_imports(sources: dict[str, Source]) -> list[str]:
    out = []
    for src, node, target in _edges(sources):
        low, high = rank(src.name), rank(target)
        if low is not None and high is not None and high > low:
            out.append(f"{src.at(node)}: {src.name} (rank {low}) imports {target} (rank {high})")
    return _in_order(out)


def _path(graph: dict[str, set[str]], start: str, goal: str) -> list[str] | None:
    """A shortest path from ``start`` to ``goal`` (breadth first), or None."""
    came = {start: ""}
    todo = deque([start])
    while todo:
        node = todo.popleft()
        if node == goal:
            path = [node]
            while came[path[-1]]:
                path.append(came[path[-1]])
            return path[::-1]
        for nxt in graph.get(node, ()):
            if nxt not in came:
                came[nxt] = node
                todo.append(nxt)
    return None


def same_rank_cycles(sources: dict[str, Source]) -> list[str]:
    """Every import between modules of one rank that lies on a cycle."""
    same = [(s, n, t) for s, n, t in _edges(sources)
            if rank(s.name) is not None and rank(s.name) == rank(t)]
    graph: dict[str, set[str]] = {}
    for src, _, target in same:
        graph.setdefault(src.name, set()).add(target)
    out = []
    for src, node, target in same:
        back = _path(graph, target, src.name)
        if back:
            out.append(f"{src.at(node)}: {src.name} imports {target}, which leads back: "
                       + " -> ".join(back))
    return _in_order(out)


def core_raises(sources: dict[str, Source]) -> list[str]:
    return _in_order([f"{s.at(n)}: raise {ast.unparse(n.exc)}" for s in sources.values()
                      if in_core(s.name)
                      for n in ast.walk(s.tree) if isinstance(n, ast.Raise) and n.exc is not None])


def code_lines(text: str, tree: ast.Module) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not a docstring."""
    lines: set[int] = set()
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT,
            tokenize.DEDENT, tokenize.ENCODING, tokenize.ENDMARKER}
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type not in skip:
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = node.body[0] if node.body else None
            if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                    and isinstance(first.value.value, str)):
                lines.difference_update(range(first.lineno, first.end_lineno + 1))
    return lines


def _definitions(node: ast.AST, prefix: str = "") -> Iterator[tuple[str, ast.AST]]:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            yield prefix + child.name, child
            yield from _definitions(child, f"{prefix}{child.name}.")
        else:
            yield from _definitions(child, prefix)


def oversized(sources: dict[str, Source]) -> list[str]:
    out = []
    for src in sources.values():
        code = code_lines(src.text, src.tree)
        for qualname, node in _definitions(src.tree):
            is_class = isinstance(node, ast.ClassDef)
            limit = CLASS_LINES if is_class else FUNCTION_LINES
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            count = len(code.intersection(range(first, node.end_lineno + 1)))
            if count > limit:
                kind = "class" if is_class else "function"
                out.append(f"{src.at(node)}: {kind} {qualname} has {count} lines of code (limit {limit})")
    return _in_order(out)


def _is_type_check(node: ast.AST) -> bool:
    """``type(x) is np.ndarray`` (or ``is not``, ``==``, ``!=``, either side)."""
    if not (isinstance(node, ast.Compare) and len(node.ops) == 1
            and isinstance(node.ops[0], (ast.Is, ast.IsNot, ast.Eq, ast.NotEq))):
        return False
    sides = [node.left, node.comparators[0]]
    called = any(isinstance(s, ast.Call) and isinstance(s.func, ast.Name) and s.func.id == "type"
                 for s in sides)
    ndarray = any((isinstance(s, ast.Attribute) and s.attr == "ndarray")
                  or (isinstance(s, ast.Name) and s.id == "ndarray") for s in sides)
    return called and ndarray


def backend_checks(sources: dict[str, Source]) -> list[str]:
    out = []
    for src in sources.values():
        if src.name == BACKENDS_MODULE:
            continue
        for node in ast.walk(src.tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.ImportFrom)
                     else [node.id] if isinstance(node, ast.Name)
                     else [node.attr] if isinstance(node, ast.Attribute) else [])
            out += [f"{src.at(node)}: {n}" for n in names if BACKEND_CHECK.fullmatch(n)]
            if _is_type_check(node):
                out.append(f"{src.at(node)}: {ast.unparse(node)}")
    return _in_order(out)


def _dotted(node: ast.AST) -> str | None:
    """``a.b.c`` for an attribute chain on a name, else None."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        head = _dotted(node.value)
        return None if head is None else f"{head}.{node.attr}"
    return None


def _private(dotted: str) -> bool:
    return any(p.startswith("_") and not p.startswith("__") for p in dotted.split(".")[1:])


def benchmark_violations(sources: dict[str, Source], package: str = "mha_xp") -> list[str]:
    out = []
    for src in sources.values():
        inner = {id(n.value) for n in ast.walk(src.tree) if isinstance(n, ast.Attribute)}
        for node in ast.walk(src.tree):
            used = []
            if isinstance(node, ast.Import):
                used = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                used = [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Attribute) and id(node) not in inner:
                used = [_dotted(node) or ""]  # the whole chain: mha_xp._layer._Call
            for name in used:
                if (name.split(".")[0] == package and _private(name)
                        and not any(name == a or name.startswith(a + ".") for a in BENCHMARK_ALLOWED)):
                    out.append(f"{src.at(node)}: uses private {name}")
            if _edits_sys_path(node):
                out.append(f"{src.at(node)}: edits sys.path ({ast.unparse(node)})")
    return _in_order(out)


def _edits_sys_path(node: ast.AST) -> bool:
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        return node.func.attr in SYS_PATH_EDITS and _dotted(node.func.value) == "sys.path"
    if isinstance(node, (ast.Assign, ast.AugAssign)):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(_dotted(t.value if isinstance(t, ast.Subscript) else t) == "sys.path"
                   for t in targets)
    return False


def _report(what: str, violations: list[str]) -> str:
    return f"{len(violations)} {what}:\n" + "\n".join(violations)


@pytest.fixture(scope="module")
def package() -> dict[str, Source]:
    return package_sources(ROOT / "mha_xp")


# -- the rules, on mha_xp -------------------------------------------------------


def test_every_module_has_a_rank(package):
    bad = unranked(package)
    assert not bad, _report("modules not in the rank table (place them, see the module docstring)", bad)


def test_imports_run_down_the_ranks(package):
    bad = upward_imports(package)
    assert not bad, _report("imports of a higher rank", bad)


def test_no_import_cycles_within_a_rank(package):
    bad = same_rank_cycles(package)
    assert not bad, _report("imports on a cycle", bad)


def test_core_raises_nothing_of_its_own(package):
    assert any(in_core(name) for name in package), "no modules under mha_xp/_core/: the rule has nothing to check"
    bad = core_raises(package)
    assert not bad, _report("raise statements in the core (validate in the public faces)", bad)


def test_functions_and_classes_are_small(package):
    bad = oversized(package)
    assert not bad, _report("functions or classes over the size limit", bad)


def test_backend_checks_only_in_lib_backends(package):
    bad = backend_checks(package)
    assert not bad, _report(f"backend checks outside {BACKENDS_MODULE}", bad)


def test_benchmarks_use_the_public_api():
    bench = ROOT / "benchmarks"
    sources = {s.name: s for s in (parse(f, ROOT) for f in sorted(bench.rglob("*.py")))}
    bad = benchmark_violations(sources)
    assert not bad, _report("private imports or sys.path edits in benchmarks/", bad)


# -- the rules catch what they should -------------------------------------------


def _write(tmp_path: Path, files: dict[str, str]) -> dict[str, Source]:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return package_sources(tmp_path / "mha_xp")


def _where(violations: list[str]) -> list[str]:
    return sorted(v.split(": ")[0] for v in violations)


def test_rules_catch_upward_and_unplaced_imports(tmp_path):
    sources = _write(tmp_path, {
        "mha_xp/__init__.py": "from ._layer import Layer\nfrom . import _masks\n",
        "mha_xp/_masks.py": "",
        "mha_xp/_layer.py": "from ._core._dense import f\nfrom ._lib import _shapes\nclass Layer: ...\n",
        "mha_xp/_config.py": "import mha_xp._lib._shapes\n",
        "mha_xp/_lib/__init__.py": "",
        "mha_xp/_lib/_shapes.py": "from .. import _config\n",
        "mha_xp/_core/__init__.py": "",
        "mha_xp/_core/_dense.py": ("import numpy as np\nfrom .._lib._shapes import g\n"
                                   "def f():\n    from mha_xp import _layer\n    from mha_xp._io import h, i\n"),
    })
    assert unranked(sources) == ["mha_xp/_masks.py: module mha_xp._masks has no rank"]
    assert upward_imports(sources) == [
        "mha_xp/_core/_dense.py:4: mha_xp._core._dense (rank 2) imports mha_xp._layer (rank 4)",
        "mha_xp/_core/_dense.py:5: mha_xp._core._dense (rank 2) imports mha_xp._io (rank 5)",
        "mha_xp/_lib/_shapes.py:1: mha_xp._lib._shapes (rank 0) imports mha_xp._config (rank 1)",
    ]


def test_rules_catch_import_cycles_within_a_rank(tmp_path):
    sources = _write(tmp_path, {
        "mha_xp/__init__.py": "",
        "mha_xp/_core/__init__.py": "from ._plan import plan\n",
        "mha_xp/_core/_plan.py": "def plan():\n    from . import _dense\n",
        "mha_xp/_core/_dense.py": "from ._scores import s\n",
        "mha_xp/_core/_scores.py": "from mha_xp._core._plan import plan\n",
        "mha_xp/_core/_backward.py": "from ._dense import d\n",  # on no cycle
        "mha_xp/_lib/_a.py": "from . import _b\n",  # lateral, no cycle
        "mha_xp/_lib/_b.py": "",
    })
    assert _where(same_rank_cycles(sources)) == [
        "mha_xp/_core/_dense.py:1", "mha_xp/_core/_plan.py:2", "mha_xp/_core/_scores.py:1"]
    assert ("mha_xp/_core/_plan.py:2: mha_xp._core._plan imports mha_xp._core._dense, which leads back: "
            "mha_xp._core._dense -> mha_xp._core._scores -> mha_xp._core._plan") in same_rank_cycles(sources)


def test_rules_catch_raises_in_the_core(tmp_path):
    body = ("def f(x):\n    try:\n        x()\n    except KeyError:\n        raise\n"
            "    if x:\n        raise ValueError('no')\n    raise NotImplementedError\n")
    sources = _write(tmp_path, {"mha_xp/_core/_dense.py": body, "mha_xp/_checks.py": body})
    assert core_raises(sources) == ["mha_xp/_core/_dense.py:7: raise ValueError('no')",
                                    "mha_xp/_core/_dense.py:8: raise NotImplementedError"]


def _function(name: str, code: int, padding: int = 0, indent: str = "") -> str:
    """Source of a function with ``code`` lines of code (its ``def`` line
    included) and ``padding`` lines each of docstring, comments and blank lines."""
    doc = [f'{indent}    """Docstring', *[f"{indent}    text" for _ in range(padding)], f'{indent}    """']
    body = [f"{indent}    x{i} = {i}  # a comment after code" for i in range(code - 1)]
    body[1:1] = [f"{indent}    # a comment"] * padding + [""] * padding
    return "\n".join([f"{indent}def {name}():", *(doc if padding else []), *body]) + "\n"


def test_rules_catch_long_functions_and_classes(tmp_path):
    nested = _function("outer", 40) + _function("inner", 42, indent="    ")
    methods = "".join(_function(f"m{i}", 80, padding=3, indent="    ") for i in range(7))
    sources = _write(tmp_path, {"mha_xp/_core/_dense.py": "\n".join([
        _function("short", 80, padding=50),  # 80 lines of code in 300 lines: fine
        _function("long", 81),
        nested,  # 40 + 42 lines: the outer is too long, not the inner
        "@decorated\n" + _function("decorated", 80),  # the decorator counts
        "class Big:\n    '''Docstring.'''\n" + methods,  # 1 + 7 * 80 lines
        "class Small:\n" + methods[: methods.index("    def m6")],  # 1 + 6 * 80 lines
    ])})
    assert [v.split(": ", 1)[1] for v in oversized(sources)] == [
        "function long has 81 lines of code (limit 80)",
        "function outer has 82 lines of code (limit 80)",
        "function decorated has 81 lines of code (limit 80)",
        "class Big has 561 lines of code (limit 500)",
    ]


def test_rules_catch_code_lines_only():
    text = ('def f(a):\n    """Doc\n\n    string."""\n    # comment\n\n'
            '    s = """not a\n    docstring"""\n    return (a +  # why\n            1)\n')
    assert sorted(code_lines(text, ast.parse(text))) == [1, 7, 8, 9, 10]


def test_rules_catch_backend_checks(tmp_path):
    body = ("import array_api_compat\nimport numpy as np\n"
            "from array_api_compat import is_torch_array, is_lazy_array, is_array_api_obj\n"
            "def f(x, xp):\n    if array_api_compat.is_dask_namespace(xp) or is_torch_array(x):\n"
            "        return type(x) is np.ndarray\n    return is_lazy_array(x) or isinstance(x, np.ndarray)\n")
    sources = _write(tmp_path, {"mha_xp/_core/_dense.py": body, "mha_xp/_lib/_backends.py": body})
    assert backend_checks(sources) == [
        "mha_xp/_core/_dense.py:3: is_torch_array",
        "mha_xp/_core/_dense.py:5: is_dask_namespace",
        "mha_xp/_core/_dense.py:5: is_torch_array",
        "mha_xp/_core/_dense.py:6: type(x) is np.ndarray",
    ]


def test_rules_catch_every_compat_backend_check():
    compat = pytest.importorskip("array_api_compat")
    checks = {n for n in dir(compat) if re.fullmatch(r"is_\w+_(array|namespace)", n)}
    assert {n for n in checks if not BACKEND_CHECK.fullmatch(n)} == {"is_lazy_array", "is_writeable_array"}


def test_rules_catch_private_use_in_benchmarks(tmp_path):
    (tmp_path / "bench.py").write_text(
        "import sys\nimport mha_xp\nimport mha_xp._core._plan\nfrom mha_xp._core import _plan\n"
        "from mha_xp._core._plan import blocks\nfrom mha_xp._attention import default_blocks\n"
        "from mha_xp import _layer, sdpa\nsys.path.insert(0, 'x')\nsys.path[:0] = ['y']\n"
        "print(mha_xp.__version__, mha_xp._layer._Call, sys.path)\n")
    sources = {"bench": parse(tmp_path / "bench.py", tmp_path)}
    assert benchmark_violations(sources) == [
        "bench.py:6: uses private mha_xp._attention.default_blocks",
        "bench.py:7: uses private mha_xp._layer",
        "bench.py:8: edits sys.path (sys.path.insert(0, 'x'))",
        "bench.py:9: edits sys.path (sys.path[:0] = ['y'])",
        "bench.py:10: uses private mha_xp._layer._Call",
    ]
