"""Help text keeps its lines: no string literal outside tests/ ends a line with a single
backslash (Python reads backslash-newline inside a non-raw string as "no line break", which
glued the two lines of a command example together in ``--help``). A backslash right after the
opening quotes, the usual way to start a text without an empty line, is allowed."""
import io
import re
import tokenize
from pathlib import Path

from testkit import source_files

REPO = Path(__file__).resolve().parents[1]
# a line break escaped by an odd number of backslashes
ESCAPED_BREAK = re.compile(r"(?<!\\)(?:\\\\)*\\\n")
OPENING = re.compile(r"^([a-zA-Z]*)('''|\"\"\"|'|\")")


def joined_lines(path: Path) -> list:
    """The line of each line break that a string literal of ``path`` escapes."""
    found = []
    for token in tokenize.generate_tokens(io.StringIO(path.read_text()).readline):
        if token.type != tokenize.STRING:
            continue
        prefix, quotes = OPENING.match(token.string).groups()
        if "r" in prefix.lower():
            continue
        body = token.string[len(prefix) + len(quotes):]
        for match in ESCAPED_BREAK.finditer(body):
            if match.start() == 0 and match.group() == "\\\n":
                continue  # """\ opening a text
            found.append(token.start[0] + body[:match.end()].count("\n") - 1)
    return found


def test_no_string_outside_tests_escapes_a_line_break():
    offenders = [f"{path.relative_to(REPO)}:{line}" for path in source_files(REPO)
                 for line in joined_lines(path)]
    assert not offenders, "a backslash ends a line inside a string (write \\\\):\n" + \
        "\n".join(offenders)


def test_the_check_finds_an_escaped_break_and_spares_the_rest(tmp_path):
    source = tmp_path / "example.py"
    source.write_text(
        'A = """\\\n'                          # 1: allowed, opens the text
        "run --one \\\n"                       # 2: escaped break
        '    --two\n"""\n'                     # 3-4
        'B = """run --one \\\\\n    --two"""\n'  # 5: an escaped backslash, then a real break
        'C = r"""run --one \\\n    --two"""\n'   # 7: raw: the backslash stays
        'D = "x \\\n y"\n')                    # 9: escaped break in a one-line string
    assert joined_lines(source) == [2, 9]
