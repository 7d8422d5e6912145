"""The committed notebooks: what a reader sees on the repository page before running anything."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_outputs_show_no_warning_boxes(path):
    # A fact such as LPIPS' random backbone is said once in the notebook's words; a stderr box (a warning repeated
    # per call, with the library's file and line) is what a reader should not have to decode.
    nb = json.loads(path.read_text())
    boxes = [(i, "".join(o.get("text", ""))[:160]) for i, cell in enumerate(nb["cells"])
             for o in cell.get("outputs", []) if o.get("name") == "stderr" or o.get("output_type") == "error"]
    assert not boxes, boxes


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 4
