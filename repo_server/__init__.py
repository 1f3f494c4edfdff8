"""The repository server: serves a signed tmplbuild repository over HTTP and accepts authenticated uploads.

`create_app(config)` is the Flask application factory; `tmplbuild serve` runs it under gunicorn. The server
holds no private key: it checks uploads against the repository's own pinned public keys (keys/<FPR>.asc)."""
from __future__ import annotations

from repo_server.app import create_app

__all__ = ["create_app"]
