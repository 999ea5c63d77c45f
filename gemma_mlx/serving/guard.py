"""The arena's front door: which requests are answered at all, and the headers every page gets.

A local server is reachable by any web page the person has open: another site's script can send
it requests (the browser only stops it reading the answers), and a name the attacker controls can
be pointed at 127.0.0.1 (DNS rebinding). So the Host header must be one of this machine's names,
and requests from other pages (their Origin, or Sec-Fetch-Site) are refused before any reply starts.
"""

from __future__ import annotations

from collections.abc import Iterable
from urllib.parse import urlsplit

from ..errors import GemmaMlxError

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
PAGE_POLICY = "default-src 'self'; img-src 'self' data:"  # our own script and styles only: no inline code


class Guard:
    """Before any route: refuse foreign Host headers (DNS rebinding) and requests from other web pages,
    then add the page's security headers. Plain ASGI, so streamed replies pass through untouched."""

    def __init__(self, app, allowed_hosts: set[str] | None):
        self.app = app
        self.allowed_hosts = allowed_hosts

    async def __call__(self, scope, receive, send) -> None:
        from starlette.datastructures import Headers, MutableHeaders
        from starlette.responses import PlainTextResponse

        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = refusal_for(scope["path"], Headers(scope=scope), self.allowed_hosts)
        if refusal is not None:
            await PlainTextResponse(f"Forbidden: {refusal}", status_code=403)(scope, receive, send)
            return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("Content-Security-Policy", PAGE_POLICY)
                headers["X-Content-Type-Options"] = "nosniff"
            await send(message)

        await self.app(scope, receive, send_with_headers)


def refusal_for(path: str, headers, allowed_hosts: set[str] | None) -> str | None:
    """Why a request is refused (None: it is not).

    - A Host header that is not one of this machine's names: a foreign name pointed at this machine
      (DNS rebinding). allowed_hosts None (tests only) skips this one check.
    - An Origin other than this page's own: another web site's script, which the browser lets send
      (but not read) requests here.
    - Sec-Fetch-Site cross-site or same-site on the API: another page's <img>, <script> or link, which
      carries no Origin; without this a GET of /api/stream from any web site would start a reply.
    """
    host = headers.get("host", "")
    if allowed_hosts is not None and host_name(host).lower() not in allowed_hosts:
        return ("this arena answers only to its own host names. Open it as http://127.0.0.1:PORT/ (or this machine's "
                "name), or start it with --allow-host NAME for the name you use.")
    origin = headers.get("origin")
    if origin is not None and not _same_origin(origin, host):
        return "requests from other web pages are refused."
    if path.startswith("/api/") and headers.get("sec-fetch-site") in ("cross-site", "same-site"):
        return "requests from other web pages are refused."
    return None


def _same_origin(origin: str, host: str) -> bool:
    """The Origin header names the page this request's Host serves ("null" and other sites do not)."""
    parts = urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and parts.netloc.lower() == host.lower()


def host_name(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8765" -> "[::1]", "localhost:8765" -> "localhost")."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


def allowed_hosts_for(host: str, extra: Iterable[str] = ()) -> set[str]:
    """Host names the server answers to: the loopback names, the address it listens on and `extra`
    (--allow-host); listening beyond loopback (0.0.0.0, ::, a LAN address) adds this machine's own
    names and addresses, the ones another computer on the network would type. Never "any name":
    that would let any web site reach the server through a name it points at this machine."""
    names = LOCAL_HOSTS | {_as_host(host)} | {_as_host(name) for name in extra}
    if listens_on_network(host):
        names |= machine_hosts()
    return names - {"0.0.0.0", "[::]"}


def listens_on_network(host: str) -> bool:
    """Whether a server on `host` is reachable from other machines (it then warns, and knows more names)."""
    return host not in ("127.0.0.1", "localhost", "::1", "[::1]")


def machine_hosts() -> set[str]:
    """This machine's names and the addresses of its interfaces that the standard library can find on
    every OS: its host name, fully qualified name and .local (mDNS) name, what they resolve to, and
    the addresses of the routes to the internet (IPv4 and IPv6; no packet is sent)."""
    import socket

    names = {socket.gethostname(), socket.getfqdn()}
    names |= {name.split(".")[0] + ".local" for name in list(names) if name and not name.startswith("localhost")}
    addresses: set[str] = set()
    for name in names:
        try:
            addresses |= {str(info[4][0]) for info in socket.getaddrinfo(name, None)}
        except (OSError, UnicodeError):
            continue
    for family, target in ((socket.AF_INET, "192.0.2.1"), (socket.AF_INET6, "2001:db8::1")):  # documentation nets
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as probe:
                probe.connect((target, 9))  # UDP: picks the route, sends nothing
                addresses.add(probe.getsockname()[0])
        except OSError:
            continue
    return {_as_host(name) for name in names | addresses if name}


def _as_host(name: str) -> str:
    """A name or address as a Host header carries it: lower case, an IPv6 address in brackets, no zone."""
    name = name.strip().lower()
    if ":" in name and not name.startswith("["):
        return f"[{name.split('%')[0]}]"
    return name


def check_port_free(host: str, port: int) -> None:
    """A port another program holds is one paragraph, with the way out."""
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        raise GemmaMlxError(f"Cannot listen on {host}:{port}: {error.strerror or error}. Another program (or another "
                            f"arena) may be using the port; pass --port with a free one, e.g. --port {port % 65535 + 1}.") from None
