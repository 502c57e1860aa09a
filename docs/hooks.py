"""mkdocs hook: the README is the site's home page, its links kept as they are for GitHub.

README.md lives at the repository root, outside docs_dir, and links into docs/ and to files beside it
(benchmarks/results.md, LICENSE). The hook adds it to the site as index.md, adds the root files it links to
at their own paths, and drops the ``docs/`` prefix of its links, so one README reads right on GitHub and in
the site, and `mkdocs build --strict` still checks every one of its links.
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[1]
README = "README.md"
_LINK = re.compile(r"\]\((?!https?://|#)([^)\s]+)\)")  # ](target) of a relative link


def _root_targets(markdown: str) -> list[str]:
    """The README's relative link targets outside docs/ (anchors stripped)."""
    targets = (t.split("#")[0] for t in _LINK.findall(markdown))
    return sorted({t for t in targets if t and not t.startswith("docs/")})


def on_files(files: Files, config) -> Files:
    readme = (ROOT / README).read_text(encoding="utf-8")
    files.append(File.generated(config, "index.md", abs_src_path=str(ROOT / README)))  # the home page
    for target in _root_targets(readme):
        if (ROOT / target).is_file() and files.get_file_from_path(target) is None:
            files.append(File.generated(config, target, abs_src_path=str(ROOT / target)))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    if page.file.src_uri != "index.md":
        return markdown
    return _LINK.sub(lambda m: f"]({m.group(1).removeprefix('docs/')})", markdown)
