"""The package's shape, checked statically: no import cycles, method code independent of the book and the
smoke profile's tiny models, modules small enough to read and each saying why it exists, a README tree that
names every module; and the lint step that `make test` runs first.

Why static (``ast``) and not by importing: a cycle that is only closed by a function-local import does not
fail at import time, it fails (or silently works) the first time that function runs; and it still means two
modules cannot be understood apart. So every import counts, at module level or inside a function.
"""
from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

import autorule_lib

LIBRARY = Path(autorule_lib.__file__).resolve().parent
PACKAGE = "autorule_lib"
# Entry points and presentation (book) and the smoke profile's tiny-model builders (smoke) may use the method
# code; the method code (data, extraction, verify, train, evaluate, cluster, llm, the base modules) may not
# use them: a GPU run must not depend on how the book is rendered or on how the CPU demo builds its models.
OUTER_PACKAGES = ("book", "smoke")
MAX_LINES = 450


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the most specific module of the package that the statement names
    line: int
    local: bool  # inside a function (a lazy import)

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}{', function-local' if self.local else ''})"


def modules(root: Path, package: str) -> dict[str, Path]:
    """Dotted name -> file, for every module of the package under ``root`` (``__init__`` is the package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [package, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _targets(node: ast.Import | ast.ImportFrom, name: str, path: Path, known: dict[str, Path]) -> list[str]:
    """The package's modules an import statement names (a name imported from a module is that module)."""
    if isinstance(node, ast.Import):
        candidates = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: resolved against the importing module's package
            here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            anchor = here[: len(here) - node.level + 1]
            base = ".".join(anchor + ([node.module] if node.module else []))
        candidates = [f"{base}.{alias.name}" for alias in node.names]  # `from pkg import submodule`
        candidates = [c if c in known else base for c in candidates]
    found = []
    for target in candidates:
        while target and target not in known:  # `import a.b.c` of a name below a module: the module
            target = target.rpartition(".")[0]
        if target and target != name and target not in found:
            found.append(target)
    return found


def imports(root: Path, package: str) -> list[Import]:
    """Every import of one of the package's modules by another, module-level and function-local alike."""
    known = modules(root, package)
    found = []
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        # walk with the enclosing function known: a lazy import is one with a def above it
        stack = [(child, False) for child in ast.iter_child_nodes(tree)]
        while stack:
            node, local = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [Import(name, t, node.lineno, local) for t in _targets(node, name, path, known)]
            inside = local or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            stack += [(child, inside) for child in ast.iter_child_nodes(node)]
    return sorted(found, key=lambda i: (i.source, i.line, i.target))


def cycles(found: list[Import]) -> list[list[Import]]:
    """The imports that lie on a cycle, one list per strongly connected group of modules (Tarjan)."""
    graph: dict[str, set[str]] = {}
    for imp in found:
        graph.setdefault(imp.source, set()).add(imp.target)
        graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    groups: list[set[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the number of modules (~70)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[i for i in found if i.source in g and i.target in g] for g in groups]


def outer_imports(found: list[Import], package: str) -> list[Import]:
    """Imports of the book or smoke packages by method modules (everything outside those two)."""
    outer = tuple(f"{package}.{p}" for p in OUTER_PACKAGES)
    inside = lambda m: any(m == o or m.startswith(o + ".") for o in outer)  # noqa: E731
    return [i for i in found if inside(i.target) and not inside(i.source)]


def _report(title: str, items: list) -> str:
    return title + "\n" + "\n".join(f"  {i}" for i in items)


# ---------------------------------------------------------------- the rules, on autorule_lib


def test_no_import_cycle_in_the_library():
    found = cycles(imports(LIBRARY, PACKAGE))
    assert not found, "\n".join(_report("import cycle:", group) for group in found)


def test_method_modules_import_neither_the_book_nor_the_smoke_package():
    bad = outer_imports(imports(LIBRARY, PACKAGE), PACKAGE)
    assert not bad, _report("method code importing book/ or smoke/:", bad)


def test_no_module_is_too_long_to_read():
    long = {str(p.relative_to(LIBRARY)): n for p in sorted(LIBRARY.rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines (split by concept): {long}"


def test_every_module_says_why_it_exists():
    # an empty package marker has nothing to explain; anything with code opens with its docstring
    missing = [str(p.relative_to(LIBRARY)) for p in sorted(LIBRARY.rglob("*.py"))
               if p.read_text().strip() and not ast.get_docstring(ast.parse(p.read_text()))]
    assert not missing, f"modules without a docstring: {missing}"


def readme_tree(readme: Path) -> list[str]:
    """The paths of the README's annotated file tree (its ``## Layout`` code block; two spaces a level)."""
    text = readme.read_text().split("## Layout", 1)[1]
    block = text.split("```text\n", 1)[1].split("```", 1)[0]
    paths, parents = [], []
    for line in block.splitlines():
        depth = (len(line) - len(line.lstrip(" "))) // 2
        name = line.split()[0]
        parents[depth:] = [name]
        paths.append("".join(parents))
    return paths


def test_readme_tree_lists_every_module_and_only_real_files():
    root = LIBRARY.parent
    listed = readme_tree(root / "README.md")
    missing_files = [p for p in listed if not (root / p).exists()]
    modules_listed = {p for p in listed if p.endswith(".py") and p.startswith(f"{PACKAGE}/")}
    actual = {str(p.relative_to(root)) for p in LIBRARY.rglob("*.py") if p.name != "__init__.py"}
    assert not missing_files, f"README's tree names files that do not exist: {missing_files}"
    assert modules_listed == actual, f"not in README's tree: {sorted(actual - modules_listed)}"


# ---------------------------------------------------------------- the quality gate: ruff before the tests


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_lints_before_it_tests():
    lines = subprocess.run(["make", "-n", "test"], cwd=LIBRARY.parent, capture_output=True, text=True,
                           check=True).stdout.splitlines()
    lint = next(i for i, line in enumerate(lines) if "ruff check" in line)
    tests = next(i for i, line in enumerate(lines) if "-m pytest" in line)
    assert lint < tests


def test_ruff_config_rejects_dead_code_stray_whitespace_and_stale_noqa_markers(tmp_path):
    ruff = Path(sys.executable).parent / "ruff"
    assert ruff.exists(), "ruff comes with the dev extra (make setup)"
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n\n"
                   "square = lambda x: x * x  # noqa: E731  (a marker that silences a selected rule: fine)\n"
                   "cube = square(3) * 3  # noqa: E731\n"  # stale: nothing to silence here
                   "done = True \n")  # trailing whitespace (W291: not in ruff's default set)
    run = subprocess.run([str(ruff), "check", "--no-cache", "--config", str(LIBRARY.parent / "pyproject.toml"),
                          "--output-format", "concise", str(bad)], capture_output=True, text=True)
    assert run.returncode == 1, run.stdout + run.stderr
    codes = sorted(line.split()[1] for line in run.stdout.splitlines() if line.startswith(str(bad)))
    assert codes == ["F401", "RUF100", "W291"], run.stdout


# ---------------------------------------------------------------- the checker, on packages made to fail


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


def test_checker_finds_a_cycle_closed_by_a_function_local_import(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/prep.py": """
            from ..config import Config

            def tokenizer():
                from ..verify import judge  # the lazy import that hides the cycle at import time
                return judge.load()
        """,
        "verify/__init__.py": "",
        "verify/judge.py": "from ..data.prep import tokenizer\n",
        "config.py": "Config = dict\n",
    })
    found = imports(root, "pkg")
    assert Import("pkg.data.prep", "pkg.verify.judge", 5, True) in found
    assert Import("pkg.data.prep", "pkg.config", 2, False) in found
    assert [sorted(map(str, g)) for g in cycles(found)] == [[
        "pkg.data.prep -> pkg.verify.judge (line 5, function-local)",
        "pkg.verify.judge -> pkg.data.prep (line 1)"]]


def test_checker_resolves_every_import_form_and_passes_a_clean_package(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "base.py": "import os\n",
        "train/__init__.py": "",
        "train/common.py": "from .. import base\n",
        "train/sft.py": "import pkg.train.common\nfrom pkg.base import os as _os\nfrom . import common\n",
        "train/grpo.py": "from .common import *\nfrom pkg.train import sft\n",
    })
    found = imports(root, "pkg")
    assert {(i.source, i.target) for i in found} == {
        ("pkg.train.common", "pkg.base"), ("pkg.train.sft", "pkg.train.common"), ("pkg.train.sft", "pkg.base"),
        ("pkg.train.grpo", "pkg.train.common"), ("pkg.train.grpo", "pkg.train.sft")}
    assert cycles(found) == []


def test_checker_finds_method_code_importing_the_smoke_or_book_package(tmp_path):
    root = _package(tmp_path, {
        "__init__.py": "",
        "smoke/__init__.py": "",
        "smoke/models.py": "from ..train import rewards\n",  # outer code may use the method code
        "book/__init__.py": "",
        "book/chapter.py": "from ..smoke.models import build\n",
        "train/__init__.py": "",
        "train/rewards.py": "def resolve():\n    from ..smoke import models\n",
        "evaluate.py": "from pkg.book.chapter import open_stage\n",
    })
    bad = outer_imports(imports(root, "pkg"), "pkg")
    assert [str(i) for i in bad] == ["pkg.evaluate -> pkg.book.chapter (line 1)",
                                     "pkg.train.rewards -> pkg.smoke.models (line 2, function-local)"]
