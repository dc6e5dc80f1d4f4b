"""The store's tables as the code queries them: the schema after every migration has run.

Changing a table means adding a migration in :mod:`mmdemo.feedback.migrations` *and* changing it
here; ``tests/test_feedback_store.py`` checks that the two agree.

* ``media``: one row per stored file (content ref), whoever uses it.
* ``outputs``: a model's result as the app showed it, with its inputs and provenance.
* ``output_media``: which media an output used (``input``) or made (``output``), in order.
* ``feedback``: a person's rating / correction / comment on an output; one per (output, annotator).
* ``annotation_campaigns``: a batch of work for annotators: task, instructions, labels wanted per item.
* ``annotation_items``: the outputs a campaign puts before its annotators (with an import key, a hidden
  reference answer for gold items, free metadata and the pre-labelling model's uncertainty).
* ``annotation_assignments``: who holds (``leased``, until ``expires_at``), labelled (``done``) or
  ``skipped`` which item; one row per (item, annotator).
* ``finetune_jobs``: fine-tuning jobs (an ``mmdemo finetune`` process each): config, state, pid, progress,
  result, exit code, error and log, written by the job's process as it goes; pending ones wait in order.
* ``model_promotions``: each promotion or rollback of a task's default model (who, when, from which model to
  which); the latest row of a task names its default (None: the catalog's own).
* ``comparisons``: two models' outputs on one input, shown blind as A and B (``swapped``: A is the model the
  caller named second); ``comparison_votes``: who preferred which (a, b, tie, both_bad), one per (comparison, voter).
* ``audit_log``: who (``actor``) did which administrative action (export, delete, promote, preload,
  finetune_start...) on what (``target``) and when; ``details``: ids, counts, model names, never user content.
"""

from __future__ import annotations

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

JSONValue = JSON(none_as_null=True)
Timestamp = DateTime(timezone=True)
RecordId = BigInteger().with_variant(Integer, "sqlite")  # SQLite: the rowid itself

schema_migrations = Table(
    "schema_migrations",
    metadata,
    Column("name", String(200), primary_key=True),
    Column("applied_at", Timestamp, nullable=False),
)

media = Table(
    "media",
    metadata,
    Column("ref", String(80), primary_key=True),
    Column("kind", String(8), nullable=False),
    Column("size", BigInteger, nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("last_used_at", Timestamp, nullable=False),
)

outputs = Table(
    "outputs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("task", String(64), nullable=False),
    Column("model_id", String(300)),
    Column("model_revision", String(100)),
    Column("backend", String(64)),
    Column("model_info", JSONValue, nullable=False),
    Column("settings", JSONValue, nullable=False),
    Column("inputs", JSONValue, nullable=False),
    Column("output", JSONValue, nullable=False),
    Column("input_key", String(64), nullable=False),
    Column("session", String(200)),
    Column("app_version", String(32), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp),
    Index("ix_outputs_task_created", "task", "created_at"),
    Index("ix_outputs_expires_at", "expires_at"),
)

output_media = Table(
    "output_media",
    metadata,
    Column("output_id", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), primary_key=True),
    Column("role", String(8), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("media_ref", String(80), ForeignKey("media.ref"), nullable=False),
    Index("ix_output_media_ref", "media_ref"),
)

feedback = Table(
    "feedback",
    metadata,
    Column("id", RecordId, primary_key=True, autoincrement=True),
    Column("output_id", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
    Column("annotator", String(200), nullable=False),
    Column("thumbs", SmallInteger),
    Column("correction", JSONValue),
    Column("comment", Text),
    Column("app_version", String(32), nullable=False),
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
    UniqueConstraint("output_id", "annotator", name="uq_feedback_output_annotator"),
    Index("ix_feedback_updated_at", "updated_at"),
)

annotation_campaigns = Table(
    "annotation_campaigns",
    metadata,
    Column("id", RecordId, primary_key=True, autoincrement=True),
    Column("name", String(200), nullable=False),
    Column("task", String(64), nullable=False),
    Column("instructions", Text, nullable=False),
    Column("labels_per_item", Integer, nullable=False),
    Column("lease_seconds", Integer, nullable=False),
    Column("model_id", String(300)),
    Column("created_by", String(200)),
    Column("created_at", Timestamp, nullable=False),
    Column("inputs", JSON(none_as_null=True)),         # the task's other inputs for every item (question, labels...)
    Column("item_order", String(16), nullable=False, server_default="import"),  # import, random, uncertain
    Column("gold_share", Float, nullable=False, server_default="0"),            # share of gold items mixed in
    Column("state", String(16), nullable=False, server_default="open"),         # open, paused, closed, archived
    UniqueConstraint("name", name="uq_annotation_campaigns_name"),
)

annotation_items = Table(
    "annotation_items",
    metadata,
    Column("id", RecordId, primary_key=True, autoincrement=True),
    Column("campaign_id", RecordId, ForeignKey("annotation_campaigns.id", ondelete="CASCADE"), nullable=False),
    Column("output_id", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),
    Column("added_at", Timestamp, nullable=False),
    Column("item_key", String(64)),                  # import key: a hash of the media and inputs (None: added)
    Column("reference", JSON(none_as_null=True)),    # a hidden reference answer (a gold item), never shown
    Column("metadata", JSON(none_as_null=True)),     # free columns of an imported manifest row
    Column("uncertainty", Float),                    # how unsure the pre-labelling model was (higher first)
    UniqueConstraint("campaign_id", "output_id", name="uq_annotation_items_campaign_output"),
    Index("ix_annotation_items_output", "output_id"),
    Index("uq_annotation_items_campaign_key", "campaign_id", "item_key", unique=True),
    Index("ix_annotation_items_uncertainty", "campaign_id", "uncertainty"),
)

annotation_assignments = Table(
    "annotation_assignments",
    metadata,
    Column("item_id", RecordId, ForeignKey("annotation_items.id", ondelete="CASCADE"), primary_key=True),
    Column("annotator", String(200), primary_key=True),
    Column("state", String(8), nullable=False),        # leased, done, skipped
    Column("leased_at", Timestamp, nullable=False),
    Column("expires_at", Timestamp),                   # while leased: when the item returns to the pool
    Column("done_at", Timestamp),                      # when it was submitted or skipped
    Index("ix_annotation_assignments_annotator", "annotator", "state"),
)

finetune_jobs = Table(
    "finetune_jobs",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("name", String(200), nullable=False),         # the new model's id
    Column("task", String(64), nullable=False),
    Column("base", String(300), nullable=False),
    Column("device", String(32), nullable=False),        # one job runs per device; the others wait
    Column("config", JSONValue, nullable=False),         # the FinetuneConfig as given
    Column("state", String(16), nullable=False),         # pending, running, succeeded, failed, cancelled
    Column("pid", Integer),                              # the job's process, once started
    Column("host", String(200)),                         # where that process runs
    Column("progress", JSONValue),                       # stage, epoch, step, total_steps, losses, eta_seconds
    Column("result", JSONValue),                         # when it succeeded: model, saved_to, summary, metrics
    Column("exit_code", Integer),
    Column("error", Text),
    Column("log_path", Text),
    Column("created_by", String(200)),
    Column("created_at", Timestamp, nullable=False),
    Column("started_at", Timestamp),
    Column("finished_at", Timestamp),
    Index("ix_finetune_jobs_state", "state", "created_at"),
)

model_promotions = Table(
    "model_promotions",
    metadata,
    Column("id", RecordId, primary_key=True, autoincrement=True),
    Column("task", String(64), nullable=False),
    Column("action", String(16), nullable=False),      # promote, rollback
    Column("model_id", String(300)),                   # the task's default after it (None: the catalog's own)
    Column("previous_model_id", String(300)),          # the default before it (None: the catalog's own)
    Column("actor", String(200)),                      # who promoted or rolled back
    Column("created_at", Timestamp, nullable=False),
    Index("ix_model_promotions_task", "task", "id"),
)

comparisons = Table(
    "comparisons",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("task", String(64), nullable=False),
    Column("output_a", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),  # shown as A
    Column("output_b", String(32), ForeignKey("outputs.id", ondelete="CASCADE"), nullable=False),  # shown as B
    Column("model_a", String(300), nullable=False),
    Column("model_b", String(300), nullable=False),
    Column("swapped", Boolean, nullable=False),         # A is the model the caller named second
    Column("created_by", String(200)),
    Column("created_at", Timestamp, nullable=False),
    Index("ix_comparisons_task", "task", "created_at"),
)

comparison_votes = Table(
    "comparison_votes",
    metadata,
    Column("comparison_id", String(32), ForeignKey("comparisons.id", ondelete="CASCADE"), primary_key=True),
    Column("voter", String(200), primary_key=True),
    Column("choice", String(8), nullable=False),        # a, b, tie, both_bad
    Column("created_at", Timestamp, nullable=False),
    Column("updated_at", Timestamp, nullable=False),
)

audit_log = Table(
    "audit_log",
    metadata,
    Column("id", RecordId, primary_key=True, autoincrement=True),
    Column("created_at", Timestamp, nullable=False),
    Column("actor", String(200)),                      # login name, visitor id, or the OS user of a command
    Column("action", String(32), nullable=False),      # see mmdemo.feedback.audit.ACTIONS
    Column("target", String(300)),                     # a model, task, campaign, job or record id
    Column("details", JSONValue),                      # ids, counts, model names (never prompts or corrections)
    Index("ix_audit_log_created_at", "created_at"),
    Index("ix_audit_log_action", "action", "created_at"),
)
