"""The backlog is keyed by (user_id, message_id): one id sent to many users is one row each.

Before this revision the primary key was ``message_id`` alone, so a notification
fanned out to several users under one id kept only the first user's row.

Upgrade, on a live database: the new unique index is built with ``CREATE INDEX
CONCURRENTLY`` (writes go on; it scans the table twice), then the primary key is
swapped onto it in one short transaction under ``ACCESS EXCLUSIVE``, which only
waits for the statements already running on the table. A failed build leaves an
invalid index that the next attempt drops first.

Downgrade loses rows: the old key allows one row per ``message_id``, so of the
rows that share an id (the same notification for several users) only the oldest
(by ``created_at, seq``) is kept and the other users' copies are deleted; the
count is logged. The table is locked (``ACCESS EXCLUSIVE``) for the whole
downgrade so no new shared id can slip in between the delete and the new key.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

import logging

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

_NEW_KEY_INDEX = "ix_undelivered_notification_user_message"

# Of the rows sharing a message_id, every one but the oldest.
_KEEP_OLDEST_OF_EACH_ID = """
DELETE FROM undelivered_notification AS t
USING undelivered_notification AS kept
WHERE t.message_id = kept.message_id AND (kept.created_at, kept.seq) < (t.created_at, t.seq)
"""


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {_NEW_KEY_INDEX}")
        op.execute(
            f"CREATE UNIQUE INDEX CONCURRENTLY {_NEW_KEY_INDEX} "
            "ON undelivered_notification (user_id, message_id)"
        )
    # Both columns are NOT NULL already (user_id by declaration, message_id as the old
    # key's column), so attaching the index needs no scan. The index takes the
    # constraint's name.
    op.execute(
        "ALTER TABLE undelivered_notification "
        "DROP CONSTRAINT undelivered_notification_pkey, "
        "ADD CONSTRAINT undelivered_notification_pkey "
        f"PRIMARY KEY USING INDEX {_NEW_KEY_INDEX}"
    )


def downgrade() -> None:
    op.execute("LOCK TABLE undelivered_notification IN ACCESS EXCLUSIVE MODE")
    if op.get_context().as_sql:  # alembic --sql: print the statement, count nothing
        op.execute(_KEEP_OLDEST_OF_EACH_ID)
    else:
        dropped = op.get_bind().execute(sa.text(_KEEP_OLDEST_OF_EACH_ID))
        if dropped.rowcount:
            log.warning(
                "downgrade: deleted %d rows whose message_id an older row of another "
                "user also had (the old key keeps one row per message_id)",
                dropped.rowcount,
            )
    op.execute(
        "ALTER TABLE undelivered_notification "
        "DROP CONSTRAINT undelivered_notification_pkey, "
        "ADD CONSTRAINT undelivered_notification_pkey PRIMARY KEY (message_id)"
    )
