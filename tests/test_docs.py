"""README.md and docs/*.md: every relative link resolves (the file, and the heading an #anchor
names), and every ``kubeseg VERB --option`` written in their code names a verb of the CLI and
an option of that verb's parser (built here, in this process)."""
import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^[ \t]*```[^\n]*\n(.*?)^[ \t]*```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")
# ``kubeseg`` where a command starts: at the start of a line or code span, after a shell prompt
# or separator, a path (.venv/bin/kubeseg) or ``-m`` (python -m kubeseg, torchrun ... -m kubeseg)
COMMAND = re.compile(r"(?:^\s*|[$;|&(]\s*|\s-m\s+|/)kubeseg\s+([a-z][a-z0-9-]*)")
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
# where the options of one command end: a pipe, a command separator, a shell comment
COMMAND_END = re.compile(r"\s[|;#]|&&")


def documents(root: Path) -> list:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set:
    text = FENCE.sub("", path.read_text())
    found, seen = set(), {}
    for heading in re.findall(r"^#{1,6} (.+)$", text, re.M):
        base = slug(heading)
        found.add(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return found


def broken_links(root: Path) -> list:
    """'file: target (why)' for every relative link that does not resolve."""
    problems = []
    for path in documents(root):
        text = FENCE.sub("", path.read_text())
        for target in LINK.findall(text):
            if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
                continue
            file_part, _, anchor = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            where = f"{path.relative_to(root)}: {target}"
            if not linked.exists():
                problems.append(f"{where} (no such file)")
            elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
                problems.append(f"{where} (no heading with that anchor in {linked.name})")
    return problems


def _code(text: str) -> list:
    """The code of a Markdown text: each fenced block's lines (a trailing backslash joins the
    next line), then each inline code span of the prose."""
    chunks = []
    for block in FENCE.findall(text):
        chunks += block.replace("\\\n", " ").splitlines()
    chunks += INLINE.findall(FENCE.sub("", text))
    return chunks


def commands(text: str) -> list:
    """``(verb, [options])`` of every ``kubeseg VERB ...`` in the code of ``text``."""
    found = []
    for chunk in _code(text):
        matches = list(COMMAND.finditer(chunk))
        for index, match in enumerate(matches):
            end = matches[index + 1].start() if index + 1 < len(matches) else len(chunk)
            rest = chunk[match.end():end]
            stop = COMMAND_END.search(rest)
            rest = rest[:stop.start()] if stop else rest
            found.append((match.group(1), OPTION.findall(rest)))
    return found


def verb_options() -> dict:
    """{verb: option strings of its parser}, read from each parser's help."""
    from kubeseg.cli import VERBS

    options = {}
    for verb, (module, _) in VERBS.items():
        parser = argparse.ArgumentParser(prog=f"kubeseg {verb}")
        module.add_arguments(parser, verb)
        heads = re.findall(r"^  (-.+?)(?:\s{2,}|$)", parser.format_help(), re.M)
        options[verb] = {o for head in heads for o in OPTION.findall(head)}
    return options


def unknown_commands(root: Path, known: dict) -> list:
    problems = []
    for path in documents(root):
        for verb, options in commands(path.read_text()):
            where = path.relative_to(root)
            if verb not in known:
                problems.append(f"{where}: kubeseg {verb} (no such verb)")
                continue
            problems += [f"{where}: kubeseg {verb} {option} (no such option)"
                         for option in options if option not in known[verb]]
    return problems


def test_the_readme_is_a_start_and_docs_hold_the_rest():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150
    assert len(documents(REPO)) >= 10


def test_every_relative_link_resolves():
    assert broken_links(REPO) == []


def test_every_kubeseg_command_names_a_verb_and_its_options():
    found = [c for path in documents(REPO) for c in commands(path.read_text())]
    assert len(found) > 30 and any(options for _, options in found)
    assert unknown_commands(REPO, verb_options()) == []


def test_the_checks_see_a_broken_link_a_missing_anchor_and_an_unknown_option(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "README.md").write_text(
        "# Start\n\n[ok](docs/a.md#two-words) [gone](docs/b.md) [bad](docs/a.md#nothing) "
        "[here](#start) [web](https://example.com/x)\n\n"
        "```bash\nkubeseg train --set a=1 \\\n  --no-such-flag x   # --not-read\n"
        "ok    listed bucket kubeseg at http://127.0.0.1:9000\n```\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# Two words\n\nRun `kubeseg serve --port 1 | kubeseg frobnicate --x` and "
        "`.venv/bin/kubeseg train --output o`.\n")
    assert broken_links(tmp_path) == ["README.md: docs/b.md (no such file)",
                                      "README.md: docs/a.md#nothing (no heading with that "
                                      "anchor in a.md)"]
    known = {"train": {"--set", "--output"}, "serve": {"--port"}}
    assert unknown_commands(tmp_path, known) == [
        "README.md: kubeseg train --no-such-flag (no such option)",
        "docs/a.md: kubeseg frobnicate (no such verb)"]


@pytest.mark.parametrize("heading, expected", [
    ("Data: validate, ingest, load", "data-validate-ingest-load"),
    ("Serving in int8 (ONNX Runtime)", "serving-in-int8-onnx-runtime"),
    ("CamVid quality (cpu-quality preset)", "camvid-quality-cpu-quality-preset"),
])
def test_anchors_are_githubs(heading, expected):
    assert slug(heading) == expected
