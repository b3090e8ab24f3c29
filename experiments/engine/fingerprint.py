"""Code fingerprints: what a stage's result depends on besides its config.

A stage's fingerprint is the sha256 of the normalised source of every module that computes its result: the
stage's root modules (training loop, data, models, evaluation, the task, and for tokens and students the
token/distillation code and the method's plug-in) and, transitively, every project module they import among the
*computing* code (``maskd/``, ``baselines/``, ``experiments/tasks/``, ``experiments/methods/`` and
``experiments/engine/{training,tokens,distill,runtime,models,data,evaluation,recorder,pretrain,teacher_outputs}.py``).
Source is normalised with :mod:`ast` (docstrings dropped, then ``ast.dump``), so comments, docstrings and
formatting do not count; any other change does.

Rule, per stage (a superset of what each stage runs, never less):

* teacher and ``baseline`` student: the training loop, runtime, models, data, evaluation, recorder, the task
  registry and the manifest's task module, every data kind (``experiments/datasets/``), and what they import
  (segmentation's task imports ``maskd`` masks);
* tokens: the same plus ``engine/tokens.py`` (hence ``maskd/``);
* a distilled student: the same plus ``engine/distill.py`` and the method's own module, and what it imports
  (MasKD: ``maskd/`` and ``baselines/fgd.py``; CWD: ``baselines/cwd.py``...). Editing the MasKD loss therefore
  changes the MasKD student's and the tokens' fingerprints but not the teacher's, the baseline's or CWD's.
  Other methods' modules are not followed: the registry loads them dynamically.
"""

from __future__ import annotations

import ast
import hashlib
import sys
from functools import lru_cache
from pathlib import Path

#: Root of the source tree that is fingerprinted (the directory holding ``maskd``, ``baselines``, ``experiments``).
#: Tests point it at an edited copy.
SOURCE_ROOT = Path(__file__).resolve().parents[2]

_ENGINE = (
    "training",
    "tokens",
    "distill",
    "runtime",
    "models",
    "data",
    "evaluation",
    "recorder",
    "weights",
    "distributed",
    "batches",
    "pretrain",
    "teacher_outputs",
)
_COMPUTING_DIRS = ("maskd", "baselines", "experiments/tasks", "experiments/methods", "experiments/datasets")
_COMMON = tuple(
    f"experiments/engine/{n}.py" for n in ("training", "runtime", "models", "data", "evaluation", "recorder")
)
_COMMON += ("experiments/tasks/__init__.py", "experiments/tasks/registry.py")


def _computing(rel: str) -> bool:
    if rel.startswith("experiments/engine/"):
        return rel[len("experiments/engine/") : -3] in _ENGINE
    return any(rel.startswith(d + "/") for d in _COMPUTING_DIRS)


def normalised(source: str) -> str:
    """``source`` as an AST dump without docstrings: comments, docstrings and layout do not count."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                if isinstance(body[0].value.value, str):
                    node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False, include_attributes=False)


def _module_file(root: Path, dotted: str) -> str | None:
    base = root.joinpath(*dotted.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(root).as_posix()
    return None


def _imports(root: Path, rel: str, tree: ast.AST) -> set[str]:
    """Project files ``rel`` imports (modules and, for ``from pkg import mod``, submodules)."""
    package = rel[: -len("/__init__.py")] if rel.endswith("/__init__.py") else rel.rsplit("/", 1)[0]
    package_parts = package.split("/")
    found: set[str] = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package_parts[: len(package_parts) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        for dotted in names:
            # ``import a.b.c`` runs a/__init__, a/b/__init__ and a/b/c.
            parts = dotted.split(".")
            for i in range(1, len(parts) + 1):
                f = _module_file(root, ".".join(parts[:i]))
                if f is not None:
                    found.add(f)
    return found


@lru_cache(maxsize=256)
def _parsed(path: str, mtime_ns: int, size: int) -> tuple[str, ast.AST]:
    source = Path(path).read_text(encoding="utf-8")
    return hashlib.sha256(normalised(source).encode()).hexdigest(), ast.parse(source)


def _digest_and_tree(path: Path) -> tuple[str, ast.AST]:
    st = path.stat()
    return _parsed(str(path), st.st_mtime_ns, st.st_size)


def files_fingerprint(roots: list[str], root: Path | None = None) -> tuple[str, list[str]]:
    """The fingerprint of ``roots`` (paths relative to ``root``, or absolute paths of plug-ins outside it) and
    the computing modules they import, transitively; and the files it covers."""
    root = root or SOURCE_ROOT
    seen: dict[str, str] = {}
    todo = list(roots)
    while todo:
        rel = todo.pop()
        if rel in seen:
            continue
        path = Path(rel) if Path(rel).is_absolute() else root / rel
        if not path.is_file():
            seen[rel] = "missing"
            continue
        digest, tree = _digest_and_tree(path)
        seen[rel] = digest
        if not Path(rel).is_absolute():
            todo += [f for f in _imports(root, rel, tree) if _computing(f) and f not in seen]
    h = hashlib.sha256()
    for rel in sorted(seen):
        h.update(f"{rel if not Path(rel).is_absolute() else Path(rel).name}\0{seen[rel]}\n".encode())
    return h.hexdigest()[:16], sorted(seen)


def _module_rel(module_name: str, root: Path) -> str | None:
    """``experiments.tasks.detection`` as a path under ``root``; a plug-in outside the tree: its absolute path."""
    rel = _module_file(root, module_name)
    if rel is not None:
        return rel
    module = sys.modules.get(module_name)
    file = getattr(module, "__file__", None)
    return str(Path(file).resolve()) if file else None


def stage_roots(kind: str, task: str, method: str | None = None, root: Path | None = None) -> list[str]:
    """The root modules of a stage (see the module docstring for the rule)."""
    from ..tasks import get_task

    root = root or SOURCE_ROOT
    roots = list(_COMMON)
    # the data kinds are loaded by their registry, not imported by name: every kind's module counts
    roots += sorted(p.relative_to(root).as_posix() for p in (root / "experiments" / "datasets").glob("*.py"))
    task_module = _module_rel(type(get_task(task)).__module__, root)
    if task_module:
        roots.append(task_module)
    if kind == "tokens":
        roots.append("experiments/engine/tokens.py")
    elif kind == "student" and method not in (None, "baseline"):
        from .. import methods

        roots += ["experiments/engine/distill.py", "experiments/engine/tokens.py"]
        spec = methods.get(method)
        module_name = getattr(spec.build, "__module__", None) or type(spec).__module__
        method_module = _module_rel(module_name, root)
        if method_module:
            roots.append(method_module)
    return roots


def code_fingerprint(kind: str, task: str, method: str | None = None) -> str:
    """The code fingerprint of stage ``kind`` (teacher, tokens, student) for ``task`` (and the student's method)."""
    return files_fingerprint(stage_roots(kind, task, method))[0]


__all__ = ["SOURCE_ROOT", "code_fingerprint", "files_fingerprint", "normalised", "stage_roots"]
