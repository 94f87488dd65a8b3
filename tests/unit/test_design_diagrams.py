"""The diagrams in docs/design.md name only code that exists: modules, their classes and functions, files, commands.

The rule (stated in docs/design.md, section 1): code in a Mermaid block is named by its dotted module path from a
top-level package (`registrar.writer`, `nodeagent.session.ControlSession`) or by its path from the repository
root (`registrar/liveness.py`, `compose/`); a command is `meshvpn-<name>`. Anything else in a label (runtime
files such as `control/registrar.db`, thread names, addresses) is prose and not checked. Top-level packages and
commands come from pyproject.toml, so a package added there is covered without touching this test.
"""

from __future__ import annotations

import ast
import re
import tomllib
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DESIGN = ROOT / "docs" / "design.md"
# Top-level directories that hold no package but are named by path in the diagrams.
OTHER_ROOTS = ("tests", "bench", "scripts", "compose", "docs")

FENCE = re.compile(r"^```mermaid[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
# Not preceded by anything that would make the match the tail of a longer name or path: in
# `control/registrar.db` the `registrar.db` is a runtime file, not the module `registrar.db`.
NOT_A_TAIL = r"(?<![\w./-])"


@cache
def project() -> tuple[tuple[str, ...], frozenset[str]]:
    """The top-level packages and the console scripts pyproject.toml declares."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = tuple(p.rstrip("*") for p in data["tool"]["setuptools"]["packages"]["find"]["include"])
    return packages, frozenset(data["project"]["scripts"])


def mermaid_blocks(markdown: str) -> list[str]:
    """The source of every ```mermaid fenced block, in order."""
    return FENCE.findall(markdown)


def named_code(block: str, packages: tuple[str, ...]) -> list[str]:
    """Every module, file or command a diagram names, by the rule in this module's docstring, in order, once."""
    pkgs = "|".join(re.escape(p) for p in packages)
    roots = "|".join(re.escape(r) for r in (*packages, *OTHER_ROOTS))
    pattern = re.compile(
        rf"{NOT_A_TAIL}(?:"
        rf"(?:{roots})/(?:[\w.-]+/)*[\w.-]*"  # a path from the repository root
        rf"|(?:{pkgs})(?:\.{IDENT})+"  # a dotted module path, maybe ending in a class or function
        rf"|meshvpn-[a-z]+(?![\w-])"  # a console script
        rf")"
    )
    found: list[str] = []
    for match in pattern.finditer(block):
        name = match.group(0)
        if name not in found:
            found.append(name)
    return found


def _defined(body: list[ast.stmt], name: str) -> ast.stmt | None:
    """The statement of `body` that binds `name` at that level (def, class, assignment or import), if any."""
    for stmt in body:
        if isinstance(stmt, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and stmt.name == name:
            return stmt
        if isinstance(stmt, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == name for t in stmt.targets
        ):
            return stmt
        if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and stmt.target.id == name:
            return stmt
        if isinstance(stmt, ast.Import | ast.ImportFrom) and any(
            (alias.asname or alias.name.split(".")[0]) == name for alias in stmt.names
        ):
            return stmt
    return None


def why_missing(name: str, root: Path, scripts: frozenset[str]) -> str | None:
    """None if `name` exists under `root`; otherwise what is missing. Reads source only (ast), imports nothing."""
    if name.startswith("meshvpn-"):
        return None if name in scripts else f"no console script {name!r} in pyproject.toml"
    if "/" in name:
        return None if (root / name).exists() else f"no file or directory {name!r}"
    parts = name.split(".")
    path = root / parts[0]
    if not (path / "__init__.py").is_file():
        return f"no package {parts[0]!r}"
    rest = parts[1:]
    while rest and path.is_dir():
        if (path / rest[0] / "__init__.py").is_file():
            path = path / rest[0]
        elif (path / f"{rest[0]}.py").is_file():
            path = path / f"{rest[0]}.py"
        else:
            break
        rest = rest[1:]
    source = path / "__init__.py" if path.is_dir() else path
    body: list[ast.stmt] = ast.parse(source.read_text(), filename=str(source)).body
    for attr in rest:
        stmt = _defined(body, attr)
        if stmt is None:
            return f"{source.relative_to(root)} has no module, class, function or name {attr!r} (in {name!r})"
        body = stmt.body if isinstance(stmt, ast.ClassDef) else []
    return None


def _design_names() -> list[str]:
    packages, _ = project()
    names: list[str] = []
    for block in mermaid_blocks(DESIGN.read_text()):
        names += [n for n in named_code(block, packages) if n not in names]
    return names


def _as_built() -> str:
    blocks = [b for b in mermaid_blocks(DESIGN.read_text()) if "process: meshvpn-agent" in b]
    assert len(blocks) == 1, (
        "docs/design.md should have exactly one as-built diagram (the one with the agent process)"
    )
    return blocks[0]


def test_design_has_its_three_kinds_of_diagram():
    blocks = mermaid_blocks(DESIGN.read_text())
    assert any(b.lstrip().startswith("flowchart") for b in blocks)
    assert any(b.lstrip().startswith("sequenceDiagram") for b in blocks)
    assert any(b.lstrip().startswith("stateDiagram") for b in blocks)


def test_the_as_built_diagram_names_code_of_every_package_it_runs():
    """Guards the rule itself: if it stopped matching, every name would pass because none was found."""
    packages, _ = project()
    names = named_code(_as_built(), packages)
    assert len(names) >= 20, names
    for package in ("broker", "registrar", "nodeagent", "meshcontract", "wgctl", "desktop_chat"):
        assert any(n.split(".")[0].split("/")[0] == package for n in names), (
            f"nothing of {package} named: {names}"
        )


@pytest.mark.parametrize("name", _design_names())
def test_every_name_in_the_design_diagrams_exists(name: str):
    _, scripts = project()
    assert why_missing(name, ROOT, scripts) is None, why_missing(name, ROOT, scripts)


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        ("registrar.writer: engine + ipam", ["registrar.writer"]),
        ("nodeagent.session.ControlSession<br/>connect", ["nodeagent.session.ControlSession"]),
        ("see registrar/liveness.py and compose/", ["registrar/liveness.py", "compose/"]),
        ("process: meshvpn-agent run", ["meshvpn-agent"]),
        ("control/registrar.db, state/ (0700), ca.pem", []),  # runtime files: prose
        ("mqtts 10.77.X.1:1883, amqtt 0.12.1, wireguard-go", []),
        ("the registrar, the broker. Then nodeagent.", []),  # words and sentence ends, not modules
        ("wgctl.diff.plan. And wgctl.diff.plan again", ["wgctl.diff.plan"]),  # once, without the full stop
    ],
)
def test_what_counts_as_a_name(label: str, expected: list[str]):
    packages, _ = project()
    assert named_code(f'flowchart LR\n  X["{label}"]\n', packages) == expected


SYNTHETIC = """\
# A design

```mermaid
flowchart LR
  R["registrar.writer<br/>{name}"] --> B["broker.embedded.MeshBroker"]
```
"""


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (
            "registrar.nosuchmodule",
            "registrar/__init__.py has no module, class, function or name 'nosuchmodule'",
        ),
        ("nodeagent.session.NoSuchSession", "nodeagent/session.py has no module, class, function or name"),
        ("nodeagent.session.ControlSession.no_such_method", "'no_such_method'"),
        ("wgctl.diff.plan.inner", "'inner'"),  # a function has no attributes to name
        ("registrar/nosuch.py", "no file or directory 'registrar/nosuch.py'"),
        ("tests/unit/nosuch/", "no file or directory"),
        ("meshvpn-nosuch", "no console script 'meshvpn-nosuch'"),
    ],
)
def test_a_diagram_naming_code_that_does_not_exist_fails(bad: str, reason: str):
    packages, scripts = project()
    blocks = mermaid_blocks(SYNTHETIC.format(name=bad))
    names = named_code(blocks[0], packages)
    assert names == ["registrar.writer", bad, "broker.embedded.MeshBroker"]
    missing = {n: why_missing(n, ROOT, scripts) for n in names}
    assert missing["registrar.writer"] is None and missing["broker.embedded.MeshBroker"] is None
    assert missing[bad] is not None and reason in missing[bad], missing[bad]
