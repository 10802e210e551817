"""Alembic environment: the engine is handed in by controlplane.store.db.upgrade (no alembic.ini URL)."""

from __future__ import annotations

from alembic import context
from sqlalchemy import text

from controlplane.store.models import Base

# Any constant: planes sharing one PostgreSQL take this lock around their migrations, so two starting at once on
# a fresh database do not both create the schema (the second waits, then finds it at head).
MIGRATION_LOCK_ID = 0x636F6E74726F6C  # "control"

engine = context.config.attributes["engine"]
with engine.connect() as connection:
    sqlite = connection.dialect.name == "sqlite"
    if sqlite:
        # A batch migration rebuilds a table (copy, drop, rename); with foreign keys enforced the drop of a
        # referenced table fails. SQLite ignores this pragma inside a transaction, so it is set before one.
        connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
        connection.commit()
    try:
        with connection.begin():
            if connection.dialect.name == "postgresql":
                connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
            context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=sqlite)
            with context.begin_transaction():
                context.run_migrations()
            if sqlite and (broken := connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()):
                raise RuntimeError(f"the migration left rows whose foreign keys point nowhere: {broken[:5]}")
    finally:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=ON")  # the pooled connection goes back as it came
            connection.commit()
