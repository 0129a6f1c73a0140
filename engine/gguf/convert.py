"""A GGUF file as a cached Hugging Face checkpoint directory, so the rest of the engine (the
safetensors loader, the tokenizer, tensor parallelism) loads it like any other.

The directory is `cache_dir()/gguf/<first 16 hex of the file's sha256>/`: config.json, the
weights as safetensors (float tensors in their own dtype, quantized ones dequantized to
float32), the tokenizer files with the chat template, and gguf_source.json naming the file.
It is built in a temporary directory and renamed into place (`engine.model_cache.publish`), so
a failed conversion leaves nothing; the second start finds it and only hashes the file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.errors import ModelLoadError
from engine.gguf.reader import GGUFCheckpoint
from engine.gguf.tensors import dequantize
from engine.gguf.tokenizer import has_tokenizer, write_tokenizer
from engine.model_cache import cache_dir, is_published, publish
from engine.progress import progress_bar

SHARD_BYTES = 2 * 2**30  # bounds the memory a conversion holds: one shard of weights at a time
# Part of the cache key: bump it whenever the converted output changes (names, dtypes, config,
# tokenizer files), so a cache written by an older converter is never reused.
CONVERTER_VERSION = 1

_digests: dict[tuple[str, int, int], str] = {}


def converted_dir(path: Path) -> Path:
    return cache_dir() / "gguf" / f"{file_digest(path)[:16]}-v{CONVERTER_VERSION}"


def ensure_converted(path: str | os.PathLike[str]) -> Path:
    """The checkpoint directory of GGUF file `path`, converting it on first use.

    Raises ModelLoadError naming the file for a missing, truncated or unsupported file, or one
    whose tensors contradict its metadata; all of that is checked before the cache is touched."""
    source = Path(path).expanduser()
    if not source.is_file():
        raise ModelLoadError(f"missing GGUF file: {source}")
    target = converted_dir(source)
    if is_published(target):
        return target
    checkpoint = GGUFCheckpoint.open(source)
    with _one_converter(source):  # the others wait, then find it published
        return publish(lambda tmp: _convert(checkpoint, tmp), target)


@contextlib.contextmanager
def _one_converter(source: Path) -> Iterator[None]:
    """Hold an exclusive lock on the GGUF file itself: the workers of a cluster that start
    together would otherwise each convert it (correct, since `publish` is atomic, but N times
    the time and memory). Locking the source leaves no lock file behind in the cache."""
    with source.open("rb") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes, remembered per (path, size, mtime) within this process (an
    engine resolves its model more than once)."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        with path.open("rb") as f:
            _digests[key] = hashlib.file_digest(f, "sha256").hexdigest()
    return _digests[key]


def _convert(checkpoint: GGUFCheckpoint, directory: Path) -> None:
    steps = checkpoint.num_tensors + (1 if has_tokenizer(checkpoint) else 0)
    with progress_bar() as progress:  # draws only on a terminal
        task = progress.add_task(f"converting {checkpoint.path.name}", total=steps)
        _write_weights(checkpoint, directory, lambda: progress.advance(task))
        write_tokenizer(checkpoint, directory)
        progress.advance(task)
    source = {"gguf_file": str(checkpoint.path.resolve()), "sha256": file_digest(checkpoint.path)}
    (directory / "gguf_source.json").write_text(json.dumps(source, indent=1))
    (directory / "config.json").write_text(json.dumps(checkpoint.config, indent=1))


def _write_weights(
    checkpoint: GGUFCheckpoint, directory: Path, advance: Callable[[], None]
) -> None:
    """The weights as safetensors: one model.safetensors, or shards of <= SHARD_BYTES and their
    index once a model is larger than that."""
    files: list[tuple[Path, list[str]]] = []
    for number, shard in enumerate(_shards(checkpoint, advance)):
        file = directory / f"shard-{number}.safetensors"
        save_file(shard, str(file), metadata={"format": "pt"})
        files.append((file, list(shard)))
    if len(files) == 1:
        files[0][0].rename(directory / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for number, (file, names) in enumerate(files, start=1):
        final = f"model-{number:05d}-of-{len(files):05d}.safetensors"
        file.rename(directory / final)
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))


def _shards(
    checkpoint: GGUFCheckpoint, advance: Callable[[], None]
) -> Iterator[dict[str, torch.Tensor]]:
    shard: dict[str, torch.Tensor] = {}
    size = 0
    for raw in checkpoint.raw_tensors():
        tensor = dequantize(raw)
        if shard and size + tensor.nbytes > SHARD_BYTES:
            yield shard
            shard, size = {}, 0
        shard[raw.name] = tensor
        size += tensor.nbytes
        advance()
    yield shard
