"""Shared model machinery: the :class:`FoundationModelMixin` every scfm model uses."""

from ._foundation import FoundationModelMixin, record_in_uns

__all__ = ["FoundationModelMixin", "record_in_uns"]
