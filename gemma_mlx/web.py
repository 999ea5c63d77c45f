"""The persona as a web page: chat with an exported GGUF model entirely in the browser.

`write_web_page` makes a folder that holds the page (gemma_mlx/webpage/), the runtime (llama.cpp
compiled to WebAssembly by wllama, vendored from npm by scripts/vendor_wllama.sh), the model as
`model.gguf` and the persona's decoding defaults as `settings.json`. Nothing else runs behind it:
any static file server will do, and `serve` is one that sends the two headers multi-threaded
WebAssembly needs (Cross-Origin-Opener-Policy and -Embedder-Policy make SharedArrayBuffer
available; without them the page still works, on one thread).

Safety: `serve` binds to 127.0.0.1 unless told otherwise, answers only to this machine's names
when bound there (DNS rebinding), serves files under the folder only and lists no directories.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable

from .arena import allowed_hosts_for, host_name, listens_on_network
from .chat_format import END_OF_TURN
from .config import RULES, GenerationSettings
from .errors import ConfigError, GemmaMlxError, OutputExistsError, ServeError
from .manifest import Progress, atomic_output_dir
from .text import LOOP_COVERAGE, LOOP_NGRAM, LOOP_REPEATS

PAGE_DIR = Path(__file__).resolve().parent / "webpage"
MODEL_FILE, SETTINGS_FILE = "model.gguf", "settings.json"
# The browser runtime (llama.cpp in WebAssembly, 29 MB) is not kept in git: scripts/vendor_wllama.sh
# fetches it from npm at its pinned version into this folder (CI runs it; so must a checkout once).
RUNTIME_FILES = ("vendor/wllama/wllama.js", "vendor/wllama/wllama.wasm",
                 "vendor/wllama/compat/wllama.js", "vendor/wllama/compat/wllama.wasm")


def check_runtime() -> None:
    """The vendored browser runtime is there, or one paragraph saying how to fetch it (before any work)."""
    missing = [name for name in RUNTIME_FILES if not (PAGE_DIR / name).is_file()]
    if missing:
        raise GemmaMlxError(
            f"The web page's runtime (llama.cpp in WebAssembly, npm @wllama/wllama) is not installed: "
            f"{PAGE_DIR / missing[0]} is missing. Fetch it once with `bash scripts/vendor_wllama.sh` (needs npm "
            "and the npm registry; afterwards the page works offline), then export again."
        )
GGUF_MAGIC = b"GGUF"

# settings.json key -> the config rule that checks it (llama.cpp's name for the repetition penalty)
SETTING_RULES = {
    "temperature": "generation.temperature",
    "top_p": "generation.top_p",
    "repeat_penalty": "generation.repetition_penalty",
    "max_tokens": "generation.max_tokens",
}

MIME_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".wasm": "application/wasm",  # WebAssembly.instantiateStreaming refuses any other type
    ".gguf": "application/octet-stream",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    "": "application/octet-stream",
}

# Sent with every file. COOP + COEP make the page cross-origin isolated, which is what unlocks
# SharedArrayBuffer and so wllama's multi-threaded build.
ISOLATION_HEADERS = {
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Embedder-Policy": "require-corp",
    "Cross-Origin-Resource-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",  # revalidate, so a re-exported model is never an old cached one
}


def page_settings(name: str, generation: GenerationSettings, system: str | None = None) -> dict:
    """settings.json for a persona from its run's generation settings."""
    settings = {
        "name": name,
        "temperature": generation.temperature,
        "top_p": generation.top_p,
        "repeat_penalty": generation.repetition_penalty,
        "max_tokens": generation.max_tokens,
        "stop": [END_OF_TURN],
    }
    if system:
        settings["system"] = system
    return settings


def check_page_settings(settings: dict) -> dict:
    """The settings with defaults filled in and the loop rule added; one ConfigError naming every bad key."""
    defaults = GenerationSettings()
    full = {
        "temperature": defaults.temperature, "top_p": defaults.top_p,
        "repeat_penalty": defaults.repetition_penalty, "max_tokens": defaults.max_tokens,
        "stop": [END_OF_TURN], **settings,
        # the page flags loops with compare's rule (gemma_mlx/text.py), so a "loop" badge means the same thing
        "loop": {"ngram": LOOP_NGRAM, "repeats": LOOP_REPEATS, "coverage": LOOP_COVERAGE},
    }
    problems = []
    if not isinstance(full.get("name"), str) or not full.get("name", "").strip():
        problems.append("name must be the persona's name (a non-empty string)")
    for key, rule in SETTING_RULES.items():
        value, (test, what) = full[key], RULES[rule]
        integer = key == "max_tokens"
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not test(value):
            problems.append(f"{key} is {value!r}; it must be {'a whole number, ' if integer else ''}{what}")
    stop = full["stop"]
    if not isinstance(stop, list) or not stop or not all(isinstance(s, str) and s for s in stop):
        problems.append(f"stop is {stop!r}; it must be a list of strings such as [{END_OF_TURN!r}]")
    if full.get("system") is not None and not isinstance(full["system"], str):
        problems.append("system must be a string (the system prompt) or left out")
    unknown = sorted(set(full) - {"name", "system", "stop", "loop", *SETTING_RULES})
    if unknown:
        problems.append(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}")
    if problems:
        raise ConfigError("The web page's settings cannot work: " + "; ".join(problems) + ".")
    return full


def _check_gguf(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as error:
        raise GemmaMlxError(f"Cannot read the model file {path}: {error.strerror or error}. "
                            "Give the .gguf file that `gemma-mlx export --gguf` wrote.") from None
    if magic != GGUF_MAGIC:
        raise GemmaMlxError(f"{path} is not a GGUF file (it does not start with 'GGUF'). The web page runs "
                            "llama.cpp, which reads GGUF only; export the model with `gemma-mlx export --gguf` first.")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link costs no space (a 270M model is 0.5 GB in f16); other file systems get a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def fill_page(directory: Path, gguf_file: Path, settings: dict) -> None:
    """Put the page, its runtime, the model (linked) and settings.json into `directory` (a temp dir
    that the caller renames into place); bad settings, a missing runtime or a non-GGUF file fail first."""
    full = check_page_settings(settings)
    check_runtime()
    _check_gguf(Path(gguf_file))
    shutil.copytree(PAGE_DIR, directory, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", ".*"))
    _link_or_copy(Path(gguf_file), Path(directory) / MODEL_FILE)
    (Path(directory) / SETTINGS_FILE).write_text(json.dumps(full, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_web_page(gguf_file: Path, out_dir: Path, settings: dict) -> Path:
    """Write the chat page for `gguf_file` into `out_dir` (new or empty) and return it.

    Everything is written into a temp dir next to `out_dir` and renamed into place at the end, so a
    failed or interrupted export leaves no half-written page behind.
    """
    out_dir = Path(out_dir)
    check_page_settings(settings)
    check_runtime()
    _check_gguf(Path(gguf_file))
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise OutputExistsError(
            f"{out_dir} already exists and is not an empty directory, so the web page would mix with what is "
            "there. Choose a new directory for the page, or remove that one first."
        )
    with atomic_output_dir(out_dir, force=True) as tmp:
        fill_page(tmp, gguf_file, settings)
    return out_dir


# ------------------------------------------------------------------------------- the file server


class _PageHandler(SimpleHTTPRequestHandler):
    """Static files from one folder, with the isolation headers and WebAssembly's MIME type."""

    extensions_map = MIME_TYPES
    allowed_hosts: set[str] | None = None  # set per server by _handler_for

    def end_headers(self) -> None:
        for header, value in ISOLATION_HEADERS.items():
            self.send_header(header, value)
        super().end_headers()

    def send_head(self):
        if self.allowed_hosts is not None and host_name(self.headers.get("Host", "")) not in self.allowed_hosts:
            self.send_error(403, "This page answers only to this machine's own names (127.0.0.1, localhost)")
            return None
        if not self._inside_folder(self.translate_path(self.path)):
            self.send_error(404, "File not found")
            return None
        return super().send_head()

    def _inside_folder(self, path: str) -> bool:
        # translate_path already drops '..' parts; resolving also stops links that lead out of the folder
        root = Path(self.directory).resolve()
        if "\0" in path:  # a NUL byte (%00) names no file, and the OS calls would raise on it
            return False
        resolved = Path(path).resolve()
        return resolved == root or root in resolved.parents

    def list_directory(self, path):
        self.send_error(404, "No directory listings")
        return None

    def log_message(self, format: str, *args) -> None:
        pass  # one line per file would bury the URL; errors reach the page's console instead


class _PageServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):
            return  # the browser stopped a download (page closed, reload): nothing to report
        super().handle_error(request, client_address)


def _check_page_dir(directory: Path) -> Path:
    directory = Path(directory)
    if not directory.is_dir():
        raise GemmaMlxError(f"{directory} {'is a file' if directory.exists() else 'does not exist'}; give the folder "
                            "that `gemma-mlx export --web` wrote.")
    missing = [name for name in ("index.html", MODEL_FILE, SETTINGS_FILE) if not (directory / name).is_file()]
    if missing:
        raise GemmaMlxError(
            f"{directory} is not a web page written by `gemma-mlx export --web` (it has no {', '.join(missing)}). "
            "Give the folder that export wrote, or export the model with --web first."
        )
    return directory.resolve()


def make_server(directory: Path, host: str = "127.0.0.1", port: int = 8000) -> ThreadingHTTPServer:
    """A server for the page folder, bound to (host, port) but not yet serving; port 0 picks a free one."""
    import socket

    root = _check_page_dir(directory)
    handler = type("PageHandler", (_PageHandler,), {"allowed_hosts": allowed_hosts_for(host)})
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("PageServer", (_PageServer,), {"address_family": family})
    try:
        return server_class((host, port), functools.partial(handler, directory=str(root)))
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise ServeError(
                f"Cannot serve the web page on {host}:{port}: the port is in use, by another program or another "
                f"`gemma-mlx web`. Pass --port with a free one, e.g. --port {port + 1}, or stop the other server."
            ) from None
        raise ServeError(
            f"Cannot serve the web page on {host}:{port}: {error.strerror or error}. Use an address of this "
            "machine, such as 127.0.0.1 (the default), and a port above 1023."
        ) from None


def url_of(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"


def serve(directory: Path, host: str = "127.0.0.1", port: int = 8000, open_browser: bool = False,
          progress: Progress = print) -> None:
    """Serve the page folder until Ctrl-C, printing its URL."""
    server = make_server(directory, host, port)
    url = url_of(server)
    if listens_on_network(host):
        progress(f"warning: the page listens on {host}: anyone who can reach this machine on port {port} can "
                 "download the model. Use it only on a network you trust.")
    progress(f"web: serving {Path(directory)} at {url} (Ctrl-C stops)")
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def serve_in_thread(directory: Path, port: int = 0, host: str = "127.0.0.1") -> tuple[str, Callable[[], None]]:
    """Serve the page folder from a background thread: (url, shutdown). For tests and scripts."""
    server = make_server(directory, host, port)
    thread = threading.Thread(target=server.serve_forever, name="gemma-mlx-web", daemon=True)
    thread.start()

    def shutdown() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)

    return url_of(server), shutdown

