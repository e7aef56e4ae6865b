"""Where memories live. :class:`UserCollection` is the protocol the engine needs;
:class:`ChromaStorage` is the implementation (embedded or a Chroma server)."""

from .base import Storage, UserCollection, collection_name
from .chroma import ChromaStorage

__all__ = ["ChromaStorage", "Storage", "UserCollection", "collection_name"]
