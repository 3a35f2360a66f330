"""The initial schema: tenants, sessions, messages, segments and their links, the store's id.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import uuid

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def when() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    store_info = op.create_table(
        "store_info",
        sa.Column("id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_store_info"),
    )
    op.bulk_insert(store_info, [{"id": uuid.uuid4().hex}])
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(128), nullable=False),
        sa.Column("created", when(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_tenants"),
    )
    op.create_table(
        "sessions",
        sa.Column("pk", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("tenant", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("fingerprint", sa.JSON(), nullable=False),
        sa.Column("memory", sa.JSON(), nullable=False),
        sa.Column("tokens", sa.BigInteger(), nullable=False),
        sa.Column("parent", sa.String(128), nullable=True),
        sa.Column("created", when(), nullable=False),
        sa.Column("updated", when(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant"], ["tenants.id"], name="fk_sessions_tenant_tenants", ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("pk", name="pk_sessions"),
        sa.UniqueConstraint("tenant", "session_id", name="uq_sessions_tenant_session_id"),
    )
    op.create_table(
        "messages",
        sa.Column("session_pk", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("start", sa.BigInteger(), nullable=False),
        sa.Column("end", sa.BigInteger(), nullable=False),
        sa.Column("created", when(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"], ["sessions.pk"], name="fk_messages_session_pk_sessions",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("session_pk", "seq", name="pk_messages"),
    )  # fmt: skip
    op.create_table(
        "segments",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("file", sa.String(255), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=False),
        sa.Column("created", when(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_segments"),
        sa.UniqueConstraint("file", name="uq_segments_file"),
    )
    op.create_table(
        "session_segments",
        sa.Column("session_pk", sa.Integer(), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("segment_id", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["session_pk"], ["sessions.pk"], name="fk_session_segments_session_pk_sessions",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["segment_id"], ["segments.id"], name="fk_session_segments_segment_id_segments",
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint("session_pk", "seq", name="pk_session_segments"),
    )  # fmt: skip
    op.create_index("ix_session_segments_segment_id", "session_segments", ["segment_id"])


def downgrade() -> None:
    op.drop_index("ix_session_segments_segment_id", table_name="session_segments")
    for table in ("session_segments", "segments", "messages", "sessions", "tenants", "store_info"):
        op.drop_table(table)
