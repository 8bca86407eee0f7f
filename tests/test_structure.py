"""The shape of the house stays readable: no class over 300 lines and no function over 80 in train_scripts/ and
hub/, and no import circle between the project's files (TYPE_CHECKING imports included)."""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ('timm_spot', 'train_scripts', 'hub')
MAX_CLASS, MAX_FUNCTION = 300, 80


def _spans(path: Path) -> List[Tuple[str, str, int]]:
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            kind = 'class' if isinstance(node, ast.ClassDef) else 'function'
            out.append((kind, node.name, node.end_lineno - first + 1))
    return out


def test_no_long_classes_or_functions():
    too_long = []
    for folder in ('train_scripts', 'hub'):
        for path in sorted((ROOT / folder).glob('*.py')):
            for kind, name, lines in _spans(path):
                key = f'{path.relative_to(ROOT).as_posix()}:{name}'
                limit = MAX_CLASS if kind == 'class' else MAX_FUNCTION
                if lines > limit:
                    too_long.append(f'{key}: {kind} of {lines} lines (limit {limit})')
    assert not too_long, '\n'.join(too_long)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix('').parts)
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _imports(path: Path, module: str, known: Set[str]) -> Set[str]:
    """The project's modules ``path`` imports, anywhere in the file (functions and TYPE_CHECKING blocks too)."""
    package = module if path.name == '__init__.py' else module.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding='utf-8'))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ''
            if node.level:
                anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
                base = '.'.join(anchor + ([base] if base else []))
            names = [base] + [f'{base}.{a.name}' for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition('.')[0]
            if name and name != module:
                found.add(name)
    return found


def test_no_import_circle():
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob('*.py')}
    graph: Dict[str, Set[str]] = {m: _imports(p, m, set(files)) for m, p in files.items()}
    # a module importing its own package (``from timm_spot.data import x`` inside timm_spot.data.sources) is not
    # counted as a circle through the package's __init__
    state: Dict[str, int] = {}
    stack: List[str] = []
    circles = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1 and not (m.startswith(n + '.') or n in PACKAGES):
                circles.append(' -> '.join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not circles, '\n'.join(circles)
