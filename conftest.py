"""Collect the book's chapters (jupytext MyST notebooks in ``notebooks/``) as nbval tests.

Each chapter ``notebooks/NN_name.md`` is read with jupytext (no stored outputs: nbval then only checks that every
cell runs, and the chapters ``assert`` what they claim). While nbval runs the cells, the outputs each cell produced
are stored back into the notebook, which is written to ``_build/executed/NN_name.ipynb`` when the chapter finishes. ``.ci/run`` renders these executed notebooks into the book with execution off, so each chapter is executed
exactly once in CI and the rendered pages still carry real outputs.

Run only the unit tests with ``pytest tests``; one chapter with ``pytest notebooks/02_voxelmorph.md``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
# DIFFREG_EXECUTED redirects them (benchmarks/claims runs several seeds side by side).
EXECUTED = Path(os.environ.get("DIFFREG_EXECUTED", ROOT / "_build" / "executed"))


def _is_chapter(path: Path) -> bool:
    if path.suffix != ".md" or path.parent.resolve() != (ROOT / "notebooks").resolve():
        return False
    head = path.read_text(encoding="utf-8")[:400]
    return "jupytext" in head and "kernelspec" in head


def pytest_configure(config: pytest.Config) -> None:
    # nbval in "lax" mode (no stored outputs to compare), in this interpreter's environment.
    config.option.nbval_lax = True
    config.option.nbval_current_env = True
    config.option.nbval_cell_timeout = 900
    # The chapter kernels inherit this environment: with MPLBACKEND set (e.g. Agg on headless machines) ipykernel
    # keeps that backend and the executed chapters, hence the rendered book, would carry no figures. Unset, the
    # kernels use the inline backend and this process matplotlib's default.
    os.environ.pop("MPLBACKEND", None)
    # Chapters cache their training runs under DIFFREG_RUNS and later chapters reuse earlier ones (e.g. chapter 04
    # compares with chapter 02's VoxelMorph). A fresh directory per test session keeps a run trained by an older
    # version of the code from being picked up; set DIFFREG_RUNS to keep runs between sessions.
    # OpenMP threads that spin while waiting make PyTorch many times slower on a machine shared with other jobs.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Chapter kernels run headless here: diffreg.widgets.in_live_kernel() is False, so chapters show their static
    # players (which the rendered book needs) and skip the live widgets.
    os.environ.setdefault("DIFFREG_STATIC", "1")
    # ITK (inside antspyx) reads its thread count once, at the process's first ANTs call, which may be a test that
    # only applies a transform; one thread from the start keeps ANTs SyN reproducible in every test and chapter.
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "1")
    # The unit tests use small tensors: one thread is faster than two and leaves the other core to a chapter kernel.
    import torch

    torch.set_num_threads(1)
    if "DIFFREG_RUNS" not in os.environ:
        os.environ["DIFFREG_RUNS"] = tempfile.mkdtemp(prefix="diffreg-runs-")


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    if not _is_chapter(file_path):
        return None
    import jupytext
    from nbval.plugin import IPyNbFile

    class ChapterNotebook(IPyNbFile):
        """nbval collector of a jupytext chapter: reads the ``.md`` through jupytext, keeps the outputs nbval sees
        and writes the executed notebook to ``_build/executed/`` at teardown."""

        def collect(self):
            import nbval.plugin as plugin

            original = plugin.nbformat.read
            plugin.nbformat.read = lambda *args, **kwargs: jupytext.read(self.path)
            try:
                yield from super().collect()
            finally:
                plugin.nbformat.read = original

        def teardown(self) -> None:
            super().teardown()
            nb = getattr(self, "nb", None)
            if nb is not None:
                import nbformat

                EXECUTED.mkdir(parents=True, exist_ok=True)
                nbformat.write(nb, str(EXECUTED / (self.path.stem + ".ipynb")))

    return ChapterNotebook.from_parent(parent, path=file_path)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> None:
    """After nbval ran a chapter cell, store the outputs it collected in the notebook written at teardown."""
    if call.when != "call":
        return
    outs = getattr(item, "test_outputs", None)
    cell = getattr(item, "cell", None)
    if cell is not None and outs is not None:
        for out in outs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = item.cell_num + 1
        cell.outputs = list(outs)
        cell.execution_count = item.cell_num + 1
