"""No function outside tests/ is longer than MAX_LINES, measured with the AST: from its ``def``
line to its last line, its docstring not counted (a KFP component's docstring is its user
documentation, and the longest part of it)."""
import ast
from pathlib import Path

from testkit import source_files

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 60


def function_lines(node) -> int:
    """Lines of a function from ``def`` to its end, less its docstring."""
    lines = node.end_lineno - node.lineno + 1
    first = node.body[0]
    if (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def long_functions(root: Path, limit: int = MAX_LINES) -> list:
    """'file:line name (N lines)' for every function or method above ``limit`` lines."""
    found = []
    for path in source_files(root):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = function_lines(node)
                if lines > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} "
                                 f"({lines} lines)")
    return found


def test_no_function_outside_tests_is_longer_than_the_limit():
    assert len(list(source_files(REPO))) > 80
    offenders = long_functions(REPO)
    assert not offenders, f"functions above {MAX_LINES} lines:\n" + "\n".join(offenders)


def test_the_measure_counts_code_and_not_the_docstring(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(59))
    (tmp_path / "pipelines").mkdir()
    (tmp_path / "pipelines" / "run.py").write_text(
        "def documented():\n    '''One.\n\n    Two.\n    '''\n" + body  # 60 lines of code
        + "class Runner:\n    def run(self):\n" + body.replace("    ", "        ")
        + "        x = 1\n        return x\n")  # 62 lines
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_long.py").write_text("def test_long():\n" + body * 2)
    assert long_functions(tmp_path) == ["pipelines/run.py:66 run (62 lines)"]
    assert long_functions(tmp_path, limit=59) == ["pipelines/run.py:1 documented (60 lines)",
                                                  "pipelines/run.py:66 run (62 lines)"]


def test_the_server_module_stays_the_routes():
    """kubeseg/serving/server.py holds the routes, build_app and serve; the protocol (v2.py),
    admission and limits (admission.py) and the request path (handling.py) live beside it."""
    server = REPO / "kubeseg" / "serving" / "server.py"
    lines = len(server.read_text().splitlines())
    assert lines < 300, f"{server.relative_to(REPO)} has {lines} lines: move what is not a " \
                        "route, build_app or serve into the modules beside it"
