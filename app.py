"""mmdemo's web app: ``python app.py [--profile tiny] [--port 7860] ...`` (the flags of ``mmdemo serve``).

Also the entry point of the Hugging Face Space (``app_file: app.py``): Spaces run ``python app.py`` and
set GRADIO_SERVER_NAME=0.0.0.0, which mmdemo honours when MMDEMO_HOST is not set. Tools that import
this file and look for ``demo`` (gradio's reload mode) get one built from the MMDEMO_* variables, on
first access.
"""

from __future__ import annotations

import sys
from typing import Any

from mmdemo.cli import main


def __getattr__(name: str) -> Any:
    if name != "demo":
        raise AttributeError(name)
    from mmdemo.config import Settings
    from mmdemo.server import build_app

    global demo
    demo = build_app(Settings.from_env())
    return demo


if __name__ == "__main__":
    raise SystemExit(main(["serve", *sys.argv[1:]]))
