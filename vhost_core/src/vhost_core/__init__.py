"""vhost-core: a vhost-user storage target whose backends and device types are plugins.

Public entry points for plugin authors:

- :func:`get_include` - directory holding ``vhost_core/vhost_native.h``, the C contract
  a plugin's native part compiles against.
- :data:`CORE_API_VERSION` - the plugin API generation; a plugin declares the versions
  it supports (``VHOST_CORE_API = (2,)`` in its plugin module) and the core refuses
  others with one clear log line.
- :mod:`vhost_core.hookspecs` - every hook a plugin may implement.
"""

from __future__ import annotations

import os

__version__ = "0.1.0"

#: Generation of the Python plugin API (hookspecs, bdev and device contracts).  2: hooks
#: register bdev modules, device types and commands, and receive registries, not the App.
#: (The native ABI is ``vhost_core.native.NATIVE_ABI_VERSION``, read from the compiled core.)
CORE_API_VERSION = 2


def get_include() -> str:
    """Directory to add to a plugin's C include path (``#include "vhost_core/vhost_native.h"``)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "include")
