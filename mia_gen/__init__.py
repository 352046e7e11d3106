"""mia-gen: membership inference attacks against generative models."""

from mia_gen.errors import MiaGenError
from mia_gen.provenance import package_version

__all__ = ["MiaGenError"]
__version__ = package_version()  # part of every score's cache key (README "Score identity")
