"""Keeping secrets out of everything the study writes: records, configs, scripts, W&B runs.

Pure Python, no framework or W&B import: ``records.write_json_atomic`` scrubs every file it writes.
"""
from __future__ import annotations

import os
import re
from typing import Any

REDACTED = "***"
#: a mapping key whose string value is a secret (api_key, WANDB_API_KEY, auth_token, password)
_SECRET_NAME = re.compile(r"(?i)(?:^|[_.\-])(?:api[_-]?key|access[_-]?key|token|password|passwd|secret)(?:$|[_.\-])")
#: ``name=value`` / ``name: value`` inside a string (argv, an error message) naming a secret
_SECRET_ASSIGN = re.compile(
    r"(?i)((?:^|(?<=[^a-z0-9])|(?<=_))(?:api[_-]?key|access[_-]?key|token|password|passwd|secret)"
    r"(?![a-z0-9])[\w.\-]*\s*[=:]\s*)([^\s,;'\"&]+)")
#: environment variables whose values are always secrets, even when no mapping key names them
_SECRET_ENV = ("WANDB_API_KEY",)


def known_secrets() -> set[str]:
    """Secret values this process can see: W&B's key (environment or ~/.netrc) and any other
    environment variable named like a secret."""
    found = {os.environ.get(k, "") for k in _SECRET_ENV}
    found |= {v for k, v in os.environ.items() if _SECRET_NAME.search(k)}
    key = _netrc_key()
    if key:
        found.add(key)
    return {s for s in found if len(s) >= 8}  # a short value would redact ordinary words


def scrub_secrets(obj: Any, secrets: set[str] | None = None) -> Any:
    """A copy of ``obj`` (dicts, lists, strings) with every secret replaced by ``***``.

    Redacts: the string value of any key named like a secret (``api_key``, ``WANDB_API_KEY``,
    ``token``, ``password``, ``secret``); every occurrence of a known secret value (the W&B key,
    see :func:`known_secrets`, and the values just found under secret-named keys) in any string;
    and ``name=value`` assignments of secret-named settings inside strings (argv, error text).
    Numbers and other scalars pass unchanged. Pure Python, no W&B import: records can call it.
    """
    values = set(known_secrets() if secrets is None else secrets)
    _collect_named(obj, values)
    ordered = sorted((v for v in values if v), key=len, reverse=True)
    return _scrub(obj, ordered)


def _collect_named(obj: Any, into: set[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, str) and v and _SECRET_NAME.search(str(k)):
                into.add(v)
            else:
                _collect_named(v, into)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _collect_named(v, into)
    elif isinstance(obj, str):
        for m in _SECRET_ASSIGN.finditer(obj):
            into.add(m.group(2))


def _scrub(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, dict):
        return {k: (REDACTED if isinstance(v, str) and v and _SECRET_NAME.search(str(k)) else _scrub(v, secrets))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_scrub(v, secrets) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_scrub(v, secrets) for v in obj)
    if isinstance(obj, str):
        for s in secrets:
            obj = obj.replace(s, REDACTED)
        return _SECRET_ASSIGN.sub(lambda m: m.group(1) + REDACTED, obj)
    return obj


def _netrc_key() -> str | None:
    """The W&B key ``wandb login`` stored in ~/.netrc (or $NETRC) for the W&B host, if any."""
    try:
        import netrc
        from urllib.parse import urlparse

        host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
        auth = netrc.netrc(os.environ.get("NETRC") or None).authenticators(host)
        return auth[2] if auth else None
    except Exception:  # no netrc, unreadable or malformed: no key from there
        return None


