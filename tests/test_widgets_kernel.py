"""A live widget driven in a real Jupyter kernel: moving its slider redraws its output.

The kernel (ipykernel, started by jupyter_client as a notebook frontend would) builds
:func:`diffreg.widgets.sequence_viewer` over frames that differ; the test moves the slider from the kernel side, as a
frontend's comm message does, and reads the kernel's IOPub channel: every change must publish a new figure, different
from the previous one, and ``in_live_kernel()`` is true there unless the kernel was started headless.
"""

from __future__ import annotations

import os

import pytest

jupyter_client = pytest.importorskip("jupyter_client")


def _run(kc, code: str, timeout: float = 60.0) -> list[dict]:
    """Execute ``code``; return the IOPub messages it produced (until the kernel is idle again)."""
    msg_id = kc.execute(code)
    messages = []
    while True:
        msg = kc.get_iopub_msg(timeout=timeout)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        messages.append(msg)
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=timeout)
    assert reply["content"]["status"] == "ok", reply["content"]
    return messages


def _pngs(messages: list[dict]) -> list[str]:
    return [m["content"]["data"]["image/png"] for m in messages
            if m["msg_type"] in ("display_data", "update_display_data") and "image/png" in m["content"]["data"]]


def _texts(messages: list[dict]) -> str:
    return "".join(m["content"]["text"] for m in messages if m["msg_type"] == "stream")


def test_slider_redraws_the_viewer_in_a_live_kernel():
    env = {k: v for k, v in os.environ.items() if k not in ("DIFFREG_STATIC", "MPLBACKEND")}
    env.update(OMP_NUM_THREADS="1", DIFFREG_STATIC="0")  # a reader's kernel
    km, kc = jupyter_client.manager.start_new_kernel(kernel_name="python3", env=env)
    try:
        setup = _run(kc, "import numpy as np\n"
                 "from diffreg import widgets\n"
                 "frames = [np.full((16, 16), k / 3.0) + np.eye(16) * (k == 2) for k in range(4)]\n"
                 "w = widgets.sequence_viewer(frames, titles=[f't = {k}' for k in range(4)])\n"
                 "slider = w.children[0]\n"
                 "print('live', widgets.in_live_kernel(), 'max', slider.max)\n")
        first = _run(kc, "slider.value = 1")
        second = _run(kc, "slider.value = 2")
        again = _run(kc, "slider.value = 2")   # no change: no redraw
        check = _run(kc, "print('value', slider.value)")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    assert _pngs(first) and _pngs(second), "moving the slider must publish a figure"
    assert _pngs(first)[-1] != _pngs(second)[-1], "a different frame must give a different figure"
    assert not _pngs(again)
    assert "value 2" in _texts(check)
    assert "live True max 3" in _texts(setup)
