"""What a template is made of and how, as documents other tools read: an SPDX 2.3 and a CycloneDX 1.5 SBOM, and an
in-toto Statement v1 with a SLSA Provenance v1 predicate.

Pure functions of the build manifest (tmplbuild.manifest: its packages carry source, maintainer, the .deb's
signed sha256 and the declared licence) and, for the provenance, of what the build resolved (`Inputs`). No
clock, no random UUID: the document namespace and the serial number come from the template's identity and the
sha256 of its primary file, every time from SOURCE_DATE_EPOCH, so the same template gives the same bytes. JSON is
written here rather than through spdx-tools or cyclonedx-python-lib: a few dicts, byte-stable, no import cost in
the build; the tests validate the result with both libraries.

Files: `<stem>.spdx.json`, `<stem>.cdx.json` and `<stem>.intoto.json` (tmplbuild.repo.index.DOCUMENT_FORMATS),
listed in the manifest and the signed index like every template file.
"""
from __future__ import annotations

import hashlib
import json
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

from tmplbuild import __version__
from tmplbuild.manifest import Manifest, ManifestArtifact, Package

NOASSERTION = "NOASSERTION"
# The SLSA buildType of a tmplbuild recipe build: what externalParameters and internalParameters mean is
# documented in docs/sbom.md, versioned by this URI.
BUILD_TYPE = "urn:tmplbuild:buildtype:recipe:v1"
BUILDER_ID = "urn:tmplbuild:builder"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://slsa.dev/provenance/v1"
_SPDX_ID = re.compile(r"[^A-Za-z0-9.-]")
_LICENSE_REF = re.compile(r"LicenseRef-[A-Za-z0-9.-]+")
_PERSON = re.compile(r"\A\s*(?P<name>[^<]*?)\s*(?:<(?P<email>[^>]*)>)?\s*\Z")


def distro(manifest: Manifest) -> str:
    """The purl `distro` qualifier: `debian-12`, from the template's distribution and release."""
    return f"{manifest.distribution or 'debian'}-{manifest.release}" if manifest.release else \
        (manifest.distribution or "debian")


def purl(name: str, version: str, arch: str, distro_id: str, namespace: str = "debian") -> str:
    """pkg:deb/debian/NAME@VERSION?arch=ARCH&distro=debian-12 (the purl spec's deb type; the version's `:` of
    an epoch and `+` are percent-encoded, qualifiers sorted)."""
    quote = lambda s: urllib.parse.quote(s, safe=".-_~")  # noqa: E731
    return f"pkg:deb/{namespace}/{quote(name)}@{quote(version)}?arch={quote(arch)}&distro={quote(distro_id)}"


def primary(manifest: Manifest) -> ManifestArtifact:
    """The template's primary file (the first rootfs format): what the SBOM's root describes by hash."""
    return manifest.artifacts[0]


def _stem(manifest: Manifest) -> str:
    return f"{manifest.name}_{manifest.version}_{manifest.arch}"


def _stamp(manifest: Manifest) -> str:
    epoch = manifest.source_date_epoch if manifest.source_date_epoch is not None else 0
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _identity(manifest: Manifest) -> str:
    """The template's identity and hash: what names the documents (namespace, serial number)."""
    return f"{_stem(manifest)}@sha256:{primary(manifest).sha256}"


def _dumps(doc: dict[str, Any]) -> bytes:
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode()


def _sources(manifest: Manifest) -> list[tuple[str, str]]:
    return sorted({(p.source_name, p.source_ver) for p in manifest.packages})


def _person(maintainer: str) -> tuple[str, str]:
    m = _PERSON.match(maintainer)
    if not m or not m.group("name"):
        return "", ""
    return m.group("name"), m.group("email") or ""


def _license_refs(manifest: Manifest) -> list[str]:
    return sorted({ref for p in manifest.packages for ref in _LICENSE_REF.findall(p.license)})


# -- SPDX 2.3 ----------------------------------------------------------------------------------------------------

def _spdx_id(kind: str, *parts: str) -> str:
    """SPDXRef-<kind>-<readable>-<8 hex>: readable where the name allows it, unique by the hash of all parts."""
    readable = _SPDX_ID.sub("-", "-".join(parts[:1]))[:64]
    return f"SPDXRef-{kind}-{readable}-{hashlib.sha256(chr(0).join(parts).encode()).hexdigest()[:8]}"


def spdx(manifest: Manifest) -> bytes:
    """The SPDX 2.3 JSON document: the template (DESCRIBES), each installed binary package (CONTAINS) and the
    source package it was built from (GENERATED_FROM), with purls, the .deb's sha256, the maintainer as
    supplier and the declared licence (NOASSERTION when the package ships no machine-readable copyright)."""
    d = distro(manifest)
    art = primary(manifest)
    root_id = "SPDXRef-Template"
    root = {
        "SPDXID": root_id, "name": manifest.name, "versionInfo": manifest.version, "packageFileName": art.file,
        "downloadLocation": NOASSERTION, "filesAnalyzed": False, "primaryPackagePurpose": "CONTAINER",
        "checksums": [{"algorithm": "SHA256", "checksumValue": art.sha256},
                      {"algorithm": "SHA512", "checksumValue": art.sha512}],
        "supplier": NOASSERTION, "licenseConcluded": NOASSERTION, "licenseDeclared": NOASSERTION,
        "copyrightText": NOASSERTION, "description": manifest.description or manifest.name,
        "builtDate": _stamp(manifest),
    }
    packages: list[dict[str, Any]] = [root]
    relationships = [{"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES",
                      "relatedSpdxElement": root_id}]
    source_ids = {}
    for name, version in _sources(manifest):
        sid = _spdx_id("Source", name, version)
        source_ids[(name, version)] = sid
        packages.append({
            "SPDXID": sid, "name": name, "versionInfo": version, "downloadLocation": NOASSERTION,
            "filesAnalyzed": False, "primaryPackagePurpose": "SOURCE", "supplier": NOASSERTION,
            "licenseConcluded": NOASSERTION, "licenseDeclared": NOASSERTION, "copyrightText": NOASSERTION,
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl(name, version, "source", d)}],
        })
    for p in manifest.packages:
        pid = _spdx_id("Package", p.name, p.version, p.arch)
        name, email = _person(p.maintainer)
        pkg: dict[str, Any] = {
            "SPDXID": pid, "name": p.name, "versionInfo": p.version, "downloadLocation": NOASSERTION,
            "filesAnalyzed": False, "primaryPackagePurpose": "LIBRARY",
            "supplier": f"Person: {name}" + (f" ({email})" if email else "") if name else NOASSERTION,
            "licenseConcluded": NOASSERTION, "licenseDeclared": p.license or NOASSERTION,
            "copyrightText": NOASSERTION, "sourceInfo": f"built from the Debian source package {p.source_name} "
                                                       f"{p.source_ver}",
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                              "referenceLocator": purl(p.name, p.version, p.arch, d)}],
        }
        if p.sha256:
            pkg["checksums"] = [{"algorithm": "SHA256", "checksumValue": p.sha256}]
        packages.append(pkg)
        relationships.append({"spdxElementId": root_id, "relationshipType": "CONTAINS", "relatedSpdxElement": pid})
        relationships.append({"spdxElementId": pid, "relationshipType": "GENERATED_FROM",
                              "relatedSpdxElement": source_ids[(p.source_name, p.source_ver)]})
    doc: dict[str, Any] = {
        "spdxVersion": "SPDX-2.3", "dataLicense": "CC0-1.0", "SPDXID": "SPDXRef-DOCUMENT",
        "name": _stem(manifest),
        # Unique per template and content, the same for the same bytes (SPDX 2.3, 6.5: no '#').
        "documentNamespace": f"urn:tmplbuild:spdx:{_stem(manifest)}:{primary(manifest).sha256}",
        "creationInfo": {"created": _stamp(manifest), "creators": [f"Tool: tmplbuild-{__version__}"]},
        "documentDescribes": [root_id], "packages": packages, "relationships": relationships,
    }
    refs = _license_refs(manifest)
    if refs:
        doc["hasExtractedLicensingInfos"] = [
            {"licenseId": ref, "name": ref[len("LicenseRef-"):],
             "extractedText": f"The licence a Debian package's machine-readable debian/copyright names "
                              f"{ref[len('LicenseRef-'):]!r}, a name outside the SPDX licence list; its text is "
                              f"in that file, under /usr/share/doc/<package>/copyright in the template."}
            for ref in refs]
    return _dumps(doc)


# -- CycloneDX 1.5 -----------------------------------------------------------------------------------------------

def serial_number(manifest: Manifest) -> str:
    return f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'urn:tmplbuild:cyclonedx:' + _identity(manifest))}"


def cyclonedx(manifest: Manifest) -> bytes:
    """The CycloneDX 1.5 JSON document: the template as metadata.component, each installed binary package as
    a component (purl, sha256, supplier, licence expression when one is declared) whose pedigree names the
    source package it was generated from; the template depends on every package it contains."""
    d = distro(manifest)
    art = primary(manifest)
    components = []
    for p in manifest.packages:
        ref = purl(p.name, p.version, p.arch, d)
        comp: dict[str, Any] = {
            "type": "library", "bom-ref": ref, "name": p.name, "version": p.version, "purl": ref,
            "pedigree": {"ancestors": [{"type": "library", "name": p.source_name, "version": p.source_ver,
                                        "purl": purl(p.source_name, p.source_ver, "source", d)}]},
            "properties": [{"name": "tmplbuild:deb:source", "value": f"{p.source_name} {p.source_ver}"},
                           {"name": "tmplbuild:deb:installed-size-kib", "value": str(p.installed_size_kib)}],
        }
        name, email = _person(p.maintainer)
        if name:
            comp["supplier"] = {"name": name, **({"contact": [{"email": email}]} if email else {})}
        if p.sha256:
            comp["hashes"] = [{"alg": "SHA-256", "content": p.sha256}]
        if p.license and p.license != NOASSERTION:
            comp["licenses"] = [{"expression": p.license}]
        components.append(comp)
    root_ref = f"template:{_stem(manifest)}"
    doc = {
        "bomFormat": "CycloneDX", "specVersion": "1.5", "serialNumber": serial_number(manifest), "version": 1,
        "metadata": {
            "timestamp": _stamp(manifest),
            "tools": {"components": [{"type": "application", "name": "tmplbuild", "version": __version__}]},
            "component": {"type": "container", "bom-ref": root_ref, "name": manifest.name,
                          "version": manifest.version, "description": manifest.description or manifest.name,
                          "hashes": [{"alg": "SHA-256", "content": art.sha256},
                                     {"alg": "SHA-512", "content": art.sha512}],
                          "properties": [{"name": "tmplbuild:file", "value": art.file},
                                         {"name": "tmplbuild:arch", "value": manifest.arch}]},
        },
        "components": components,
        "dependencies": [{"ref": root_ref, "dependsOn": [c["bom-ref"] for c in components]}]
        + [{"ref": c["bom-ref"]} for c in components],
        "compositions": [{"aggregate": "complete", "assemblies": [root_ref]}],
    }
    return _dumps(doc)


# -- in-toto Statement v1 + SLSA Provenance v1 ------------------------------------------------------------------

@dataclass(frozen=True)
class Release:
    """One suite's InRelease as the build verified it."""

    url: str  # dists/<suite>/InRelease on the mirror the build read
    sha256: str


def provenance(manifest: Manifest, subjects: list[tuple[str, str]], releases: list[Release],
               formats: list[str]) -> bytes:
    """The in-toto Statement over `subjects` ((file name, sha256): every published file of the template but the
    manifest, which publishing amends) with a SLSA v1 predicate: the recipe and its `extends` chain as external
    parameters, the compressor settings as internal ones, every InRelease and .deb the build resolved (URI and
    sha256) as resolved dependencies, tmplbuild as the builder, and SOURCE_DATE_EPOCH as the times."""
    b = manifest.build
    internal: dict[str, Any] = {"zstd_level": b.get("zstd_level"), "xz_level": b.get("xz_level"),
                                "bootstrap_variant": b.get("bootstrap_variant"),
                                "source_date_epoch": manifest.source_date_epoch, "input_hash": manifest.input_hash}
    if manifest.oci is not None:
        internal["oci_layer_compression"] = manifest.oci.get("layer_compression")
    deps: list[dict[str, Any]] = [{"uri": r.url, "digest": {"sha256": r.sha256}} for r in releases]
    for p in manifest.packages:
        if p.sha256:
            # The archive's pool file name (no epoch): what `curl -O URI` saves and `sha256sum -c` reads.
            pool = p.uri.rsplit("/", 1)[-1] if p.uri else f"{p.name}_{p.version.split(':', 1)[-1]}_{p.arch}.deb"
            dep: dict[str, Any] = {"name": pool, "digest": {"sha256": p.sha256}}
            if p.uri:
                dep["uri"] = p.uri
            deps.append(dep)
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": [{"name": name, "digest": {"sha256": sha}} for name, sha in sorted(subjects)],
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "buildDefinition": {
                "buildType": BUILD_TYPE,
                "externalParameters": {
                    "recipe": {"name": manifest.name, "sha256": b.get("recipe_sha256", ""),
                               "extends": list(b.get("extends", []))},
                    "arch": manifest.arch, "version": manifest.version, "formats": formats,
                    "apt_sources": list(manifest.apt_sources),
                },
                "internalParameters": internal,
                "resolvedDependencies": deps,
            },
            "runDetails": {
                "builder": {"id": BUILDER_ID, "version": {"tmplbuild": b.get("tmplbuild", __version__)}},
                "metadata": {"invocationId": _identity(manifest), "startedOn": _stamp(manifest),
                             "finishedOn": _stamp(manifest)},
            },
        },
    }
    return _dumps(statement)


def package_rows(packages: tuple[Package, ...]) -> list[dict[str, str]]:
    """The package list as `tmplbuild show` prints it and its --json gives it."""
    return [{"name": p.name, "version": p.version, "arch": p.arch, "source": p.source_name,
             "source_version": p.source_ver, "license": p.license or NOASSERTION, "sha256": p.sha256}
            for p in packages]
