"""The form of a ``module:function`` reference in the specs (``metrics:``, ``data.preprocess``), checked without
importing anything; extensions.py resolves them when a run is built from the user's own specs."""
from __future__ import annotations

import re
from typing import Any

from ..errors import ConfigError

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
REFERENCE = re.compile(rf"^(?P<module>{_NAME}(?:\.{_NAME})*|.+\.py):(?P<attr>{_NAME}(?:\.{_NAME})*)$")
FORM_HINT = "write it as 'module:function' (an importable module) or 'path/to/file.py:function'"


def check_reference(value: Any, field_name: str) -> str:
    """The form of one reference, checked without importing anything (specs validation)."""
    if not isinstance(value, str) or not REFERENCE.match(value.strip()):
        raise ConfigError(f"{field_name} must name a Python callable as 'module:function', got {value!r}",
                          field=field_name, suggestions=[FORM_HINT, "e.g. my_metrics:macro_f1"])
    return value.strip()
