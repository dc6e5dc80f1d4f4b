"""Named, ordered schema migrations, applied when the store opens.

Each migration is a name and a function of a connection. :func:`migrate` applies the ones the
``schema_migrations`` table does not list yet, in order, each in its own transaction together with
the row that records it, so a crash leaves either all of a migration or none of it.

Several app replicas may start at once: on PostgreSQL they queue on an advisory lock, on SQLite on
the write lock (``BEGIN IMMEDIATE``); whoever comes second finds the work done.

A migration is history: never edit one that has shipped. To change the schema, append a new
migration here and change :mod:`mmdemo.feedback.tables` to match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    Connection,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    insert,
    inspect,
    select,
    text,
)

from .database import Database
from .errors import StoreError, UnusableStoreError
from .tables import schema_migrations

log = logging.getLogger(__name__)

_ADVISORY_LOCK_KEY = 0x6D6D64656D6F0001  # "mmdemo" + 1: one key for this app's migrations


@dataclass(frozen=True)
class Migration:
    name: str
    apply: Callable[[Connection], None]


def _0001_initial(conn: Connection) -> None:
    """Media, outputs, the media each output used or made, and feedback."""
    m = MetaData()
    json_value = JSON(none_as_null=True)
    timestamp = DateTime(timezone=True)
    Table("media", m,
          Column("ref", String(80), primary_key=True),
          Column("kind", String(8), nullable=False),
          Column("size", BigInteger, nullable=False),
          Column("created_at", timestamp, nullable=False),
          Column("last_used_at", timestamp, nullable=False))
    Table("outputs", m,
          Column("id", String(32), primary_key=True),
          Column("task", String(64), nullable=False),
          Column("model_id", String(300)),
          Column("model_revision", String(100)),
          Column("backend", String(64)),
          Column("model_info", json_value, nullable=False),
          Column("settings", json_value, nullable=False),
          Column("inputs", json_value, nullable=False),
          Column("output", json_value, nullable=False),
          Column("input_key", String(64), nullable=False),
          Column("session", String(200)),
          Column("app_version", String(32), nullable=False),
          Column("created_at", timestamp, nullable=False),
          Column("expires_at", timestamp),
          Index("ix_outputs_task_created", "task", "created_at"),
          Index("ix_outputs_expires_at", "expires_at"))
    Table("output_media", m,
          Column("output_id", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), primary_key=True),
          Column("role", String(8), primary_key=True),
          Column("position", Integer, primary_key=True),
          Column("media_ref", String(80), ForeignKey("media.ref"), nullable=False),
          Index("ix_output_media_ref", "media_ref"))
    Table("feedback", m,
          Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
          Column("output_id", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
          Column("annotator", String(200), nullable=False),
          Column("thumbs", SmallInteger),
          Column("correction", json_value),
          Column("comment", Text),
          Column("app_version", String(32), nullable=False),
          Column("created_at", timestamp, nullable=False),
          Column("updated_at", timestamp, nullable=False),
          UniqueConstraint("output_id", "annotator", name="uq_feedback_output_annotator"),
          Index("ix_feedback_updated_at", "updated_at"))
    m.create_all(conn)


def _0002_annotation(conn: Connection) -> None:
    """Annotation campaigns, the outputs each one puts before annotators, and who holds or did which."""
    m = MetaData()
    timestamp = DateTime(timezone=True)
    record_id = BigInteger().with_variant(Integer, "sqlite")
    # the tables this one refers to, as 0001 made them (only their keys matter here)
    Table("outputs", m, Column("id", String(32), primary_key=True))
    Table("annotation_campaigns", m,
          Column("id", record_id, primary_key=True, autoincrement=True),
          Column("name", String(200), nullable=False),
          Column("task", String(64), nullable=False),
          Column("instructions", Text, nullable=False),
          Column("labels_per_item", Integer, nullable=False),
          Column("lease_seconds", Integer, nullable=False),
          Column("model_id", String(300)),
          Column("created_by", String(200)),
          Column("created_at", timestamp, nullable=False),
          UniqueConstraint("name", name="uq_annotation_campaigns_name"))
    Table("annotation_items", m,
          Column("id", record_id, primary_key=True, autoincrement=True),
          Column("campaign_id", record_id, ForeignKey("annotation_campaigns.id", ondelete="CASCADE"),
                 nullable=False),
          Column("output_id", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
          Column("added_at", timestamp, nullable=False),
          UniqueConstraint("campaign_id", "output_id", name="uq_annotation_items_campaign_output"),
          Index("ix_annotation_items_output", "output_id"))
    Table("annotation_assignments", m,
          Column("item_id", record_id, ForeignKey("annotation_items.id", ondelete="CASCADE"), primary_key=True),
          Column("annotator", String(200), primary_key=True),
          Column("state", String(8), nullable=False),
          Column("leased_at", timestamp, nullable=False),
          Column("expires_at", timestamp),
          Column("done_at", timestamp),
          Index("ix_annotation_assignments_annotator", "annotator", "state"))
    for name in ("annotation_campaigns", "annotation_items", "annotation_assignments"):
        m.tables[name].create(conn)


def _0003_finetune_jobs(conn: Connection) -> None:
    """Fine-tuning jobs: what each trains, its state and progress as its process writes them, its queue order."""
    m = MetaData()
    timestamp = DateTime(timezone=True)
    json_value = JSON(none_as_null=True)
    Table("finetune_jobs", m,
          Column("id", String(32), primary_key=True),
          Column("name", String(200), nullable=False),
          Column("task", String(64), nullable=False),
          Column("base", String(300), nullable=False),
          Column("device", String(32), nullable=False),
          Column("config", json_value, nullable=False),
          Column("state", String(16), nullable=False),
          Column("pid", Integer),
          Column("host", String(200)),
          Column("progress", json_value),
          Column("result", json_value),
          Column("exit_code", Integer),
          Column("error", Text),
          Column("log_path", Text),
          Column("created_by", String(200)),
          Column("created_at", timestamp, nullable=False),
          Column("started_at", timestamp),
          Column("finished_at", timestamp),
          Index("ix_finetune_jobs_state", "state", "created_at"))
    m.tables["finetune_jobs"].create(conn)


def _0004_model_promotions(conn: Connection) -> None:
    """Promotions and rollbacks of each task's default model, oldest first: the latest row of a task names
    its default now."""
    m = MetaData()
    Table("model_promotions", m,
          Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
          Column("task", String(64), nullable=False),
          Column("action", String(16), nullable=False),
          Column("model_id", String(300)),
          Column("previous_model_id", String(300)),
          Column("actor", String(200)),
          Column("created_at", DateTime(timezone=True), nullable=False),
          Index("ix_model_promotions_task", "task", "id"))
    m.tables["model_promotions"].create(conn)
def _0005_comparisons(conn: Connection) -> None:
    """Blind comparisons of two models' outputs on one input, and the votes people gave them."""
    m = MetaData()
    timestamp = DateTime(timezone=True)
    Table("outputs", m, Column("id", String(32), primary_key=True))
    Table("comparisons", m,
          Column("id", String(32), primary_key=True),
          Column("task", String(64), nullable=False),
          Column("output_a", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
          Column("output_b", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
          Column("model_a", String(300), nullable=False),
          Column("model_b", String(300), nullable=False),
          Column("swapped", Boolean, nullable=False),
          Column("created_by", String(200)),
          Column("created_at", timestamp, nullable=False),
          Index("ix_comparisons_task", "task", "created_at"))
    Table("comparison_votes", m,
          Column("comparison_id", String(32), ForeignKey("comparisons.id", ondelete="CASCADE"), primary_key=True),
          Column("voter", String(200), primary_key=True),
          Column("choice", String(8), nullable=False),
          Column("created_at", timestamp, nullable=False),
          Column("updated_at", timestamp, nullable=False))
    for name in ("comparisons", "comparison_votes"):
        m.tables[name].create(conn)


def _0006_audit_log(conn: Connection) -> None:
    """Who did which administrative action when (exports, deletions, promotions, fine-tuning...)."""
    m = MetaData()
    Table("audit_log", m,
          Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
          Column("created_at", DateTime(timezone=True), nullable=False),
          Column("actor", String(200)),
          Column("action", String(32), nullable=False),
          Column("target", String(300)),
          Column("details", JSON(none_as_null=True)),
          Index("ix_audit_log_created_at", "created_at"),
          Index("ix_audit_log_action", "action", "created_at"))
    m.tables["audit_log"].create(conn)


def _0007_annotation_items_v2(conn: Connection) -> None:
    """Campaigns get their own inputs, item order, gold share and state; items get an import key (the same
    media and inputs twice is one item), a hidden reference answer, free metadata and an uncertainty score."""
    for statement in (
        "ALTER TABLE annotation_campaigns ADD COLUMN inputs JSON",
        "ALTER TABLE annotation_campaigns ADD COLUMN item_order VARCHAR(16) DEFAULT 'import' NOT NULL",
        "ALTER TABLE annotation_campaigns ADD COLUMN gold_share FLOAT DEFAULT 0 NOT NULL",
        "ALTER TABLE annotation_campaigns ADD COLUMN state VARCHAR(16) DEFAULT 'open' NOT NULL",
        "ALTER TABLE annotation_items ADD COLUMN item_key VARCHAR(64)",
        "ALTER TABLE annotation_items ADD COLUMN reference JSON",
        "ALTER TABLE annotation_items ADD COLUMN metadata JSON",
        "ALTER TABLE annotation_items ADD COLUMN uncertainty FLOAT",
        "CREATE UNIQUE INDEX uq_annotation_items_campaign_key ON annotation_items (campaign_id, item_key)",
        "CREATE INDEX ix_annotation_items_uncertainty ON annotation_items (campaign_id, uncertainty)",
    ):
        conn.execute(text(statement))


MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_initial", _0001_initial),
    Migration("0002_annotation", _0002_annotation),
    Migration("0003_finetune_jobs", _0003_finetune_jobs),
    Migration("0004_model_promotions", _0004_model_promotions),
    Migration("0005_comparisons", _0005_comparisons),
    Migration("0006_audit_log", _0006_audit_log),
    Migration("0007_annotation_items_v2", _0007_annotation_items_v2),
)

def migrate(db: Database, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[str]:
    """Apply the migrations not applied yet, in order; return the names applied now.

    Raises :class:`StoreError` if the database has migrations this code does not know (it was
    upgraded by a newer mmdemo), rather than run on a schema it does not understand.
    """
    names = [m.name for m in migrations]
    if len(set(names)) != len(names):
        raise ValueError("migration names must be unique")
    applied_now: list[str] = []
    with db.translate_errors(), db.engine.connect() as lock_conn:
        if not db.is_sqlite:
            lock_conn.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _ADVISORY_LOCK_KEY})
            lock_conn.commit()
        try:
            refuse_foreign_database(db, lock_conn)
            for migration in migrations:
                with db.write() as conn:
                    schema_migrations.create(conn, checkfirst=True)
                    done = set(conn.execute(select(schema_migrations.c.name)).scalars())
                    unknown = sorted(done - set(names))
                    if unknown:
                        raise StoreError(
                            f"The feedback database ({db.describe()}) was migrated by a newer mmdemo "
                            f"({', '.join(unknown)}); upgrade mmdemo to use it."
                        )
                    if migration.name in done:
                        continue
                    log.info("applying migration %s", migration.name)
                    migration.apply(conn)
                    conn.execute(insert(schema_migrations).values(
                        name=migration.name, applied_at=datetime.now(timezone.utc)))
                applied_now.append(migration.name)
        finally:
            if not db.is_sqlite:
                lock_conn.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _ADVISORY_LOCK_KEY})
                lock_conn.commit()
    return applied_now


def refuse_foreign_database(db: Database, conn: Connection) -> None:
    """Raise :class:`UnusableStoreError` if the database holds tables but none of mmdemo's (no
    ``schema_migrations``): it belongs to something else, and mmdemo will not create its tables in it."""
    tables = sorted(inspect(conn).get_table_names())
    if tables and schema_migrations.name not in tables:
        shown = ", ".join(tables[:5]) + (f" and {len(tables) - 5} more" if len(tables) > 5 else "")
        raise UnusableStoreError(
            f"The feedback database {db.describe()} holds another application's tables ({shown}) and no "
            "mmdemo tables; mmdemo will not write into it. Give mmdemo a database of its own (a new SQLite "
            "file or an empty PostgreSQL database), or, if this file should be mmdemo's, restore it from a backup.")
    conn.rollback()  # end the inspection's transaction (PostgreSQL: it would hold the catalog snapshot)


def applied_migrations(db: Database) -> list[str]:
    """Names of the migrations the database lists, in order."""
    with db.read() as conn:
        if not db.engine.dialect.has_table(conn, "schema_migrations"):
            return []
        return sorted(conn.execute(select(schema_migrations.c.name)).scalars())
