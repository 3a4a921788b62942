"""Every command the documentation shows runs.

The ``python -m diffreg ...`` and ``torchrun ... -m diffreg ...`` commands of ``README.md`` and
``book/reproducing.md`` are read from their code blocks (line continuations joined, ``VAR=value`` prefixes kept as
environment variables, comments dropped) and each one is run, made small:

* data paths are rewritten to phantoms in the real on-disk layouts (``python -m diffreg phantom``): ``/data/ACDC``
  holds ``training/`` and ``testing/`` (ACDC NIfTI), ``/data/ACDC-h5`` the HDF5 layout, ``/data/CAMUS`` CAMUS;
  other ``/data/...`` and ``/tmp/...`` paths land in the test's own folder, relative paths are relative to it;
* the work shrinks: ``--profile quick`` instead of ``paper`` (the paper networks and their first stages would take
  hours on a CPU), ``--steps 2``, ``--stage-steps 2``, a small ``--size``, ``--limit 2``, ``--copies 1``,
  ``--patients 3``, two CPU processes for ``torchrun`` (gloo);
* everything else stays as written, so a wrong flag, method name, choice or path fails the test.

A command that reads a run (``--run R``), a data folder that is not one of the phantoms above, or image files
(``register --moving``, ``--fixed``, ... inside such a folder) first gets it from the documented command that writes
it (``train`` or ``phantom --out R``, same document first), run once per session. A command added to the documents
is tested without touching this file. ``python -m diffreg`` commands run in this process (through :func:`diffreg.cli.main`, which is what
``python -m diffreg`` calls); ``torchrun`` commands in two subprocesses.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from diffreg.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ("README.md", "book/reproducing.md")
#: phantoms standing in for the datasets under /data (name -> writer arguments)
DATASETS = {
    "ACDC/training": dict(layout="acdc", n_patients=5, size=(6, 48, 48), n_frames=4),
    "ACDC/testing": dict(layout="acdc", n_patients=2, size=(6, 48, 48), n_frames=4, first_id=101),
    "ACDC-h5": dict(layout="acdc-h5", n_patients=4, size=(6, 48, 48), n_frames=4),
    "CAMUS": dict(layout="camus", n_patients=5, size=(48, 48), n_frames=4, half_sequence=False),
}
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_SEPARATORS = {"&&", "||", ";", "|"}
_SCHEMES = ("acdc", "acdc-h5", "camus", "phantom")


@dataclass
class DocCommand:
    """One documented command: where it is, its environment prefix, and ``python -m diffreg`` arguments."""

    doc: str
    line: int
    text: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    torchrun: list[str] | None = None  # torchrun's own options (None: a plain ``python -m diffreg`` command)

    @property
    def id(self) -> str:
        method = (_values(self.argv, "--method") or [""])[0]
        launcher = "torchrun " if self.torchrun is not None else ""
        return f"{Path(self.doc).name}:{self.line}:{launcher}{self.argv[0]}{' ' + method if method else ''}"


def _code_lines(text: str):
    """``(line number, logical line)`` of the shell code blocks of a Markdown text (continuations joined)."""
    in_block, shell, buf, start = False, False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            if in_block:
                in_block = False
            else:
                in_block, info = True, stripped[3:].strip().lower()
                shell = info in ("", "bash", "sh", "shell", "console", "zsh")
            continue
        if not (in_block and shell):
            continue
        if not buf:
            start = n
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        yield start, buf + line
        buf = ""


def extract_commands(doc: str, text: str | None = None) -> list[DocCommand]:
    """The ``python -m diffreg`` and ``torchrun -m diffreg`` commands of the document ``doc`` (relative to the
    repository root)."""
    text = (ROOT / doc).read_text(encoding="utf-8") if text is None else text
    out = []
    for n, line in _code_lines(text):
        if line.lstrip().startswith("$ "):
            line = line.lstrip()[2:]
        try:
            tokens = shlex.split(line, comments=True)
        except ValueError as exc:  # not shell (e.g. a directory tree in a plain block): fine unless it runs diffreg
            if re.search(r"(python\S*|torchrun)\s.*-m\s+diffreg", line):
                raise AssertionError(f"{doc}:{n}: cannot parse the command {line!r} ({exc})") from exc
            continue
        segments, cur = [], []
        for tok in tokens:
            if tok in _SEPARATORS:
                segments.append(cur)
                cur = []
            else:
                cur.append(tok)
        segments.append(cur)
        for seg in segments:
            env = {}
            while seg and _ENV.match(seg[0]):
                key, _, value = seg.pop(0).partition("=")
                env[key] = value
            if len(seg) >= 3 and re.fullmatch(r"python(3(\.\d+)?)?", seg[0]) and seg[1:3] == ["-m", "diffreg"]:
                out.append(DocCommand(doc, n, line.strip(), seg[3:], env))
            elif seg and seg[0] == "torchrun":
                if "diffreg" not in seg or seg[seg.index("diffreg") - 1] not in ("-m", "--module"):
                    raise AssertionError(f"{doc}:{n}: a torchrun command that does not run -m diffreg: {line}")
                i = seg.index("diffreg")
                out.append(DocCommand(doc, n, line.strip(), seg[i + 1:], env, torchrun=seg[1:i - 1]))
    return out


COMMANDS = [c for doc in DOCS for c in extract_commands(doc)]


# ----------------------------------------------------------------------------------------------------------------
# making a command small and pointing it at the phantoms
# ----------------------------------------------------------------------------------------------------------------


def _values(argv: list[str], flag: str) -> list[str] | None:
    if flag not in argv:
        return None
    i = argv.index(flag) + 1
    j = i
    while j < len(argv) and not argv[j].startswith("--"):
        j += 1
    return argv[i:j]


def _set(argv: list[str], flag: str, *values: str) -> list[str]:
    """``argv`` with ``flag``'s values replaced by ``values`` (appended when the flag is absent)."""
    argv = list(argv)
    if flag in argv:
        i = argv.index(flag) + 1
        j = i
        while j < len(argv) and not argv[j].startswith("--"):
            j += 1
        argv[i:j] = list(values)
    else:
        argv += [flag, *values]
    return argv


def _size(method: str | None, dims: int) -> list[str]:
    """A small size the method accepts: Swin-UNETR (DiffuseReg) needs 64 in 2D and 32 per axis in 3D; U-Nets 16."""
    if dims == 3:
        return ["32", "32", "32"] if method in ("diffusereg", None) else ["16", "32", "32"]
    return ["64", "64"] if method in ("diffusereg", None) else ["32", "32"]


def shrink(argv: list[str]) -> list[str]:
    """The documented arguments with the work made small (see the module docstring); everything else unchanged."""
    if not argv:
        return argv
    sub, argv = argv[0], list(argv)
    if sub in ("train", "bench", "speed"):
        if "--profile" in argv or sub == "speed":
            argv = _set(argv, "--profile", "quick")
        argv = _set(argv, "--steps", "2")
        dims = int((_values(argv, "--dims") or ["2"])[0] or 2)
        method = (_values(argv, "--method") or [None])[0]
        argv = _set(argv, "--size", *_size(method, dims))
    if sub in ("train", "bench"):
        argv = _set(argv, "--stage-steps", "2")
    if sub == "speed" and _values(argv, "--sampler-steps"):
        argv = _set(argv, "--sampler-steps", *[str(min(int(v), 5)) for v in _values(argv, "--sampler-steps")])
    if sub == "bench" and "--budget" in argv:  # an equal budget: 2 training pairs each
        argv = _set(argv, "--budget", "steps=2")
    if sub == "bench" and "--curve-every" in argv:
        argv = _set(argv, "--curve-every", "1")
        argv = _set(argv, "--curve-pairs", "1")
    if sub in ("evaluate", "bench"):
        argv = _set(argv, "--limit", "2")
    if sub == "synthesize":
        argv = _set(argv, "--copies", "1")
    if sub == "phantom":
        argv = _set(argv, "--patients", "3")
    return argv


def _rebase(token: str, data: Path, tmp: Path) -> str:
    """``/data/X`` -> ``data/X``, ``/tmp/X`` -> ``tmp/X`` (also after a ``scheme:`` prefix); others unchanged."""
    prefix, colon, rest = token.partition(":")
    if colon and prefix in _SCHEMES:
        return f"{prefix}:{_rebase(rest, data, tmp)}"
    for root, target in (("/data", data), ("/tmp", tmp)):
        if token == root or token.startswith(root + "/"):
            return str(target / token[len(root) + 1:]) if token != root else str(target)
    return token


@pytest.fixture(scope="session")
def phantoms(tmp_path_factory) -> Path:
    """The datasets of :data:`DATASETS`, written once per session by ``python -m diffreg phantom``'s writer."""
    from diffreg.data import write_phantom

    root = tmp_path_factory.mktemp("phantom-data")
    for name, kwargs in DATASETS.items():
        kwargs = dict(kwargs)
        write_phantom(root / name, layout=kwargs.pop("layout"), n_patients=kwargs.pop("n_patients"), **kwargs)
    return root


@pytest.fixture(scope="session")
def workdirs() -> dict[tuple[str, int], "Workspace"]:
    """Workspace in which each documented command ran this session (key: document and line)."""
    return {}


class Workspace:
    """A fresh folder for one command: ``data/`` links to the shared phantoms, ``tmp/`` stands for ``/tmp``."""

    def __init__(self, path: Path, phantoms: Path) -> None:
        self.path = path
        self.data = path / "data"
        self.tmp = path / "tmp"
        self.data.mkdir(parents=True)
        self.tmp.mkdir()
        for child in phantoms.iterdir():
            (self.data / child.name).symlink_to(child, target_is_directory=True)

    def argv(self, cmd: DocCommand) -> list[str]:
        return [_rebase(t, self.data, self.tmp) for t in shrink(cmd.argv)]

    def local(self, path: str) -> Path:
        """Where the documented ``path`` is in this workspace."""
        return Path(_rebase(path, self.data, self.tmp)) if path.startswith("/") else self.path / path


def _inputs(cmd: DocCommand) -> list[str]:
    """Paths ``cmd`` reads, as documented: ``--run`` folders, the folders of ``--data scheme:PATH`` and the image
    files of ``register``."""
    data = [v.partition(":")[2] for v in _values(cmd.argv, "--data") or [] if v.partition(":")[0] in _SCHEMES[:3]]
    files = [v for flag in ("--moving", "--fixed", "--moving-label", "--fixed-label", "--pairs")
             for v in _values(cmd.argv, flag) or []]
    return (_values(cmd.argv, "--run") or []) + data + files


def _writes(c: DocCommand, path: str) -> bool:
    """``c`` writes ``path``: its ``--out`` is ``path`` or a folder above it."""
    out = (_values(c.argv, "--out") or [None])[0]
    return out is not None and (path == out or path.startswith(out.rstrip("/") + "/"))


def _producer(path: str, cmd: DocCommand) -> DocCommand | None:
    """The documented ``train`` or ``phantom`` command that writes ``path`` (``--out``; same document first)."""
    candidates = [c for c in COMMANDS if c.argv[:1] in (["train"], ["phantom"]) and c.torchrun is None
                  and _writes(c, path) and c is not cmd]
    candidates.sort(key=lambda c: ((_values(c.argv, "--out") or [None])[0] != path, c.doc != cmd.doc, c.doc, c.line))
    return candidates[0] if candidates else None


def _run(cmd: DocCommand, ws: Workspace, monkeypatch, capfd) -> None:
    """Run ``cmd`` (made small) in ``ws``; fail with its output when it does not exit with 0."""
    argv = ws.argv(cmd)
    env = {k: _rebase(v, ws.data, ws.tmp) for k, v in cmd.env.items()}
    where = f"{cmd.doc}:{cmd.line}: {cmd.text}\nran as: {' '.join(argv)}"
    if cmd.torchrun is None:
        monkeypatch.chdir(ws.path)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        try:
            rc = main(argv)
        except SystemExit as exc:  # argparse: unknown flag, bad choice, missing argument
            rc = exc.code
        out, err = capfd.readouterr()
        assert rc == 0, f"{where}\nexit status {rc}\n{err[-3000:]}"
        return
    opts = list(cmd.torchrun)
    opts = _set(opts, "--nproc_per_node", "2") if "--nproc_per_node" in opts else _set(opts, "--nproc-per-node", "2")
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    full = [sys.executable, "-m", "torch.distributed.run", *opts, "--master_port", port, "-m", "diffreg",
            *argv, "--device", "cpu"]
    proc = subprocess.run(full, cwd=ws.path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, f"{where}\nexit status {proc.returncode}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"


def _prepare(cmd: DocCommand, ws: Workspace, phantoms: Path, workdirs: dict, tmp_path: Path, monkeypatch,
             capfd) -> None:
    """Put the runs and data folders ``cmd`` reads into ``ws``: from the workspace of the documented command that
    writes them, run first (once per session, with its own inputs) when it has not run yet."""
    for path in _inputs(cmd):
        if (ws.local(path)).exists():  # e.g. a phantom standing in for /data/ACDC/training
            continue
        producer = _producer(path, cmd)
        assert producer is not None, (f"{cmd.doc}:{cmd.line} reads {path}, which does not exist and which no "
                                      f"documented train or phantom command writes (--out {path})")
        key = (producer.doc, producer.line)
        if key not in workdirs:
            pws = Workspace(tmp_path / f"producer-{producer.line}", phantoms)
            _prepare(producer, pws, phantoms, workdirs, tmp_path, monkeypatch, capfd)
            _run(producer, pws, monkeypatch, capfd)
            workdirs[key] = pws
        out = (_values(producer.argv, "--out") or [path])[0]  # the whole folder it writes
        target = ws.local(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(workdirs[key].local(out), target, symlinks=True)


def test_the_documents_show_enough_commands():
    assert len(COMMANDS) >= 15, [c.id for c in COMMANDS]
    assert any(c.torchrun is not None for c in COMMANDS)
    for doc in DOCS:
        assert any(c.doc == doc for c in COMMANDS), doc


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command_runs(cmd, phantoms, workdirs, tmp_path, monkeypatch, capfd):
    ws = Workspace(tmp_path / "work", phantoms)
    _prepare(cmd, ws, phantoms, workdirs, tmp_path, monkeypatch, capfd)
    _run(cmd, ws, monkeypatch, capfd)
    workdirs[(cmd.doc, cmd.line)] = ws


def test_a_wrong_flag_method_or_path_fails(phantoms, tmp_path, monkeypatch, capfd):
    """The harness itself: a command with a misspelt flag, an unknown method or a missing path does not pass."""
    train = next(c for c in COMMANDS if c.argv[:1] == ["train"] and c.torchrun is None)
    broken = [
        [("--methd" if a == "--method" else a) for a in train.argv],
        _set(train.argv, "--method", "voxelmorf"),
        _set(train.argv, "--data", "acdc:/data/ACDC/trainnig"),
        _set(train.argv, "--split-scheme", "paper"),
    ]
    for k, argv in enumerate(broken):
        cmd = DocCommand(train.doc, train.line, " ".join(argv), argv)
        with pytest.raises(AssertionError, match="exit status 2"):
            _run(cmd, Workspace(tmp_path / f"w{k}", phantoms), monkeypatch, capfd)


def test_extraction_handles_continuations_env_prefixes_and_comments():
    text = "\n".join([
        "```bash",
        "DIFFREG_PROFILE=paper python -m diffreg train --method voxelmorph \\",
        "    --out runs/vm   # a comment",
        "torchrun --nproc_per_node 4 -m diffreg train --method drdm --out r && python -m diffreg evaluate --run r",
        "jupyter-book build .",
        "```",
        "```python",
        "python -m diffreg not-a-shell-block",
        "```",
    ])
    cmds = extract_commands("x.md", text)
    assert [c.argv for c in cmds] == [["train", "--method", "voxelmorph", "--out", "runs/vm"],
                                      ["train", "--method", "drdm", "--out", "r"], ["evaluate", "--run", "r"]]
    assert cmds[0].env == {"DIFFREG_PROFILE": "paper"} and cmds[0].line == 2
    assert cmds[1].torchrun == ["--nproc_per_node", "4"] and cmds[2].torchrun is None
