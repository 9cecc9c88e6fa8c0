"""Secrets out of text: credentials inside URIs are refused, and masked wherever text leaves a process.

Credentials come only from the AWS chain (env, profile, instance role). A URI such as
`s3://AKIA…:SECRET@bucket/p` or `http://user:pw@host:8333` would carry one into flow-run parameters,
state messages, log lines and block documents, so settings and sources refuse it
(`refuse_credentials_in_uri`); anything that slips through (a URI inside a library's error text) is
masked by `redact`, which every log record of the process passes through once
`install_log_redaction()` ran (infra/settings.py runs it on import).
"""
from __future__ import annotations

import logging
import os
import re
import threading

SECRET_ENV = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# scheme://user:password@ (the password may hold '/', as AWS secrets do) or scheme://token@
USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)(?:[^\s/@:]*:[^\s@]*|[^\s/@:]+)@")
MASKED_USERINFO = r"\1****@"


def redact(text: str) -> str:
    """`text` with URI userinfo and the values of SECRET_ENV replaced by '****'. O(len(text))."""
    text = USERINFO.sub(MASKED_USERINFO, text)
    for var in SECRET_ENV:
        secret = os.environ.get(var)
        if secret:
            text = text.replace(secret, "****")
    return text


def refuse_credentials_in_uri(uri: str | None, what: str) -> None:
    """Raise ValueError (secret masked) when `uri` carries userinfo (`scheme://user[:secret]@…`)."""
    if uri and USERINFO.match(uri.strip()):
        raise ValueError(f"{what} {redact(uri)!r} carries credentials in the URI: remove the 'user:…@' part "
                         f"and give credentials through the AWS chain (AWS_ACCESS_KEY_ID / "
                         f"AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role)")


_INSTALLED = False
_INSTALL_LOCK = threading.Lock()


def install_log_redaction() -> None:
    """Make every log record of this process carry a redacted message (all loggers and handlers,
    Prefect's API handler included). Idempotent. Cost: each emitted record is formatted once, early."""
    global _INSTALLED
    with _INSTALL_LOCK:
        if _INSTALLED:
            return
        inner = logging.getLogRecordFactory()

        def factory(*args, **kwargs) -> logging.LogRecord:
            record = inner(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record is logging's to report, not ours
                return record
            clean = redact(message)
            if clean != message:
                record.msg, record.args = clean, ()
            return record

        logging.setLogRecordFactory(factory)
        _INSTALLED = True
