"""Write ``build/typecheck/paligemma_edge``: the package as its imports name it, made of links to the
source folders, so mypy, pyright and editors resolve every ``paligemma_edge.X`` import.

Why: pyproject's package-dir maps ``paligemma_edge.runtime`` to the root folder ``runtime/`` (and so on),
and the editable install serves that mapping through an import hook that static tools cannot read.

What is decided here: each top-level mapped folder is one directory link, so files added later are
seen without running this again; the package's own files (``paligemma_edge/*.py``) are linked one by
one. ``make install`` and ``make lint`` run it.

    python tools/link_tree.py [OUTPUT]   (default: build/typecheck)
"""

from __future__ import annotations

import importlib
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "paligemma_edge"


def link_tree(output: Path) -> Path:
    if sys.version_info < (3, 11):
        sys.exit("tools/link_tree.py reads pyproject.toml with tomllib: run it with Python 3.11 or newer")
    tomllib = importlib.import_module("tomllib")  # the standard library's from 3.11 (mypy checks for 3.10)
    package_dir = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    top = output / PACKAGE
    if output.exists():
        shutil.rmtree(output)
    top.mkdir(parents=True)
    for source in sorted((ROOT / package_dir[PACKAGE]).iterdir()):
        if source.suffix == ".py":
            (top / source.name).symlink_to(source)
    for name, folder in package_dir.items():
        parent, _, leaf = name.rpartition(".")
        if parent != PACKAGE:
            continue  # a subpackage nested in its parent's folder, as its name says (runtime/backends)
        (top / leaf).symlink_to(ROOT / folder, target_is_directory=True)
    for name, folder in package_dir.items():  # every nested mapping must follow the folder nesting
        parent, _, leaf = name.rpartition(".")
        if parent not in (PACKAGE, "") and Path(folder) != Path(package_dir[parent]) / leaf:
            sys.exit(f"pyproject.toml maps {name} to {folder}, not inside {package_dir[parent]}/: "
                     "a link tree of top-level folders cannot follow it")
    return top


if __name__ == "__main__":
    print(f"linked {link_tree(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / 'build' / 'typecheck')}")
