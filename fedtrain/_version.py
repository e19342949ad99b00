"""The package version, in a module of its own so that fedtrain's modules (and the build) can read it
without importing the whole package."""

__version__ = "0.2.0"
