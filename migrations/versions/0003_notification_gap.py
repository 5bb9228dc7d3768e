"""Per-user count of stored notifications retention dropped unacknowledged (protocol v2 gaps).

Retention (TTL and the per-user cap) adds the rows it deletes to the user's
``dropped``; the next protocol v2 connection of the user reads and resets it
(``DELETE ... RETURNING``) and tells the client ``{"type":"gap","dropped":N}``.
One row per user who lost something, at most.

Downgrade drops the table and with it the counts not yet told: those clients
are not told of that gap.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        "CREATE TABLE notification_gap ("
        "user_id varchar(255) PRIMARY KEY, "
        "dropped bigint NOT NULL CHECK (dropped > 0))"
    )


def downgrade() -> None:
    op.execute("DROP TABLE notification_gap")
