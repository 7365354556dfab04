"""The far end of the straw: consume streams with consumer groups and apply records to targets exactly once.

Loaders import the record and config types only; never an adapter or the outbox store.
"""
