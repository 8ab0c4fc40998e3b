"""Store exceptions."""

from krea2_train.errors import Krea2Error


class StoreError(Krea2Error, RuntimeError):
    """A store-level failure with an explanation (bad migration, bad input)."""


class StoreUnavailable(StoreError):
    """The PostgreSQL server could not be reached within the connect timeout."""

    retryable = True  # the server may be back by the next start


class StoreRefused(StoreError):
    """The server answered but refused the DSN (no such database or role, a wrong password)."""
