"""Stage the book sources for the CI build: the chapters are replaced by the notebooks nbval executed.

``conftest.py`` writes ``_build/executed/NN_name.ipynb`` (with outputs) while ``pytest`` runs each chapter. This
script copies the book sources into a staging folder, swaps every ``notebooks/NN_name.md`` for its executed
notebook and turns execution off, so ``jupyter-book build`` renders real outputs without running a chapter twice.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def main(dest: str) -> None:
    dest_path = Path(dest).resolve()
    if dest_path.exists():
        shutil.rmtree(dest_path)
    dest_path.mkdir(parents=True)
    for name in ("_toc.yml", "README.md"):
        shutil.copy(ROOT / name, dest_path / name)
    shutil.copytree(ROOT / "book", dest_path / "book")
    (dest_path / "notebooks").mkdir()
    executed = ROOT / "_build" / "executed"
    missing = []
    for chapter in sorted((ROOT / "notebooks").glob("*.md")):
        nb = executed / (chapter.stem + ".ipynb")
        if not nb.is_file():
            missing.append(chapter.name)
            continue
        if "image/png" not in nb.read_text():
            sys.exit(f"{nb} has no figure output: was it executed with a non-inline matplotlib backend?")
        shutil.copy(nb, dest_path / "notebooks" / nb.name)
    for extra in (ROOT / "notebooks").iterdir():
        if extra.is_dir() and not extra.name.startswith((".", "_")):
            shutil.copytree(extra, dest_path / "notebooks" / extra.name)
    if missing:
        sys.exit(f"no executed notebook for {', '.join(missing)}: run pytest first")
    config = yaml.safe_load((ROOT / "_config.yml").read_text())
    config.setdefault("execute", {})["execute_notebooks"] = "off"
    (dest_path / "_config.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"staged the book with {len(list((dest_path / 'notebooks').glob('*.ipynb')))} executed chapters in {dest_path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "_build/ci-src")
