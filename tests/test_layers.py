"""The layering: the core library (kubeseg/) never reaches up into the platform code
(pipelines/, components/) and never imports kfp. Only the CLI's pipeline verbs call into
``pipelines``, and only inside their functions, so ``import kubeseg.<anything>`` stays light."""
import ast
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLATFORM = ("pipelines", "components")
# The one module allowed to call into the platform code, inside its functions only.
PIPELINE_VERBS = Path("kubeseg") / "cli" / "pipeline.py"


def _platform_imports(tree: ast.AST):
    """(line, module, inside a function) for every import of pipelines/components."""
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                       ast.Lambda))
            names = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                names = [child.module]
            for name in names:
                if name.split(".")[0] in PLATFORM:
                    found.append((child.lineno, name, in_function))
            visit(child, nested)

    visit(tree, False)
    return found


def test_the_core_library_does_not_import_the_platform_code():
    offenders = []
    modules = sorted((REPO / "kubeseg").rglob("*.py"))
    assert len(modules) > 30
    for path in modules:
        relative = path.relative_to(REPO)
        for line, name, in_function in _platform_imports(ast.parse(path.read_text())):
            if relative == PIPELINE_VERBS and in_function:
                continue
            where = "inside a function" if in_function else "at module level"
            offenders.append(f"{relative}:{line} imports {name} ({where})")
    assert not offenders, "kubeseg/ must not import pipelines/ or components/:\n" + \
        "\n".join(offenders)


def test_the_pipeline_verbs_reach_the_pipelines_package_lazily():
    found = _platform_imports(ast.parse((REPO / PIPELINE_VERBS).read_text()))
    assert found and all(in_function for _, _, in_function in found), found


def test_the_scan_sees_a_module_level_import():
    tree = ast.parse("import os\nfrom pipelines.submit import submit\n"
                     "def f():\n    import components.train\n")
    assert _platform_imports(tree) == [(2, "pipelines.submit", False),
                                       (4, "components.train", True)]


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import kubeseg
names = [m.name for m in pkgutil.walk_packages(kubeseg.__path__, "kubeseg.")
         if not m.name.endswith(".__main__")]  # __main__ runs the CLI
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names,
                  "loaded": sorted(m for m in sys.modules
                                   if m.split(".")[0] in ("kfp", "pipelines", "components"))}))
"""


def test_importing_every_kubeseg_module_loads_no_kfp(tmp_path):
    result = subprocess.run([sys.executable, "-c", IMPORT_ALL], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert "kubeseg.cli.pipeline" in report["modules"] and "kubeseg.config" in report["modules"]
    assert report["loaded"] == [], f"kubeseg imports pulled in {report['loaded']}"


# The predictor image installs kubeseg alone: every verb's --help must build there.
HELP_WITHOUT_PLATFORM = """
import sys
for name in ("kfp", "pipelines", "components"):
    sys.modules[name] = None  # any import of them raises ImportError
from kubeseg.cli import VERBS, build_parser
parser = build_parser()
for verb in VERBS:
    try:
        parser.parse_args([verb, "--help"])
    except SystemExit as exc:
        assert exc.code == 0, verb
"""


def test_every_verb_help_builds_without_the_platform_packages(tmp_path):
    result = subprocess.run([sys.executable, "-c", HELP_WITHOUT_PLATFORM], capture_output=True,
                            text=True, timeout=300, cwd=tmp_path,
                            env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kubeseg submit" in result.stdout and "kubeseg serve" in result.stdout
