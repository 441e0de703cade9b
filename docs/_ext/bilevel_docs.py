"""Sphinx helpers for the bilevel documentation.

* :func:`write_api_sections` writes ``_api_sections.rst`` (git-ignored, included
  by ``api.rst``): one section per public module, with an autosummary table of
  the names in the module's ``__all__``.  Public modules are ``bilevel``, its
  sub-packages and the modules named in an ``__all__`` below them (plus
  :data:`EXTRA_MODULES`), so new names and modules appear without editing the docs.
* Every object is documented once, at its *home*: among the public modules that
  export it, the one closest to where it is defined (``bilevel.implicit.CG`` is
  documented as ``bilevel.implicit.linear_solve.CG``).  The other public
  spellings are listed under each module as re-exports, and cross-references to
  them (and sphinx-gallery's code links) lead to the home
  (:func:`register_aliases`).
* :func:`split_grouped_attributes` renders ``Attributes: x, y: ...`` as two
  fields.
* :class:`TutorialOrder` orders the gallery; :func:`reset_torch` restores
  torch's global defaults between examples.
"""

from __future__ import annotations

import importlib
import inspect
import pathlib
import pkgutil
import re
import types

ROOT_MODULE = "bilevel"
EXTRA_MODULES = ("bilevel.typing",)
"""Public modules not reachable through an ``__all__``."""
MODULE_ORDER = (
    "bilevel",
    "bilevel.implicit",
    "bilevel.implicit.linear_solve",
    "bilevel.implicit.operators",
    "bilevel.implicit.conditions",
    "bilevel.implicit.projections",
    "bilevel.implicit.prox",
    "bilevel.solvers",
    "bilevel.algorithms",
    "bilevel.layers",
    "bilevel.hpo",
    "bilevel.problems",
    "bilevel.status",
    "bilevel.typing",
)
"""Order of the sections; modules not listed follow, alphabetically."""
TUTORIALS = (
    "plot_five_minutes.py",
    "scipy_solver.py",
    "plot_cg_neumann_unrolled.py",
    "plot_hyper_cleaning.py",
    "plot_single_loop.py",
    "plot_convex_layer.py",
    "plot_moe_pde.py",
    "plot_sinkhorn_rebasin.py",
)
"""Order of the gallery; files not listed follow, alphabetically."""

MAX_REEXPORT_TABLE = 12
"""Re-exports are shown as a table with summaries up to this many, else as links."""

_ALIASES: dict[str, str] = {}


def public_modules() -> list[str]:
    """Names of the public modules: ``bilevel``, its public sub-packages, and every
    module named in an ``__all__`` below them."""
    root = importlib.import_module(ROOT_MODULE)
    packages = [f"{ROOT_MODULE}.{m.name}" for m in pkgutil.iter_modules(root.__path__)
                if m.ispkg and not m.name.startswith("_")]
    found, stack = [], [ROOT_MODULE, *EXTRA_MODULES, *packages]
    while stack:
        name = stack.pop()
        if name in found:
            continue
        found.append(name)
        module = importlib.import_module(name)
        for member in getattr(module, "__all__", ()):
            value = getattr(module, member)
            if isinstance(value, types.ModuleType) and value.__name__.startswith(ROOT_MODULE + "."):
                stack.append(value.__name__)
    rank = {name: i for i, name in enumerate(MODULE_ORDER)}
    return sorted(found, key=lambda n: (rank.get(n, len(rank)), n))


def _exports(module_name: str) -> list[str]:
    module = importlib.import_module(module_name)
    if not hasattr(module, "__all__"):
        raise RuntimeError(f"{module_name} has no __all__; the API reference is built from it.")
    return [n for n in module.__all__ if not isinstance(getattr(module, n), types.ModuleType)]


def _defined_in(obj) -> str:
    return getattr(obj, "__module__", None) or ""


def _home(obj, exporters: list[str]) -> str:
    """The exporting module closest to the object's definition (then the shortest name)."""
    where = _defined_in(obj).split(".")

    def shared(module_name: str) -> int:
        parts = module_name.split(".")
        n = 0
        while n < min(len(parts), len(where)) and parts[n] == where[n]:
            n += 1
        return n

    return max(exporters, key=lambda m: (shared(m), -len(m.split("."))))


def _kind(obj) -> str:
    if inspect.isclass(obj):
        return "exception" if issubclass(obj, BaseException) else "class"
    if inspect.isroutine(obj):
        return "function"
    return "data"  # constants and type aliases


def _identity(module_name: str, name: str, obj):
    """What makes two exports the same object: identity for classes and functions;
    constants (a small int may be shared by unrelated names) are their own."""
    return id(obj) if inspect.isclass(obj) or inspect.isroutine(obj) else (module_name, name)


def api_layout() -> tuple[list[str], dict[str, list[tuple[str, bool]]], dict[str, str]]:
    """(modules, {module: [(name, documented_here)]}, {alias full name: home full name})."""
    modules = public_modules()
    exporters: dict[object, list[str]] = {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        for name in _exports(module_name):
            obj = getattr(module, name)
            exporters.setdefault(_identity(module_name, name, obj), []).append(module_name)
    layout, aliases = {}, {}
    for module_name in modules:
        module = importlib.import_module(module_name)
        entries = []
        for name in _exports(module_name):
            obj = getattr(module, name)
            home = _home(obj, exporters[_identity(module_name, name, obj)])
            entries.append((name, home == module_name))
            home_module = importlib.import_module(home)
            home_name = name if home == module_name else next(
                n for n in _exports(home) if getattr(home_module, n) is obj)
            documented = f"{home}.{home_name}"
            if home != module_name:
                aliases[f"{module_name}.{name}"] = documented
            # the defining module's spelling (e.g. in sphinx-gallery's code links)
            defined = f"{_defined_in(obj)}.{getattr(obj, '__qualname__', name)}"
            if defined.startswith(ROOT_MODULE + ".") and defined != documented:
                aliases.setdefault(defined, documented)
        layout[module_name] = entries
    return modules, layout, aliases


def _table(names: list[str], toctree: bool) -> list[str]:
    lines = [".. autosummary::"]
    if toctree:
        lines += ["   :toctree: generated", "   :template: autosummary/bilevel_object.rst"]
    lines.append("")
    lines += [f"   {n}" for n in names]
    return lines + [""]


def write_api_sections(srcdir: pathlib.Path) -> str:
    """Write ``_api_sections.rst`` and return its name (relative to ``srcdir``)."""
    modules, layout, aliases = api_layout()
    _ALIASES.clear()
    _ALIASES.update(aliases)
    lines = [
        ".. This file is generated by docs/_ext/bilevel_docs.py from the modules' __all__;",
        "   do not edit it.",
        "",
    ]
    for module_name in modules:
        module = importlib.import_module(module_name)
        entries = layout[module_name]
        lines += [f"``{module_name}``", "-" * (len(module_name) + 4), ""]
        lines += [f".. automodule:: {module_name}", "   :no-members:", ""]
        lines += [f".. currentmodule:: {module_name}", ""]
        own = [n for n, here in entries if here]
        by_kind: dict[str, list[str]] = {}
        for name in own:
            by_kind.setdefault(_kind(getattr(module, name)), []).append(name)
        for kind, title in (("function", "Functions"), ("class", "Classes"),
                            ("exception", "Warnings and errors"), ("data", "Constants and types")):
            if by_kind.get(kind):
                lines += [f".. rubric:: {title}", ""] + _table(by_kind[kind], toctree=True)
        reexported = [n for n, here in entries if not here]
        if reexported:
            lines += [f".. rubric:: Also importable from ``{module_name}``", ""]
            if len(reexported) <= MAX_REEXPORT_TABLE:  # a table with the summaries
                lines += _table(reexported, toctree=False)
            else:  # a long list documented in the sections below: links only
                lines += [", ".join(f":obj:`~{module_name}.{n}`" for n in reexported), ""]
    target = srcdir / "_api_sections.rst"
    text = "\n".join(lines)
    if not target.exists() or target.read_text() != text:  # keep the mtime: no needless rebuilds
        target.write_text(text)
    return target.name


def register_aliases(app, env):
    """Enter every re-exported spelling in the py domain as an alias of its home
    entry, so that cross-references and sphinx-gallery's code links find it."""
    try:
        from sphinx.domains.python import ObjectEntry
    except ImportError as err:  # pragma: no cover - Sphinx < 4
        raise RuntimeError("the bilevel docs need Sphinx >= 7") from err
    objects = env.get_domain("py").objects
    for alias, home in _ALIASES.items():
        entry = objects.get(home)
        if entry is not None and alias not in objects:
            objects[alias] = ObjectEntry(entry.docname, entry.node_id, entry.objtype, True)


_GROUPED_IVAR = re.compile(r"^(\s*):ivar (\w+(?:\s*,\s*\w+)+):(.*)$")


def split_grouped_attributes(app, what, name, obj, options, lines):
    """One field per name for ``Attributes: x, y: ...``, as napoleon does for ``Args``.

    napoleon writes the attribute as ``:ivar x, y: ...``, which Sphinx would show
    as a variable ``y`` of type ``x,``; each name gets the description instead.
    """
    out, i = [], 0
    while i < len(lines):
        match = _GROUPED_IVAR.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent, names, first = match.groups()
        body = [first]
        i += 1
        while i < len(lines) and lines[i].startswith(indent + " ") and lines[i].strip():
            body.append(" " + lines[i].strip())
            i += 1
        out += [f"{indent}:ivar {n.strip()}:{''.join(body)}" for n in names.split(",")]
    lines[:] = out


class TutorialOrder:
    """Sort key of sphinx-gallery: the order of :data:`TUTORIALS`, then file name."""

    def __init__(self, src_dir):
        self.src_dir = src_dir

    def __call__(self, filename: str):
        name = pathlib.Path(filename).name
        return (TUTORIALS.index(name), name) if name in TUTORIALS else (len(TUTORIALS), name)

    def __repr__(self) -> str:  # sphinx-gallery caches on the repr
        return f"{type(self).__name__}()"


def reset_torch(gallery_conf, fname, when=None):
    """Restore torch's global defaults (dtype, seed) before each example."""
    import torch

    torch.set_default_dtype(torch.float32)
    torch.manual_seed(0)


def _on_config_inited(app, config):
    config.autosummary_generate = [write_api_sections(pathlib.Path(app.srcdir))]


def _readable_type_aliases() -> None:
    """Show ``autodoc_type_aliases`` by name inside unions (``Matvec | None``); some
    Sphinx versions print the internal ``TypeAliasForwardRef('...')`` there."""
    try:
        from sphinx.util.inspect import TypeAliasForwardRef
    except ImportError:  # other Sphinx versions: nothing to fix
        return
    TypeAliasForwardRef.__repr__ = lambda self: self.name.rpartition(".")[2]


def setup(app):
    _readable_type_aliases()
    app.connect("config-inited", _on_config_inited)
    app.connect("env-check-consistency", register_aliases)
    app.connect("autodoc-process-docstring", split_grouped_attributes, priority=600)  # after napoleon
    return {"parallel_read_safe": True, "parallel_write_safe": True}
