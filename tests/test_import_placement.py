"""Imports sit at the top of files. One inside a function is there on purpose: it loads a third-party module
(torch, transformers' Trainer, peft, ...) that importing its file does not load yet, so that `tunepipe check` and
`tunepipe predict` stay free of what they never use (test_startup.py guards those paths). Two exceptions: a
platform module tried inside ``try/except ImportError`` (fcntl, resource), and the modules on the start-up path of
`tunepipe train` (cli.py, the specs, pipeline.py and what it imports at the top), which import tunepipe's later
stages inside the functions that use them, so that a specs typo is reported before those load. This test names
any other import inside a function, and checks that the start-up path is what it says."""
import ast
import subprocess
import sys
from pathlib import Path

from test_import_layers import ROOT, _modules, _targets

STDLIB = set(sys.stdlib_module_names) | {"__future__"}
START_UP_MODULES = {"tunepipe.cli", "tunepipe.cli_commands", "tunepipe.console", "tunepipe.pipeline",
                    "tunepipe.saved_run", "tunepipe.evaluation_records", "tunepipe.specs", "tunepipe.specs.legacy",
                    "tunepipe.specs.schema"}
LATER_STAGES = ("tunepipe.data", "tunepipe.tasks", "tunepipe.modeling", "tunepipe.trainers", "tunepipe.tracking",
                "tunepipe.serving", "tunepipe.output", "tunepipe.ownership", "tunepipe.check")


def _imports(module: str, path, node, modules) -> set[str]:
    """What executing ``node`` may load: tunepipe modules (resolved as the layering test resolves them), third-party
    ones by name, as 'module:name' for a from-import (transformers and accelerate load a submodule per name); the
    standard library counts as loaded."""
    found = set(_targets(module, path, node, modules))
    outside = STDLIB | {"tunepipe"}
    if isinstance(node, ast.Import):
        found |= {a.name for a in node.names if a.name.split(".")[0] not in outside}
    elif node.level == 0 and node.module.split(".")[0] not in outside:
        found |= {f"{node.module}:{a.name}" for a in node.names}
    return found


def _top_level(tree) -> list:
    """Import statements run when the file is imported (not those under ``if TYPE_CHECKING``)."""
    found = []

    def visit(statements):
        for s in statements:
            if isinstance(s, (ast.Import, ast.ImportFrom)):
                found.append(s)
            elif isinstance(s, ast.If) and not (getattr(s.test, "id", None) == "TYPE_CHECKING"
                                                or getattr(s.test, "attr", None) == "TYPE_CHECKING"):
                visit(s.body + s.orelse)
            elif isinstance(s, ast.Try):
                visit(s.body + s.orelse + s.finalbody + [x for h in s.handlers for x in h.body])
            elif isinstance(s, (ast.ClassDef, ast.With)):
                visit([x for x in s.body if not isinstance(x, (ast.FunctionDef, ast.AsyncFunctionDef))])
    visit(tree.body)
    return found


def _in_functions(tree):
    """(import statement, whether it is tried under an ImportError handler) for imports inside functions."""
    found = []

    def visit(node, in_function, optional):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)) and in_function:
                found.append((child, optional))
                continue
            tried = isinstance(child, ast.Try) and any(
                h.type is not None and any(getattr(n, "id", None) in ("ImportError", "ModuleNotFoundError")
                                           for n in ast.walk(h.type)) for h in child.handlers)
            visit(child, in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)),
                  optional or tried)
    visit(tree, False, False)
    return found


def needless_imports(sources: dict[str, tuple[str, str]]) -> list[str]:
    """``sources``: module name -> (file name, text). The imports inside functions that load nothing new."""
    modules = {name: Path(file) for name, (file, _) in sources.items()}
    trees = {name: ast.parse(text) for name, (_, text) in sources.items()}
    direct = {m: set().union(*[_imports(m, modules[m], n, modules) for n in _top_level(t)])
              for m, t in trees.items()}
    closures: dict[str, set[str]] = {}

    def closure(m: str, seen=()) -> set[str]:
        if m in closures:
            return closures[m]
        parts = m.split(".")
        out = set()
        for item in direct.get(m, set()) | {".".join(parts[:i]) for i in range(1, len(parts))}:
            if item in modules and item != m and item not in seen:
                out |= closure(item, seen + (m,))
            elif item not in modules:
                out.add(item)
        if not seen:
            closures[m] = out
        return out

    found = []
    for m, tree in trees.items():
        if m in START_UP_MODULES:
            continue
        loaded = closure(m)
        for node, optional in _in_functions(tree):
            targets = _imports(m, modules[m], node, modules)
            brings = set().union(*[closure(t) | ({t} if t not in modules else set()) for t in targets])
            if not optional and not brings - loaded:
                found.append(f"{sources[m][0]}:{node.lineno} {ast.unparse(node)}")
    return found


def test_the_check_sees_an_import_that_loads_nothing_new():
    sources = {
        "tunepipe": ("tunepipe/__init__.py", ""),
        "tunepipe.light": ("tunepipe/light.py", "import json\n"),
        "tunepipe.heavy": ("tunepipe/heavy.py", "import torch\nfrom transformers import TrainerCallback\n"),
        "tunepipe.user": ("tunepipe/user.py",
                          "from .heavy import TrainerCallback\n"
                          "def a():\n    import torch\n"  # loaded already, through .heavy
                          "def b():\n    from .light import json\n"  # loads nothing third-party
                          "def c():\n    import os\n"  # standard library
                          "def d():\n    from transformers import Trainer\n"  # a submodule not loaded yet: on purpose
                          "def e():\n    try:\n        import fcntl\n    except ImportError:\n        pass\n"),
    }
    assert [line.split(" ", 1)[0] for line in needless_imports(sources)] == [
        "tunepipe/user.py:3", "tunepipe/user.py:5", "tunepipe/user.py:7"]


def test_imports_inside_functions_load_what_their_file_does_not():
    sources = {}
    for name, path in _modules().items():
        sources[name] = (str(path.relative_to(ROOT.parent)), path.read_text(encoding="utf-8"))
    found = needless_imports(sources)
    assert not found, "move these imports to the top of their file:\n" + "\n".join(found)


def test_the_start_up_path_is_the_modules_allowed_to_defer_imports(tmp_path):
    """A specs typo given to `tunepipe train` goes through every module of START_UP_MODULES and loads none of the
    later stages: the reason those modules may keep their imports inside functions."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("training: {learning_rte: 1e-4}\n")
    code = ("import sys\nfrom tunepipe.cli import main\nrc = main(['train', %r])\n"
            "print('LOADED', rc, ' '.join(sorted(m for m in sys.modules if m.startswith('tunepipe'))))" % str(bad))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    line = next(x for x in out.stdout.splitlines() if x.startswith("LOADED "))
    rc, *loaded = line.split()[1:]
    assert rc == "2" and "learning_rte" in out.stderr
    assert START_UP_MODULES <= set(loaded), "no longer on the start-up path: " + str(START_UP_MODULES - set(loaded))
    assert not [m for m in loaded if m.startswith(LATER_STAGES)]
