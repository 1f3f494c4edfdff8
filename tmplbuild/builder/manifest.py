"""The package manifest: what dpkg says is installed in the tree, with exact versions."""
from __future__ import annotations

from pathlib import Path

from tmplbuild.run import run

QUERY_FORMAT = "${binary:Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\t${Installed-Size}\\n"


def installed_packages(root: Path) -> list[dict[str, object]]:
    """Installed packages (status `ii`), sorted by name, read with dpkg-query from the tree's own database.
    Raises BuildError when dpkg-query fails."""
    proc = run(
        ["dpkg-query", f"--admindir={root / 'var/lib/dpkg'}", "-W", f"--showformat={QUERY_FORMAT}"],
        check="manifest", capture=True,
    )
    return parse_query(proc.stdout.decode())


def parse_query(text: str) -> list[dict[str, object]]:
    packages = []
    for line in text.splitlines():
        name, version, arch, status, size = (line.split("\t") + [""] * 5)[:5]
        if status.strip() != "ii":
            continue
        packages.append({
            "name": name.split(":")[0], "version": version, "arch": arch,
            "installed_size_kib": int(size) if size.isdigit() else 0,
        })
    return sorted(packages, key=lambda p: str(p["name"]))
