"""The ``mmdemo`` command: serve the app, list models, run one prediction, build tiny checkpoints,
export feedback, run annotation campaigns and fine-tune models on the feedback.

    mmdemo serve --profile tiny
    mmdemo models --json
    mmdemo models promote blip-ours && mmdemo models rollback caption && mmdemo models history caption
    mmdemo models show blip-ours
    mmdemo predict image-to-text --input cat.jpg --json
    mmdemo predict text-to-image --prompt "a red bicycle" --seed 7 --out bike.png
    mmdemo build-tiny
    mmdemo export --task caption --format datasets --out ./captions
    mmdemo delete --record 12
    mmdemo audit --since 2026-12-01 --action export --json
    mmdemo annotate create shelf --task caption && mmdemo annotate import ./photos --campaign shelf
    mmdemo finetune --task caption --base blip-caption-base --name blip-ours
    mmdemo finetune --task vqa --base vilt-vqa --name vilt-ours --eval-campaign held-out
    mmdemo evaluate --task vqa --models vilt-vqa,vilt-ours --campaign held-out
    mmdemo leaderboard --task vqa --json
    mmdemo finetune --task zero-shot --base tiny-clip --name clip-ours --eval-dataset ./gold
    mmdemo finetune --task detection --base owlv2-base --name owlv2-ours --eval-campaign boxes-held-out
    mmdemo evaluate --task caption --models blip-caption-base,blip-ours --dataset ./gold-captions

Exit codes: 0 success, 2 bad input or usage, 1 a model or system failure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import Settings, apply_environment
from .errors import InvalidInputError, MMDemoError
from .logs import configure_logging


def task_id(name: str) -> str:
    """The id of the task called ``name`` (an id or an alias: ``caption``, ``vqa``, ``asr``...)."""
    from .tasks.spec import task_spec

    return task_spec(name).id


def task_names() -> str:
    from .tasks.spec import task_specs

    return ", ".join(spec.aliases[0] if spec.aliases else spec.id for spec in task_specs())


def common_options() -> argparse.ArgumentParser:
    """Flags shared by every command; each also has an MMDEMO_* variable."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("common options (also MMDEMO_<NAME> variables)")
    group.add_argument("--profile", choices=["default", "tiny"], help="'tiny': offline tiny models (MMDEMO_PROFILE)")
    group.add_argument("--data-dir", type=Path, help="models built, database, media, exports (MMDEMO_DATA_DIR)")
    group.add_argument("--catalog", type=Path, help="user catalog file, TOML or YAML (MMDEMO_CATALOG)")
    group.add_argument("--device", help="auto, cuda, cuda:N, mps or cpu (MMDEMO_DEVICE)")
    group.add_argument("--dtype", help="auto, float32, float16 or bfloat16 (MMDEMO_DTYPE)")
    group.add_argument("--memory-budget", help="e.g. 20GiB, or 0.8 of device memory (MMDEMO_MEMORY_BUDGET)")
    group.add_argument("--database-url", help="feedback store; default SQLite in the data dir (MMDEMO_DATABASE_URL)")
    group.add_argument("-v", "--verbose", action="store_true", help="log what the registry does")
    return parent


def build_parser() -> argparse.ArgumentParser:
    common = common_options()
    parser = argparse.ArgumentParser(prog="mmdemo", description="Try multimodal models and collect feedback.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common], help="start the web app")
    serve.add_argument("--host", help="address to listen on (MMDEMO_HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (MMDEMO_PORT, default 7860)")
    serve.add_argument("--preload", help="comma-separated model ids to load at start-up (MMDEMO_PRELOAD)")
    serve.add_argument("--root-path", help="URL prefix when served behind a proxy (MMDEMO_ROOT_PATH)")
    serve.add_argument("--concurrency", type=int, help="model calls at once (MMDEMO_CONCURRENCY)")
    serve.add_argument("--max-queue", type=int, help="longest queue before refusing (MMDEMO_MAX_QUEUE)")
    serve.add_argument("--max-batch", type=int, help="largest batch formed from the queue (MMDEMO_MAX_BATCH)")
    serve.add_argument("--auth-file", type=Path, help="users, roles and password hashes (MMDEMO_AUTH_FILE)")

    models = commands.add_parser(
        "models", parents=[common], help="list the catalog; promote a model to its task's default, roll back",
        description="list (default): the catalog. promote NAME: make model NAME its task's default in every "
                    "replica (each loads it, then switches, within 10 s). rollback TASK: back to the task's "
                    "default before its latest promotion. history TASK: its promotions. show NAME: a "
                    "model's lineage (base, data, records, metrics before/after, who promoted it).")
    models.add_argument("action", nargs="?", default="list", choices=["list", "promote", "rollback", "history", "show"])
    models.add_argument("target", nargs="?", help="promote, show: a model id; rollback, history: a task id or alias")
    models.add_argument("--task", help="list: only this task")
    models.add_argument("--by", help="promote, rollback: who does it (default: your login name)")
    models.add_argument("--json", action="store_true", help="print JSON")

    add_predict_parser(commands, common)

    export = commands.add_parser("export", parents=[common], help="export feedback as a fine-tuning dataset")
    export.add_argument("--task", required=True, help=f"task id or alias: {task_names()}")
    export.add_argument("--format", choices=["datasets", "parquet", "jsonl"], default="datasets")
    export.add_argument("--out", type=Path, required=True, help="folder to write (new or empty)")
    export.add_argument("--only", choices=["corrected", "approved", "all"], default="approved",
                        help="corrected; approved: corrected or thumbs up (default); all")
    export.add_argument("--since", help="only feedback saved on or after this date (YYYY-MM-DD)")
    export.add_argument("--val-fraction", type=float, default=0.1, help="share of inputs for validation")
    export.add_argument("--seed", type=int, default=0, help="seed of the train/validation split")
    export.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub dataset repo (token: HF_TOKEN)")
    export.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")

    delete = commands.add_parser(
        "delete", parents=[common],
        help="delete feedback records (data-subject requests): run on the server, with admin rights")
    target = delete.add_mutually_exclusive_group(required=True)
    target.add_argument("--record", type=int, action="append", help="feedback record id (repeatable)")
    target.add_argument("--output", action="append", help="output id: the result and all feedback on it")

    audit = commands.add_parser(
        "audit", parents=[common], help="the audit log: who exported, deleted, promoted, fine-tuned... and when",
        description="Entries of the audit log, newest first. Commands record the OS user who ran them; the app "
                    "records the signed-in user, or the admin link's visitor id.")
    audit.add_argument("--since", help="only entries on or after this date (YYYY-MM-DD or an ISO time)")
    audit.add_argument("--action", help="only this action (export, delete_feedback, promote, preload, ...)")
    audit.add_argument("--actor", help="only this actor (login name, visitor id or OS user)")
    audit.add_argument("--limit", type=int, default=100, help="at most this many entries (default 100)")
    audit.add_argument("--json", action="store_true", help="print JSON")

    build = commands.add_parser("build-tiny", parents=[common], help="build the offline tiny checkpoints")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    add_annotate_parser(commands, common)
    add_finetune_parser(commands, common)
    add_evaluate_parser(commands, common)
    add_backup_parsers(commands, common)
    add_leaderboard_parser(commands, common)
    return parser


def add_annotate_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``mmdemo annotate create|add|import|list|progress``: annotation campaigns (run on the server)."""
    annotate = commands.add_parser("annotate", help="annotation campaigns: create, add items, import media, progress")
    actions = annotate.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[common], help="create a campaign")
    create.add_argument("name")
    create.add_argument("--task", required=True, help=f"task id or alias: {task_names()}")
    create.add_argument("--instructions", default="", help="what annotators should do (Markdown)")
    create.add_argument("--labels-per-item", type=int, default=1, help="annotators who label each item (default 1)")
    create.add_argument("--model", help="catalog model that pre-labels imported media")
    create.add_argument("--lease-minutes", type=float, default=30.0,
                        help="how long a batch item stays with an annotator before it returns to the pool")
    add = actions.add_parser("add", parents=[common], help="add outputs already recorded in the store")
    add.add_argument("campaign")
    add.add_argument("--model", help="only this model's outputs")
    add.add_argument("--since", help="only outputs recorded on or after this date (YYYY-MM-DD)")
    add.add_argument("--include-rated", action="store_true", help="also outputs that already have feedback")
    add.add_argument("--limit", type=int, help="at most this many")
    imp = actions.add_parser("import", parents=[common], help="pre-label a folder of media with a model and add it")
    imp.add_argument("folder", type=Path)
    imp.add_argument("--campaign", required=True)
    imp.add_argument("--model", help="catalog model id (default: the campaign's, else the task's default)")
    imp.add_argument("--question", help="VQA: the question asked about every image")
    imp.add_argument("--labels", help="zero-shot: the labels offered, comma separated")
    imp.add_argument("--template", help='zero-shot prompt template, e.g. "a photo of a {}."')
    imp.add_argument("--prefix", help="captioning: text the caption must start with")
    imp.add_argument("--language", help="speech: language code, or auto")
    for name, action in (("list", "list campaigns"), ("progress", "labels done per campaign and annotator")):
        sub = actions.add_parser(name, parents=[common], help=action)
        if name == "progress":
            sub.add_argument("campaign")
        sub.add_argument("--json", action="store_true", help="print JSON")


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = ("profile", "data_dir", "catalog", "device", "dtype", "memory_budget", "host", "port", "preload",
             "root_path", "concurrency", "max_queue", "max_batch", "auth_file", "database_url")
    return Settings.from_env(**{name: getattr(args, name, None) for name in names})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.WARNING
    configure_logging(level)
    try:
        settings = settings_from_args(args)
        configure_logging(level, settings.log_format)
        apply_environment(settings)
        return COMMANDS[args.command](args, settings)
    except InvalidInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except MMDemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def cmd_serve(args: argparse.Namespace, settings: Settings) -> int:
    from .server import serve

    if not serve(settings):
        # Calls were cut off after the grace period: their threads may still run in native code, where the
        # interpreter's exit would abort; leave at once (the store is closed, the log flushed).
        logging.shutdown()
        os._exit(1)
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from .tasks import open_catalog

    if args.action != "list":
        return cmd_model_defaults(args, settings)
    catalog = open_catalog(settings)
    task = task_id(args.task) if args.task else None
    specs = [spec for spec in catalog if task is None or spec.task == task]
    if args.json:
        print(json.dumps([spec.to_dict() for spec in specs], indent=2))
        return 0
    width = max((len(spec.id) for spec in specs), default=10)
    for spec in specs:
        revision = f"@{spec.revision}" if spec.revision else ""
        print(f"{spec.id:<{width}}  {spec.task:<31} {spec.kind:<15} {spec.source}{revision}")
        if spec.description:
            print(f"{'':<{width}}  {spec.description}")
    print(f"\n{len(specs)} models, profile '{settings.profile}'. Nothing is loaded until first use.")
    return 0


def os_user() -> str:
    """Who runs this command (the audit log's actor for commands): the OS login name."""
    import getpass

    return getpass.getuser()


def cmd_model_defaults(args: argparse.Namespace, settings: Settings) -> int:
    """``mmdemo models promote|rollback|history|show``: recorded in the feedback store, which every replica
    follows (this command loads no model)."""
    from .feedback import FeedbackStore
    from .promotion import ModelDefaults, describe_lineage, model_lineage
    from .tasks import open_registry

    if not args.target:
        wanted = "a model id" if args.action in ("promote", "show") else "a task id or alias"
        raise InvalidInputError(f"mmdemo models {args.action} needs {wanted}.")
    registry = open_registry(settings)
    with FeedbackStore.from_settings(settings) as store:
        defaults = ModelDefaults(settings, registry, lambda: store)
        if args.action == "show":
            lineage = model_lineage(registry.catalog.get(args.target), defaults.promotions)
            print(json.dumps(lineage, indent=2) if args.json else describe_lineage(lineage))
            return 0
        if args.action == "history":
            records = defaults.promotions.history(task_id(args.target))
            if args.json:
                print(json.dumps([record.to_dict() for record in records], indent=2))
            for record in [] if args.json else records:
                print(record.describe())
            if not records and not args.json:
                print(f"no promotions of {task_id(args.target)}: it uses the catalog's default")
            return 0
        actor = args.by or os_user()
        if args.action == "promote":
            record = defaults.promote(args.target, actor, apply_here=False)
        else:
            record = defaults.rollback(args.target, actor, apply_here=False)
    print(json.dumps(record.to_dict(), indent=2) if args.json else
          f"{record.describe()}\nEvery running replica loads {record.model_id or 'the catalog default'} and "
          f"switches {record.task} to it within {settings.defaults_poll_s:g} s.")
    return 0


def add_predict_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``mmdemo predict TASK``: one sub-command per task (id and aliases), its options made from the fields of
    the task's request (``--max-new-tokens``, ``--labels``...); the media input is ``--input FILE``."""
    from .tasks.spec import task_specs

    predict = commands.add_parser("predict", help="run one task and print the result")
    tasks = predict.add_subparsers(dest="task", required=True, metavar="TASK",
                                   help=f"task id or alias: {task_names()}")
    shared = argparse.ArgumentParser(add_help=False)
    shared.add_argument("--model", help="catalog model id (default: the task's default: promoted, else its first)")
    shared.add_argument("--json", action="store_true", help="print the result as JSON")
    shared.add_argument("--no-record", action="store_true",
                        help="do not record the result in the feedback store (by default it is, as in the app)")
    for spec in task_specs():
        parser = tasks.add_parser(spec.id, aliases=list(spec.aliases), parents=[common, shared],
                                  help=spec.description or spec.title)
        if spec.input_kind != "text":
            parser.add_argument("--input", type=Path, help=f"the {spec.input_kind} file")
        if spec.schema.output_media:
            parser.add_argument("--out", type=Path, help="where to write generated images (PNG)")
        for name, kind, default in request_options(spec):
            flag = "--" + name.replace("_", "-")
            if kind is bool:
                parser.add_argument(flag, action="store_true", default=None, help=f"(default: {default})")
            else:
                parser.add_argument(flag, type=kind, help=f"(default: {default!r})" if default != "" else None)


def request_options(spec: Any) -> list[tuple[str, type, Any]]:
    """(name, type, default) of the request fields a person sets on the command line: text, numbers and
    switches; the media field and callbacks are not options."""
    import dataclasses

    kinds = {"str": str, "int": int, "float": float, "bool": bool}
    options = []
    for request_field in dataclasses.fields(spec.runner.Request):
        if request_field.name == spec.input_kind:
            continue
        annotation = str(request_field.type)
        names = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
        kind = next((kinds[name] for name in names if name in kinds), None)
        if kind is None:
            continue
        default = request_field.default if request_field.default is not dataclasses.MISSING else None
        options.append((request_field.name, kind, default))
    return options


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from .media import save_images
    from .tasks import open_registry, predict
    from .tasks.spec import task_spec

    from .feedback import FeedbackStore
    from .feedback.promotions import PromotionStore
    from .promotion import apply_promoted

    spec = task_spec(args.task)
    inputs = predict_inputs(spec, args)
    registry = open_registry(settings)
    needs_store = not (args.no_record and args.model)
    with FeedbackStore.from_settings(settings) if needs_store else contextlib.nullcontext() as store:
        if not args.model:  # the task's default as the app serves it: promoted, else the catalog's
            apply_promoted(registry.catalog, PromotionStore(store).current())
        # recorded as in the app unless --no-record: the output can be rated and exported (its id is printed)
        record = None if args.no_record else store.record_prediction
        result = predict(registry, spec.id, args.model, inputs, record=record).result
    if spec.schema.output_media:
        media = spec.schema.output_media
        result[media] = save_images(result[media], args.out or Path("mmdemo-image.png"), result["settings"],
                                    result.get("seeds"))
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_result(spec, result))
    return 0


def predict_inputs(spec: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The request of ``mmdemo predict``: the options given (None: the model's or task's default) and the
    media file."""
    inputs: dict[str, Any] = {name: getattr(args, name) for name, _, _ in request_options(spec)}
    if spec.input_kind != "text":
        if args.input is None:
            raise InvalidInputError(f"{spec.id} needs --input FILE (an {spec.input_kind}).")
        if not args.input.is_file():
            raise InvalidInputError(f"The input file {args.input} does not exist.")
        inputs[spec.input_kind] = args.input
    return inputs


def format_result(spec: Any, result: dict[str, Any]) -> str:
    """The task's own text form of ``result`` and a line saying which model answered, where, how fast."""
    model = result["model"]
    footer = f"\n-- {model['id']} on {model['device']} ({model['dtype']}), {result['seconds']:.2f}s"
    if result.get("output_id"):
        footer += f"; recorded as output {result['output_id']}"
    return spec.runner.describe(result) + footer


def cmd_build_tiny(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from .tasks import build_tiny_models

    started = time.perf_counter()
    folders = build_tiny_models(settings.tiny_dir, force=args.force)
    for name, folder in folders.items():
        print(f"{name:<18} {folder}")
    print(f"{len(folders)} tiny checkpoints ready in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from .feedback import FeedbackStore, export_dataset

    task = task_id(args.task)
    with FeedbackStore.from_settings(settings) as store:
        summary = export_dataset(store, task, args.out, format=args.format, only=args.only, since=args.since,
                                 val_fraction=args.val_fraction, seed=args.seed, push_to_hub=args.push_to_hub,
                                 overwrite=args.overwrite, actor=os_user())
    print(summary.describe())
    return 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Whoever runs the command on the server holds the data directory: they act as an admin."""
    from .feedback import ADMIN_ROLE, FeedbackStore

    with FeedbackStore.from_settings(settings) as store:
        for record_id in args.record or []:
            deleted = store.delete_feedback(record_id, actor_role=ADMIN_ROLE, actor=os_user())
            print(f"deleted record #{record_id} ({len(deleted.media_refs)} media files no longer used)")
        for output_id in args.output or []:
            deleted = store.delete_output(output_id, actor_role=ADMIN_ROLE, actor=os_user())
            print(f"deleted output {output_id}: {len(deleted.feedback_ids)} records, "
                  f"{len(deleted.media_refs)} media files")
    return 0


def cmd_audit(args: argparse.Namespace, settings: Settings) -> int:
    """``mmdemo audit``: the audit log, newest first (whoever can read the data directory or database)."""
    from .feedback import FeedbackStore
    from .feedback.audit import AuditLog
    from .feedback.store import parse_since

    since = parse_since(args.since) if args.since else None
    with FeedbackStore.from_settings(settings) as store:
        entries = AuditLog(store).entries(since=since, action=args.action, actor=args.actor, limit=args.limit)
    if args.json:
        print(json.dumps([entry.to_dict() for entry in entries], indent=2))
        return 0
    for entry in entries:
        print(entry.describe())
    if not entries:
        print("no audit log entries match")
    return 0


COMMANDS = {"delete": cmd_delete, "export": cmd_export, "serve": cmd_serve, "models": cmd_models, "predict": cmd_predict, "build-tiny": cmd_build_tiny}
COMMANDS["audit"] = cmd_audit


def cmd_annotate(args: argparse.Namespace, settings: Settings) -> int:
    """Annotation campaigns. Whoever runs this on the server holds the data directory: an admin."""
    from .feedback import AnnotationQueue, FeedbackStore

    with FeedbackStore.from_settings(settings) as store:
        queue = AnnotationQueue(store)
        if args.action == "create":
            task = task_id(args.task)
            if args.model:
                from .tasks import open_catalog

                catalog = open_catalog(settings)
                catalog.get(args.model, task)  # known, and of this task
            campaign = queue.create_campaign(args.name, task, instructions=args.instructions,
                                             labels_per_item=args.labels_per_item, model=args.model,
                                             lease_minutes=args.lease_minutes, created_by=os_user())
            print(f"created campaign {campaign.name} (#{campaign.id}, {campaign.task}, "
                  f"{campaign.labels_per_item} label(s) per item)")
        elif args.action == "add":
            added = queue.add_recorded(args.campaign, model=args.model, since=args.since,
                                       without_feedback=not args.include_rated, limit=args.limit, actor=os_user())
            print(f"added {added} recorded output(s) to {args.campaign}")
        elif args.action == "import":
            from .feedback.promotions import PromotionStore
            from .promotion import apply_promoted
            from .tasks import open_registry

            inputs = {"question": args.question, "labels": args.labels, "template": args.template,
                      "prefix": args.prefix, "language": args.language}
            registry = open_registry(settings)
            apply_promoted(registry.catalog, PromotionStore(store).current())  # no model named: the app's default
            summary = queue.import_folder(args.campaign, args.folder, registry, model=args.model, inputs=inputs,
                                          actor=os_user())
            print(summary.describe())
        elif args.action == "list":
            found = queue.campaigns()
            if args.json:
                print(json.dumps([c.to_dict() for c in found], indent=2))
            for c in [] if args.json else found:
                print(f"#{c.id:<4} {c.name:<30} {c.task:<31} {c.items:>6} items  {c.labels_per_item} label(s)/item")
            if not found and not args.json:
                print("no campaigns yet: mmdemo annotate create NAME --task TASK")
        else:
            progress = queue.progress(args.campaign)
            print(json.dumps(progress.to_dict(), indent=2) if args.json else progress.describe())
    return 0


COMMANDS["annotate"] = cmd_annotate


def add_finetune_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``mmdemo finetune``: a catalog model fine-tuned on feedback becomes a new catalog model."""
    from .finetune.config import LORA_DEFAULT_MIN_PARAMS_M

    finetune = commands.add_parser(
        "finetune", parents=[common], help="fine-tune a catalog model on feedback into a new catalog model",
        description="Fine-tune a catalog model on exported feedback (or the store's feedback) and save it as "
                    "<data_dir>/models/NAME, served as catalog model NAME.")
    finetune.add_argument("--task", help="task id or alias: caption (BLIP), vqa (ViLT or BLIP), zero-shot (CLIP or "
                                         "SigLIP), asr (Whisper, faster-whisper through its twin), detection (OWL-ViT, "
                                         "OWLv2 or Grounding DINO), t2i (Stable Diffusion: a LoRA on the UNet, on "
                                         "images rated 4-5) (required)")
    finetune.add_argument("--base", help="catalog model id to start from, see `mmdemo models` (required)")
    finetune.add_argument("--name", help="id of the new model: letters, digits, '.', '_', '-' (required)")
    finetune.add_argument("--job-id", help="run the feedback store's queued job ID (what the web app starts), "
                                           "writing its progress and end into the store; no other option needed")
    finetune.add_argument("--resume", metavar="NAME",
                          help="continue the interrupted run that was training NAME from its last checkpoint, "
                               "with its saved settings and the same data; no other option needed")
    finetune.add_argument("--dataset", type=Path,
                          help="a `mmdemo export --format datasets` folder (default: export the store's feedback); "
                               "t2i also takes an image folder with metadata.jsonl/.csv (file_name, text)")
    finetune.add_argument("--only", choices=["corrected", "approved", "all"],
                          help="store export: which feedback (default approved: corrected or thumbs up)")
    finetune.add_argument("--since", help="store export: feedback saved on or after this date (YYYY-MM-DD)")
    finetune.add_argument("--val-fraction", type=float, help="store export: share of inputs for validation (0.1)")
    finetune.add_argument("--seed", type=int, help="weights, shuffling and the export's split (0)")
    finetune.add_argument("--epochs", type=int, help="passes over the training split (3)")
    finetune.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    finetune.add_argument("--lr", type=float, help="AdamW learning rate (5e-5)")
    finetune.add_argument("--batch-size", type=int, help="examples per forward pass on each process (8)")
    finetune.add_argument("--grad-accum", type=int,
                          help="forward passes whose gradients add up into one optimizer step (1)")
    finetune.add_argument("--checkpoint-every", type=int,
                          help="optimizer steps between resumable checkpoints, also written at each epoch's end (50)")
    finetune.add_argument("--augment",
                          help="augment training batches (never validation): comma-separated crop, flip, colour "
                               "(images), speed, noise, specaugment (audio), or 'default' for the task's safe set: "
                               "caption crop, colour; VQA crop only (questions ask about left, right and colours: "
                               "name flip or colour to use them); zero-shot crop, flip (labels may be colours); "
                               "speech all three (default: none)")
    finetune.add_argument("--weight-decay", type=float, help="AdamW weight decay on weight matrices (0.01)")
    finetune.add_argument("--grad-clip", type=float, help="maximum gradient norm, 0 for none (1.0)")
    finetune.add_argument("--max-length", type=int, help="target tokens per example (40)")
    finetune.add_argument("--extend", action=argparse.BooleanOptionalAction,
                          help="VQA (ViLT): answers the base does not know extend its answer head (default); "
                               "--no-extend refuses them")
    finetune.add_argument("--lora", action=argparse.BooleanOptionalAction,
                          help="train a LoRA adapter (peft) instead of every weight; default: on for bases of "
                               f"{LORA_DEFAULT_MIN_PARAMS_M}M parameters or more. Without --merge the new model is "
                               "the adapter alone, served on the base's loaded copy")
    finetune.add_argument("--lora-rank", type=int, help="rank r of the LoRA matrices (8)")
    finetune.add_argument("--lora-alpha", type=float,
                          help="LoRA alpha (implies --lora); the update is scaled by alpha / r (2 x rank)")
    finetune.add_argument("--lora-targets", type=_names,
                          help="comma-separated module names to adapt, implies --lora (default: the model "
                               "kind's attention and MLP layers, e.g. q_proj,k_proj,v_proj,out_proj,fc1,fc2 for "
                               "CLIP and Whisper)")
    finetune.add_argument("--merge", action="store_true",
                          help="merge the trained LoRA adapter into a full checkpoint (implies --lora; always so "
                               "for faster-whisper, whose CTranslate2 conversion needs a full model)")
    evaluation = finetune.add_mutually_exclusive_group()
    evaluation.add_argument("--eval-campaign", help="score base and new model on this held-out campaign's labels")
    evaluation.add_argument("--eval-dataset", type=Path,
                            help="... or on this exported folder (default: the validation split, biased)")
    finetune.add_argument("--description", help="the catalog description of the new model")
    finetune.add_argument("--overwrite", action="store_true", help="replace an earlier fine-tuned model NAME")
    finetune.add_argument("--json", action="store_true", help="print the run's metrics as JSON")


def _names(text: str) -> tuple[str, ...]:
    """``a,b`` -> ("a", "b"), for --lora-targets."""
    return tuple(name.strip() for name in text.split(",") if name.strip())


def cmd_finetune(args: argparse.Namespace, settings: Settings) -> int:
    """Run one fine-tuning job; an epoch's losses go to stderr as it ends, the summary to stdout."""
    from .finetune import FinetuneJob

    if args.job_id:
        from .finetune.jobs import run_stored_job

        return run_stored_job(args.job_id, settings)
    if args.resume:
        from .finetune.jobs import resume_config

        config, resume = resume_config(settings, args.resume), True
    else:
        config, resume = finetune_config(args), False

    def show(progress: Any) -> None:
        if progress.stage == "validated":
            val = "-" if progress.val_loss is None else f"{progress.val_loss:.4f}"
            print(f"epoch {progress.epoch}/{progress.epochs}  step {progress.step}/{progress.total_steps}  "
                  f"train loss {progress.train_loss:.4f}  validation loss {val}", file=sys.stderr)

    result = FinetuneJob(config, settings, on_progress=show, resume=resume).run()
    if result is None:  # another process of `accelerate launch`: the main one publishes and prints
        return 0
    if args.json:
        print(json.dumps({"model": result.spec.to_dict(), "path": str(result.path), "metrics": result.metrics},
                         indent=2))
    else:
        print(result.describe())
    return 0


def finetune_config(args: argparse.Namespace) -> Any:
    """The run configuration the `mmdemo finetune` options give."""
    from .finetune import FinetuneConfig

    missing = [f"--{name}" for name in ("task", "base", "name") if not getattr(args, name)]
    if missing:
        raise InvalidInputError(f"mmdemo finetune needs {', '.join(missing)} (or --job-id).")

    names = ("only", "since", "val_fraction", "seed", "epochs", "max_steps", "lr", "batch_size", "weight_decay",
             "grad_clip", "max_length", "description", "extend", "eval_campaign", "grad_accum", "checkpoint_every",
             "augment", "lora", "lora_rank", "lora_alpha", "lora_targets")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    if args.eval_dataset is not None:
        options["eval_dataset"] = str(args.eval_dataset)
    return FinetuneConfig(task_id(args.task), base=args.base, name=args.name,
                          dataset=str(args.dataset) if args.dataset else None, overwrite=args.overwrite,
                          merge=args.merge, **options)


COMMANDS["finetune"] = cmd_finetune


def add_evaluate_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``mmdemo evaluate``: the task's metric for catalog models on labelled data."""
    evaluate = commands.add_parser(
        "evaluate", parents=[common], help="score catalog models on labelled data (a campaign or an export)",
        description="Score catalog models with the task's metric (BLEU-4, ROUGE-L and CIDEr-D for captions; VQA "
                    "accuracy; zero-shot top-1 accuracy and multi-label F1; WER and CER for speech; mAP@0.5 for "
                    "detection; CLIP score and validation loss for text-to-image) on the labels of an annotation "
                    "campaign or on an exported dataset folder, and print a table.")
    evaluate.add_argument("--task", required=True,
                          help="task id or alias (caption, vqa, zero-shot, asr, detection, t2i)")
    evaluate.add_argument("--models", required=True, help="catalog model ids, comma separated")
    source = evaluate.add_mutually_exclusive_group(required=True)
    source.add_argument("--campaign", help="an annotation campaign whose submitted labels are the answers")
    source.add_argument("--dataset", type=Path, help="a `mmdemo export --format datasets` folder")
    evaluate.add_argument("--json", action="store_true", help="print JSON")


def cmd_evaluate(args: argparse.Namespace, settings: Settings) -> int:
    from .finetune.evaluate import describe_source, evaluation_for, format_table
    from .tasks import open_registry

    task = task_id(args.task)
    evaluation = evaluation_for(task)
    registry = open_registry(settings)
    model_ids = [name.strip() for name in args.models.split(",") if name.strip()]
    if not model_ids:
        raise InvalidInputError("Name at least one catalog model in --models.")
    for model_id in model_ids:
        registry.catalog.get(model_id, task)  # known, and of this task, before any scoring
    if args.campaign:
        from .feedback import FeedbackStore

        with FeedbackStore.from_settings(settings) as store:
            questions = evaluation.examples_from_campaign(store, args.campaign)
        source = describe_source(questions, {"kind": "campaign", "campaign": args.campaign})
    else:
        questions = evaluation.examples_from_export(args.dataset)
        source = describe_source(questions, {"kind": "dataset", "dataset": str(args.dataset.resolve())})
    results = {model_id: evaluation.score(evaluation.served_model_answers(registry, model_id), questions)
               for model_id in model_ids}
    if args.json:
        print(json.dumps({"task": task, "data": source, "models": results}, indent=2))
    else:
        print(format_table(results, source, task))
    return 0


COMMANDS["evaluate"] = cmd_evaluate


def add_backup_parsers(commands: Any, common: argparse.ArgumentParser) -> None:
    """``mmdemo backup DIR`` (while the app runs) and ``mmdemo restore DIR`` (into an empty store)."""
    backup = commands.add_parser(
        "backup", parents=[common], help="snapshot the feedback store and its media into a folder (incremental)",
        description="A consistent snapshot of the feedback store (SQLite's backup API, or pg_dump) plus the media "
                    "it uses, into DIR/snapshots/<time>; media already in DIR are not copied again. Safe while "
                    "the app runs.")
    backup.add_argument("folder", type=Path, help="the backup folder (created if needed)")
    backup.add_argument("--keep", type=int, help="keep only the newest N snapshots (and the media they use)")
    backup.add_argument("--json", action="store_true", help="print JSON")
    restore = commands.add_parser(
        "restore", parents=[common], help="restore a backup snapshot into an empty feedback store",
        description="Restore the newest (or --snapshot) snapshot of DIR into the store of --data-dir / "
                    "--database-url. Stop the app first. A store that holds records is refused unless --replace "
                    "(a replaced SQLite file is kept beside the new one).")
    restore.add_argument("folder", type=Path, help="the backup folder")
    restore.add_argument("--snapshot", help="snapshot name (default: the newest); see --list")
    restore.add_argument("--list", action="store_true", help="list the folder's snapshots and exit")
    restore.add_argument("--replace", action="store_true", help="replace a store that holds records")


def cmd_backup(args: argparse.Namespace, settings: Settings) -> int:
    from .feedback import FeedbackStore
    from .feedback.audit import record_after
    from .feedback.backup import backup_store

    with FeedbackStore.from_settings(settings) as store:
        result = backup_store(store, args.folder, keep=args.keep)
        record_after(store, os_user(), "backup", result.snapshot,
                     {"folder": str(result.folder), "media_copied": result.media_copied, "pruned": len(result.pruned)})
    if args.json:
        print(json.dumps({"snapshot": result.snapshot, "folder": str(result.folder), "rows": result.rows,
                          "media_copied": result.media_copied, "media_present": result.media_present,
                          "media_missing": result.media_missing, "pruned": result.pruned}, indent=2))
    else:
        print(result.describe())
    return 0


def cmd_restore(args: argparse.Namespace, settings: Settings) -> int:
    from .feedback.backup import list_snapshots, restore_store

    if args.list:
        for name in list_snapshots(args.folder):
            print(name)
        return 0
    url = settings.database_url or os.environ.get("MMDEMO_DATABASE_URL") or None
    result = restore_store(args.folder, settings.data_dir, url, snapshot=args.snapshot, replace=args.replace)
    print(result.describe())
    return 0


COMMANDS["backup"] = cmd_backup
COMMANDS["restore"] = cmd_restore
def add_leaderboard_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """``mmdemo leaderboard``: the task's models ranked by people's blind votes (Compare mode)."""
    board = commands.add_parser(
        "leaderboard", parents=[common], help="rank a task's models by blind votes (Bradley-Terry ratings)",
        description="Win rates and Bradley-Terry ratings (Elo scale, 95%% bootstrap intervals) of a task's models "
                    "from the votes given in Compare mode, with each fine-tuned model's evaluation metric.")
    board.add_argument("--task", required=True, help="task id or alias")
    board.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resampling")
    board.add_argument("--json", action="store_true", help="print JSON")


def cmd_leaderboard(args: argparse.Namespace, settings: Settings) -> int:
    from .feedback import FeedbackStore
    from .feedback.comparisons import ComparisonStore
    from .feedback.leaderboard import format_table, leaderboard
    from .tasks import open_catalog

    task = task_id(args.task)
    with FeedbackStore.from_settings(settings) as store:
        games = ComparisonStore(store).games(task)
    standings = leaderboard(games, catalog=open_catalog(settings), seed=args.seed)
    if args.json:
        print(json.dumps({"task": task, "votes": len(games), "models": [s.to_dict() for s in standings]}, indent=2))
    else:
        print(format_table(standings) if standings else f"No votes on {task} yet: compare two models in its tab.")
    return 0


COMMANDS["leaderboard"] = cmd_leaderboard

if __name__ == "__main__":
    raise SystemExit(main())
