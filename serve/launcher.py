"""What the Triton server PyTriton starts needs from this process's environment.

PyTriton's Python-backend stub loads the shared libpython of the interpreter running the server. On a
Python whose `libpython3.X.so` is not on the loader path (pyenv builds, for one), the stub picks up the
system's libpython of another patch level and fails at start (`'_thread.RLock' object has no attribute
'_recursion_count'`) or finds none. So the interpreter's LIBDIR goes first on LD_LIBRARY_PATH (inherited by
the server and its stubs), and an interpreter without a shared libpython is refused with what to do.
"""

from __future__ import annotations

import os
import sys
import sysconfig
from pathlib import Path


def shared_libpython() -> Path:
    """The interpreter's shared libpython; ImportError naming the remedy when it has none."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("INSTSONAME") or \
        sysconfig.get_config_var("LDLIBRARY")
    path = Path(libdir or "") / (name or "")
    if not sysconfig.get_config_var("Py_ENABLE_SHARED") or not name or ".so" not in name or not path.is_file():
        raise ImportError(f"Triton's Python backend needs a shared libpython, and this Python ({sys.executable})"
                          f" has none ({path} not found); use a Python built with --enable-shared (pyenv: "
                          "PYTHON_CONFIGURE_OPTS=--enable-shared pyenv install ...), or start with --no-triton")
    return path


def triton_environment() -> None:
    """Put the interpreter's libpython directory first on LD_LIBRARY_PATH (for the server PyTriton starts)."""
    libdir = str(shared_libpython().parent)
    paths = [p for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
    os.environ["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *paths])
