"""Bulk ingest on Ray Data: Parquet of vectors or images into a sharded memory.

    engine ingest /shared/mem /shared/data/part-*.parquet --checkpoint runs/omniglot   # or a directory

Each Parquet row is one slot: a ``label`` column (int or str), an optional ``id``
column, an optional ``weight`` column, and either

- ``vector``: a list of floats (the embedding itself), or
- ``image``: encoded image bytes (PNG, JPEG, ...; or a struct with a ``bytes`` field,
  as Hugging Face datasets write them), embedded by a trained Matching Network's g.

Images are decoded, made grayscale and resized to ``image_size`` by Pillow, and
embedded in parallel by Ray Data (``map_batches`` over a pool of model replicas);
the driver writes the embeddings into the memory batch by batch, with a progress bar.
FCE models are refused: a full-context embedding depends on the whole support set,
and ingest embeds each image alone.
"""

from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import EngineError, InvalidValueError

MAX_PIXELS = 4096 * 4096  # an encoded image decoding to more is refused (a decompression bomb)


@dataclass(frozen=True)
class IngestReport:
    rows: int
    slots: int
    seconds: float
    embedded: bool

    def as_dict(self) -> dict:
        return asdict(self)


class Embedder:
    """A Ray Data batch function: image bytes -> g embeddings (one model replica an actor)."""

    def __init__(self, checkpoint: str, image_size: int | None, max_pixels: int = MAX_PIXELS):
        from ..data.omniglot import SIZE, check_size
        from ..train import load_checkpoint

        self.model = load_checkpoint(checkpoint)
        if self.model.support_lstm is not None:
            raise InvalidValueError("an FCE model embeds a whole support set at once; ingest embeds each image "
                                    "alone: use a checkpoint trained without --fce")
        trained = self.model.image_size
        if image_size is not None:
            image_size = check_size(image_size)
        if image_size is not None and trained is not None and image_size != trained:
            raise InvalidValueError(f"the checkpoint's model was trained on {trained}x{trained} images; "
                                    f"image_size={image_size} would feed it another size")
        self.size = image_size if image_size is not None else (trained or SIZE)
        self.max_pixels = max_pixels

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..data.images import as_input

        raw = batch.pop("image")
        try:
            images = np.stack([decode(b, self.size, self.max_pixels) for b in raw])
        except InvalidValueError as exc:  # passed on as data: Ray Data would wrap it in its own text
            batch["vector"] = np.zeros((len(raw), self.model.dim), np.float32)
            batch["error"] = np.array([str(exc)] * len(raw), dtype=object)
            return batch
        with torch.no_grad():
            batch["vector"] = self.model.g_backbone(as_input(images)).numpy().astype(np.float32)
        batch["error"] = np.array([""] * len(raw), dtype=object)
        return batch


def decode(item, size: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Encoded image bytes (or {"bytes": ...}) as a (size, size) uint8 grayscale array; an
    image of more than ``max_pixels`` pixels is refused before it is decoded."""
    from PIL import Image

    data = item.get("bytes") if isinstance(item, dict) else item
    if not isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):
        raise InvalidValueError(f"an image must be encoded bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:  # reads the header only
            if im.size[0] * im.size[1] > max_pixels:
                raise InvalidValueError(f"an image of {im.size[0]} x {im.size[1]} pixels is larger than the "
                                        f"{max_pixels:,} pixels allowed")
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        if isinstance(exc, InvalidValueError):
            raise
        raise InvalidValueError(f"an image could not be decoded: {str(exc).splitlines()[0]}") from None


def check_sources(sources) -> tuple[list[str], bool]:
    """(the columns, whether rows carry images) of Parquet ``sources``, checked by type before
    anything is written (read from the files' schemas, no Ray needed).

    Raises:
        InvalidValueError: no file, no ``label`` column, neither ``vector`` nor ``image``, or
            a column of the wrong type (labels must be integers or strings, vectors lists of
            numbers, ids integers, weights numbers, images binary or a struct with ``bytes``).
    """
    import pyarrow as pa
    import pyarrow.dataset as pds

    paths = [str(sources)] if isinstance(sources, (str, Path)) else [str(p) for p in sources]
    if not paths:
        raise InvalidValueError("no Parquet sources given")
    schemas = []
    for path in paths:  # a file or a directory each (pyarrow reads a directory given alone)
        try:
            schemas.append(pds.dataset(path, format="parquet").schema)
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise InvalidValueError(f"cannot read Parquet from {path}: {str(exc).splitlines()[0]}") from None
    names = schemas[0].names
    for path, other in zip(paths[1:], schemas[1:]):
        if other.names != names:
            raise InvalidValueError(f"{path} has columns {other.names}, {paths[0]} has {names}")
    schema = schemas[0]
    if "label" not in names:
        raise InvalidValueError(f"no 'label' column in {paths} (columns: {names})")
    if "vector" not in names and "image" not in names:
        raise InvalidValueError(f"rows need a 'vector' or an 'image' column (columns: {names})")
    t = schema.field("label").type
    if not (pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)):
        raise InvalidValueError(f"labels must be integers or strings, got {t}")
    if "vector" in names:
        t = schema.field("vector").type
        if not (pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)) or not (
                pa.types.is_floating(t.value_type) or pa.types.is_integer(t.value_type)):
            raise InvalidValueError(f"vectors must be lists of numbers, got {t}")
    elif "image" in names:
        t = schema.field("image").type
        ok = pa.types.is_binary(t) or pa.types.is_large_binary(t) or (
            pa.types.is_struct(t) and t.get_field_index("bytes") >= 0)
        if not ok:
            raise InvalidValueError(f"images must be encoded bytes (binary, or a struct with 'bytes'), got {t}")
    if "id" in names and not pa.types.is_integer(schema.field("id").type):
        raise InvalidValueError(f"ids must be integers, got {schema.field('id').type}")
    if "weight" in names:
        t = schema.field("weight").type
        if not (pa.types.is_floating(t) or pa.types.is_integer(t)):
            raise InvalidValueError(f"weights must be numbers, got {t}")
    return names, "vector" not in names


def parquet_files(sources) -> list[tuple[str, int]]:
    """The Parquet files of ``sources`` in the order they are read (each local directory's
    files by name, numbers in names compared as numbers: part-2 before part-10), with their
    row counts from the files' footers. A URI (s3://...) is read as given, counted whole."""
    import re

    import pyarrow.dataset as pds
    import pyarrow.parquet as pq

    def natural(name: str) -> list:
        return [int(t) if t.isdigit() else t for t in re.split(r"([0-9]+)", name)]

    paths = [str(sources)] if isinstance(sources, (str, Path)) else [str(p) for p in sources]
    files = []
    for path in paths:
        if "://" in path:  # a remote filesystem: Ray Data lists it itself
            files.append((path, pds.dataset(path, format="parquet").count_rows()))
            continue
        found = [path] if Path(path).is_file() else sorted(pds.dataset(path, format="parquet").files, key=natural)
        files += [(f, pq.ParquetFile(f).metadata.num_rows) for f in found]
    return files


def _where(files: list[tuple[str, int]], start: int, n: int) -> str:
    """The files and rows within them of input rows ``start`` .. ``start + n - 1``."""
    parts, offset, end = [], 0, start + n
    for name, rows in files:
        lo, hi = max(start, offset), min(end, offset + rows)
        if lo < hi:
            parts.append(f"{Path(name).name} rows {lo - offset:,}-{hi - offset - 1:,}")
        offset += rows
    return ", ".join(parts)


def _engine_error(exc: BaseException) -> BaseException:
    """The engine error inside what Ray Data raised from a worker (or the error itself)."""
    seen, todo = set(), [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, EngineError):
            e.__traceback__ = None
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    # Ray Data passes a worker's error on as text: the engine error named in it, rebuilt
    import re

    from .. import errors

    text = "\n".join(str(e) for e in [exc, getattr(exc, "cause", None), exc.__cause__] if e is not None)
    for name, message in re.findall(r"(\w+Error): ([^\n]+)", text):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, EngineError) and cls.__init__ is EngineError.__init__:
            return cls(message.strip())
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return EngineError(f"ingest failed: {type(exc).__name__}: {lines[-1] if lines else ''}")


def ingest(memory, sources, *, checkpoint: str | Path | None = None, image_size: int | None = None,
           batch_size: int = 4096, replicas: int = 2, progress: bool = True, verbose: bool = False) -> IngestReport:
    """Write the rows of Parquet ``sources`` into ``memory`` (any :class:`~engine.protocol.MemoryLike`).

    Args:
        memory: the memory to write into (a ShardedMemory, usually).
        sources: Parquet files or directories (anything ``ray.data.read_parquet`` reads).
        checkpoint: a trained model's checkpoint folder; needed when rows carry images.
        image_size: images are resized to this square before embedding (default: the side
            the checkpoint's model was trained on, 28 for a checkpoint that does not say).
        batch_size: rows a model call embeds and an add writes.
        replicas: model replicas embedding in parallel.
        progress: one progress bar, of the rows written.
        verbose: Ray Data's own logs and progress bars too (by default only its warnings and
            errors).

    Raises:
        InvalidValueError: no label column, neither vector nor image, images without a checkpoint.
    """
    import logging
    import time

    import ray

    t0 = time.perf_counter()
    names, embedded = check_sources(sources)  # before anything is read by workers or written
    files = parquet_files(sources)
    # rows arrive in the order of the files and of their rows, so that an error names its rows
    context = ray.data.DataContext.get_current()
    # Ray Data's logs; its progress module only says that its bars are off
    data_log, bars_log = logging.getLogger("ray.data"), logging.getLogger("ray.data._internal.progress")
    kept = (context.execution_options.preserve_order, context.enable_progress_bars,
            context.enable_operator_progress_bars, data_log.level, bars_log.level)
    context.execution_options.preserve_order = True
    if not verbose:  # one bar, the engine's; Ray Data says only what goes wrong
        context.enable_progress_bars = context.enable_operator_progress_bars = False
        data_log.setLevel(logging.WARNING)
        bars_log.setLevel(logging.ERROR)
    try:
        # Reads and model replicas reserve a quarter of a CPU each (a reservation for the scheduler,
        # not a limit: torch still uses the node's cores), so that on a small machine, where the
        # shards hold a sliver of CPU, a read and the replicas fit together instead of each
        # waiting for a whole CPU the other holds.
        ds = ray.data.read_parquet([f for f, _ in files], num_cpus=0.25)
        return _ingest(memory, ds, files, embedded, checkpoint, image_size, batch_size, replicas, progress, t0)
    finally:
        (context.execution_options.preserve_order, context.enable_progress_bars,
         context.enable_operator_progress_bars) = kept[:3]
        data_log.setLevel(kept[3])
        bars_log.setLevel(kept[4])


def _ingest(memory, ds, files, embedded, checkpoint, image_size, batch_size, replicas, progress, t0) -> IngestReport:
    """Embed (if rows carry images) and write the rows of ``ds``, read from ``files``, in order."""
    import ray

    total = sum(rows for _, rows in files)  # from the Parquet metadata: nothing is embedded twice
    if embedded:
        if checkpoint is None:
            raise InvalidValueError("rows carry images: give the checkpoint of a trained model to embed them")
        Embedder(str(checkpoint), image_size)  # checked here, before any worker starts: exists, not FCE
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=replicas)  # a small input needs no idle replica
        ds = ds.map_batches(Embedder, fn_constructor_args=(str(checkpoint), image_size), batch_size=batch_size,
                            batch_format="numpy", compute=pool, num_cpus=0.25)
    written = 0
    batches = iter(ds.iter_batches(batch_size=batch_size, batch_format="numpy"))
    try:
        return _write_batches(memory, batches, files, total, embedded, progress, written, t0)
    finally:  # an error stops the reading early: ended here, while Ray is up (not by the collector at exit)
        close = getattr(batches, "close", None)
        if close is not None:
            close()


def _write_batches(memory, batches, files, total, embedded, progress, written, t0) -> IngestReport:
    """Write each batch read into ``memory``, with one progress bar; an error names its rows."""
    import time

    from tqdm import tqdm

    with tqdm(total=total, desc="ingest", unit="slot", disable=not progress) as bar:
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                break
            except Exception as exc:  # noqa: BLE001 - a worker's error, as the engine error it carries
                raise _at_rows(_engine_error(exc), written, None, files) from None
            try:
                failed = [e for e in batch.get("error", ()) if e]  # batches regroup rows: any row
                if failed:
                    raise InvalidValueError(str(failed[0]))
                for c in ("label", "id"):  # a null integer arrives as a float NaN, a null string as None
                    if c in batch and (batch[c].dtype.kind == "f" or (
                            batch[c].dtype == object and any(v is None for v in batch[c]))):
                        raise InvalidValueError(f"the '{c}' column holds nulls")
                if batch["vector"].dtype == object and any(v is None for v in batch["vector"]):
                    raise InvalidValueError("the 'vector' column holds nulls")
                vectors = np.stack(batch["vector"]) if batch["vector"].dtype == object else batch["vector"]
                memory.add(vectors, batch["label"], ids=batch.get("id"), weights=batch.get("weight"))
            except (EngineError, ValueError, TypeError) as exc:
                raise _at_rows(exc if isinstance(exc, EngineError) else InvalidValueError(str(exc)), written,
                               len(batch["label"]), files) from None
            written += len(vectors)
            bar.update(len(vectors))
    return IngestReport(rows=total, slots=written, seconds=time.perf_counter() - t0, embedded=embedded)


def _at_rows(exc: BaseException, written: int, n: int | None, files: list[tuple[str, int]]) -> BaseException:
    """``exc`` with where it happened: the input rows of the batch (and the files and rows
    within them), and how many were written."""
    where = f"input rows {written:,}-{written + n - 1:,}: {_where(files, written, n)}" if n else \
        f"after input row {written:,}"
    note = f" ({where}; positions are within that batch; {written:,} rows were written before it)"
    exc.args = (f"{exc.args[0] if exc.args else exc}{note}", *exc.args[1:])
    return exc
