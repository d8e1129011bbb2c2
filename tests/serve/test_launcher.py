"""The environment of the Triton server PyTriton starts: this interpreter's libpython first on the loader
path, and a clear refusal (with the remedy) on a Python without a shared libpython."""

from __future__ import annotations

import os
import sysconfig

import pytest

from serve import launcher


def test_the_interpreters_libpython_goes_first_on_the_loader_path(monkeypatch) -> None:
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        pytest.skip("this Python has no shared libpython (the refusal is tested below)")
    monkeypatch.setenv("LD_LIBRARY_PATH", "/opt/other:/usr/lib")
    launcher.triton_environment()
    first = os.environ["LD_LIBRARY_PATH"].split(os.pathsep)
    assert first[0] == sysconfig.get_config_var("LIBDIR") and first[1:] == ["/opt/other", "/usr/lib"]
    launcher.triton_environment()                                        # idempotent: not added twice
    assert os.environ["LD_LIBRARY_PATH"].split(os.pathsep).count(first[0]) == 1


def test_a_python_without_a_shared_libpython_is_refused_with_the_remedy(monkeypatch) -> None:
    real = sysconfig.get_config_var
    monkeypatch.setattr(launcher.sysconfig, "get_config_var",
                        lambda name: 0 if name == "Py_ENABLE_SHARED" else "libpython3.a" if name in
                        ("LDLIBRARY", "INSTSONAME") else real(name))
    with pytest.raises(ImportError, match="--enable-shared.*--no-triton"):
        launcher.triton_environment()
