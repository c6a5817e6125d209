"""The post-training tests use the data suite's tiny components (tokenizer, random X-Codec, clips).

pytest shares fixtures only down a directory tree, so the data suite's conftest is loaded here
as a plugin module by its file path (as tests/tools does; both share one loaded module).
"""

import importlib.util
import pathlib
import sys

_NAME = "ualm_data_test_fixtures"
if _NAME not in sys.modules:
    _path = pathlib.Path(__file__).resolve().parents[1] / "data" / "conftest.py"
    _spec = importlib.util.spec_from_file_location(_NAME, _path)
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[_NAME] = _module
    _spec.loader.exec_module(_module)
globals().update({k: v for k, v in vars(sys.modules[_NAME]).items() if not k.startswith("_")})
