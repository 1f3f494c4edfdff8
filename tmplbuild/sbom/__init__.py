"""Software bills of materials (SPDX, CycloneDX), SLSA provenance, and the package queries over them."""
