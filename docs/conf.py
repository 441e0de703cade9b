"""Sphinx configuration of the bilevel documentation.

Build (from the repository root, with the ``docs`` extra installed)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html

The tutorials in ``examples/`` are executed during the build (sphinx-gallery);
the API reference is generated from the modules' ``__all__``
(``_ext/bilevel_docs.py``).
"""

import os
import pathlib
import sys

os.environ.setdefault("MPLBACKEND", "Agg")  # examples plot headless
# The tutorials' problems are small: one thread is faster, and several threads on a
# busy 2-core machine slowed the hyper-cleaning tutorial from 20 s to 2.5 min.
os.environ.setdefault("OMP_NUM_THREADS", "1")

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's bilevel, installed or not
sys.path.insert(0, str(HERE / "_ext"))

import bilevel  # noqa: E402
import bilevel.typing  # noqa: E402

project = "bilevel"
author = "the bilevel developers"
copyright = "the bilevel developers"  # noqa: A001
release = bilevel.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx_gallery.gen_gallery",
    "bilevel_docs",  # API sections from __all__, alias cross-references
]

templates_path = ["_templates"]
exclude_patterns = ["_build", "_api_sections.rst", "Thumbs.db", ".DS_Store"]
root_doc = "index"
default_role = "py:obj"

# -- autodoc / autosummary / napoleon ----------------------------------------
autosummary_generate = True  # replaced by the generated API sections (bilevel_docs)
autosummary_imported_members = False
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented"  # no type-only lists for undocumented fields
autodoc_typehints_format = "short"
autodoc_member_order = "bysource"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = True
autodoc_type_aliases = {name: f"bilevel.typing.{name}" for name in bilevel.typing.__all__}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False
napoleon_use_ivar = True  # "Attributes:" as fields, so dataclass fields are not described twice

# -- math ---------------------------------------------------------------------
# MathJax from its CDN, loaded by the reader's browser; the build needs no network.

# -- sphinx-gallery -----------------------------------------------------------
sphinx_gallery_conf = {
    "examples_dirs": "../examples",
    "gallery_dirs": "auto_examples",
    "filename_pattern": r"\.py$",  # execute every example
    "ignore_pattern": r"__init__\.py",
    "within_subsection_order": "bilevel_docs.TutorialOrder",
    "reset_modules": ("matplotlib", "bilevel_docs.reset_torch"),
    "abort_on_example_error": True,
    "download_all_examples": False,
    "remove_config_comments": True,
    "show_memory": False,
    "min_reported_time": 1,
    "doc_module": ("bilevel",),
    "backreferences_dir": None,
    "capture_repr": (),
}

# -- HTML -----------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"bilevel {release}"
html_static_path = []
html_theme_options = {
    "description": "Bilevel optimization and implicit differentiation for PyTorch",
    "fixed_sidebar": True,
    "page_width": "1100px",
    "sidebar_width": "230px",
}
html_sidebars = {"**": ["about.html", "navigation.html", "relations.html", "searchbox.html"]}
