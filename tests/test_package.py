import subprocess
import sys


def test_core_imports_do_not_pull_matplotlib_or_ipywidgets():
    code = (
        "import sys, diffreg, diffreg.models, diffreg.metrics, diffreg.spatial, diffreg.losses, diffreg.diffusion, "
        "diffreg.data, diffreg.train, diffreg.evaluate, diffreg.config\n"
        "bad = [m for m in ('matplotlib', 'ipywidgets', 'IPython') if m in sys.modules]\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_only_viz_and_widgets_import_matplotlib():
    from pathlib import Path

    import diffreg

    root = Path(diffreg.__file__).parent
    offenders = [p.name for p in root.rglob("*.py") if p.name not in ("viz.py", "widgets.py")
                 and ("import matplotlib" in p.read_text() or "import ipywidgets" in p.read_text())]
    assert not offenders, offenders


def test_no_cuda_calls_in_the_package():
    from pathlib import Path

    import diffreg

    root = Path(diffreg.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if ".cuda()" in p.read_text()]
    assert not offenders, offenders
