"""The Ray tests run in one pytest-xdist worker (``--dist loadgroup``): each starts a local Ray, and Serve's
HTTP proxy listens on one port, which two workers' Serve instances would contend for."""
from pathlib import Path

import pytest

HERE = Path(__file__).parent


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the groups
def pytest_collection_modifyitems(config, items):
    for item in items:  # (every item of the session comes here: only this folder's are grouped)
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.xdist_group("ray"))
