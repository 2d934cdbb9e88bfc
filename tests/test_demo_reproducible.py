"""The demo's media are the same bytes in every process and run: its video and audio writers, run twice in two
separate processes over the whole clip sets `make demo` writes, give byte-identical files. (The libx264
writer they replaced differed in 55 of 240 clips, and the demo's video score moved between fresh clones.)"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from testing.support import ROOT

WRITE = "import sys; from pathlib import Path; from data_shards import demo; "
WRITE += "demo.write_shapes(Path(sys.argv[1])); demo.write_tones(Path(sys.argv[1]))"


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_demo_video_and_audio_are_byte_identical_across_processes(tmp_path):
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:  # one fresh interpreter each, as two fresh clones would run them
        subprocess.run([sys.executable, "-c", WRITE, str(out)], cwd=ROOT, check=True, timeout=300)
    a, b = (_digests(out) for out in runs)
    assert (
        len([n for n in a if n.endswith(".mp4")]) == 240 and len([n for n in a if n.endswith(".wav")]) == 210
    )
    differing = sorted(n for n in a if a[n] != b.get(n))
    assert a.keys() == b.keys() and not differing, differing[:10]
