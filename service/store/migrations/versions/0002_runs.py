"""Run records: what a restart must still answer about the runs of in-memory run backends.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``runs``."""
    op.create_table(
        "runs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("chat_id", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("subject", sa.String(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("error_code", sa.String(), nullable=True),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("message_id", sa.String(), nullable=False),
        sa.Column("created_at", sa.Double[float](), nullable=False),
        sa.Column("finished_at", sa.Double[float](), nullable=True),
        sa.Column("partial", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(["chat_id"], ["chats.id"], name="fk_runs_chat_id_chats", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_chat_id", "runs", ["chat_id"])


def downgrade() -> None:
    """Drop ``runs``."""
    op.drop_table("runs")
