"""Reading batch-encode outputs (Parquet shards of latent files) for diffusion training.

A shard row holds one latent file (``Latents.to_bytes``: safetensors bytes whose metadata says how
to decode it back exactly) plus its source metadata. The schema (ROW_SCHEMA) and file names live
here, the reader's side, and ``serving.batch`` writes them; docs/batch.md describes the columns.
Error rows (``error`` set, no latents) are kept out of the dataset and listed by
:meth:`LatentDataset.errors`. :class:`BucketBatchSampler` batches rows of one latent shape (one
``--crop`` bucket), so a DataLoader can stack them.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch.utils.data import Dataset, Sampler

from tokenizers_svc.errors import InvalidRequestError, ShapeMismatchError
from tokenizers_svc.latents import Latents, latents_from_bytes
from tokenizers_svc.spec import ID_DTYPE
from tokenizers_svc.tokens import TokenIds, tokens_from_bytes

SHARD_PREFIX = "part-"
SHARD_SUFFIX = ".parquet"
SHARD_GLOB = f"{SHARD_PREFIX}*{SHARD_SUFFIX}"
MANIFEST_FILE = "manifest.json"

# The shard schema (written by serving.batch): one row per image, per video clip, or per input (or
# clip) that failed.
ROW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),  # digest of source_path + clip frame range + job options
        ("source_path", pa.string()),  # absolute path as listed (bytes not UTF-8 shown as U+FFFD)
        ("sha256", pa.string()),  # of the file bytes; null when the file could not be read
        ("kind", pa.string()),  # image | video; null when unreadable or not recognized media
        ("clip_index", pa.int32()),  # 0-based clip number within the video; null for images
        ("clip_count", pa.int32()),  # rows this input produces (1 for images and failed inputs)
        ("clip_start_frame", pa.int64()),  # index in the decoded (strided) frames, inclusive
        ("clip_end_frame", pa.int64()),  # exclusive
        ("clip_start", pa.float64()),  # seconds from the stream's first timestamp
        ("clip_end", pa.float64()),
        ("fps", pa.float64()),  # of the decoded (strided) frames; null for images
        ("original_height", pa.int32()),  # decoded size, before any --resize
        ("original_width", pa.int32()),
        ("original_frames", pa.int32()),  # frames decoded from the whole video
        ("bucket_height", pa.int32()),  # --crop: the size the item was cropped to; null otherwise
        ("bucket_width", pa.int32()),
        ("crop_top", pa.int32()),  # --crop: the window's corner in the item resized to cover the bucket
        ("crop_left", pa.int32()),
        ("latents", pa.binary()),  # a complete latent file (Latents.to_bytes), or token file with --tokens
        # of the stored latent tensor: (1, C, h, w) / (1, C, t, h, w); of the ids: (1, h, w) / (1, t, h, w)
        ("shape", pa.list_(pa.int64())),
        ("dtype", pa.string()),
        ("model", pa.string()),
        ("weights_hash", pa.string()),
        ("normalized", pa.bool_()),
        ("normalization", pa.string()),  # JSON of LatentNormalization
        ("error", pa.string()),  # null on success, "type: message" on failure
        ("source_path_bytes", pa.binary()),  # source_path exactly, for names that are not UTF-8
        (
            "encoder_node",
            pa.string(),
        ),  # Ray node id of the encoder actor that made the row (`ray list nodes`)
        ("ids", pa.list_(pa.int32())),  # --tokens: the token ids, raster order (t, h, w); null otherwise
    ]
)
METADATA_COLUMNS = [name for name in ROW_SCHEMA.names if name not in ("latents", "ids")]
SHARD_CACHE = 4  # shards whose latent column stays in memory; sequential reads touch one at a time


class LatentDataset(Dataset):
    """Map-style dataset over the success rows of a batch-encode output directory.

    ``dataset[i]`` is ``{"latents": tensor, **metadata}``: latents without the leading item axis,
    (C, h, w) for an image or (C, t, h, w) for a video clip, float (dtype as stored), in the space
    asked for by ``normalized`` (True: diffusion-ready, the model's normalization applied; False:
    raw encoder output; None: as stored). Metadata values are plain Python (see METADATA_COLUMNS).
    Rows are ordered by shard file name, then row; latents are read lazily per shard.
    """

    def __init__(self, root: str | Path, *, normalized: bool | None = True) -> None:
        self.root = Path(root)
        self.normalized = normalized
        self.shards = sorted(self.root.glob(SHARD_GLOB))
        if not self.shards:
            raise InvalidRequestError(
                f"no {SHARD_GLOB} shards in {self.root}; expected a batch-encode --output directory",
                param="root",
            )
        self._rows: list[dict] = []
        self._index: list[tuple[int, int]] = []  # dataset index -> (shard, row in shard)
        self._errors: list[dict] = []
        for shard, path in enumerate(self.shards):
            present = set(pq.read_schema(path).names)  # shards written before a column existed lack it
            table = pq.read_table(path, columns=[c for c in METADATA_COLUMNS if c in present])
            for row_number, read in enumerate(table.to_pylist()):
                row = {**dict.fromkeys(METADATA_COLUMNS), **read}
                if row["normalization"] is not None:
                    row["normalization"] = json.loads(row["normalization"])
                if row["error"] is None:
                    self._rows.append(row)
                    self._index.append((shard, row_number))
                else:
                    self._errors.append(row)
        self._columns: OrderedDict[tuple[int, str], pa.ChunkedArray] = OrderedDict()  # (shard, column)
        self._tokenizers: dict[str, object] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, index: int) -> dict:
        item = self.latent_file(index)
        if self.normalized is not None:
            item = item.with_normalized(self.normalized)
        return {"latents": item.latents[0], **self._rows[index]}

    @staticmethod
    def collate(items: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """``DataLoader(..., collate_fn=LatentDataset.collate)``: same-shape items -> (latents
        stacked to (B, C, [t,] h, w), metadata dicts). Metadata holds None values (e.g. clip
        fields of images), which torch's default collate refuses. Items of several shapes (the
        output of ``--resize``, where shapes follow aspect ratios) are refused with the way out:
        ``--crop``, ``--aspect-buckets`` and :class:`BucketBatchSampler`."""
        return _stack(items, "latents")

    def metadata(self, index: int) -> dict:
        """Row ``index`` without its latents."""
        return dict(self._rows[index])

    def errors(self) -> list[dict]:
        """The error rows (inputs or clips that could not be encoded), ``error`` = "type: message"."""
        return [dict(row) for row in self._errors]

    def latent_file(self, index: int) -> Latents:
        """Row ``index`` as :class:`Latents` (one item, with crop and normalization metadata)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        shard, row = self._index[index]
        return latents_from_bytes(self._latent_column(shard)[row].as_py())

    def _latent_column(self, shard: int, column: str = "latents") -> pa.ChunkedArray:
        """``column`` of a shard, read once; the last SHARD_CACHE shards stay in memory."""
        key = (shard, column)
        if key not in self._columns:
            self._columns[key] = pq.read_table(self.shards[shard], columns=[column]).column(column)
            while len(self._columns) > SHARD_CACHE:
                self._columns.popitem(last=False)
        self._columns.move_to_end(key)
        return self._columns[key]

    def decode(self, index: int, tokenizer=None, *, output_dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """Row ``index`` back to pixels for spot checks: (1, 3, H, W) for an image or (1, 3, T, H, W)
        for a clip, cropped to the encoded size and frame count; uint8 [0, 255] (or float [-1, 1]
        with ``output_dtype=torch.float32``). ``tokenizer``: a loaded Tokenizer, else the row's
        model is loaded on CPU (the job's ``--model`` from manifest.json, else the row's model
        name); latents from other weights are refused (InvalidLatentsError)."""
        latents = self.latent_file(index)
        if tokenizer is None:
            tokenizer = self._tokenizer(self._rows[index]["model"])
        return tokenizer.decode(latents, output_dtype=output_dtype)

    def _tokenizer(self, model: str):
        from tokenizers_svc.loading import load_tokenizer

        if model not in self._tokenizers:
            manifest = self.root / MANIFEST_FILE
            job = json.loads(manifest.read_text())["model"] if manifest.is_file() else {}
            source = job["source"] if job.get("name") == model else model
            self._tokenizers[model] = load_tokenizer(source)
        return self._tokenizers[model]

    def __repr__(self) -> str:
        return f"LatentDataset({str(self.root)!r}, rows={len(self)}, errors={len(self._errors)})"


def _stack(items: list[dict], key: str) -> tuple[torch.Tensor, list[dict]]:
    """Items' ``key`` tensors of one shape stacked, and their metadata dicts; several shapes are
    refused with the way out (one crop size, or batches of one shape)."""
    shapes = sorted({tuple(item[key].shape) for item in items})
    if len(shapes) > 1:
        raise ShapeMismatchError(
            f"a batch stacks {key} of one shape, got {len(shapes)}: {', '.join(map(str, shapes[:4]))}; "
            "encode with --crop center|random (one size) or --crop ... --aspect-buckets (a few sizes), "
            "and batch with DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, batch_size), "
            "collate_fn=dataset.collate), which keeps each batch to one shape",
            param="batch",
        )
    stacked = torch.stack([item[key] for item in items])
    return stacked, [{k: v for k, v in item.items() if k != key} for item in items]


class TokenDataset(LatentDataset):
    """Map-style dataset over a ``batch-encode --tokens`` output, for an autoregressive trainer.

    ``dataset[i]`` is ``{"ids": tensor, **metadata}``: int32 ids in ``[0, vocabulary_size)``,
    ``(h, w)`` for an image or ``(t, h, w)`` for a clip, raster order (the ``ids`` column; the row's
    token file, with its crop metadata, is :meth:`token_file`). ``tokens`` is the job's token
    description from manifest.json: vocabulary size, levels, id dtype and base, layout and order.
    Batches of one shape: ``DataLoader(dataset, batch_sampler=BucketBatchSampler(dataset, B),
    collate_fn=TokenDataset.collate)`` -> (ids (B, [t,] h, w) int32, metadata).
    """

    def __init__(self, root: str | Path) -> None:
        super().__init__(root, normalized=None)
        latents = [row["source_path"] for row in self._rows if row["dtype"] != ID_DTYPE]
        if latents:
            raise InvalidRequestError(
                f"{self.root} holds latents, not token ids (e.g. {latents[0]}); encode with --tokens and a "
                "quantized tokenizer, or read it with LatentDataset",
                param="root",
            )
        manifest = self.root / MANIFEST_FILE
        self.tokens: dict | None = (
            json.loads(manifest.read_text()).get("tokens") if manifest.is_file() else None
        )
        self.vocabulary_size: int | None = None if self.tokens is None else self.tokens["vocabulary_size"]

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        shard, row = self._index[index]
        flat = self._latent_column(shard, "ids")[row].as_py()
        ids = torch.tensor(flat, dtype=torch.int32).reshape(self._rows[index]["shape"][1:])
        return {"ids": ids, **self._rows[index]}

    @staticmethod
    def collate(items: list[dict]) -> tuple[torch.Tensor, list[dict]]:
        """Same-shape items -> (ids stacked to (B, [t,] h, w) int32, metadata dicts)."""
        return _stack(items, "ids")

    def token_file(self, index: int) -> TokenIds:
        """Row ``index`` as :class:`TokenIds` (one item, with its vocabulary and crop metadata)."""
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} rows")
        shard, row = self._index[index]
        return tokens_from_bytes(self._latent_column(shard)[row].as_py())

    def decode(self, index: int, tokenizer=None, *, output_dtype: torch.dtype = torch.uint8) -> torch.Tensor:
        """Row ``index`` back to pixels (see :meth:`LatentDataset.decode`); ids of other weights are refused."""
        tokens = self.token_file(index)
        if tokenizer is None:
            tokenizer = self._tokenizer(self._rows[index]["model"])
        return tokenizer.decode(tokens, output_dtype=output_dtype)

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.root)!r}, rows={len(self)}, errors={len(self._errors)})"


class BucketBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices whose latents have one shape (one ``--crop`` bucket, or one resized
    size), so that ``LatentDataset.collate`` can stack them::

        sampler = BucketBatchSampler(dataset, batch_size=16)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=LatentDataset.collate)

    With ``shuffle`` every epoch shuffles the rows within each shape and then the order of all
    batches, from ``seed`` and the epoch (:meth:`set_epoch`), so an epoch mixes buckets while each
    batch stacks. ``drop_last`` drops each shape's short last batch.
    """

    def __init__(
        self,
        dataset: LatentDataset | TokenDataset,
        batch_size: int,
        *,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if batch_size < 1:
            raise InvalidRequestError(f"batch_size must be >= 1, got {batch_size}", param="batch_size")
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.buckets: dict[tuple[int, ...], list[int]] = {}  # latent shape -> dataset indices
        for index in range(len(dataset)):
            self.buckets.setdefault(tuple(dataset.metadata(index)["shape"]), []).append(index)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        batches = []
        for indices in self.buckets.values():
            if self.shuffle:
                indices = [indices[i] for i in torch.randperm(len(indices), generator=generator).tolist()]
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        yield from batches

    def __len__(self) -> int:
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(indices) / self.batch_size) for indices in self.buckets.values())
