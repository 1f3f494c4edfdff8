"""The node admin's client: `tmplbuild remote`, `list`, `fetch` and `verify`.

config   remotes (mirror URLs, pinned key file and fingerprints, pinned repo_id), system and per user
state    the last index seen per remote, for rollback protection; written only after a run passed every check
trust    the checks, pure: index bytes + signature in, verified index out; entry selection; file hashes
download HTTP with caps, same-host redirects only, a hashing .part download that resumes with Range
commands argparse verbs wiring it together, trying each mirror in turn
"""
