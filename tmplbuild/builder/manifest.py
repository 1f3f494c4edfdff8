"""The package inventory: what dpkg says is installed in the tree, with exact versions, the source package each
was built from, its maintainer, the .deb's sha256 from a verified index, and its declared licence. The manifest
and the SBOMs (tmplbuild.sbom.documents) are both written from it."""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from tmplbuild.builder.archive import select_stanzas
from tmplbuild.builder.plan import lists_name
from tmplbuild.run import run
from tmplbuild.sbom import copyright

QUERY_FORMAT = ("${binary:Package}\\t${Version}\\t${Architecture}\\t${db:Status-Abbrev}\\t${Installed-Size}"
                "\\t${source:Package}\\t${source:Version}\\t${Maintainer}\\n")
Origin = tuple[str, str]  # (sha256, uri) of a .deb


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
        name, version, arch, status, size, source, source_version, maintainer = (line.split("\t") + [""] * 8)[:8]
        if status.strip() != "ii":
            continue
        packages.append({
            "name": name.split(":")[0], "version": version, "arch": arch,
            "installed_size_kib": int(size) if size.isdigit() else 0,
            "source": source or name.split(":")[0], "source_version": source_version or version,
            "maintainer": maintainer.strip(),
        })
    return sorted(packages, key=lambda p: str(p["name"]))


def inventory(root: Path, known: dict[tuple[str, str, str], Origin], bases: Iterable[str]) -> list[dict[str, object]]:
    """installed_packages() with each package's .deb sha256 and URI and its declared licence. `known` are the
    .debs the build itself verified (the bootstrap plan); a package a script or a recipe repository installed is
    looked up in the tree's apt lists, which apt verified (read here, before the clean-up empties them), its URI
    rebuilt from whichever of `bases` (repository URLs) the list file is named after. A package found in
    neither keeps an empty sha256: the SBOMs then carry no hash for it rather than a guessed one."""
    packages = installed_packages(root)
    missing = {(str(p["name"]), str(p["version"]), str(p["arch"])) for p in packages} - known.keys()
    found = dict(known)
    if missing:
        found.update(_from_lists(root / "var/lib/apt/lists", missing, list(bases)))
    for p in packages:
        sha256, uri = found.get((str(p["name"]), str(p["version"]), str(p["arch"])), ("", ""))
        p.update(sha256=sha256, uri=uri, license=copyright.package_license(root, str(p["name"])))
    return packages


def _from_lists(lists: Path, wanted: set[tuple[str, str, str]], bases: list[str]) -> dict[tuple[str, str, str], Origin]:
    names = {n for n, _, _ in wanted}
    prefixes = sorted(((lists_name(b.rstrip("/"), ""), b.rstrip("/")) for b in bases), key=lambda x: -len(x[0]))
    out: dict[tuple[str, str, str], Origin] = {}
    try:
        files = sorted(f for f in os.listdir(lists) if f.endswith("_Packages"))
    except OSError:
        return out
    for fname in files:
        base = next((b for prefix, b in prefixes if fname.startswith(prefix)), "")
        try:
            data = (lists / fname).read_bytes()
        except OSError:
            continue
        for stanza in select_stanzas(data, names).split(b"\n\n"):
            fields = dict(line.split(": ", 1) for line in stanza.decode(errors="replace").splitlines()
                          if ": " in line and not line.startswith((" ", "\t")))
            key = (fields.get("Package", ""), fields.get("Version", ""), fields.get("Architecture", ""))
            if key in wanted and key not in out and fields.get("SHA256"):
                uri = f"{base}/{fields['Filename']}" if base and fields.get("Filename") else ""
                out[key] = (fields["SHA256"], uri)
    return out
