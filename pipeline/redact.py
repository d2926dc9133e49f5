"""Secrets never leave the process: credentials given in ``storage_options`` are kept
out of every output (``config.yaml``, ``run_config.json``, manifests, logs) and every
error message.

Two rules, both applied:
- by key name: inside a ``storage_options`` mapping (at any depth, e.g. s3fs's
  ``client_kwargs``), a key whose name says credential (``key``, ``secret``, ``token``,
  ``password``, ``aws_secret_access_key``, ``account_key``, ``sas_token``, ...) has its
  value replaced by ``***``;
- by value: the values of those credentials (`remember`) are replaced by ``***`` in any
  text (`redact`), e.g. a log line or an error a storage client wrote; `RedactingFilter`
  does it for log records.

Where credentials should come from instead: the environment or the platform (for S3:
``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or ``AWS_PROFILE``, an instance or pod
role), which fsspec's drivers read themselves; see the README.
"""

from __future__ import annotations

import logging
import re
from typing import Any

MASK = "***"
_SECRET_NAME = re.compile(
    r"(^key$|secret|token|passw|credential|private|signature|account_key|sas|"
    r"access_key|auth|cookie|session)",
    re.IGNORECASE,
)
_known: set[str] = set()


def is_secret_key(name: str) -> bool:
    return bool(_SECRET_NAME.search(name))


def _secrets_in(options: Any) -> list[str]:
    out: list[str] = []
    if isinstance(options, dict):
        for k, v in options.items():
            if isinstance(v, str) and is_secret_key(str(k)):
                out.append(v)
            elif isinstance(v, dict | list):
                out.extend(_secrets_in(v))
    elif isinstance(options, list):
        for v in options:
            out.extend(_secrets_in(v))
    return out


def _mask_options(options: Any) -> Any:
    if isinstance(options, dict):
        return {
            k: (MASK if is_secret_key(str(k)) and v not in (None, "") else _mask_options(v))
            for k, v in options.items()
        }
    if isinstance(options, list):
        return [_mask_options(v) for v in options]
    return options


def remember(data: Any) -> None:
    """Collect the credential values of every ``storage_options`` mapping in ``data`` (a
    config dump) so that `redact` masks them in any text from now on."""
    if isinstance(data, dict):
        for k, v in data.items():
            if k == "storage_options":
                # short values (e.g. "1") would mask unrelated text; real credentials are long
                _known.update(s for s in _secrets_in(v) if len(s) >= 6)
            else:
                remember(v)
    elif isinstance(data, list):
        for v in data:
            remember(v)


def public(data: Any) -> Any:
    """A copy of a config dump safe to write next to the targets: every
    ``storage_options`` mapping masked by key name, and any remembered credential value
    masked wherever it appears."""
    remember(data)
    if isinstance(data, dict):
        return {
            k: _mask_options(v) if k == "storage_options" else public(v) for k, v in data.items()
        }
    if isinstance(data, list):
        return [public(v) for v in data]
    if isinstance(data, str):
        return redact(data)
    return data


def redact(text: str) -> str:
    """``text`` with every remembered credential value replaced by ``***``."""
    for s in sorted(_known, key=len, reverse=True):
        if s in text:
            text = text.replace(s, MASK)
    return text


class RedactingFilter(logging.Filter):
    """Masks remembered credentials in a log record's message and traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _known:
            msg = record.getMessage()
            clean = redact(msg)
            if clean != msg:
                record.msg, record.args = clean, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Add `RedactingFilter` to every handler of ``logger`` (default: the root logger),
    once; call after the handlers exist (e.g. after ``logging.basicConfig``)."""
    target = logger or logging.getLogger()
    for h in target.handlers:
        if not any(isinstance(f, RedactingFilter) for f in h.filters):
            h.addFilter(RedactingFilter())
