"""README's "Layout" section names every source file of the tree, so that it
cannot fall behind a split or a new module."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_readme_layout_names_every_source_file():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    files = [p for pattern in ("supervisor/*.py", "supervisor/config/*.py", "worker/*.py",
                               "native/*.c", "native/*.h", "native/*.py")
             for p in ROOT.glob(pattern) if p.name not in ("__init__.py", "__main__.py")]
    assert files
    missing = [str(p.relative_to(ROOT)) for p in files if f"{p.name}`" not in section]
    assert not missing, f"README's Layout section does not name {missing}"
