"""Secret redaction (SPEC section 8): the one place that decides what is a secret and masks it.

Tags, params, run names, log lines and ``doctor`` output all pass through :func:`redact`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import re
import sys
import threading
import warnings

from trainkit_tracking.errors import TrackingWarning

MASK = "***"
# The package's root directory: warn() attributes a warning to the first frame outside it.
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_log = logging.getLogger("trainkit_tracking")

# A key is secret when one of its words is one of these ...
_SECRET_WORDS = frozenset(
    {"token", "secret", "password", "passwd", "apikey", "credential", "credentials", "sas"}
)
# ... or when it contains one of these word sequences (compared with and without '_') ...
_SECRET_PHRASES = ("api_key", "access_key", "private_key")
# ... unless its last word says it is metadata about a secret, not the secret itself
# (pad_token_id, max_new_tokens' cousins, tokenizer_name: every HF config has them).
_SAFE_LAST_WORDS = frozenset({"id", "ids", "size", "len", "length", "count", "type", "name"})

# Separators of SPEC section 8 (_ . - /), plus whitespace and ':' which tag keys may hold.
_SEPARATORS = re.compile(r"[_.\-/:\s]+")
# camelCase and acronyms: "apiKey" -> api Key, "HFToken" -> HF Token, "token2" -> token 2.
_CAMEL_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")

# Azure SAS query parameters: their values are masked wherever they appear in a query string.
_SAS_PARAMS = frozenset(
    {
        "sig", "sv", "se", "st", "sp", "spr", "srt", "ss", "sr", "si", "sip", "sdd",
        "skoid", "sktid", "skt", "ske", "sks", "skv", "saoid", "suoid", "scid",
        "rscc", "rscd", "rsce", "rscl", "rsct",
    }
)  # fmt: skip
# Secret fields of connection strings whose names the word rule does not catch.
_SECRET_PARAMS = frozenset({"accountkey", "pwd", "sharedaccesssignature", "sharedaccesskey"})
# Header-like names whose whole value (to the end of the line) is a credential.
_AUTH_HEADERS = frozenset({"authorization", "proxy-authorization"})

_URL_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)[^/\s?#@]*(?:@[^/\s?#@]*)*@")
_BEARER = re.compile(r"\b(?P<word>bearer)[ \t]+[^\s\"',;]+", re.IGNORECASE)
# HTTP basic credentials: "Basic <base64 of user:password>" (checked by decoding).
_BASIC = re.compile(
    r"\b(?P<word>basic)[ \t]+(?P<b64>[A-Za-z0-9+/]{4,}={0,2})(?![\w+/=])", re.IGNORECASE
)
# A command-line flag with a secret name and its value as the next word: --password X.
_FLAG_VALUE = re.compile(
    r"(?<![\w\-])(?P<flag>--?(?P<name>[A-Za-z][\w.\-]*))(?P<sep>[ \t]+)(?P<value>[^\s\-\"'][^\s\"']*|\"[^\"]*\"|'[^']*')"
)
_KEY_SEP = re.compile(
    r"(?<![\w.])(?P<q>[\"']?)(?P<name>[A-Za-z_][\w.\-]*)(?P=q)(?P<sep>[ \t]*[:=][ \t]*)"
)
_PLAIN_VALUE = re.compile(r"[^\s\"'&;,}#]+")
_LINE_VALUE = re.compile(r"[^\r\n\"']+")
# Credentials recognisable by their shape alone, whatever key they sit under.
# Credentials recognisable by their shape alone, whatever key they sit under; '_' counts
# as a separator (names join parts with it: local_hf_xxx_hpo...).
_KNOWN_TOKENS = re.compile(
    r"(?<![A-Za-z0-9])(?:"
    r"hf_[A-Za-z0-9]{30,}"
    r"|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{40,}"
    r"|(?:AKIA|ASIA)[0-9A-Z]{16}"
    r"|sk-[A-Za-z0-9_\-]{32,}"
    r")(?![A-Za-z0-9])"
    r"|\beyJ[A-Za-z0-9_\-]{8,}\.eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]*"
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----.*?(?:-----END [A-Z ]*PRIVATE KEY-----|\Z)",
    re.DOTALL,
)


def _words(key: str) -> list[str]:
    return [word.lower() for part in _SEPARATORS.split(key) for word in _CAMEL_WORDS.findall(part)]


def is_secret_key(key: str) -> bool:
    """Return whether values under ``key`` are secrets (SPEC section 8).

    Secret when a word of the key (split at ``_ . - /`` and camelCase) is ``token``,
    ``secret``, ``password``, ``passwd``, ``apikey``, ``credential(s)`` or ``sas``, or the
    key contains ``api_key``, ``access_key`` or ``private_key`` (any case, any
    separator, camelCase), unless its last word is ``id``, ``ids``, ``size``, ``len``,
    ``length``, ``count``, ``type`` or ``name``.
    """
    words = _words(key)
    if not words or words[-1] in _SAFE_LAST_WORDS:
        return False
    if any(word in _SECRET_WORDS for word in words):
        return True
    joined = "_".join(words)
    compact = "".join(words)
    return any(phrase in joined or phrase.replace("_", "") in compact for phrase in _SECRET_PHRASES)


def _is_secret_param(name: str, text: str, start: int) -> bool:
    lowered = name.lower()
    if lowered in _SAS_PARAMS:
        # Short SAS names (se, sp, st...) are common words elsewhere: only a query string
        # (after '?' or '&') or a bare SAS token (one that carries a signature) counts.
        if start == 0:
            return "sig=" in text
        return text[start - 1] in "?&"
    return lowered in _SECRET_PARAMS or is_secret_key(name)


def _mask_key_values(text: str) -> str:
    """Mask the value of every ``name=value`` / ``name: value`` pair with a secret name."""
    spans: list[tuple[int, int]] = []
    last_end = 0
    for match in _KEY_SEP.finditer(text):
        if match.start() < last_end:
            continue  # inside a value masked already
        name = match["name"]
        header = name.lower() in _AUTH_HEADERS
        if not header and not _is_secret_param(name, text, match.start()):
            continue
        start = match.end()
        quote = text[start] if start < len(text) and text[start] in "\"'" else ""
        if quote:
            start += 1
            close = text.find(quote, start)
            end = len(text) if close < 0 else close
        else:
            found = (_LINE_VALUE if header else _PLAIN_VALUE).match(text, start)
            end = start if found is None else found.end()
        if end > start and text[start:end] != MASK:
            spans.append((start, end))
            last_end = end
    if not spans:
        return text
    parts: list[str] = []
    position = 0
    for start, end in spans:
        parts.append(text[position:start])
        parts.append(MASK)
        position = end
    parts.append(text[position:])
    return "".join(parts)


def redact_value(value: str) -> str:
    """Mask credentials inside ``value``, whatever its key.

    ``https://user:pass@host`` -> ``https://***@host``; SAS query parameters
    (``sig=``, ``sv=``, ``se=``...) -> ``sig=***``; ``Bearer <token>`` -> ``Bearer ***``;
    ``Authorization: ...`` -> ``Authorization: ***``; ``password=...``, ``"hf_token": "..."``
    and other pairs with a secret name; well-known token shapes (``hf_...``, ``ghp_...``,
    JWTs, AWS access key ids, PEM private keys) -> ``***``.
    """
    text = _URL_USERINFO.sub(lambda m: m["scheme"] + MASK + "@", value)
    text = _BEARER.sub(lambda m: m["word"] + " " + MASK, text)
    text = _BASIC.sub(_mask_basic, text)
    text = _FLAG_VALUE.sub(_mask_flag, text)
    text = _KNOWN_TOKENS.sub(MASK, text)
    return _mask_key_values(text)


def _mask_basic(match: re.Match[str]) -> str:
    try:
        decoded = base64.b64decode(match["b64"], validate=True)
    except (binascii.Error, ValueError):
        return match[0]
    return f"{match['word']} {MASK}" if b":" in decoded else match[0]


def _mask_flag(match: re.Match[str]) -> str:
    if not is_secret_key(match["name"]) or match["value"] == MASK:
        return match[0]
    return f"{match['flag']}{match['sep']}{MASK}"


def redact(key: str, value: str) -> str:
    """Return ``'***'`` when ``key`` is secret, else ``value`` with credentials masked."""
    if is_secret_key(key):
        return MASK
    return redact_value(value)


class RedactingFilter(logging.Filter):
    """Masks credentials in a record's message and traceback before any handler sees it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_value(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info:
            formatted = logging.Formatter().formatException(record.exc_info)
            record.exc_text, record.exc_info = redact_value(formatted), None
        elif record.exc_text:
            record.exc_text = redact_value(record.exc_text)
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` with credential masking on every record it emits.

    A logger's filters see only its own records, so each module of the package takes its
    logger from here.
    """
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger


def warn(message: str) -> None:
    """A TrackingWarning (credentials masked) attributed to the first caller outside the package.

    In the worker's threads a warnings filter set to "error" must not lose data: the
    warning then becomes a log record.
    """
    message = redact_value(message)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    if frame is not None and frame.f_code.co_filename != threading.__file__:
        warnings.warn(message, TrackingWarning, stacklevel=level)
        return
    try:  # no caller outside the package: one of the worker's threads
        warnings.warn(message, TrackingWarning, stacklevel=2)
    except Exception:  # a filter set to "error" in a thread nobody catches for
        _log.warning("%s", message)


def scrub_chain(exc: BaseException) -> BaseException:
    """Mask credentials in the text of ``exc`` and of every exception chained to it
    (``__cause__``, ``__context__``), in place, keeping their types; returns ``exc``.

    What the SDK raises to the user passes through here: a message it wrote is masked
    already, but an exception of MLflow's chained under it may quote a URI with its
    password, and ``traceback.format_exception()`` prints the whole chain.
    """
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        try:
            text = str(current)
        except Exception:  # an exception whose str() fails: leave its args alone
            text = ""
        masked = redact_value(text)
        if masked != text:
            current.args = (masked,)
            if isinstance(getattr(current, "message", None), str):
                current.message = masked  # type: ignore[attr-defined]  # MlflowException
        todo += [current.__cause__, current.__context__]
    return exc
