"""What a user reads speaks of the project alone, stays short enough to read, and shows only
images that exist: README.md, docs/, RESULTS.md, BENCHMARKS.md and the sweep files' comments."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = sorted([ROOT / "README.md", ROOT / "RESULTS.md", ROOT / "BENCHMARKS.md", *(ROOT / "docs").glob("*.md")])
# Words about how the work was organised, or places the reader cannot reach.
FORBIDDEN = {
    "an issue number": r"\bissues?\s*#|\bissues?\s+\d+",
    "a session": r"\bsessions?\b",
    "a round of work": r"\bround[ -]\d",
    "an earlier version of the file": r"\bprevious version\b",
    "a path under /tmp": r"/tmp/",
    "a path outside the repository": r"\.\./shared",
    "a package-registry host": r"pypi\.org|pythonhosted\.org|download\.pytorch\.org",
}
SIZE_LIMITS = {"README.md": 12_000, "RESULTS.md": 20_000, "BENCHMARKS.md": 10_000}
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def forbidden_in(lines: list, where: str) -> list[str]:
    """'where:line: text (what)' for every line holding a forbidden word."""
    found = []
    for number, line in lines:
        for what, pattern in FORBIDDEN.items():
            if re.search(pattern, line, re.IGNORECASE):
                found.append(f"{where}:{number}: {line.strip()} ({what})")
    return found


def test_documents_speak_of_the_project_alone():
    found = []
    for path in DOCUMENTS:
        found += forbidden_in(list(enumerate(path.read_text().splitlines(), 1)), path.relative_to(ROOT))
    assert not found, "\n".join(found)


def test_sweep_headers_speak_of_the_project():
    found = []
    for path in sorted((ROOT / "sweeps").glob("*.yaml")):
        comments = [(n, line) for n, line in enumerate(path.read_text().splitlines(), 1) if line.lstrip().startswith("#")]
        found += forbidden_in(comments, path.relative_to(ROOT))
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name,limit", SIZE_LIMITS.items())
def test_documents_stay_within_their_size(name, limit):
    size = len((ROOT / name).read_text())
    assert size <= limit, f"{name} has {size:,} characters, more than {limit:,}: move detail to docs/"


def test_readme_gives_the_test_command_that_ci_runs_on_its_first_screens():
    (command,) = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest -q" in line]
    head = (ROOT / "README.md").read_text().splitlines()[:100]
    assert any(line.strip().startswith(command) for line in head)


def test_every_image_and_local_link_points_at_a_file():
    missing = []
    for path in DOCUMENTS:
        text = path.read_text()
        for target in IMAGE.findall(text) + LINK.findall(text):
            target = target.split("#")[0]
            if target and not re.match(r"[a-z]+:", target) and not (path.parent / target).exists():
                missing.append(f"{path.relative_to(ROOT)}: {target}")
    assert not missing, "\n".join(missing)
