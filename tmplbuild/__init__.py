"""tmplbuild: build, sign, publish and fetch OS container templates."""

__version__ = "0.1.0"
