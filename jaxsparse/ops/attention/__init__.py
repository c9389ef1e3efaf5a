"""Block-sparse flash attention (``jaxsparse.attention``)."""

from jaxsparse.ops.attention.api import IMPLEMENTATIONS, attention
from jaxsparse.ops.attention.config import BlockSizes

__all__ = ["BlockSizes", "IMPLEMENTATIONS", "attention"]
