"""Run-dir writes: the files they leave behind."""

from __future__ import annotations

import os
import stat

from compo.rundir import write_jsonl


def test_written_files_get_the_permissions_of_a_plain_open(tmp_path):
    """Data files written atomically (the benchmark's, the embedded default set) are shipped and
    shared: not owner-only like the temporary file they start as."""
    mask = os.umask(0o022)
    os.umask(mask)
    write_jsonl(tmp_path / "rows.jsonl", [{"a": 1}, {"b": "é"}])
    with open(tmp_path / "plain.txt", "w") as handle:
        handle.write("x")
    mode = stat.S_IMODE((tmp_path / "rows.jsonl").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o666 & ~mask
    assert (tmp_path / "rows.jsonl").read_bytes() == '{"a": 1}\n{"b": "é"}\n'.encode()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
