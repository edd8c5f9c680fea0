"""The manifest: a memory's one commit point (format, settings, the snapshot and the log
segments it names), written canonically with a SHA-256 of its own bytes, and checked
whole when read."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from ..errors import CorruptFileError, FormatVersionError

FORMAT = "engine-memory"
FORMAT_VERSION = 3
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20
SNAPSHOT_NAME = re.compile(r"snapshot-[0-9]{6,12}\.arrow")
SEGMENT_NAME = re.compile(r"wal-[0-9]{6,12}\.arrows")


def manifest_bytes(manifest: dict) -> bytes:
    """The canonical bytes of a manifest, with the SHA-256 of the rest as its ``checksum``."""
    body = {k: v for k, v in manifest.items() if k != "checksum"}
    digest = hashlib.sha256(_canonical(body)).hexdigest()
    return _canonical({**body, "checksum": digest})


def _canonical(doc: dict) -> bytes:
    return (json.dumps(doc, sort_keys=True, indent=1, allow_nan=False) + "\n").encode()


def read_manifest(path: Path) -> dict:
    """Read and check ``path/manifest.json``: format, version, checksum, every field's type.

    Raises:
        FormatVersionError, CorruptFileError.
    """
    file = path / MANIFEST
    try:
        if file.stat().st_size > MAX_MANIFEST_BYTES:  # never read an absurd file whole
            raise CorruptFileError(f"{file}: {file.stat().st_size} bytes, far too large for a manifest")
        raw = file.read_bytes()
    except OSError as exc:
        raise CorruptFileError(f"{file}: unreadable ({exc.strerror})") from None
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CorruptFileError(f"{file}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CorruptFileError(f"{file}: not an engine memory manifest")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatVersionError(f"{file}: format version {version!r}; this engine reads version {FORMAT_VERSION}")
    try:
        canonical = manifest_bytes(doc)
    except (TypeError, ValueError):
        canonical = None
    if canonical != raw:
        raise CorruptFileError(f"{file}: checksum mismatch (the manifest was damaged or edited)")
    _check_manifest(file, doc)
    return {k: v for k, v in doc.items() if k != "checksum"}


def _is_int(x, lo: int = 0) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= lo


def _check_manifest(file: Path, m: dict) -> None:
    """Every field the store reads has the type it must have."""
    def bad(what: str):
        raise CorruptFileError(f"{file}: {what}")

    checks = {
        "memory_id": lambda v: isinstance(v, str) and re.fullmatch(r"[0-9a-f]{32}", v),
        "dim": lambda v: _is_int(v, 1),
        "settings": lambda v: isinstance(v, dict),  # the owner's: Memory checks their values
        "label_kind": lambda v: v in (None, "int", "str"),
        "seq": lambda v: _is_int(v),
        "generation": lambda v: _is_int(v),
        "wal": lambda v: isinstance(v, list),
        "snapshot": lambda v: v is None or isinstance(v, dict),
    }
    for key, ok in checks.items():
        if key not in m:
            bad(f"the manifest lacks {key!r}")
        if not ok(m[key]):
            bad(f"the manifest's {key!r} is invalid: {m[key]!r}")
    snap = m["snapshot"]
    if snap is not None:
        if set(snap) != {"file", "sha256", "rows", "seq"} or not isinstance(snap["file"], str) \
                or not SNAPSHOT_NAME.fullmatch(snap["file"]) or not isinstance(snap["sha256"], str) \
                or not _is_int(snap["rows"]) or snap["seq"] != m["seq"]:
            bad(f"the manifest's snapshot entry is invalid: {snap!r}")
    names = set()
    for i, e in enumerate(m["wal"]):
        if not isinstance(e, dict) or not isinstance(e.get("file"), str) or not SEGMENT_NAME.fullmatch(e["file"]):
            bad(f"log entry {i} is invalid: {e!r}")
        sealed = set(e) == {"file", "records", "bytes", "crc32"} and all(
            _is_int(e[k]) for k in ("records", "bytes", "crc32"))
        if not sealed and (set(e) != {"file"} or i != len(m["wal"]) - 1):
            bad(f"log entry {i} is invalid (only the last segment may be open): {e!r}")
        if e["file"] in names:
            bad(f"log segment {e['file']} is listed twice")
        names.add(e["file"])
    _check_history(m, bad)


def _generation(name: str) -> int:
    return int(re.search(r"-([0-9]+)\.", name).group(1))


def _check_history(m: dict, bad) -> None:
    """The manifest's fields agree with one another as the store writes them: a manifest
    without a snapshot has logged nothing before its log (``seq`` 0), and file generations
    rise from the snapshot through the log segments, none above ``generation``. A manifest
    edited and signed again (a snapshot dropped, a segment's place changed) is refused,
    never opened with fewer slots."""
    if m["snapshot"] is None and m["seq"] != 0:
        bad(f"no snapshot, but sequence number {m['seq']} says one was taken")
    order = ([_generation(m["snapshot"]["file"])] if m["snapshot"] is not None else []) + \
        [_generation(e["file"]) for e in m["wal"]]
    if any(b <= a for a, b in zip(order, order[1:])) or any(g > m["generation"] for g in order):
        bad(f"its files are out of order for generation {m['generation']}: "
            f"{[m['snapshot']['file']] if m['snapshot'] else []} {[e['file'] for e in m['wal']]}")
