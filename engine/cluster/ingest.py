"""Bulk ingest on Ray Data: Parquet of vectors or images into a sharded memory.

    engine ingest /shared/mem 's3-or-nfs/part-*.parquet' --checkpoint runs/omniglot

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

from ..errors import InvalidValueError


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

    def __init__(self, checkpoint: str, image_size: int):
        from ..train import load_checkpoint

        self.model = load_checkpoint(checkpoint)
        if self.model.support_lstm is not None:
            raise InvalidValueError("an FCE model embeds a whole support set at once; ingest embeds each image "
                                    "alone: use a checkpoint trained without --fce")
        self.size = image_size

    def __call__(self, batch: dict) -> dict:
        import torch

        from ..data.images import as_input

        images = np.stack([decode(b, self.size) for b in batch.pop("image")])
        with torch.no_grad():
            batch["vector"] = self.model.g_backbone(as_input(images)).numpy().astype(np.float32)
        return batch


def decode(item, size: int) -> np.ndarray:
    """Encoded image bytes (or {"bytes": ...}) as a (size, size) uint8 grayscale array."""
    from PIL import Image

    data = item.get("bytes") if isinstance(item, dict) else item
    if not isinstance(data, (bytes, bytearray, memoryview, np.bytes_)):
        raise InvalidValueError(f"an image must be encoded bytes, got {type(data).__name__}")
    try:
        with Image.open(io.BytesIO(bytes(data))) as im:
            im = im.convert("L")
            if im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except (OSError, ValueError) as exc:
        raise InvalidValueError(f"an image could not be decoded: {exc}") from None


def ingest(memory, sources, *, checkpoint: str | Path | None = None, image_size: int = 28,
           batch_size: int = 4096, replicas: int = 2, progress: bool = True) -> IngestReport:
    """Write the rows of Parquet ``sources`` into ``memory`` (any :class:`~engine.protocol.MemoryLike`).

    Args:
        memory: the memory to write into (a ShardedMemory, usually).
        sources: Parquet files or directories (anything ``ray.data.read_parquet`` reads).
        checkpoint: a trained model's checkpoint folder; needed when rows carry images.
        image_size: images are resized to this square before embedding.
        batch_size: rows a model call embeds and an add writes.
        replicas: model replicas embedding in parallel.

    Raises:
        InvalidValueError: no label column, neither vector nor image, images without a checkpoint.
    """
    import time

    import ray
    from tqdm import tqdm

    t0 = time.perf_counter()
    # Reads and model replicas reserve a quarter of a CPU each (a reservation for the scheduler,
    # not a limit: torch still uses the node's cores), so that on a small machine, where the
    # shards hold a sliver of CPU, a read and the replicas fit together instead of each
    # waiting for a whole CPU the other holds.
    ds = ray.data.read_parquet(str(sources) if isinstance(sources, (str, Path)) else [str(s) for s in sources],
                               num_cpus=0.25)
    names = ds.schema().names
    total = ds.count()  # from the Parquet metadata: nothing is embedded twice
    if "label" not in names:
        raise InvalidValueError(f"no 'label' column in {sources} (columns: {names})")
    embedded = "vector" not in names
    if embedded:
        if "image" not in names:
            raise InvalidValueError(f"rows need a 'vector' or an 'image' column (columns: {names})")
        if checkpoint is None:
            raise InvalidValueError("rows carry images: give the checkpoint of a trained model to embed them")
        Embedder(str(checkpoint), image_size)  # checked here, before any worker starts: exists, not FCE
        ds = ds.map_batches(Embedder, fn_constructor_args=(str(checkpoint), image_size), batch_size=batch_size,
                            batch_format="numpy", concurrency=replicas, num_cpus=0.25)
    written = 0
    with tqdm(total=total, desc="ingest", unit="slot", disable=not progress) as bar:
        for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
            vectors = np.stack(batch["vector"]) if batch["vector"].dtype == object else batch["vector"]
            memory.add(vectors, batch["label"], ids=batch.get("id"), weights=batch.get("weight"))
            written += len(vectors)
            bar.update(len(vectors))
    return IngestReport(rows=total, slots=written, seconds=time.perf_counter() - t0, embedded=embedded)
