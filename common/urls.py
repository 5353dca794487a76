"""URLs that may carry a password (Redis), shown in logs, errors, reports and config files redacted,
and whether a URL names this machine only (a loopback address or a unix socket)."""
from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

#: what a redacted password reads as
MASK = "***"
#: query parameters that carry a secret (redis-py accepts `?password=…`)
_SECRET_PARAMS = ("password", "passwd", "pass", "token", "secret", "key")


def _secret_param(name: str) -> bool:
    name = name.lower()
    return any(word in name for word in _SECRET_PARAMS) and not name.startswith("ssl_")


def redact(url: str) -> str:
    """The URL with its password (and any `?password=`/`?token=` value) replaced by `***`."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    query = parts.query
    if query and any(_secret_param(k) for k, _ in parse_qsl(query, keep_blank_values=True)):
        query = urlencode([(k, MASK if _secret_param(k) else v) for k, v in parse_qsl(query, keep_blank_values=True)],
                          safe="*/")
    netloc = parts.netloc
    if password is not None:
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        netloc = f"{user}:{MASK}@{host}{port}"
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_arg(arg: str) -> str:
    """A command-line argument with any URL's password redacted: `redis://…` or `key=redis://…`."""
    key, sep, value = arg.partition("=")
    if sep and "://" in value and "://" not in key:
        return key + sep + redact(value)
    return redact(arg) if "://" in arg else arg


def is_redacted(url: str) -> bool:
    """True when `url` is the output of `redact` for a URL that had a secret (it cannot connect)."""
    try:
        return urlsplit(url).password == MASK or f"={MASK}" in urlsplit(url).query
    except ValueError:
        return False


def redact_tree(value: Any) -> Any:
    """A copy of a JSON-like tree (a config's `to_dict()`) with every URL string redacted."""
    if isinstance(value, dict):
        return {k: redact_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_tree(v) for v in value]
    if isinstance(value, str) and "://" in value:
        return redact(value)
    return value


def is_loopback_url(url: str) -> bool:
    """True when the URL can only be reached from this machine: a unix socket, `localhost`, an address
    in 127.0.0.0/8 or ::1, or a host name that resolves only to such addresses (Debian maps the
    machine's own name to 127.0.1.1). A name that does not resolve here is not called loopback."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if parts.scheme == "unix":
        return True
    host = parts.hostname
    if not host:
        return parts.scheme in ("redis", "rediss")  # redis:// with no host: redis-py connects to localhost
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (OSError, UnicodeError):
        return False
    addresses = {info[4][0] for info in infos}
    return bool(addresses) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses)
