"""Typed settings: defaults, then ``MMDEMO_*`` environment variables, then command-line flags.

One data directory (``MMDEMO_DATA_DIR``) holds everything mmdemo writes: the tiny checkpoints it
builds, the feedback database, stored media and exports.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Mapping

from .errors import InvalidInputError

Profile = Literal["default", "tiny"]
PROFILES: tuple[str, ...] = ("default", "tiny")
DEVICES: tuple[str, ...] = ("auto", "cuda", "mps", "cpu")
DTYPES: tuple[str, ...] = ("auto", "float32", "float16", "bfloat16")
LOG_FORMATS: tuple[str, ...] = ("text", "json")

_UNITS = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
          "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4}


def default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "mmdemo"


@dataclass
class Settings:
    """Everything that configures a running mmdemo; each field has an ``MMDEMO_<NAME>`` override."""

    profile: str = "default"
    data_dir: Path = field(default_factory=default_data_dir)
    catalog: Path | None = None          # user catalog file (TOML or YAML) adding/overriding models
    device: str = "auto"                 # auto | cuda | cuda:N | mps | cpu
    dtype: str = "auto"                  # auto | float32 | float16 | bfloat16
    memory_budget: str = "auto"          # "20GiB", "0.8" (fraction of device memory) or "auto"
    preload: tuple[str, ...] = ()        # model ids loaded at start-up
    # input limits
    max_image_pixels: int = 40_000_000
    max_upload_mb: float = 50.0
    max_audio_seconds: float = 600.0
    max_request_kb: float = 1024.0       # bodies of requests that carry no upload or model input
    # server
    host: str = "127.0.0.1"
    port: int = 7860
    root_path: str = ""
    concurrency: int = 0                 # 0: 1 on a GPU, 2 on CPU
    max_queue: int = 64
    max_batch: int = 8
    auth_file: Path | None = None
    secret: str | None = field(default=None, repr=False)  # signs cookies; None: random per process
    trusted_proxies: tuple[str, ...] = ()  # addresses/networks whose X-Forwarded-For is believed
    # feedback store
    database_url: str | None = field(default=None, repr=False)  # SQLAlchemy URL; None: SQLite in data_dir
    feedback_ttl_days: float = 30.0      # how long a shown result accepts feedback; 0: forever
    defaults_poll_s: float = 3.0         # how often a replica reads the promoted default models (at most 10)
    sync_repo: str | None = None         # a Hub dataset repo ("owner/name") the store syncs to and restores from
    sync_every_minutes: float = 5.0      # how often the store syncs to sync_repo (and at shutdown)
    # operations
    log_format: str = "text"             # text | json (one JSON object per line)
    metrics_token: str | None = field(default=None, repr=False)  # bearer token for /metrics; None: loopback only
    shutdown_grace_s: float = 30.0       # on SIGTERM, how long running calls may take to finish

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.catalog is not None:
            self.catalog = Path(self.catalog).expanduser()
        if self.auth_file is not None:
            self.auth_file = Path(self.auth_file).expanduser()
        if isinstance(self.preload, str):
            self.preload = tuple(p.strip() for p in self.preload.split(",") if p.strip())
        if isinstance(self.trusted_proxies, str):
            self.trusted_proxies = tuple(p.strip() for p in self.trusted_proxies.split(",") if p.strip())
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise InvalidInputError(f"Trusted proxy '{proxy}' is not an IP address or network (e.g. "
                                        "10.0.0.5 or 10.0.0.0/8).") from None
        if self.profile not in PROFILES:
            raise InvalidInputError(f"Unknown profile '{self.profile}'; choose one of {', '.join(PROFILES)}.")
        if self.dtype not in DTYPES:
            raise InvalidInputError(f"Unknown dtype '{self.dtype}'; choose one of {', '.join(DTYPES)}.")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            raise InvalidInputError(f"Unknown device '{self.device}'; use auto, cpu, mps, cuda or cuda:N.")
        parse_memory_budget(self.memory_budget, total_bytes=1)  # validate early
        if self.log_format not in LOG_FORMATS:
            raise InvalidInputError(f"Unknown log format '{self.log_format}'; choose one of {', '.join(LOG_FORMATS)}.")
        if not 0 < self.defaults_poll_s <= 10:
            raise InvalidInputError("MMDEMO_DEFAULTS_POLL_S must be more than 0 and at most 10 seconds (a "
                                    "promotion reaches every replica within 10 s).")
        if self.sync_repo is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.sync_repo):
            raise InvalidInputError(f"MMDEMO_SYNC_REPO={self.sync_repo!r} is not a repo id; use owner/name (a "
                                    "dataset repo, created private if it does not exist).")
        if not self.sync_every_minutes > 0:
            raise InvalidInputError("MMDEMO_SYNC_EVERY_MINUTES must be more than 0 (minutes between two syncs).")
        if self.shutdown_grace_s < 0:
            raise InvalidInputError("The shutdown grace period (MMDEMO_SHUTDOWN_GRACE_S) cannot be negative.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> "Settings":
        """Build settings from ``MMDEMO_*`` variables; keyword overrides (flags) win; None is ignored."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = environ.get(f"MMDEMO_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _coerce(f, raw)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @property
    def tiny_dir(self) -> Path:
        return self.data_dir / "tiny-models"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"

    @property
    def models_dir(self) -> Path:
        """Fine-tuned checkpoints, one folder per model id; the catalog serves them (see catalog.py)."""
        return self.data_dir / "models"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_kb * 1024)

    def replace(self, **changes: Any) -> "Settings":
        return dataclasses.replace(self, **changes)


GRADIO_SUMMARY_EVERY = 10_000  # events between two of gradio's queue analytics summaries


def apply_environment(settings: Settings) -> None:
    """Switch off analytics and telemetry; with the tiny profile, make the Hub libraries offline.

    Call before importing gradio, transformers or diffusers: they read these variables at import.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("DISABLE_TELEMETRY", "1")  # diffusers
    # gradio's queue rebuilds a pandas summary of up to 10,000 past events after every event (for its own
    # monitoring page, which mmdemo does not serve; /metrics is ours): 3-11 ms of CPU per call on the model
    # threads, more than a tiny model's forward pass. Once every GRADIO_ANALYTICS_CACHE_FREQUENCY events.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", str(GRADIO_SUMMARY_EVERY))
    if settings.profile == "tiny":
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _coerce(f: dataclasses.Field, raw: str) -> Any:
    kind = str(f.type)
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise InvalidInputError(f"MMDEMO_{f.name.upper()}={raw!r} is not a number.") from None
    return raw


def parse_memory_budget(value: str | int | float, total_bytes: int) -> int:
    """Turn ``"20GiB"``, ``"512MB"``, ``"0.8"`` (fraction of total) or ``"auto"`` into bytes.

    ``auto`` is 90% of ``total_bytes`` (the device's memory).
    """
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    text = str(value).strip().lower().replace(" ", "")
    if text == "auto":
        return int(total_bytes * 0.9)
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*)", text)
    if not match or match.group(2) not in _UNITS:
        raise InvalidInputError(
            f"Memory budget {value!r} is not understood; use e.g. '20GiB', '512MB', '0.8' (a fraction) or 'auto'."
        )
    number, unit = float(match.group(1)), match.group(2)
    if unit == "" and number <= 1.0:
        return int(total_bytes * number)
    return int(number * _UNITS[unit])
