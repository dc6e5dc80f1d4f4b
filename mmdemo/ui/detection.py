"""Detect tab (zero-shot object detection): an image and what to look for -> boxes with labels and scores,
drawn on the image. API: ``/detect``.

Its correction is made with the mouse on the image (``gradio_image_annotation``): keep or delete each box,
fix its label, move or resize it, draw a missing one. A table of the same boxes' coordinates is there for
the keyboard; editing either updates the other.
"""

from __future__ import annotations

import colorsys
from types import SimpleNamespace
from typing import Any

import gradio as gr
from gradio_image_annotation import image_annotator
from PIL import Image, ImageDraw

from ..errors import InvalidFeedbackError, MMDemoError
from ..media import load_image
from ..tasks.detection import COORDINATES, DEFAULT_MAX_BOXES, MAX_BOXES, TASK, check_inside, clean_boxes
from ..tasks.spec import task_spec
from .common import (AppContext, asset, connect, examples, media_source, model_picker, output_area,
                     results_column, standalone)
from .feedback import Correction

TITLE = task_spec(TASK).title
TABLE_HEADERS = ["label", *COORDINATES]


def request(image: Any, queries: str, model: str, threshold: float | None,
            max_boxes: int) -> tuple[str, dict[str, Any]]:
    """The inputs of ``/detect``, in order; ``queries`` separated by commas or new lines; ``threshold`` None:
    the model's default."""
    return model, dict(image=media_source(image, "image"), queries=queries, threshold=threshold,
                       max_boxes=max_boxes)


def present(result: dict[str, Any]) -> tuple[list[list[Any]]]:
    return ([[item["label"], item["score"], *(item["box"][c] for c in COORDINATES)] for item in result["boxes"]],)


def colour_of(label: str) -> tuple[int, int, int]:
    """A stable, readable colour per label."""
    hue = (sum(map(ord, label)) * 0.618033988749895) % 1.0
    return tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, 0.85, 0.95))  # type: ignore[return-value]


def draw_boxes(image: Image.Image, boxes: list[dict[str, Any]]) -> Image.Image:
    """A copy of ``image`` with each box outlined and labelled ("cat 0.41")."""
    drawn = image.copy()
    pen = ImageDraw.Draw(drawn)
    width = max(2, round(max(image.size) / 300))
    for item in reversed(boxes):  # the best box drawn last, on top
        corners = tuple(item["box"][c] for c in COORDINATES)
        colour = colour_of(item["label"])
        pen.rectangle(corners, outline=colour, width=width)
        text = f"{item['label']} {item['score']:.2f}" if "score" in item else item["label"]
        left, top, right, bottom = pen.textbbox((corners[0], corners[1]), text)
        pen.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
        pen.text((corners[0], corners[1]), text, fill=(0, 0, 0))
    return drawn


def input_image(value: Any) -> Image.Image | None:
    """The picture the model saw (decoded as the task decodes it: EXIF orientation applied), or None."""
    try:
        return load_image(media_source(value, "image"))
    except MMDemoError:
        return None


class BoxesCorrection(Correction):
    """The boxes, editable with the mouse on the image, and the same boxes as a table for the keyboard. Saved
    as ``[{label, box: {xmin, ymin, xmax, ymax}}]``; boxes left as the model found them are no correction."""

    def __init__(self) -> None:
        self.annotator = image_annotator(
            None, label="Right boxes: drag to move or resize, draw a missing one, select one to fix its label or "
                        "delete it", image_type="filepath", sources=[], show_clear_button=False,
            show_remove_button=True, show_download_button=False, box_min_size=4, handles_cursor=True,
            elem_classes="mmdemo-box-editor")
        self.table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["str", "number", "number", "number", "number"],
                                  column_count=(len(TABLE_HEADERS), "fixed"), type="array", interactive=True,
                                  label="The same boxes as coordinates (pixels): type to fix one, add a row for a "
                                        "missing one", max_height=240,
                                  elem_classes="mmdemo-box-table")
        self.components = [self.annotator, self.table]
        self.annotator.change(self.table_of, [self.annotator], [self.table], queue=False, show_progress="hidden",
                              api_visibility="private")
        self.table.input(self.with_table, [self.annotator, self.table], [self.annotator], queue=False,
                         show_progress="hidden", api_visibility="private")

    # -- the two views of the boxes --

    @staticmethod
    def editor_value(image: Any, boxes: list[dict[str, Any]]) -> dict[str, Any]:
        return {"image": image, "boxes": [{"label": item["label"], "color": colour_of(item["label"]),
                                           **{c: round(item["box"][c]) for c in COORDINATES}} for item in boxes]}

    @staticmethod
    def table_of(value: dict[str, Any] | None) -> list[list[Any]]:
        boxes = (value or {}).get("boxes") or []
        return [[box.get("label", ""), *(box[c] for c in COORDINATES)] for box in boxes]

    def with_table(self, value: dict[str, Any] | None, rows: list[list[Any]] | None) -> Any:
        """The editor with the table's boxes (rows that are not four numbers yet are left out until they are)."""
        if not value or not value.get("image"):
            return gr.skip()
        boxes = []
        for row in rows or []:
            label, *corners = (list(row) + [None] * len(TABLE_HEADERS))[: len(TABLE_HEADERS)]
            try:
                numbers = [float(c) for c in corners]
            except (TypeError, ValueError):
                continue
            boxes.append({"label": str(label or ""), "box": dict(zip(COORDINATES, numbers))})
        return self.editor_value(value["image"], boxes)

    @staticmethod
    def boxes_of(value: dict[str, Any] | None) -> list[dict[str, Any]]:
        return [{"label": box.get("label") or "", "box": {c: box[c] for c in COORDINATES}}
                for box in (value or {}).get("boxes") or []]

    # -- Correction --

    def fill(self, result: dict[str, Any]) -> list[Any]:
        """Filled when the result comes with its ``image`` (else the tab fills the editor from its input)."""
        image = result.get("image")
        if image is None:
            return [gr.skip(), gr.skip()]
        value = self.editor_value(image, result.get("boxes") or [])
        return [value, self.table_of(value)]

    def read(self, result: dict[str, Any], values: list[Any]) -> Any:
        value = values[0]
        if not value or not value.get("image"):
            return None
        if value.get("orientation"):
            raise InvalidFeedbackError("Turn the image back upright before saving: boxes are saved in the "
                                       "picture's own orientation.")
        boxes = clean_boxes(self.boxes_of(value))
        if "width" in result and "height" in result:
            check_inside(boxes, result["width"], result["height"])
        found = [{"label": item["label"], "box": {c: round(item["box"][c]) for c in COORDINATES}}
                 for item in result.get("boxes") or []]
        as_ints = [{"label": item["label"], "box": {c: round(item["box"][c]) for c in COORDINATES}} for item in boxes]
        return None if as_ints == found else boxes


def correction() -> Correction:
    """The correction widgets under a result (and in Annotate)."""
    return BoxesCorrection()


def build(ctx: AppContext) -> SimpleNamespace:
    spec = task_spec(TASK)
    with gr.Row(equal_height=False):
        with gr.Column():
            image = gr.Image(label="Image", type="filepath", sources=["upload", "webcam", "clipboard"],
                             image_mode=None, height=320, elem_classes="mmdemo-input-image")
            queries = gr.Textbox("", label="What to find (separated by commas or new lines)", lines=2,
                                 placeholder="cat, remote control")
            model, note = model_picker(ctx, TASK)
            with gr.Accordion("Advanced settings", open=False):
                threshold = gr.Number(None, label="Score threshold, 0-1 (empty: the model's default)",
                                      minimum=0, maximum=1, step=0.05)
                max_boxes = gr.Number(DEFAULT_MAX_BOXES, label=f"Most boxes shown (1-{MAX_BOXES})", precision=0,
                                      minimum=1, maximum=MAX_BOXES)
            button = gr.Button("Detect", variant="primary")
        with results_column() as results:
            drawn = gr.Image(label="Boxes found", type="pil", interactive=False, height=320, format="jpeg",
                             elem_classes="mmdemo-boxes-drawn")
            table = gr.Dataframe(headers=["label", "score", *COORDINATES], label="Boxes (pixels)", interactive=False,
                                 max_height=240)
            area = output_area(ctx, TASK, results)
    examples([[asset("cat.jpg"), "cat, cup of coffee"], [asset("astronaut.jpg"), "person, flag, rocket"]],
             inputs=[image, queries])
    event = connect(ctx, task=TASK, button=button, request=request,
                    inputs=[image, queries, model, threshold, max_boxes], present=present, outputs=[table],
                    area=area, api_name=spec.api_name, model=model, note=note, media="image", text="queries",
                    batch=True)
    editor: BoxesCorrection = area.feedback.correction  # type: ignore[assignment]

    def show(value: Any, result: dict[str, Any] | None) -> tuple[Any, Any, Any]:
        """The boxes drawn on the input image, and the correction editor on it."""
        picture = input_image(value)
        if picture is None or not result:
            return None, gr.skip(), gr.skip()
        # The editor gets a file: handed a PIL image it would encode it (WebP), seconds for a large photo.
        path = ctx.output_path("detect", ".jpg")
        picture.save(path, format="JPEG", quality=92)
        start = editor.editor_value(str(path), result.get("boxes") or [])
        return draw_boxes(picture, result.get("boxes") or []), start, editor.table_of(start)

    event.success(show, [image, area.details], [drawn, editor.annotator, editor.table], queue=False,
                  preprocess=False, show_progress="hidden", api_visibility="private")
    event.failure(lambda: None, None, [drawn], queue=False, show_progress="hidden", api_visibility="private")
    return SimpleNamespace(image=image, queries=queries, model=model, threshold=threshold, max_boxes=max_boxes,
                           button=button, drawn=drawn, table=table, area=area, editor=editor, event=event)


def demo(ctx: AppContext) -> gr.Blocks:
    return standalone(build, ctx, f"mmdemo · {TITLE}")
