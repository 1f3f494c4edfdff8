"""The template as an OCI image: the deterministic oci-archive (image.py), its record in the manifest, and
publishing it to registries."""
