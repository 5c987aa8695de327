"""The patterns of the names users choose: flow and vertex names, request ids.

A leaf module (it imports nothing of flowloom) so that the definitions, the service
and the HTTP input checks share one spelling of each rule.
"""

from __future__ import annotations

import re

__all__ = ["NAME", "REQUEST_ID"]

# a flow or vertex name: 1-128 letters, digits, '_', '.' or '-', not starting with '.' or '-'
NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
# a request id: 1-128 letters, digits, '_', '.', ':' or '-', starting with a letter or digit
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}")
