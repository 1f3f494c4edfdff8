"""Signing and verification through real GnuPG, always with an explicit, dedicated GNUPGHOME."""
from __future__ import annotations

from tmplbuild.sign.keys import default_gnupghome, export_public, generate_key
from tmplbuild.sign.signer import Signer
from tmplbuild.sign.verify import Verified, Verifier

__all__ = ["Signer", "Verifier", "Verified", "generate_key", "export_public", "default_gnupghome"]
