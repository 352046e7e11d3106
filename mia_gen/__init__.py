"""mia-gen: membership inference attacks against generative models."""

from mia_gen.errors import MiaGenError

__all__ = ["MiaGenError"]
__version__ = "0.1.0"
