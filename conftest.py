"""Collect the book's chapters (jupytext MyST notebooks in ``notebooks/``) as nbval tests.

Each chapter ``notebooks/NN_name.md`` is converted with jupytext to ``_build/executed/NN_name.ipynb`` (no outputs:
nbval then only checks that every cell runs, and the chapters ``assert`` what they claim). While nbval runs the
cells, the outputs each cell produced are stored back into that notebook, which is written when the chapter
finishes. ``.ci/run`` renders these executed notebooks into the book with execution off, so each chapter is executed
exactly once in CI and the rendered pages still carry real outputs.

Run only the unit tests with ``pytest tests``; one chapter with ``pytest notebooks/02_voxelmorph.md``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
EXECUTED = ROOT / "_build" / "executed"


def _is_chapter(path: Path) -> bool:
    if path.suffix != ".md" or path.parent.resolve() != (ROOT / "notebooks").resolve():
        return False
    head = path.read_text(encoding="utf-8")[:400]
    return "jupytext" in head and "kernelspec" in head


def pytest_configure(config: pytest.Config) -> None:
    # nbval in "lax" mode (no stored outputs to compare), in this interpreter's environment.
    config.option.nbval_lax = True
    config.option.nbval_current_env = True
    if not config.option.nbval_cell_timeout or config.option.nbval_cell_timeout < 0:
        config.option.nbval_cell_timeout = 900
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if not _is_chapter(file_path):
        return None
    import jupytext
    from nbval.plugin import IPyNbFile

    class ChapterNotebook(IPyNbFile):
        """nbval collector that keeps the outputs it sees and writes the executed notebook at teardown."""

        def teardown(self) -> None:
            super().teardown()
            nb = getattr(self, "nb", None)
            if nb is not None:
                import nbformat

                nbformat.write(nb, str(self.path))

    EXECUTED.mkdir(parents=True, exist_ok=True)
    nb = jupytext.read(file_path)
    target = EXECUTED / (file_path.stem + ".ipynb")
    jupytext.write(nb, target, fmt="ipynb")
    return ChapterNotebook.from_parent(parent, path=target)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item):
    outcome = yield
    outs = getattr(item, "test_outputs", None)
    cell = getattr(item, "cell", None)
    if cell is not None and outs is not None:
        for out in outs:
            if out.get("output_type") == "execute_result":
                out.setdefault("execution_count", item.cell_num + 1)
        cell.outputs = list(outs)
        cell.execution_count = item.cell_num + 1
