"""The ``engine`` command: create, fill, query, inspect and serve memories; train and evaluate models."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from .errors import EngineError, InvalidValueError, MissingFileError, OutputExistsError, UnknownLabelError
from .extras import EXTRA_OF, missing
from .inputs import read_batch
from .memory import Memory
from .options import help_text
from .runtime import prepare as prepare_torch

app = typer.Typer(help="engine: a memory-retrieval engine for Matching Networks.", no_args_is_help=True)
memory_app = typer.Typer(help="Create, fill, query and inspect durable memories.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
_DEBUG = {"on": False}


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the traceback of an error, not one line.")) -> None:
    """engine: a memory-retrieval engine for Matching Networks."""
    _DEBUG["on"] = debug
console = Console()

PathArg = typer.Argument(..., help="The memory's directory.")
JsonOpt = typer.Option(False, "--json", help="Print JSON.")
VectorsArg = typer.Argument(..., help="Vectors: a .parquet/.arrow/.feather/.csv table or a .npy array.")
VectorColumnOpt = typer.Option("vector", help="List column of a table (else numeric columns are features).")


def _fail(exc: BaseException) -> None:
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code=2)


# The library's advice to a Python caller, as a command-line user takes it.
_CLI_WORDS = (("pass upsert=True to replace", "--upsert replaces them"),
              ("open it with Memory.open(", "use it with the memory commands ("),
              ("use ShardedMemory.open", "use it with --cluster"),
              ('make the memory with track_usage=True (or policy="age")', "create the memory with --track-usage"),
              ("this memory was made with track_usage=False", "this memory was created without --track-usage"))


def _cli_words(exc: BaseException) -> str:
    text = str(exc)
    for library, cli in _CLI_WORDS:
        text = text.replace(library, cli)
    return text


def _command(typer_app: typer.Typer, name: str):
    """Register a command whose engine errors become a one-line message and exit code 2."""
    return lambda fn: typer_app.command(name)(_guard(fn, name))


def _guard(fn, name: str = ""):
    """Turn the engine's errors (and the system's: a file that cannot be read or written) into
    a one-line message and exit code 2; anything else is a bug and keeps its traceback, as
    every error does with ``--debug``."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:  # a command of an optional extra that is not installed
            if exc.name and exc.name.split(".")[0] in EXTRA_OF and not _DEBUG["on"]:
                _fail(missing(exc.name, f"engine {name or fn.__name__}"))
            raise
        except (EngineError, OSError) as exc:
            if _DEBUG["on"]:
                raise
            _fail(_cli_words(exc))

    return wrapper


@_command(memory_app, "create")
def create(
    path: Path = PathArg,
    dim: int = typer.Option(..., help="Embedding dimension."),
    metric: str = typer.Option("cosine", help=help_text("metric")),
    index: str = typer.Option("auto", help=help_text("index")),
    temperature: str = typer.Option("auto", help=help_text("temperature")),
    probs: str = typer.Option("top-k", help=help_text("probs")),
    budget: str | None = typer.Option(None, help=help_text("budget")),
    policy: str = typer.Option("merge", help=help_text("policy")),
    nprobe: int | None = typer.Option(None, help=help_text("nprobe")),
    ef_search: int | None = typer.Option(None, help=help_text("ef_search")),
    recall: float | None = typer.Option(None, help=help_text("recall")),
    track_usage: bool | None = typer.Option(None, help=help_text("track_usage")),
) -> None:
    """Create an empty durable memory."""
    try:
        t = temperature if temperature == "auto" else float(temperature)
    except ValueError:
        raise InvalidValueError(f'--temperature must be a number or "auto", got {temperature!r}') from None
    if Path(path).parent != Path(path) and not Path(path).parent.is_dir():
        raise MissingFileError(f"{Path(path).parent}: no such directory (create it first)")
    mem = Memory(dim, metric=metric, index=index, temperature=t, path=path, probs=probs, budget=_budget(budget),
                 policy=policy, nprobe=nprobe, ef_search=ef_search, recall=recall, track_usage=track_usage)
    mem.close()
    typer.echo(f"created {mem!r}")


@_command(memory_app, "add")
def add(
    path: Path = PathArg,
    file: Path = VectorsArg,
    labels: Path | None = typer.Option(None, help="Labels for a .npy file: .npy or one label per line."),
    label_column: str = typer.Option("label", help="Label column of a table."),
    vector_column: str = VectorColumnOpt,
    upsert: bool = typer.Option(False, help="Replace slots whose id exists."),
    as_json: bool = JsonOpt,
) -> None:
    """Add slots from a file (ids, weights from 'id' and 'weight' columns when present)."""
    batch = read_batch(file, labels_path=labels, label_column=label_column, vector_column=vector_column)
    if batch.labels is None:
        raise InvalidValueError(f"{file}: no labels (a {label_column!r} column, or --labels FILE)")
    with Memory.open(path) as mem:
        ids = mem.add(batch.vectors, batch.labels, ids=batch.ids, weights=batch.weights, upsert=upsert)
        size = len(mem)
    if as_json:
        typer.echo(json.dumps({"added": len(ids), "first_id": int(ids[0]), "last_id": int(ids[-1]), "slots": size}))
    else:
        typer.echo(f"added {len(ids)} slots (ids {ids[0]}..{ids[-1]}); memory holds {size}")


@_command(memory_app, "query")
def query(
    path: Path = PathArg,
    file: Path = VectorsArg,
    k: int = typer.Option(64, "-k", "--k", help="Slots per query."),
    tail: float | None = typer.Option(None, help="Grow k until the tail bound (with --probs full: the "
                                         "estimated tail) is below this."),
    probs: str | None = typer.Option(None, help="'full': estimate attention over the whole memory; "
                                        "'top-k': renormalise over the top-k (default: the memory's setting)."),
    top: int = typer.Option(3, help="Neighbours shown per query in table output."),
    labels: Path | None = typer.Option(None, help="The true labels of the queries (.npy or one per line; a "
                                          "table's label column is used by itself): prints the accuracy."),
    vector_column: str = VectorColumnOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Classify query vectors by attention over their top-k slots (with --probs full, over every slot)."""
    batch = read_batch(file, vector_column=vector_column, labels_path=labels)
    with Memory.open(path, read_only=True) as mem:
        res = mem.query(batch.vectors, k=k, tail=tail, probs=probs)
        kind = mem.label_kind
    accuracy = None
    if batch.labels is not None:
        if len(batch.labels) != len(res):
            raise InvalidValueError(f"{len(res)} queries but {len(batch.labels)} labels")
        truth = [str(v) for v in batch.labels] if kind == "str" else batch.labels  # as the memory's labels
        accuracy = float(np.mean([_py(a) == b for a, b in zip(res.labels, truth)]))
    if as_json:
        out = {
            "classes": res.classes.tolist(), "k": res.k, "k_requested": res.k_requested,
            "exact_bound": res.exact_bound,
            "queries": [
                {"label": _py(res.labels[i]), "probs": res.probs[i].round(6).tolist(),
                 "tail_bound": float(res.tail_bound[i]), "ids": res.ids[i].tolist(),
                 **({} if res.tail_estimate is None else {"tail_estimate": float(res.tail_estimate[i])}),
                 "scores": [None if np.isnan(s) else round(float(s), 6) for s in res.scores[i]]}
                for i in range(len(res))
            ],
        }
        if accuracy is not None:
            out["accuracy"] = accuracy
        typer.echo(json.dumps(out))
        return
    table = Table(title=f"k={res.k}" + (f" (clamped from {res.k_requested})" if res.k_clamped else "")
                  + ("" if res.exact_bound else "; tail bound is an estimate (approximate index)"))
    estimated = res.tail_estimate is not None
    for col in ("query", "label", "p(label)", *(("tail (estimate)",) if estimated else ()), "tail bound",
                "nearest ids (score)"):
        table.add_column(col)
    for i in range(len(res)):
        j = int(np.argmax(res.probs[i]))
        near = ", ".join(f"{res.ids[i, c]} ({res.scores[i, c]:.3f})"
                         for c in range(min(top, res.k)) if res.ids[i, c] >= 0)
        table.add_row(str(i), str(res.labels[i]), f"{res.probs[i, j]:.3f}",
                      *((f"{res.tail_estimate[i]:.3f}",) if estimated else ()), f"{res.tail_bound[i]:.2e}", near)
    console.print(table)
    if accuracy is not None:
        typer.echo(f"accuracy {accuracy:.4f} on {len(res):,} queries")


@_command(memory_app, "compact")
def compact(
    path: Path = PathArg,
    budget: str | None = typer.Option(None, help="Slots to keep (or bytes: 64MB); none: only drop removed slots."),
    policy: str = typer.Option("merge", help="merge, reservoir, age or distill (each class keeps its mass)."),
    seed: int = typer.Option(0, help="Seed of k-means, sampling and distillation."),
    as_json: bool = JsonOpt,
) -> None:
    """Shrink a memory to a budget, every class keeping its attention mass."""
    with Memory.open(path) as mem:
        report = mem.compact(budget=_budget(budget), policy=policy, seed=seed)
    if as_json:
        typer.echo(json.dumps(report.as_dict()))
    else:
        typer.echo(f"{report.slots:,} slots kept ({report.merged_away:,} merged away, {report.dropped:,} removed "
                   f"slots dropped) in {report.seconds:.1f} s")
        if report.kept:
            typer.echo(report.kept)


@_command(memory_app, "export")
def export(
    path: Path = PathArg,
    out: Path = typer.Argument(..., help="A .parquet (or .arrow / .feather) file to write: id, label, weight, vector."),
    label: list[str] | None = typer.Option(None, "--label", help="Only the slots of this label (repeat)."),
    ids_file: Path | None = typer.Option(None, help="Only these ids: a file, one per line (or .npy)."),
) -> None:
    """Write a memory's slots (all, some labels', or some ids') to a table file."""
    from .store import codec

    if out.exists():
        raise OutputExistsError(f"{out} exists; choose another file")
    if out.suffix.lower() not in (".parquet", ".pq", ".arrow", ".feather"):
        raise InvalidValueError(f"{out}: write .parquet, .arrow or .feather")
    if not out.parent.is_dir():
        raise MissingFileError(f"{out.parent}: no such directory")
    with Memory.open(path, read_only=True) as mem:
        if ids_file is not None:
            wanted = _ids_in(ids_file)
        elif label:
            asked = _labels_of(label, mem.label_kind)
            held = set(mem.classes().tolist())
            absent = list(dict.fromkeys(v for v in asked if v not in held))
            if absent:
                raise UnknownLabelError(f"labels with no slot: {absent[:10]}{' ...' if len(absent) > 10 else ''}",
                                        absent)
            wanted = mem.ids(labels=asked)
        else:
            wanted = mem.ids()
        slots = mem.get(wanted)
        dim = mem.dim
    import pyarrow as pa

    table = pa.table({"id": pa.array(slots.ids), "label": codec.label_array(slots.labels),
                      "weight": pa.array(slots.weights),
                      "vector": codec.vector_array(slots.vectors.reshape(len(slots.ids), dim))})
    # written aside and renamed into place: an interrupted export leaves no partial file
    part = out.with_name(f".engine-export-{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        if out.suffix.lower() in (".parquet", ".pq"):
            import pyarrow.parquet as pq

            pq.write_table(table, part)
        else:
            import pyarrow.feather as feather

            feather.write_feather(table, part)
        try:
            os.link(part, out)  # never over a file made meanwhile
        except FileExistsError:
            raise OutputExistsError(f"{out} exists; choose another file") from None
        except OSError:  # a filesystem without hard links (FAT, some SMB): checked, then renamed
            if out.exists():
                raise OutputExistsError(f"{out} exists; choose another file") from None
            os.rename(part, out)
    finally:
        part.unlink(missing_ok=True)
    typer.echo(f"wrote {len(slots.ids):,} slots to {out}")


@_command(memory_app, "set")
def set_(
    path: Path = PathArg,
    temperature: float | None = typer.Option(None, help="A new attention temperature, kept as given."),
    nprobe: int | None = typer.Option(None, help="Fix the IVF lists a query visits (0: calibrated again)."),
    ef_search: int | None = typer.Option(None, help="Fix the HNSW breadth (0: calibrated again)."),
) -> None:
    """Change a memory's settings (persisted in its manifest)."""
    from .index import SearchSettings

    if temperature is None and nprobe is None and ef_search is None:
        raise InvalidValueError("nothing to set: give --temperature, --nprobe or --ef-search")
    from . import checks

    for option, value in (("--nprobe", nprobe), ("--ef-search", ef_search)):  # every value checked first
        if value is not None:
            checks.integer(option, value, low=0)
    if temperature is not None:
        checks.temperature(temperature)
    with Memory.open(path) as mem:
        if temperature is not None:
            mem.temperature = temperature
        if nprobe is not None or ef_search is not None:
            now = mem.search_settings
            mem.search_settings = SearchSettings(
                nprobe=now.nprobe if nprobe is None else (nprobe or None),
                ef_search=now.ef_search if ef_search is None else (ef_search or None))
        typer.echo(f"set: {mem!r}")


def _budget(text: str | None) -> int | str | None:
    """A budget typed on the command line: slots (digits) or bytes ("64MB")."""
    return int(text) if text is not None and text.isdigit() else text


def _ids_in(file: Path) -> np.ndarray:
    """Ids from a file (one per line, or a .npy of integers); anything else is refused, never cut
    to an integer."""
    from . import checks
    from .inputs import read_labels

    return checks.ids(np.asarray(read_labels(file)))


def _labels_of(values: list[str], kind: str | None) -> list:
    """Labels typed on the command line, as the memory's kind (ints where it holds ints)."""
    if kind == "int":
        try:
            return [int(v) for v in values]
        except ValueError:
            raise InvalidValueError(f"this memory's labels are integers, got {values}") from None
    return list(values)


@_command(memory_app, "info")
def info(path: Path = PathArg, as_json: bool = JsonOpt) -> None:
    """Show a memory's size, settings and bytes used (also of a memory another process holds open)."""
    with Memory.open(path, read_only=True) as mem:
        stats = {**mem.stats().as_dict(), "temperature": mem.temperature, "path": str(path)}
    if as_json:
        typer.echo(json.dumps(stats))
        return
    table = Table(show_header=False)
    for key, value in stats.items():
        table.add_row(key, f"{value:,}" if isinstance(value, int) and not isinstance(value, bool) else str(value))
    console.print(table)


@_command(memory_app, "remove")
def remove(
    path: Path = PathArg,
    ids: list[int] | None = typer.Argument(None, help="Ids to remove."),
    ids_file: Path | None = typer.Option(None, help="A file of ids, one per line (or .npy)."),
    label: list[str] | None = typer.Option(None, "--label", help="Remove every slot of this label (repeat)."),
    as_json: bool = JsonOpt,
) -> None:
    """Remove slots by id, or every slot of some labels (unknown ones: an error, nothing removed)."""
    wanted = list(ids or [])
    if ids_file is not None:
        wanted += _ids_in(ids_file).tolist()
    if not wanted and not label:
        raise InvalidValueError("no ids or labels given")
    if wanted and label:
        raise InvalidValueError("give ids or --label, not both")
    with Memory.open(path) as mem:
        n = mem.remove(labels=_labels_of(label, mem.label_kind)) if label else mem.remove(wanted)
        size = len(mem)
    typer.echo(json.dumps({"removed": n, "slots": size}) if as_json else f"removed {n} slots; memory holds {size}")


@_command(memory_app, "get")
def get(
    path: Path = PathArg,
    ids: list[int] | None = typer.Argument(None, help="Ids to read."),
    ids_file: Path | None = typer.Option(None, help="A file of ids, one per line (or .npy)."),
    as_json: bool = JsonOpt,
) -> None:
    """Print slots by id: label, weight and vector (unknown ids: an error)."""
    wanted = list(ids or [])
    if ids_file is not None:
        wanted += _ids_in(ids_file).tolist()
    if not wanted:
        raise InvalidValueError("no ids given")
    with Memory.open(path, read_only=True) as mem:
        slots = mem.get(wanted)
    rows = [{"id": int(i), "label": label, "weight": float(w), "vector": [float(x) for x in v]}
            for i, label, w, v in zip(slots.ids, slots.labels, slots.weights, slots.vectors)]
    if as_json:
        typer.echo(json.dumps(rows))
        return
    for row in rows:
        head = ", ".join(f"{x:.4g}" for x in row["vector"][:6])
        more = ", ..." if len(row["vector"]) > 6 else ""
        typer.echo(f"{row['id']}  label {row['label']}  weight {row['weight']:g}  [{head}{more}]")


@_command(memory_app, "save")
def save(
    path: Path = PathArg,
    to: Path | None = typer.Option(None, help="Write a copy of the memory into this new directory instead."),
) -> None:
    """Fold a memory's log into a fresh snapshot (or copy it whole to --to)."""
    if to is not None and to.exists():
        raise OutputExistsError(f"{to} exists; choose another directory")
    if to is not None and not to.parent.is_dir():
        raise MissingFileError(f"{to.parent}: no such directory (create it first)")
    with Memory.open(path, read_only=to is not None) as mem:
        written = mem.save(to) if to is not None else mem.save()
        size = len(mem)
    typer.echo(f"saved {size:,} slots to {written}")


@_command(app, "serve")
def serve(
    memory: list[str] = typer.Option(..., help="A memory directory, or NAME=DIR; repeat for several."),
    host: str = typer.Option("127.0.0.1", help="Address to bind (loopback by default)."),
    port: int = typer.Option(8815, help="Port (0 picks a free one)."),
    token_file: Path | None = typer.Option(None, help="File holding the bearer token writes need."),
    open_reads: bool = typer.Option(False, help="Let reads through without the token."),
    max_rows: int = typer.Option(1_000_000, help="Most rows in one add request or one query batch."),
    batching: bool = typer.Option(True, help="Answer concurrent small queries together (a batch forms while a "
                                  "query runs; an idle server answers at once)."),
    batch_wait_ms: float = typer.Option(0.0, help="Under load, let a batch wait up to this long for more rows."),
    max_queue: int = typer.Option(256, help="Most query requests waiting per memory; past it, ServerBusyError "
                                  "(0: no bound)."),
    tls_cert: Path | None = typer.Option(None, help="PEM certificate (with --tls-key) to serve over TLS."),
    tls_key: Path | None = typer.Option(None, help="PEM private key."),
    cluster: str | None = typer.Option(None, help="A Ray cluster address ('auto': the local one): each "
                                          "--memory is then a sharded memory's root directory."),
) -> None:
    """Serve durable memories (or, with --cluster, sharded memories on Ray) over Arrow Flight
    until SIGTERM or SIGINT."""
    from .serve.server import MemoryServer

    if (tls_cert is None) != (tls_key is None):
        raise InvalidValueError("--tls-cert and --tls-key go together")
    try:
        token = token_file.read_text().strip() if token_file else None
    except UnicodeDecodeError:
        raise InvalidValueError(f"{token_file}: a token file holds UTF-8 text") from None
    if token_file and not token:
        raise InvalidValueError(f"{token_file} is empty")
    memories = {}
    for spec in memory:
        name, _, folder = spec.rpartition("=") if "=" in spec else (Path(spec).resolve().name, "", spec)
        if name in memories:
            raise InvalidValueError(f"two memories named {name!r}; use NAME=DIR")
        if cluster is not None:
            from .cluster import ShardedMemory

            memories[name] = ShardedMemory.open(folder, address=cluster)
        else:
            memories[name] = Memory.open(folder)
    scheme = "grpc+tls" if tls_cert else "grpc"
    tls = [(tls_cert.read_bytes(), tls_key.read_bytes())] if tls_cert else None
    server = MemoryServer(memories, f"{scheme}://{host}:{port}", token=token, open_reads=open_reads,
                          max_rows=max_rows, tls_certificates=tls, batching=batching, batch_wait_ms=batch_wait_ms,
                          max_queue=max_queue)
    typer.echo(f"serving {', '.join(sorted(memories))} on {scheme}://{host}:{server.port}", err=False)
    sys.stdout.flush()
    server.serve_until_signalled()
    typer.echo("stopped; every memory closed")


@_command(app, "ingest")
def ingest_cmd(
    path: Path = PathArg,
    sources: list[str] = typer.Argument(..., help="Parquet files or directories: label, optionally id and weight, "
                                        "and vector (floats) or image (encoded bytes)."),
    checkpoint: Path | None = typer.Option(None, help="A trained model's checkpoint folder (to embed images)."),
    shards: int | None = typer.Option(None, help="Create the sharded memory with this many shards "
                                         "(default: it exists already)."),
    dim: int | None = typer.Option(None, help="Embedding dimension, when creating (default: the model's, "
                                      "or the vectors')."),
    index: str = typer.Option("auto", help="Each shard's index, when creating."),
    temperature: float = typer.Option(0.1, help="Attention temperature, when creating."),
    cluster: str | None = typer.Option(None, help="Ray cluster address (default: RAY_ADDRESS or a local one)."),
    image_size: int | None = typer.Option(None, help="Images are resized to this square (default: the side the "
                                          "checkpoint's model was trained on)."),
    batch_size: int = typer.Option(4096, help="Rows an embedding call and a write take."),
    replicas: int = typer.Option(2, help="Model replicas embedding in parallel."),
    verbose: bool = typer.Option(False, "--verbose", help="Show Ray's own logs and progress bars too."),
) -> None:
    """Write Parquet rows (vectors, or images embedded by a trained g) into a sharded memory on Ray."""
    from .cluster import ShardedMemory
    from .cluster.ingest import check_sources, ingest
    from .cluster.sharded import ROOT_FILE, connect

    check_sources(sources)  # a refused input leaves no memory behind
    if shards is not None:  # what can be refused is refused before Ray starts
        if dim is None:
            if checkpoint is None:
                raise InvalidValueError("give --dim to create a memory for vectors")
            from .train import load_checkpoint

            dim = load_checkpoint(checkpoint).dim
    elif not (Path(path) / ROOT_FILE).is_file():
        raise MissingFileError(f"no sharded memory at {path} (give --shards to create one)")
    connect(cluster, quiet=not verbose)
    if shards is not None:
        mem = ShardedMemory(dim, shards=shards, path=path, address=cluster, index=index, temperature=temperature)
    else:
        mem = ShardedMemory.open(path, address=cluster)
    try:
        report = ingest(mem, sources, checkpoint=checkpoint, image_size=image_size, batch_size=batch_size,
                        replicas=replicas, verbose=verbose)
        mem.save()
    finally:
        mem.close()
    typer.echo(f"ingested {report.slots:,} slots into {path} in {report.seconds:.1f} s"
               f"{' (embedded with ' + str(checkpoint) + ')' if report.embedded else ''}")


def _widths(text: str | None) -> int | list[int] | None:
    """--width as typed: one count of filters ("64") or one a block ("64,64,128,256"); the
    counts themselves are checked with the rest of the config."""
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise InvalidValueError(f"--width is a count of filters or one a block, comma-separated (64,64,128,256); "
                                f"got {text!r}") from None
    return counts[0] if len(counts) == 1 else counts


@_command(app, "train")
def train_cmd(
    out: Path = typer.Option(Path("runs/omniglot"), help="Checkpoint folder."),
    dataset: str | None = typer.Option(None, help="omniglot (the default) or fashion-mnist (each has its recipe)."),
    data: Path | None = typer.Option(None, help="Data directory (default: $ENGINE_DATA or ../shared/data)."),
    background: str | None = typer.Option(None, help="Omniglot: the minimal split to train on, small1 (the "
                                             "recipe) or small2; validated on the other's alphabets it lacks."),
    episodes: int | None = typer.Option(None, help="Training episodes (recipe: 6000)."),
    pretrain_epochs: int | None = typer.Option(
        None, help="Supervised epochs over every training class before the episodes (see the recipe)."),
    width: str | None = typer.Option(None, help="Filters per conv block, or four counts, one a block (Omniglot "
                                     "recipe: 64,64,128,256; Fashion-MNIST: 64): the last block's is the "
                                     "embedding's dimension with --pool mean, times the last map's positions with "
                                     "flat."),
    pool: str | None = typer.Option(None, help="The last block's map: averaged (mean) or kept whole (flat: width x "
                                    "the map's positions; the Omniglot recipe)."),
    image_size: int | None = typer.Option(None, help="Omniglot: images are resized to this square (recipe: 40); the "
                                          "model keeps it, and its evaluations read images at it."),
    shift: float | None = typer.Option(None, help="Random translation of training images, largest pixels "
                                       "(Omniglot recipe: 3)."),
    elastic: float | None = typer.Option(None, help="Elastic deformation of strokes, largest pixels "
                                         "(Omniglot recipe: 2; 0: off)."),
    mixup: float | None = typer.Option(None, help="Supervised stage: images blended in pairs, shares drawn from "
                                       "Beta(mixup, mixup) (0: off)."),
    thickness: float | None = typer.Option(None, help="Strokes thicker or thinner, largest share of a pixel (0: off)."),
    erase: float | None = typer.Option(None, help="A square of each training image blanked, its side as a share "
                                       "of the image's larger side (cutout; 0: off)."),
    views: int | None = typer.Option(None, help="Test-time views averaged per image (1: the image alone)."),
    time_budget: float | None = typer.Option(None, help="Stop once the run has trained this many seconds (with "
                                             "--resume its earlier seconds count; a run's budget is not carried "
                                             "over to its resume)."),
    n_way: int | None = typer.Option(None, help="Classes per training episode."),
    k_shot: int | None = typer.Option(None, help="Support examples per class."),
    n_query: int | None = typer.Option(None, help="Queries per class."),
    fce: bool | None = typer.Option(None, help="Full Context Embeddings."),
    fce_steps: int | None = typer.Option(None, help="Read steps K of the attention LSTM."),
    lr: float | None = typer.Option(None, help="Adam's (AdamW's) learning rate (cosine decay)."),
    weight_decay: float | None = typer.Option(None, help="AdamW's decay of weight matrices and filters (0: Adam)."),
    teacher: list[Path] | None = typer.Option(None, help="Checkpoint folder of a trained model to distil from; "
                                              "repeated, the models teach as one ensemble (give --distill)."),
    distill: float | None = typer.Option(None, help="Share of each stage's loss that is the KL from the teachers' "
                                         "answer to the model's, above 0 and at most 1 (with --teacher)."),
    topk: int | None = typer.Option(None, help="Train with top-k attention over the support set."),
    val_every: int | None = typer.Option(None, help="Validate every this many episodes."),
    val_episodes: int | None = typer.Option(None, help="Validation episodes (within-alphabet 20-way 1-shot)."),
    seed: int | None = typer.Option(None, help="Seed."),
    resume: bool = typer.Option(False, help="Continue the run in --out with the options it was trained with "
                                "(saved in its config.json), any given here in their place."),
    force: bool = typer.Option(False, help="Start afresh over a run already in --out (it is overwritten)."),
) -> None:
    """Episodic meta-training of a Matching Network: the dataset's recipe (engine.train.recipe),
    or with --resume the run's own options, with any option given here in their place."""
    if out.is_dir() and any(out.iterdir()) and not (resume or force):
        raise OutputExistsError(f"{out} holds a run already: --resume continues it, --force starts afresh over it")
    prepare_torch()  # glibc keeps freed blocks: no page faults per batch (engine.runtime)
    from .train import recipe, resume_config, train
    from .train.config import check_stage
    from .train.loop import check_teachers

    given = {"episodes": episodes, "pretrain_epochs": pretrain_epochs, "width": _widths(width), "pool": pool,
             "image_size": image_size, "shift": shift, "elastic": elastic, "mixup": mixup, "thickness": thickness,
             "erase": erase,
             "views": views, "time_budget_s": time_budget, "n_way": n_way, "k_shot": k_shot, "n_query": n_query,
             "fce": fce, "fce_steps": fce_steps, "lr": lr, "weight_decay": weight_decay, "topk": topk,
             "val_every": val_every, "val_episodes": val_episodes, "seed": seed, "background": background}
    # the data folder saved absolute (the teachers' are, by check_stage): a resume from another directory reads the
    # same images
    given = {k: v for k, v in {**given, "dataset": dataset, "data": str(data.resolve()) if data else None,
                                "teachers": [str(t) for t in teacher] if teacher else None,
                                "distill": distill}.items()
             if v is not None}
    if resume:  # the run's saved options, not the recipe's: a run trained otherwise goes on as it was
        cfg = resume_config(out, **given)
    else:
        cfg = recipe(given.pop("dataset", "omniglot"), **given)
        check_stage(cfg)  # bad options (and teachers) refused before --force removes the old run
        check_teachers(cfg, out)
    if force and not resume and out.is_dir():
        import shutil

        shutil.rmtree(out)  # afresh: no log, checkpoint or best model of the old run is left to mix in
    summary = train(cfg, out, resume=resume)
    if summary.get("best_val_acc", 0) < 0:  # never validated (no episodes): no accuracy to report
        summary["best_val_acc"] = None
    typer.echo(json.dumps(summary))


CHECKPOINTS_HELP = ("Checkpoint folder of engine train; repeated, the models score as one ensemble (their "
                    "logits averaged, engine.nn.ensemble).")


def _models(checkpoints: list[Path], views: int | None):
    """The checkpoints' model, or their ensemble when there are several; and the image side
    they read (a run saved before models kept their side read 28x28 images)."""
    from .data.omniglot import SIZE
    from .nn import ensemble
    from .train import load_checkpoint
    from .train.checkpoint import read_config

    if len({c.resolve() for c in checkpoints}) < len(checkpoints):  # a model twice would count twice
        raise InvalidValueError("a checkpoint is given twice: an ensemble takes each model once")
    models = [load_checkpoint(c, views=views) for c in checkpoints]
    sides = [m.image_size or read_config(c).get("image_size", SIZE) for m, c in zip(models, checkpoints)]
    if len(set(sides)) > 1:
        raise InvalidValueError("an ensemble's members must read one image size, got " + ", ".join(
            f"{c}: {side}x{side}" for c, side in zip(checkpoints, sides)))
    return (models[0] if len(models) == 1 else ensemble(models)), sides[0]


@_command(app, "eval-oneshot")
def eval_oneshot_cmd(
    checkpoint: list[Path] = typer.Option(..., help=CHECKPOINTS_HELP),
    runs: Path = typer.Option(..., help="A folder of runNN folders, one runNN folder, or all_runs.zip."),
    views: int | None = typer.Option(None, help="Test-time views per image (default: the checkpoint's)."),
    assign: bool = typer.Option(False, "--assign", help="Also score each run transductively: its test items "
                                "matched to its classes one to one (an optimal assignment), on a line of its own."),
    as_json: bool = JsonOpt,
) -> None:
    """The official 20-way within-alphabet one-shot task, each run's memory an engine.Memory."""
    prepare_torch()
    from .data.omniglot import load_oneshot_runs
    from .train import eval_oneshot

    model, side = _models(checkpoint, views)
    out = eval_oneshot(model, load_oneshot_runs(runs, size=side), assign=assign)
    if as_json:
        typer.echo(json.dumps(out))
        return
    for name, err in out["per_run"].items():
        line = f"{name}: error {100 * err:.1f}%"
        if assign:
            line += f" (one-to-one assignment: {100 * out['assigned']['per_run'][name]:.1f}%)"
        typer.echo(line)
    typer.echo(f"overall: error {100 * out['error_rate']:.2f}% over {out['runs']} runs")
    if assign:
        typer.echo(f"overall, one-to-one assignment (transductive, not per-query): error "
                   f"{100 * out['assigned']['error_rate']:.2f}% over {out['runs']} runs")


@_command(app, "eval-episodes")
def eval_episodes_cmd(
    checkpoint: list[Path] = typer.Option(..., help=CHECKPOINTS_HELP + " Their runs must share the dataset and "
                                          "background set: the validation set is theirs."),
    data: Path | None = typer.Option(None, help="Data directory."),
    n_way: list[int] = typer.Option([5, 20], help="Ways to evaluate."),
    k_shot: list[int] = typer.Option([1, 5], help="Shots to evaluate."),
    episodes: int = typer.Option(1000, help="Episodes per setting."),
    views: int | None = typer.Option(None, help="Test-time views per image (default: the checkpoint's)."),
    as_json: bool = JsonOpt,
) -> None:
    """Mean accuracy with a 95% CI over N-way K-shot episodes of the validation set (random and within-alphabet)."""
    prepare_torch()
    from .train import TrainConfig, episode_features, evaluate_episodes, load_sets
    from .train.checkpoint import read_config

    configs = [read_config(c) for c in checkpoint]
    cfg = configs[0]
    datasets = {c.get("dataset", "omniglot") for c in configs}
    if len(datasets) > 1:
        raise InvalidValueError(f"the checkpoints' runs train on different datasets ({', '.join(sorted(datasets))}): "
                                f"they have no validation set in common")
    backgrounds = {c.get("background", "small1") for c in configs}
    if datasets == {"omniglot"} and len(backgrounds) > 1:  # each set's validation alphabets are the other's
        raise InvalidValueError(f"the checkpoints' runs train on different Omniglot sets "
                                f"({', '.join(sorted(backgrounds))}): each is validated on alphabets the other "
                                f"trained on")
    model, side = _models(checkpoint, views)
    _, _, val_x, val_groups = load_sets(TrainConfig(dataset=cfg.get("dataset", "omniglot"),
                                                    data=str(data) if data else cfg.get("data"),
                                                    background=cfg.get("background", "small1"), image_size=side))
    rows = []
    features = episode_features(model, val_x)  # embedded once for every setting
    for way in n_way:
        for shot in k_shot:
            for within in ([0.0, 1.0] if val_groups else [0.0]):
                rows.append(evaluate_episodes(model, val_x, val_groups, n_way=min(way, len(val_x)), k_shot=shot,
                                              episodes=episodes, within_group=within, seed=7, features=features))
    if as_json:
        typer.echo(json.dumps(rows))
        return
    table = Table(title=f"{', '.join(map(str, checkpoint))}: validation episodes")
    for col in ("way", "shot", "episodes from", "accuracy", "95% CI", "episodes"):
        table.add_column(col)
    for r in rows:
        table.add_row(str(r["n_way"]), str(r["k_shot"]), "one alphabet" if r["within_alphabet"] else "all classes",
                      f"{100 * r['accuracy']:.2f}%", f"± {100 * r['ci95']:.2f}", str(r["episodes"]))
    console.print(table)


def _py(x):
    return x.item() if hasattr(x, "item") else x


def main() -> None:
    """Entry point of the ``engine`` console script."""
    app(prog_name="engine")


if __name__ == "__main__":
    sys.exit(main())
