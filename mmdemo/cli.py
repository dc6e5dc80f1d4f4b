"""The ``mmdemo`` command: serve the app, list models, run one prediction, build tiny checkpoints.

    mmdemo serve --profile tiny
    mmdemo models --json
    mmdemo predict image-to-text --input cat.jpg --json
    mmdemo predict text-to-image --prompt "a red bicycle" --seed 7 --out bike.png
    mmdemo build-tiny
    mmdemo export --task caption --format datasets --out ./captions
    mmdemo delete --record 12

Exit codes: 0 success, 2 bad input or usage, 1 a model or system failure.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

from .config import Settings, apply_environment
from .errors import InvalidInputError, MMDemoError

TASK_ALIASES = {
    "caption": "image-to-text",
    "vqa": "visual-question-answering",
    "t2i": "text-to-image",
    "generate": "text-to-image",
    "zero-shot": "zero-shot-image-classification",
    "classify": "zero-shot-image-classification",
    "asr": "automatic-speech-recognition",
    "transcribe": "automatic-speech-recognition",
}


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

    models = commands.add_parser("models", parents=[common], help="list the catalog and what is loaded")
    models.add_argument("--task", help="only this task")
    models.add_argument("--json", action="store_true", help="print JSON")

    predict = commands.add_parser("predict", parents=[common], help="run one task and print the result")
    predict.add_argument("task", help="task id or alias: caption, vqa, text-to-image, zero-shot, asr")
    predict.add_argument("--model", help="catalog model id (default: the task's first model)")
    predict.add_argument("--input", type=Path, help="image or audio file")
    predict.add_argument("--question", help="VQA question")
    predict.add_argument("--labels", help="zero-shot labels, comma separated")
    predict.add_argument("--template", help='zero-shot prompt template, e.g. "a photo of a {}."')
    predict.add_argument("--multi-label", action="store_true", help="zero-shot: independent sigmoid scores")
    predict.add_argument("--prefix", help="captioning: text the caption must start with")
    predict.add_argument("--max-new-tokens", type=int)
    predict.add_argument("--beams", type=int, dest="num_beams")
    predict.add_argument("--prompt", help="text-to-image prompt")
    predict.add_argument("--negative-prompt")
    predict.add_argument("--steps", type=int)
    predict.add_argument("--guidance", type=float)
    predict.add_argument("--width", type=int)
    predict.add_argument("--height", type=int)
    predict.add_argument("--num-images", type=int)
    predict.add_argument("--seed", type=int)
    predict.add_argument("--language", help="speech: language code, or auto")
    predict.add_argument("--translate", action="store_true", help="speech: translate into English")
    predict.add_argument("--timestamps", action="store_true", help="speech: segment timestamps")
    predict.add_argument("--out", type=Path, help="where to write generated images (PNG)")
    predict.add_argument("--json", action="store_true", help="print the result as JSON")

    export = commands.add_parser("export", parents=[common], help="export feedback as a fine-tuning dataset")
    export.add_argument("--task", required=True, help="task id or alias: caption, vqa, zero-shot, asr, text-to-image")
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

    build = commands.add_parser("build-tiny", parents=[common], help="build the offline tiny checkpoints")
    build.add_argument("--force", action="store_true", help="rebuild even if present")
    return parser


def settings_from_args(args: argparse.Namespace) -> Settings:
    names = ("profile", "data_dir", "catalog", "device", "dtype", "memory_budget", "host", "port", "preload",
             "root_path", "concurrency", "max_queue", "max_batch", "auth_file", "database_url")
    return Settings.from_env(**{name: getattr(args, name, None) for name in names})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = settings_from_args(args)
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

    serve(settings)
    return 0


def cmd_models(args: argparse.Namespace, settings: Settings) -> int:
    from .catalog import load_catalog

    catalog = load_catalog(settings.profile, settings.catalog)
    task = TASK_ALIASES.get(args.task, args.task) if args.task else None
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


def cmd_predict(args: argparse.Namespace, settings: Settings) -> int:
    from .registry import ModelRegistry
    from .tasks import run

    task = TASK_ALIASES.get(args.task, args.task)
    inputs = predict_inputs(task, args)
    registry = ModelRegistry.from_settings(settings)
    result = run(registry, task, args.model, **inputs)
    if task == "text-to-image":
        result["images"] = save_images(result["images"], args.out or Path("mmdemo-image.png"), result["settings"])
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    else:
        print(format_result(task, result))
    return 0


def predict_inputs(task: str, args: argparse.Namespace) -> dict[str, Any]:
    media = {"image-to-text": "image", "visual-question-answering": "image",
             "zero-shot-image-classification": "image", "automatic-speech-recognition": "audio"}
    fields = {
        "image-to-text": ("prefix", "max_new_tokens", "num_beams"),
        "visual-question-answering": ("question", "max_new_tokens"),
        "text-to-image": ("prompt", "negative_prompt", "steps", "guidance", "width", "height", "num_images", "seed"),
        "zero-shot-image-classification": ("labels", "template"),
        "automatic-speech-recognition": ("language",),
    }
    if task not in fields:
        raise InvalidInputError(f"Unknown task '{task}'. Tasks: {', '.join(fields)} (or aliases {', '.join(TASK_ALIASES)}).")
    inputs: dict[str, Any] = {name: getattr(args, name) for name in fields[task]}
    if task in media:
        if args.input is None:
            raise InvalidInputError(f"{task} needs --input FILE (an {media[task]}).")
        if not args.input.is_file():
            raise InvalidInputError(f"The input file {args.input} does not exist.")
        inputs[media[task]] = args.input
    if task == "zero-shot-image-classification":
        inputs["multi_label"] = args.multi_label or None
    if task == "automatic-speech-recognition":
        inputs["translate"] = args.translate or None
        inputs["timestamps"] = args.timestamps or None
    return inputs


def save_images(images: list[Any], out: Path, settings: dict[str, Any]) -> list[str]:
    """Write PNGs (``out``, or ``out-1.png``... for several) with the settings in their metadata."""
    from PIL.PngImagePlugin import PngInfo

    out.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images, start=1):
        path = out if len(images) == 1 else out.with_name(f"{out.stem}-{index}{out.suffix or '.png'}")
        info = PngInfo()
        info.add_text("parameters", json.dumps(settings))
        image.save(path, format="PNG", pnginfo=info)
        paths.append(str(path))
    return paths


def format_result(task: str, result: dict[str, Any]) -> str:
    model = result["model"]
    footer = f"\n-- {model['id']} on {model['device']} ({model['dtype']}), {result['seconds']:.2f}s"
    if task == "image-to-text":
        body = result["text"]
    elif task == "visual-question-answering":
        body = result["answer"] + "".join(f"\n  {a['score']:.3f}  {a['answer']}" for a in result["answers"])
    elif task == "zero-shot-image-classification":
        body = "\n".join(f"{item['score']:.3f}  {item['label']}" for item in result["labels"])
    elif task == "automatic-speech-recognition":
        body = result["text"] + "".join(
            f"\n  [{c['start']}-{c['end']}] {c['text']}" for c in result.get("chunks", [])
        )
    else:
        body = f"seed {result['seed']}: " + ", ".join(result["images"])
        body += "".join(f"\nwarning: {w}" for w in result["warnings"])
    return body + footer


def cmd_build_tiny(args: argparse.Namespace, settings: Settings) -> int:
    import time

    from .tiny import build_tiny_models

    started = time.perf_counter()
    folders = build_tiny_models(settings.tiny_dir, force=args.force)
    for name, folder in folders.items():
        print(f"{name:<18} {folder}")
    print(f"{len(folders)} tiny checkpoints ready in {time.perf_counter() - started:.1f}s")
    return 0


def cmd_export(args: argparse.Namespace, settings: Settings) -> int:
    from .feedback import FeedbackStore, export_dataset

    task = TASK_ALIASES.get(args.task, args.task)
    with FeedbackStore.from_settings(settings) as store:
        summary = export_dataset(store, task, args.out, format=args.format, only=args.only, since=args.since,
                                 val_fraction=args.val_fraction, seed=args.seed, push_to_hub=args.push_to_hub,
                                 overwrite=args.overwrite)
    print(summary.describe())
    return 0


def cmd_delete(args: argparse.Namespace, settings: Settings) -> int:
    """Whoever runs the command on the server holds the data directory: they act as an admin."""
    from .feedback import ADMIN_ROLE, FeedbackStore

    with FeedbackStore.from_settings(settings) as store:
        for record_id in args.record or []:
            deleted = store.delete_feedback(record_id, actor_role=ADMIN_ROLE)
            print(f"deleted record #{record_id} ({len(deleted.media_refs)} media files no longer used)")
        for output_id in args.output or []:
            deleted = store.delete_output(output_id, actor_role=ADMIN_ROLE)
            print(f"deleted output {output_id}: {len(deleted.feedback_ids)} records, "
                  f"{len(deleted.media_refs)} media files")
    return 0


COMMANDS = {"delete": cmd_delete, "export": cmd_export, "serve": cmd_serve, "models": cmd_models, "predict": cmd_predict, "build-tiny": cmd_build_tiny}

if __name__ == "__main__":
    raise SystemExit(main())
