"""Bearer-token auth for the HTTP API (`--token-file`): every route but /health, constant-time compare."""

from __future__ import annotations

import hmac
from pathlib import Path

OPEN_PATHS = frozenset({"/health"})


def read_token(path: Path) -> str:
    """The token in `path` (surrounding whitespace dropped); refused when missing, empty or too short."""
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except OSError as err:
        raise ValueError(f"--token-file {path}: cannot read it ({err})") from err
    if len(token) < 16:
        raise ValueError(f"--token-file {path}: the token must have at least 16 characters "
                         f"(it has {len(token)})")
    return token


def authorized(header: str | None, token: str) -> bool:
    """`Authorization: Bearer <token>`, compared in constant time."""
    scheme, _, given = (header or "").partition(" ")
    return hmac.compare_digest(given.strip().encode(), token.encode()) and scheme.lower() == "bearer"
