"""Chats and their messages.

Revision ID: 0001
Revises:
Create Date: 2025-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None


def _json() -> sa.JSON:
    return sa.JSON(none_as_null=True)


def upgrade() -> None:
    """Create ``chats`` and ``messages``."""
    op.create_table(
        "chats",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=False),
        sa.Column("system", sa.Text(), nullable=True),
        sa.Column("tools", _json(), nullable=True),
        sa.Column("mcp_servers", _json(), nullable=True),
        sa.Column("response_format", _json(), nullable=True),
        sa.Column("owner", sa.String(), nullable=True),
        sa.Column("created_at", sa.Double[float](), nullable=False),
        sa.Column("updated_at", sa.Double[float](), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_chats"),
    )
    op.create_index("ix_chats_created_at_id", "chats", ["created_at", "id"])
    op.create_index("ix_chats_owner_created_at_id", "chats", ["owner", "created_at", "id"])
    op.create_table(
        "messages",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("chat_id", sa.String(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(), nullable=False),
        sa.Column("content", _json(), nullable=True),
        sa.Column("tool_calls", _json(), nullable=True),
        sa.Column("tool_call_id", sa.String(), nullable=True),
        sa.Column("name", sa.String(), nullable=True),
        sa.Column("is_error", sa.Boolean(), nullable=True),
        sa.Column("output", _json(), nullable=True),
        sa.Column("refusal", sa.Text(), nullable=True),
        sa.Column("reasoning", sa.Text(), nullable=True),
        sa.Column("finish_reason", sa.String(), nullable=True),
        sa.Column("usage", _json(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=True),
        sa.Column("created_at", sa.Double[float](), nullable=False),
        sa.ForeignKeyConstraint(
            ["chat_id"], ["chats.id"], name="fk_messages_chat_id_chats", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_messages"),
        sa.UniqueConstraint("chat_id", "position", name="uq_messages_chat_id_position"),
    )


def downgrade() -> None:
    """Drop ``messages`` and ``chats``."""
    op.drop_table("messages")
    op.drop_index("ix_chats_owner_created_at_id", table_name="chats")
    op.drop_index("ix_chats_created_at_id", table_name="chats")
    op.drop_table("chats")
