"""Undelivered notifications: what reached no socket, kept until the user connects.

Revision ID: 0001
Revises:
Create Date: 2026-11-26
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE undelivered_notification (
            message_id uuid PRIMARY KEY,
            user_id varchar(255) NOT NULL,
            title text NOT NULL,
            body text NOT NULL,
            created_at timestamptz NOT NULL,
            seq bigint GENERATED ALWAYS AS IDENTITY
        )
        """
    )
    # Flush on connect reads one user's rows oldest first.
    op.execute(
        "CREATE INDEX ix_undelivered_notification_user_order "
        "ON undelivered_notification (user_id, created_at, seq)"
    )
    # Retention deletes by age across all users.
    op.execute(
        "CREATE INDEX ix_undelivered_notification_created_at "
        "ON undelivered_notification (created_at)"
    )


def downgrade() -> None:
    op.execute("DROP TABLE undelivered_notification")
