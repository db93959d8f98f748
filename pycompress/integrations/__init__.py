"""Integrations with other libraries; each imports its library lazily, so none is a dependency."""
