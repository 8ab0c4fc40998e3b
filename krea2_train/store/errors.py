"""Store exceptions."""


class StoreError(RuntimeError):
    """A store-level failure with an explanation (bad migration, bad input)."""


class StoreUnavailable(StoreError):
    """The PostgreSQL server could not be reached within the connect timeout."""
