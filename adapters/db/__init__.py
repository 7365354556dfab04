"""SQL polling of legacy databases through SQLAlchemy Core."""

from adapters.db.poller import DbSource

__all__ = ["DbSource"]
