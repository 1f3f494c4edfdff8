"""Which Debian mirror to bootstrap from: the `--mirror` flag, then TMPLBUILD_MIRROR, then the recipe, then
the first Debian archive in the host's apt sources. No mirror host is written anywhere in the project."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from tmplbuild.errors import UsageError
from tmplbuild.recipe.validate import url_problem

# Suites whose entry names a Debian archive proper (not security, backports, or a third-party repository).
DEBIAN_SUITES = frozenset(
    "buster bullseye bookworm trixie forky duke sid oldoldstable oldstable stable testing unstable".split()
)
HOW_TO_SET = "set TMPLBUILD_MIRROR=URL, pass --mirror URL, or set bootstrap.mirror in the recipe"


def parse_one_line(text: str) -> Iterable[tuple[str, list[str]]]:
    """(uri, suites) of each `deb` line of a one-line-style sources.list."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line.startswith("deb "):
            continue
        # Drop the optional [ option=value ... ] block.
        line = re.sub(r"\[[^\]]*\]", " ", line[4:]).split()
        if len(line) >= 2:
            yield line[0], [line[1]]


def parse_deb822(text: str) -> Iterable[tuple[str, list[str]]]:
    """(uri, suites) of each enabled `Types: deb` stanza of a deb822 .sources file."""
    for stanza in re.split(r"\n\s*\n", text):
        fields: dict[str, str] = {}
        key = None
        for raw in stanza.splitlines():
            if raw.startswith("#"):
                continue
            if raw[:1].isspace() and key:
                fields[key] += " " + raw.strip()
            elif ":" in raw:
                key, _, value = raw.partition(":")
                key = key.strip().lower()
                fields[key] = value.strip()
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        for uri in fields.get("uris", "").split():
            yield uri, fields.get("suites", "").split()


def host_sources(root: Path = Path("/")) -> list[tuple[str, list[str]]]:
    entries: list[tuple[str, list[str]]] = []
    etc = root / "etc/apt"
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*"))
    for path in files:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        if path.name.endswith(".list"):
            entries.extend(parse_one_line(text))
        elif path.name.endswith(".sources"):
            entries.extend(parse_deb822(text))
    return entries


def debian_mirror_from_host(root: Path = Path("/")) -> str | None:
    for uri, suites in host_sources(root):
        if any(s in DEBIAN_SUITES for s in suites) and uri.startswith(("http://", "https://", "file:/")):
            return uri.rstrip("/")
    return None


def security_mirror_from_host(root: Path = Path("/")) -> str | None:
    for uri, suites in host_sources(root):
        if any(s.endswith("-security") for s in suites) and uri.startswith(("http://", "https://", "file:/")):
            return uri.rstrip("/")
    return None


def resolve_mirror(flag: str | None, recipe_mirror: str | None, root: Path = Path("/"), *,
                   security: bool = False) -> str:
    """The mirror URL to use (the security mirror with security=True). Raises UsageError when none is
    configured or the chosen one is malformed."""
    prefix, field = ("SECURITY_", "security_mirror") if security else ("", "mirror")
    flag_name = "--security-mirror" if security else "--mirror"
    from_host = security_mirror_from_host(root) if security else debian_mirror_from_host(root)
    for source, value in (
        (flag_name, flag),
        (f"TMPLBUILD_{prefix}MIRROR", os.environ.get(f"TMPLBUILD_{prefix}MIRROR") or None),
        (f"bootstrap.{field}", recipe_mirror),
        ("host apt sources", from_host),
    ):
        if value:
            problem = url_problem(value)
            if problem:
                raise UsageError("mirror", f"{source}: {problem}")
            return value.rstrip("/")
    if security:
        raise UsageError("mirror", "no Debian security mirror found in the host's apt sources; set "
                                   "TMPLBUILD_SECURITY_MIRROR=URL, pass --security-mirror URL, or set "
                                   "bootstrap.security_mirror in the recipe")
    raise UsageError("mirror", f"no Debian mirror found in the host's apt sources; {HOW_TO_SET}")


def host_proxies() -> set[str]:
    """host:port of every HTTP proxy the building host uses (environment, apt's Acquire::http(s)::Proxy): a
    template's sources must not name one of them."""
    import subprocess
    import urllib.parse

    urls = [os.environ.get(k, "") for k in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY")]
    try:
        out = subprocess.run(["apt-config", "dump", "Acquire"], capture_output=True, text=True, timeout=10).stdout
        urls += re.findall(r'^Acquire::https?::Proxy(?:::[^ ]+)? "([^"]*)";', out, re.M)
    except (OSError, subprocess.SubprocessError):
        pass
    found = set()
    for u in urls:
        parts = urllib.parse.urlsplit(u if "://" in u else f"http://{u}")
        if parts.hostname:
            found.add(f"{parts.hostname.lower()}:{parts.port or 80}")
    return found


def template_mirror(recipe_value: str | None, root: Path = Path("/"), *, security: bool = False,
                    proxies: set[str] | None = None) -> str:
    """The mirror the template's sources.list names: the recipe's `sources.(security_)mirror`, else the one in
    the building host's apt sources. Never the build mirror (--mirror, TMPLBUILD_MIRROR): that may be a proxy,
    a cache or a file: tree only the build host reaches. `proxies`: host_proxies(), when the caller has them.
    Raises UsageError naming where a bad value came from."""
    import urllib.parse

    from tmplbuild.recipe.validate import template_source_problem

    field = "sources.security_mirror" if security else "sources.mirror"
    source, value = (field, recipe_value) if recipe_value else (
        "host apt sources", security_mirror_from_host(root) if security else debian_mirror_from_host(root))
    if not value:
        raise UsageError("sources", f"no Debian {'security ' if security else ''}mirror in the host's apt sources "
                                    f"for the template's sources.list; set {field} in the recipe")
    problem = template_source_problem(value)
    parts = urllib.parse.urlsplit(value)
    proxies = host_proxies() if proxies is None else proxies
    if not problem and f"{(parts.hostname or '').lower()}:{parts.port or 80}" in proxies:
        problem = "expected a Debian mirror, not the proxy this host's apt uses"
    if problem:
        hint = "" if source == field else f"; set {field} in the recipe"
        raise UsageError("sources", f"{source}: {value}: {problem}{hint}")
    return value.rstrip("/")
