"""The tool tests use the same tiny corpora as the data tests.

pytest shares fixtures only down a directory tree, and tests/ (the common parent) belongs to
every suite, so the data suite's conftest is loaded here as a plugin module by its file path.
"""

import importlib.util
import pathlib
import sys

_path = pathlib.Path(__file__).resolve().parents[1] / "data" / "conftest.py"
_spec = importlib.util.spec_from_file_location("ualm_data_test_fixtures", _path)
_fixtures = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = _fixtures
_spec.loader.exec_module(_fixtures)
globals().update({k: v for k, v in vars(_fixtures).items() if not k.startswith("_")})
