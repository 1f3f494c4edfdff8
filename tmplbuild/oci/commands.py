"""`tmplbuild oci export|trust`: the OCI image of a built template, and the trust set-up stock skopeo and podman
need to verify the images a repository signs.

`register(subparsers)` adds the verbs; each raises the typed errors that tmplbuild.cli.main turns into exit
codes and one-line messages."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def cmd_export(args: argparse.Namespace) -> int:
    from tmplbuild.oci.exporter import export_artifact

    dest, image = export_artifact(Path(args.artifact), force=args.force)
    print(f"{dest}: manifest {image.manifest_digest}, layer {image.layer_digest} "
          f"({image.layer_size / 1e6:.1f} MB gzip -{image.compression.get('level')}), diff_id {image.diff_id}")
    return 0


def cmd_trust(args: argparse.Namespace) -> int:
    from tmplbuild.client.commands import _offline_keys, _source
    from tmplbuild.oci import consumer
    from tmplbuild.oci.publisher import check_destination

    check_destination(args.registry)
    material, fingerprints = _offline_keys(args)
    # The lookaside is the repository's own sigstore/ unless it is served elsewhere.
    lookaside = args.lookaside or f"{(args.url or _source(args).urls)[0].rstrip('/')}/sigstore"
    written = consumer.write(Path(args.out), consumer.Setup(
        name=args.name or "tmplbuild", registry=args.registry.rstrip("/"), lookaside=lookaside,
        keys=material, fingerprints=fingerprints, strict=args.strict))
    for path in written:
        print(path)
    print(f"tmplbuild: verify with: skopeo --policy {Path(args.out) / 'policy.json'} --registries.d "
          f"{Path(args.out) / 'registries.d'} copy --remove-signatures docker://{args.registry.rstrip('/')}/NAME:TAG "
          "oci-archive:/var/lib/vz/template/cache/NAME_VERSION_ARCH.oci.tar", file=sys.stderr)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    from tmplbuild.client.commands import _source_args

    o = sub.add_parser("oci", help="OCI images: export one from a build, set up skopeo/podman to verify them")
    verbs = o.add_subparsers(dest="oci_verb", required=True)
    ex = verbs.add_parser("export", help="write <stem>.oci.tar (an oci-archive) from a built template, and record "
                                         "it in its manifest")
    ex.add_argument("artifact", help="a built .tar.zst (or .tar.xz) or its .manifest.json")
    ex.add_argument("--force", action="store_true", help="replace an existing .oci.tar")
    ex.set_defaults(func=cmd_export)

    tr = verbs.add_parser("trust", help="write the keyring, registries.d entry and policy.json with which stock "
                                        "skopeo and podman verify the images this repository signs")
    tr.add_argument("--registry", required=True, metavar="HOST/PATH",
                    help="the registry prefix images are published under (publish --oci)")
    tr.add_argument("--out", required=True, metavar="DIR", help="where to write the files")
    tr.add_argument("--lookaside", metavar="URL",
                    help="where the signatures are served (default: <repository URL>/sigstore)")
    tr.add_argument("--name", help="file name stem (default tmplbuild)")
    tr.add_argument("--strict", action="store_true",
                    help="policy.json rejects every image not covered by a rule (default: only the registry prefix "
                         "is restricted; other images are accepted as skopeo's stock policy does)")
    _source_args(tr)  # whose keys, as for `tmplbuild verify`: the online keys of the root this client trusts
    tr.set_defaults(func=cmd_trust)
