"""Build helper for plugins' native parts (used at build time, from a plugin's setup.py).

A plugin with C code keeps a header (its API, which is also its cffi cdef) and C
sources next to a small ``_build.py``::

    from vhost_core.native_build import plugin_ffibuilder

    ffibuilder = plugin_ffibuilder("vhost_bdev_foo._foo_native", __file__, "foo.h", ["foo.c"])

and ``setup(cffi_modules=["src/vhost_bdev_foo/_build.py:ffibuilder"])``.  The
sources compile against ``vhost_core/vhost_native.h`` (the data-path contract);
nothing links against the core.

This file imports nothing from vhost_core and finds the header next to itself
(``include/``), so a plugin's source tree can carry it with the header and build
without vhost-core installed: the in-tree plugins do (``vhost_core_build/``, see
docs/packaging.md).

``VHOST_SANITIZE=1`` in the build's environment compiles with AddressSanitizer and
UndefinedBehaviorSanitizer (see docs/testing.md: such a module only loads with the
ASan runtime preloaded).
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence

from cffi import FFI

#: The directory holding ``vhost_core/vhost_native.h`` (what ``vhost_core.get_include()`` returns).
INCLUDE_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
COMPILE_ARGS = ["-O2", "-std=gnu11", "-Wall", "-fno-strict-aliasing"]
# UBSan must abort on its first report: one that logs and carries on would pass
# every test.  The same flags as vhost_core/_native/build.py's (which cannot
# import this module: it runs before vhost_core is installed).
SANITIZE_COMPILE_ARGS = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all",
                         "-fno-omit-frame-pointer", "-g"]
SANITIZE_LINK_ARGS = ["-fsanitize=address,undefined"]


def sanitize_args() -> tuple[list[str], list[str]]:
    """(compile args, link args) that VHOST_SANITIZE asks for; empty without it."""
    if os.environ.get("VHOST_SANITIZE", "0") in ("", "0"):
        return [], []
    return list(SANITIZE_COMPILE_ARGS), list(SANITIZE_LINK_ARGS)


def cdef_from_header(text: str) -> str:
    """A header as cffi reads it: preprocessor lines and comment-only lines dropped."""
    return "\n".join(line for line in text.splitlines()
                     if not line.startswith("#") and not line.startswith("/*"))


def plugin_ffibuilder(module: str, build_file: str, header: str, sources: Sequence[str],
                      **extra) -> FFI:
    """An API-mode FFI for ``module`` from ``header`` (cdef + include) and ``sources``.

    ``build_file`` is the caller's ``__file__``: header and sources are found next to
    it.  ``extra`` goes to ``set_source`` (e.g. ``extra_link_args=["-pthread"]``).
    """
    here = pathlib.Path(build_file).resolve().parent
    san_compile, san_link = sanitize_args()
    extra["extra_link_args"] = list(extra.get("extra_link_args", [])) + san_link
    ffi = FFI()
    ffi.cdef(cdef_from_header((here / header).read_text()))
    ffi.set_source(
        module,
        f'#include "vhost_core/vhost_native.h"\n#include "{header}"\n',
        # setuptools wants paths relative to setup.py's directory (the build's cwd)
        sources=[os.path.relpath(here / s) for s in sources],
        include_dirs=[INCLUDE_DIR, str(here)],
        extra_compile_args=list(COMPILE_ARGS) + san_compile,
        **extra,
    )
    return ffi
