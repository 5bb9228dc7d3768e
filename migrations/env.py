"""Alembic environment: runs the hand-written revisions over asyncpg.

The database comes from ``DATABASE_URL``, read and validated by the gateway's
own settings, so migrations and the gateway always agree on it. Progress (each
revision run, and what a downgrade had to delete) is logged to stderr as
``alembic.ini`` says.
"""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from service.config import Settings

if context.config.config_file_name is not None:
    fileConfig(context.config.config_file_name, disable_existing_loggers=False)


def _url() -> str:
    url = (
        context.config.attributes.get("database_url") or Settings.from_env(os.environ).database_url
    )
    _, rest = url.split("://", 1)
    return f"postgresql+asyncpg://{rest}"


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_online() -> None:
    engine = create_async_engine(_url(), poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(_run)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(_run_online())
