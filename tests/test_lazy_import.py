"""`import lossbalance` and `lossbalance --help` answer without importing torch; the lazy
table of public names is the one the type checkers see."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import lossbalance
from lossbalance import cli

INIT = Path(lossbalance.__file__)


def run(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_import_and_help_do_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "import lossbalance\n"
        "from lossbalance.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    try:\n"
        "        main(['--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'bench' in buf.getvalue())\n"
    )
    assert run(code).split() == ["False", "True"]


def test_the_light_parser_lists_every_command_of_the_full_one():
    def commands(parser):
        (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
        return {a.dest: a.help for a in sub._choices_actions}

    assert commands(cli._light_parser("lossbalance")) == commands(cli.build_parser())


def type_checking_imports(path: Path) -> dict[str, str | None]:
    """name -> module of the ``if TYPE_CHECKING:`` imports of a lazy ``__init__``."""
    tree = ast.parse(path.read_text())
    (guard,) = [n for n in tree.body if isinstance(n, ast.If)]  # if TYPE_CHECKING:
    return {a.name: n.module for n in guard.body if isinstance(n, ast.ImportFrom) for a in n.names}


def test_the_lazy_table_is_the_type_checkers_view_and_every_name_resolves():
    assert type_checking_imports(INIT) == lossbalance._EXPORTS
    assert set(lossbalance.__all__) == {*lossbalance._EXPORTS, "__version__"}
    for name in lossbalance._EXPORTS:
        assert getattr(lossbalance, name) is not None


def test_the_registry_holds_every_method_in_a_fresh_process():
    names = run("import lossbalance; print(' '.join(lossbalance.available_methods()))").split()
    assert len(names) >= 30 and {"mtadam", "imtl-g", "upgrad", "famo", "moco"} <= set(names)


def test_list_does_not_import_torch():
    code = (
        "import sys, contextlib, io\n"
        "from lossbalance.cli import main\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    main(['list'])\n"
        "print('torch' in sys.modules, 'nash-mtl' in buf.getvalue())\n"
    )
    assert run(code).split() == ["False", "True"]


def test_the_catalog_of_list_is_the_live_registry():
    from lossbalance._catalog import BUILTIN_METHODS

    lossbalance._import_all()
    live = tuple(
        (m.name, m.needs, m.stateful, m.paper, m.summary)
        for m in map(lossbalance.get_method, lossbalance.available_methods())
    )
    assert BUILTIN_METHODS == live


def test_the_experiments_package_is_lazy_and_complete():
    import lossbalance.experiments as ex

    assert type_checking_imports(Path(ex.__file__)) == ex._EXPORTS
    assert set(ex.__all__) == set(ex._EXPORTS)
    for name in ex.__all__:
        assert getattr(ex, name) is not None
    assert run(
        "import sys, lossbalance.experiments.methods; print('torch' in sys.modules)"
    ).split() == ["False"]
