"""PostgreSQL store: embedded or external server, migrations, batched upserts, the job queue.

Imports no torch. ``open_store`` is the entry point; ``krea2_train.store.queue`` holds the
processing-queue API.
"""

from krea2_train.store.db import Store, default_store_dir, open_store
from krea2_train.store.errors import StoreError, StoreRefused, StoreUnavailable

__all__ = ["Store", "StoreError", "StoreRefused", "StoreUnavailable", "default_store_dir", "open_store"]
