"""The training scripts stay readable in one sitting: the size budgets of docs/README hold, measured here.

Code lines are lines that hold code: not blank, not only a comment, not part of a docstring.
"""

import ast
import io
import tokenize
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["train_dual_task.py", "train_llava.py"]


def code_lines(source: str, first: int = 1, last: int | None = None) -> int:
    """How many lines in [first, last] of `source` hold code (no blanks, comments or docstrings)."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
            docstrings.update(range(body[0].lineno, body[0].end_lineno + 1))
    with_code = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT,
                              tokenize.ENDMARKER):
            with_code.update(range(token.start[0], token.end[0] + 1))
    last = last or len(source.splitlines())
    return len({n for n in with_code - docstrings if first <= n <= last})


def function(source: str, name: str) -> ast.FunctionDef:
    return next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)


def test_code_lines_skip_blanks_comments_and_docstrings():
    source = ('"""Module."""\n\n# a comment\ndef f(x):\n    """Doc\n    string."""\n'
              '    return (x +\n            1)  # why\n')
    assert code_lines(source) == 3


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_training_script_keeps_its_budgets(script):
    source = (REPO / script).read_text()
    lines = source.splitlines()
    assert len(lines) <= 650, f"{script}: {len(lines)} lines in all"
    assert code_lines(source) <= 480, f"{script}: {code_lines(source)} code lines"
    long = [i + 1 for i, line in enumerate(lines) if len(line) > 120]
    assert not long, f"{script}: lines over 120 characters: {long}"
    main, train = function(source, "main"), function(source, "train")
    assert code_lines(source, main.lineno, main.end_lineno) <= 60
    assert code_lines(source, train.lineno, train.end_lineno) <= 90
    assert len(train.args.args) <= 10


@pytest.mark.parametrize("script", SCRIPTS)
def test_config_help_strings_are_short(script):
    import importlib

    module = importlib.import_module(script.removesuffix(".py"))
    import dataclasses

    for f in dataclasses.fields(module.Config):
        assert len(f.metadata.get("help", "")) <= 100, f"{script} --{f.name}: {len(f.metadata['help'])} characters"


def test_the_docs_stay_few_pages_a_user_reads():
    pages = sorted((REPO / "docs").glob("*.md"))
    assert len(pages) <= 5, [p.name for p in pages]
    assert sum(len(p.read_text()) for p in pages) <= 45_000
    assert len((REPO / "README.md").read_text()) <= 10_500


def test_only_common_plots_imports_matplotlib_and_every_common_module_says_who_uses_it():
    for path in REPO.glob("**/*.py"):
        if ".git" not in path.parts and path != REPO / "common" / "plots.py":
            tree = ast.parse(path.read_text())
            imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
            imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
            assert not [name for name in imported if name.startswith("matplotlib")], path
    for path in (REPO / "common").glob("*.py"):
        if path.name != "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert any(who in doc for who in ("train_dual_task.py", "train_llava.py", "both", "every script")), path
