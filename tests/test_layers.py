"""The layering: every import points down the layers (LAYERS), there is no cycle between files
and no file uses another's private names; the core library (kubeseg/) never reaches up into the
platform code (pipelines/, components/: the package kubeseg_platform) and never imports kfp.
Only the CLI's pipeline verbs call into ``kubeseg_platform.pipelines``, and only inside their
functions, so ``import kubeseg.<anything>`` stays light."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The folders whose files form the graph, and the package each one is: pipelines/ and
# components/ are installed inside kubeseg_platform (kubeseg_platform/ links to them).
SCANNED = {"kubeseg": "kubeseg", "kubeseg_platform": "kubeseg_platform",
           "pipelines": "kubeseg_platform.pipelines",
           "components": "kubeseg_platform.components"}

# Bottom to top. A file may import, at module level, files of its own layer and of the layers
# below it, never of a layer above. An entry ending in "/" places every file below that folder;
# every file of the scanned folders must be placed.
LAYERS = (
    # the ground: errors, the configuration (hyperparameters, operator names), object storage
    # (with its per-command deadline), and the leaves anything may use: the package root
    # (version, load_model), strict JSON, the device checks, the image names, the pipeline API
    # token's variable names, the supported platform versions, the YAML writer for Kubernetes
    # objects
    ("errors, config, storage", (
        "kubeseg/errors.py", "kubeseg/config.py", "kubeseg/storage.py",
        "kubeseg/storage_deadline.py", "kubeseg/__init__.py",
        "kubeseg/strict_json.py", "kubeseg/device.py", "kubeseg/images.py",
        "kubeseg/pipeline_auth.py", "kubeseg/versions.py", "kubeseg/manifest_yaml.py")),
    # what is computed from data and models: datasets and transforms, the networks, the
    # sliding-window/TTA inference, the confusion-matrix metrics, report pictures and pages,
    # the hyperparameter presets, the drift statistics and the alert rules built on them
    ("data, models", (
        "kubeseg/data/", "kubeseg/models/", "kubeseg/inference.py", "kubeseg/metrics.py",
        "kubeseg/report/", "kubeseg/presets.py", "kubeseg/monitoring/__init__.py",
        "kubeseg/monitoring/defaults.py", "kubeseg/monitoring/drift.py",
        "kubeseg/monitoring/alerts.py")),
    # training and evaluation, with the model artifact they write and read (it builds the model)
    ("engine", ("kubeseg/engine/", "kubeseg/artifact.py")),
    # what runs the model and what speaks to a cluster (preflight reads the cluster with what
    # deploy and tuning declare), and the webhook that turns a drift alert into a retraining run
    ("serving, deploy, tuning", ("kubeseg/serving/", "kubeseg/deploy/", "kubeseg/tuning/",
                                 "kubeseg/preflight/", "kubeseg/monitoring/receiver.py")),
    ("pipelines/ and components/", ("pipelines/", "components/", "kubeseg_platform/")),
    ("the CLI", ("kubeseg/cli/", "kubeseg/__main__.py")),
)


def _module_files(root: Path) -> dict:
    """{module name: path relative to ``root``} of every file of the scanned folders."""
    found = {}
    for folder, package in SCANNED.items():
        for path in sorted((root / folder).rglob("*.py")):
            relative = path.relative_to(root)
            parts = [package, *relative.with_suffix("").parts[1:]]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = relative
    return found


def _layer(relative: Path):
    """(index, name) of the layer that places the file ``relative``; None when none does."""
    text = relative.as_posix()
    for index, (name, entries) in enumerate(LAYERS):
        if any(text == entry or (entry.endswith("/") and text.startswith(entry))
               for entry in entries):
            return index, name
    return None


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imported_modules(node, module: str, is_package: bool, modules: dict) -> list:
    """The modules of the graph that one import statement loads: ``from a import b`` loads
    ``a.b`` when that is a module of the graph, else ``a``."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the file's package, one level up per extra dot
            package = module.split(".") if is_package else module.split(".")[:-1]
            package = package[:len(package) - (node.level - 1)]
            base = ".".join(package + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    found = []
    for name in names:
        while name and name not in modules:  # import a.b.c of a module a.b: a.b
            name = name.rpartition(".")[0]
        if name and name != module and name not in found:
            found.append(name)
    return found


def _imports(root: Path, module: str, modules: dict) -> list:
    """(line, imported module, at module level) for every import of a module of the graph in
    ``module``'s file; imports under ``if TYPE_CHECKING:`` never run and are left out."""
    relative = modules[module]
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                for name in _imported_modules(child, module, relative.name == "__init__.py",
                                              modules):
                    found.append((child.lineno, name, not in_function))
            visit(child, in_function or isinstance(
                child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse((root / relative).read_text()), False)
    return found


def unplaced_files(root: Path) -> list:
    return [str(path) for path in _module_files(root).values() if _layer(path) is None]


def climbing_imports(root: Path) -> list:
    """Every module-level import of a file in a higher layer, as 'file:line imports module'."""
    modules = _module_files(root)
    offenders = []
    for module, relative in modules.items():
        own = _layer(relative)
        for line, name, module_level in _imports(root, module, modules):
            target = _layer(modules[name])
            if module_level and own and target and target[0] > own[0]:
                offenders.append(f"{relative}:{line} ({own[1]}) imports {name} ({target[1]})")
    return offenders


def import_cycles(root: Path) -> list:
    """Every set of files that import one another in a circle (imports inside functions
    included: they run too), each as a sorted list of module names."""
    modules = _module_files(root)
    edges = {m: sorted({name for _, name, _ in _imports(root, m, modules)}) for m in modules}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def connect(node):  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in modules:
        if node not in index:
            connect(node)
    return sorted(cycles)


def private_names_used_across_files(root: Path) -> list:
    """Every use of another file's private name (``_name``): ``from m import _name`` or
    ``m._name`` where ``m`` is a module of the graph, as 'file:line uses m._name'."""
    modules = _module_files(root)
    found = []
    for module, relative in modules.items():
        tree = ast.parse((root / relative).read_text())
        bound = {}  # local name -> module of the graph it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in modules:
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        found.append(f"{relative}:{node.lineno} uses {node.module}.{alias.name}")
                    if f"{node.module}.{alias.name}" in modules:
                        bound[alias.asname or alias.name] = f"{node.module}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.asname and alias.name in modules:
                        bound[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in bound and bound[node.value.id] != module
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                found.append(f"{relative}:{node.lineno} uses {bound[node.value.id]}.{node.attr}")
    return found


def test_no_file_uses_another_files_private_names():
    offenders = private_names_used_across_files(REPO)
    assert not offenders, "private names used across files:\n" + "\n".join(offenders)


def test_the_private_name_check_sees_both_forms(tmp_path):
    (tmp_path / "kubeseg" / "engine").mkdir(parents=True)
    (tmp_path / "kubeseg" / "__init__.py").write_text("")
    (tmp_path / "kubeseg" / "engine" / "__init__.py").write_text("")
    (tmp_path / "kubeseg" / "engine" / "distributed.py").write_text("def _comm_device(): pass\n")
    (tmp_path / "kubeseg" / "config.py").write_text("def _parse(): pass\n")
    (tmp_path / "kubeseg" / "engine" / "loop.py").write_text(
        "import kubeseg.engine.distributed as D\nfrom kubeseg.config import _parse\n"
        "from kubeseg import config\nD._comm_device()\nconfig.__name__\n")
    assert private_names_used_across_files(tmp_path) == [
        "kubeseg/engine/loop.py:2 uses kubeseg.config._parse",
        "kubeseg/engine/loop.py:4 uses kubeseg.engine.distributed._comm_device"]


def test_every_file_has_a_layer():
    assert len(_module_files(REPO)) > 60
    assert unplaced_files(REPO) == [], "place these files in LAYERS (tests/test_layers.py)"


def test_no_module_level_import_climbs_a_layer():
    offenders = climbing_imports(REPO)
    assert not offenders, "imports against the layer order:\n" + "\n".join(offenders)


def test_no_cycle_between_files():
    cycles = import_cycles(REPO)
    assert not cycles, "files that import one another:\n" + "\n".join(map(str, cycles))


SYNTHETIC = {  # file -> source: the climbs and the cycle the checks must see
    "kubeseg/__init__.py": "def load_model():\n    from kubeseg.artifact import load\n",
    "kubeseg/errors.py": "",
    "kubeseg/config.py": "from kubeseg.deploy.training_job import OPERATORS\n",
    "kubeseg/artifact.py": "from kubeseg import config, errors\n",
    "kubeseg/serving/__init__.py": "",
    "kubeseg/serving/server.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                 "    from kubeseg.cli import main\nfrom . import v2\n",
    "kubeseg/serving/v2.py": "from ..artifact import load\n",
    "kubeseg/deploy/__init__.py": "",
    "kubeseg/deploy/training_job.py": "import kubeseg.config\n",
    "kubeseg/cli/__init__.py": "",
    "kubeseg/cli/pipeline.py": "TOKEN_ENV = 'T'\ndef run():\n"
                               "    import kubeseg_platform.pipelines.submit\n",
    "kubeseg/scratch.py": "",
    "pipelines/__init__.py": "",
    "pipelines/submit.py": "from kubeseg.cli.pipeline import TOKEN_ENV\n",
    "components/__init__.py": "",
}


def test_the_checks_see_a_climbing_import_and_a_cycle(tmp_path):
    for name, text in SYNTHETIC.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert unplaced_files(tmp_path) == ["kubeseg/scratch.py"]
    # climbs at module level only: load_model's lazy import, the TYPE_CHECKING import and the
    # relative imports going down are not climbs
    assert climbing_imports(tmp_path) == [
        "kubeseg/config.py:1 (errors, config, storage) imports kubeseg.deploy.training_job "
        "(serving, deploy, tuning)",
        "pipelines/submit.py:1 (pipelines/ and components/) imports kubeseg.cli.pipeline "
        "(the CLI)"]
    # the CLI importing pipelines.submit inside a function still closes a cycle
    assert import_cycles(tmp_path) == [["kubeseg.cli.pipeline",
                                        "kubeseg_platform.pipelines.submit"],
                                       ["kubeseg.config", "kubeseg.deploy.training_job"]]


@pytest.mark.parametrize("module, statement, expected", [
    ("kubeseg.serving.server", "from . import v2", ["kubeseg.serving.v2"]),
    ("kubeseg.serving", "from .server import x", ["kubeseg.serving.server"]),
    ("kubeseg.serving.v2", "from .. import config", ["kubeseg.config"]),
    ("kubeseg.cli", "from kubeseg import __version__", ["kubeseg"]),
    ("kubeseg.cli", "import kubeseg.serving.server.x", ["kubeseg.serving.server"]),
])
def test_an_import_names_the_modules_it_loads(module, statement, expected):
    modules = dict.fromkeys(["kubeseg", "kubeseg.config", "kubeseg.cli", "kubeseg.serving",
                             "kubeseg.serving.server", "kubeseg.serving.v2"])
    node = ast.parse(statement).body[0]
    assert _imported_modules(node, module, module in ("kubeseg.serving", "kubeseg.cli"),
                             modules) == expected


PLATFORM = ("kubeseg_platform",)
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
    tree = ast.parse("import os\nfrom kubeseg_platform.pipelines.submit import submit\n"
                     "def f():\n    import kubeseg_platform.components.train\n")
    assert _platform_imports(tree) == [(2, "kubeseg_platform.pipelines.submit", False),
                                       (4, "kubeseg_platform.components.train", True)]


IMPORT_ALL = """
import importlib, json, pkgutil, sys
import kubeseg
names = [m.name for m in pkgutil.walk_packages(kubeseg.__path__, "kubeseg.")
         if not m.name.endswith(".__main__")]  # __main__ runs the CLI
for name in names:
    importlib.import_module(name)
print(json.dumps({"modules": names,
                  "loaded": sorted(m for m in sys.modules
                                   if m.split(".")[0] in ("kfp", "kubeseg_platform", "pipelines",
                                                         "components"))}))
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
for name in ("kfp", "kubeseg_platform", "pipelines", "components"):
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
