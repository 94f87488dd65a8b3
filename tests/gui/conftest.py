"""GUI tests run offscreen: the platform must be chosen before any QApplication exists."""

import os

import pytest

os.environ["QT_QPA_PLATFORM"] = "offscreen"


@pytest.fixture(autouse=True)
def debug_logs(caplog):
    """Every log call really formats its record (extra= fields included), so a bad one fails the test."""
    caplog.set_level("DEBUG")
