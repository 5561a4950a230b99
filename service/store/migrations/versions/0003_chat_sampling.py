"""A chat's sampling parameters (temperature, top_p, max_tokens, stop, seed: the ones the client set).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add ``chats.sampling`` (JSON, NULL for the chats made before it)."""
    op.add_column("chats", sa.Column("sampling", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    """Drop ``chats.sampling``."""
    op.drop_column("chats", "sampling")
