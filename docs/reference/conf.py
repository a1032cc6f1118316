"""Sphinx configuration of the API reference (built in CI with warnings as errors:
`sphinx-build -W -b html docs/reference docs/reference/_build`)."""
import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

project = "fastmaml"
author = "the fastmaml developers"
extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
napoleon_google_docstring = True
napoleon_numpy_docstring = False
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autodoc_default_options = {"members": False}
exclude_patterns = ["_build"]
html_theme = "alabaster"
nitpicky = False
