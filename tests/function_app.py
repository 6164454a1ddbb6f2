"""The app functions-framework builds, for Flask test clients: `create_app` loads a
small source file that calls `make_handler` exactly as main.py does, except that the
settings and the model host come from a module put in `sys.modules`, so each test can
inject its own host (a fake engine, or the real model already loaded)."""

import sys
import types
from pathlib import Path

import flask.testing
import functions_framework
import pytest

from handler.model_host import ModelHost
from handler.settings import Settings

WIRING_MODULE = "jaxchat_test_wiring"
SOURCE = f"""
from handler.app import make_handler
from {WIRING_MODULE} import host, settings

app = make_handler(settings, host)
"""


def app_client(
    monkeypatch: pytest.MonkeyPatch, directory: Path, host: ModelHost, settings: Settings
) -> flask.testing.FlaskClient:
    """A test client of the functions-framework app serving `host` with `settings`.

    `monkeypatch` restores what create_app records in os.environ and sys.modules.
    """
    monkeypatch.setenv("FUNCTION_TARGET", "app")
    monkeypatch.setenv("FUNCTION_SIGNATURE_TYPE", "http")
    monkeypatch.delitem(sys.modules, "jaxchat_test_main", raising=False)
    wiring = types.ModuleType(WIRING_MODULE)
    wiring.settings = settings
    wiring.host = host
    monkeypatch.setitem(sys.modules, WIRING_MODULE, wiring)
    source = directory / "jaxchat_test_main.py"
    source.write_text(SOURCE)
    return functions_framework.create_app(target="app", source=str(source)).test_client()
