"""Every package that a test (or any script of the suite) imports is named in requirements.txt or
requirements-test.txt, so a fresh virtual environment built from the README's install commands runs
the whole suite: a package installed by hand, or only as another package's dependency, fails here."""
import ast
import importlib.metadata
import os
import re
import sys

from conftest import REPO_ROOT

REQUIREMENT_FILES = ("requirements.txt", "requirements-test.txt")


def normalise(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def required_distributions(paths):
    """The distribution names the requirement files list (normalised)."""
    names = set()
    for path in paths:
        with open(path) as f:
            for line in f:
                line = line.split("#", 1)[0].strip()
                if line and not line.startswith("-"):
                    names.add(normalise(re.match(r"[A-Za-z0-9_.\-]+", line).group(0)))
    return names


def imported_modules(path):
    """Top-level names of every module a Python file imports: import statements anywhere (also
    inside functions), importlib.import_module("x") and pytest.importorskip("x")."""
    with open(path) as f:
        tree = ast.parse(f.read(), filename=path)
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None))
              in ("importorskip", "import_module")):
            names.add(node.args[0].value.split(".")[0])
    return names


def python_files(root):
    folders = [root] + [os.path.join(root, d) for d in ("tests", "tools", "slurm")]
    return sorted(os.path.join(folder, name) for folder in folders if os.path.isdir(folder)
                  for name in os.listdir(folder) if name.endswith(".py"))


def unnamed_imports(files, requirement_files):
    """["file: imports X (distribution D), which no requirements file names", ...] for each
    third-party import of `files` (not the standard library, not a module of the suite itself)."""
    local = {os.path.splitext(os.path.basename(path))[0] for path in files}
    required = required_distributions(requirement_files)
    distributions = importlib.metadata.packages_distributions()
    problems = []
    for path in files:
        for module in sorted(imported_modules(path) - local - set(sys.stdlib_module_names)):
            dists = distributions.get(module)
            if not dists:
                problems.append(f"{os.path.relpath(path, REPO_ROOT)}: imports {module}, which is "
                                "not installed (name its package in a requirements file)")
            elif not any(normalise(d) in required for d in dists):
                problems.append(f"{os.path.relpath(path, REPO_ROOT)}: imports {module} (package "
                                f"{dists[0]}), which no requirements file names")
    return problems


def test_every_imported_package_is_named_in_a_requirements_file():
    files = python_files(REPO_ROOT)
    assert any(path.endswith("test_plot_logs.py") for path in files)
    problems = unnamed_imports(files, [os.path.join(REPO_ROOT, f) for f in REQUIREMENT_FILES])
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_package_installed_only_as_a_dependency(tmp_path):
    # jinja2 comes with torch, so it imports here; a test using it would still fail on a machine
    # whose requirements do not name it (as matplotlib did)
    (tmp_path / "requirements.txt").write_text("torch>=2.1\nnumpy  # comment\n")
    (tmp_path / "test_uses_extras.py").write_text(
        "import os\nimport numpy as np\nfrom torch import nn\n\n\ndef test_x():\n"
        "    import jinja2\n    pytest.importorskip('not_a_real_package_xyz')\n")
    problems = unnamed_imports([str(tmp_path / "test_uses_extras.py")],
                               [str(tmp_path / "requirements.txt")])
    assert len(problems) == 2, problems
    assert "imports jinja2 (package" in problems[0] and "no requirements file names" in problems[0]
    assert "not_a_real_package_xyz, which is not installed" in problems[1]
    (tmp_path / "requirements.txt").write_text("torch\nnumpy\nJinja2>=3\n")
    assert len(unnamed_imports([str(tmp_path / "test_uses_extras.py")],
                               [str(tmp_path / "requirements.txt")])) == 1
