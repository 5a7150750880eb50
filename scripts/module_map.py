"""Print the module map of a package: lines per module, its longest function, and function-level imports.

    python scripts/module_map.py simvq          # tab-separated: module, lines, longest function, its lines
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path


def module_map(root: Path) -> tuple[list[tuple[str, int, str, int]], int]:
    rows, deferred = [], 0
    package = root.name
    for path in sorted(root.rglob("*.py")):
        source = path.read_text(encoding="utf-8")
        longest = ("", 0)
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > longest[1]:
                    longest = (node.name, length)
                for sub in ast.walk(node):
                    if isinstance(sub, ast.ImportFrom) and (sub.module or "").split(".")[0] == package:
                        deferred += 1
                    elif isinstance(sub, ast.Import) and any(a.name.split(".")[0] == package for a in sub.names):
                        deferred += 1
        rows.append((str(path.relative_to(root.parent)), len(source.splitlines()), *longest))
    return rows, deferred


def main(argv: list[str]) -> int:
    rows, deferred = module_map(Path(argv[1] if len(argv) > 1 else "simvq"))
    for module, lines, function, length in sorted(rows, key=lambda r: -r[1]):
        print(f"{module}\t{lines}\t{function}\t{length}")
    print(f"# {len(rows)} modules, {sum(r[1] for r in rows)} lines, {deferred} function-level imports of the package")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
