"""What the README and docs/ point a reader to is there: each repository path they name (`proxy/tls/server.py`,
`tests/integration/test_ad.py`), each Markdown link and its #anchor, and each dotted name in proxy
(`proxy.tls.limits.HeaderBlockBudget`); and each path the code's comments and the build files name. A file moved or
a function renamed then fails here."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# A path in the repository: not part of a longer one (/etc/kcd-proxy/...) nor a placeholder's start (`bench-<time>`).
PATH = re.compile(r"(?<![\w/.<-])((?:proxy|tests|docs|bench|deploy|config)/[\w./-]*\w)(?![\w-]*<)")
DOTTED = re.compile(r"(?<![\w/.@-])(proxy(?:\.[A-Za-z_]\w*)+)")


def _anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, each space a hyphen."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _headings(doc: Path) -> set[str]:
    prose = re.sub(r"^ *```.*?^ *```", "", doc.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_anchor(h) for h in re.findall(r"^#+ (.*)$", prose, flags=re.MULTILINE)}


def _resolve(dotted: str) -> object | None:
    """The module or attribute `dotted` names (a submodule imported where the package does not hold it), or None."""
    obj: object = importlib.import_module("proxy")
    parts = dotted.split(".")
    for i, part in enumerate(parts[1:], start=2):
        if not hasattr(obj, part) and hasattr(obj, "__path__"):
            try:
                importlib.import_module(".".join(parts[:i]))
            except ModuleNotFoundError:
                return None
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_each_repository_path_named_exists(doc: Path) -> None:
    """Every `proxy/...`, `tests/...`, `docs/...`, `bench/...`, `deploy/...` or `config/...` path it names exists."""
    assert sorted({p for p in PATH.findall(doc.read_text()) if not (ROOT / p).exists()}) == []


def test_each_repository_path_the_code_and_build_files_name_exists() -> None:
    """The comments and docstrings of proxy/ and bench/, the Makefile, pyproject.toml, config/ and deploy/ name
    only paths that exist (`tests/integration/test_compose.py`, `docs/performance.md`)."""
    named = [ROOT / "Makefile", ROOT / "pyproject.toml", ROOT / "docker-compose.yml"]
    for folder, pattern in (("proxy", "*.py"), ("bench", "*.py"), ("config", "*"), ("deploy", "*")):
        named += [p for p in sorted((ROOT / folder).rglob(pattern)) if p.is_file() and "__pycache__" not in p.parts]
    missing = []
    for source in named:
        try:
            text = source.read_text()
        except UnicodeDecodeError:
            continue
        missing += [f"{source.relative_to(ROOT)}: {p}" for p in PATH.findall(text) if not (ROOT / p).exists()]
    assert sorted(set(missing)) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_each_link_and_anchor_resolves(doc: Path) -> None:
    """Every relative Markdown link names a file that exists, and its #anchor a heading of that file."""
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        name, _, anchor = target.partition("#")
        linked = (doc.parent / name).resolve() if name else doc
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in _headings(linked)):
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_each_dotted_name_in_proxy_resolves(doc: Path) -> None:
    """Every `proxy.module.name` it names (host names such as proxy.lab.test apart) is a module or an attribute."""
    missing = []
    for dotted in set(DOTTED.findall(doc.read_text())):
        if dotted.endswith(".test"):
            continue
        if _resolve(dotted) is None:
            missing.append(dotted)
    assert sorted(missing) == []


def test_the_layout_page_names_each_part_of_proxy() -> None:
    """docs/layout.md's block (the README's Layout until it grew) names every module and package directly under
    proxy/ (`held.py`, `tls/`)."""
    layout = (ROOT / "docs" / "layout.md").read_text().partition("\nconfig/")[0]
    parts = [p.name + ("/" if p.is_dir() else "") for p in (ROOT / "proxy").iterdir() if not p.name.startswith("_")]
    parts = [p for p in parts if p.endswith((".py", "/"))]
    assert sorted(p for p in parts if not re.search(rf"(?<![\w/]){re.escape(p)}", layout)) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_each_name_given_in_a_module_is_there(doc: Path) -> None:
    """Every "`NAME` in `proxy/module.py`" (also "of" or "from") names an attribute of that module
    (`TOKEN_FLAGS` in `proxy/kerberos/password.py`)."""
    said = re.findall(r"`([A-Za-z_]\w*)(?:\(\))?`,? (?:in|of|from) `((?:proxy|bench)/[\w/]+)\.py`", doc.read_text())
    missing = [f"{name} in {path}.py" for name, path in said if not hasattr(_module(path), name)]
    assert missing == []


def _module(path: str) -> object:
    return importlib.import_module(path.replace("/", "."))


def test_each_metric_is_in_the_operations_page_and_each_one_named_is_served() -> None:
    """The metrics proxy/observability/metrics.py defines are each named in docs/operations.md, the admin listener's
    reference (`kcd_refusals_total`), and no `kcd_...` name in the README or docs/ is one it does not define (a
    counter's `_total` read as its name)."""
    defined = set(re.findall(r'"(kcd_[a-z_]+)"', (ROOT / "proxy" / "observability" / "metrics.py").read_text()))
    operations = (ROOT / "docs" / "operations.md").read_text()
    named = {
        re.sub(r"_(total|bucket|count|sum)$", "", m) for doc in DOCS for m in re.findall(r"`(kcd_\w+)", doc.read_text())
    }
    assert sorted(m for m in defined if f"`{m}" not in operations) == []
    assert sorted(named - defined) == []


# `docs/deploying.md, "Several gateways"`: a page and, quoted, one of its headings (its words, not its anchor)
NAMED_HEADING = re.compile(r"(?<![\w/.-])(?:docs/)?([\w-]+\.md),? (?:\"([^\"\n]+)\"|'([^'\n]+)')")


def _places(doc: Path) -> set[str]:
    """What a reader finds by its words on a page: each heading, also without its number ("9. ") and without what
    follows its name (" (issue #18)", ": `proxy/tls/record.py`"), and each bold run-in label ("**Long requests.**")."""
    prose = re.sub(r"^ *```.*?^ *```", "", doc.read_text(), flags=re.MULTILINE | re.DOTALL)
    places = {label.strip() for label in re.findall(r"\*\*([^*\n]+?)\.?\*\*", prose)}
    for heading in re.findall(r"^#+ (.*)$", prose, flags=re.MULTILINE):
        name = re.sub(r"^\d+\. ", "", heading.strip())
        places |= {heading.strip(), name, re.split(r" \(|: ", name)[0]}
    return places


def test_each_heading_named_in_words_is_a_heading_of_that_page() -> None:
    """Every "docs/PAGE.md, 'Heading'" (or "Heading" in double quotes) in the code, the build and deploy files, the
    README and docs/ is, word for word, a heading of that page (check-config's Basic warning named 'Several
    gateways' where the heading is 'Several gateways and several workers')."""
    named = [ROOT / "Makefile", ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    for folder, pattern in (("proxy", "*.py"), ("bench", "*.py"), ("config", "*"), ("deploy", "*")):
        named += [p for p in sorted((ROOT / folder).rglob(pattern)) if p.is_file() and "__pycache__" not in p.parts]
    wrong = []
    for source in named:
        try:
            text = source.read_text()
        except UnicodeDecodeError:
            continue
        for page, double, single in NAMED_HEADING.findall(text):
            doc = ROOT / "docs" / page if page != "README.md" else ROOT / page
            heading = double or single
            if doc.exists() and heading not in _places(doc):
                wrong.append(f"{source.relative_to(ROOT)}: {page}, {heading!r}")
    assert sorted(set(wrong)) == []
