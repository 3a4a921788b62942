import subprocess
import sys

import pytest


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


def test_claims_assert_record_and_report(tmp_path, monkeypatch):
    """diffreg.claims: a failing claim raises in assert mode and is recorded in record mode; reports never raise;
    the JSON record carries value, threshold, margin, seed and kernel level; DIFFREG_SEED is read."""
    import json

    from diffreg.claims import ClaimFailed, Claims, chapter_seed

    c = Claims("99_test", 3, mode="assert", out=tmp_path)
    assert c.check("big", 2.0, ">", 1.5) is True
    with pytest.raises(ClaimFailed, match="'small'.*seed 3"):
        c.check("small", 0.1, ">", 1.0)
    r = Claims("99_test", 4, mode="record", out=tmp_path / "rec")
    assert r.check("small", 0.1, ">", 1.0) is False and r.report("range", -0.5) == -0.5
    rows = {x["claim"]: x for x in json.loads((tmp_path / "rec" / "99_test.json").read_text())}
    assert rows["small"]["margin"] == pytest.approx(-0.9) and rows["small"]["holds"] is False
    assert rows["small"]["seed"] == 4 and rows["small"]["kernel"] and rows["range"]["op"] == "report"
    assert c.check("le", 1.0, "<=", 1.0) and [t["must be"] for t in r.table()] == ["> 1", "(reported)"]
    with pytest.raises(ValueError):
        c.check("bad", 1.0, "==", 1.0)
    monkeypatch.setenv("DIFFREG_SEED", "7")
    assert chapter_seed() == 7
    monkeypatch.setenv("DIFFREG_SEED", "x")
    with pytest.raises(ValueError, match="DIFFREG_SEED"):
        chapter_seed()
