"""Predictive models (`model_type: ecd`): pretrained text encoders (frozen, adapted or trained) and tabular inputs,
a concat combiner and one head per output. Implements the model-type contract in docs/architecture.md."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from .. import device
from .. import metrics as M
from ..artifacts import (ECD_WEIGHTS, METADATA_FILE, hub_source_errors, read_json, sweep_abandoned, unshared,
                         write_json, writer_tag)
from ..data.cache import cache_root, configured_cache_dir
from ..data import stream
from ..data.read import check_not_empty, read_dataset, require_columns
from ..errors import DataError, ModelFolderError
from ..phases import note, phase
from ..train.loop import TrainResult, TrainTask, fit, freeze_by_regex, process_state
from . import features as FT
from .embed_cache import CachedEmbedder, EmbeddingCache, Ranks
from .network import CategoryEmbedding, EcdNet, output_loss, threads_for, torch_threads
from .tokens import token_ids
from .text_encoder import (TextEncoder, check_encoder_sources, encoder_source, fingerprint, load_tokenizer,
                           revision_known)

DEFAULT_BATCH_SIZE = 64
# a saved ecd model names its pretrained encoder; the encoder's pretrained weights are not in the model folder
FROZEN_ENCODER_SOURCE = ("the model folder holds no copy of the pretrained encoder: restore that folder, or point "
                         "model_hyperparameters.json at a copy of the same encoder")


class EcdModel:
    def __init__(self, config):
        self.config = config
        self.metadata: Optional[dict] = None
        self.net: Optional[EcdNet] = None
        self._encoders: dict[str, tuple] = {}  # feature → (TextEncoder, tokenizer), loaded only when needed
        self._embedders: dict[str, CachedEmbedder] = {}  # feature → its cache's key index, for one pass over data
        self._fitting = False  # inside fit: every process of a distributed run embeds its share
        self.log: Callable = print
        # Soft targets (set by cadenza.distill): split name → output feature name → class probabilities per row (a
        # DataFrame indexed like that split's frame, one column per class name). Where a split has them, the loss
        # learns them instead of the hard labels; metrics still compare with the hard labels.
        self.soft_targets: dict[str, dict[str, pd.DataFrame]] = {}

    # ------------------------------------------------------------------------------------------- helpers
    def _text_inputs(self):
        return [f for f in self.config.input_features if f.type == "text"]

    def is_cached(self, feature) -> bool:
        enc = feature.encoder
        return feature.preprocessing.cache_encoder_embeddings and not enc.trainable and enc.adapter is None

    def _max_length(self, feature) -> int:
        cap = feature.encoder.max_sequence_length
        return min(feature.preprocessing.max_sequence_length, cap) if cap else feature.preprocessing.max_sequence_length

    def _encoder(self, feature):
        if feature.name not in self._encoders:
            cache = str(self._cache_folder())  # where a GGUF encoder's converted copy goes
            # a cached encoder only embeds: its weights load in the embedding precision (no per-batch casts)
            dtype = self._embed_precision().dtype if self.is_cached(feature) else torch.float32
            with self._hub_source_errors(feature), phase("model load"):
                tokenizer = load_tokenizer(feature.encoder, cache)
                self._encoders[feature.name] = (TextEncoder(feature.encoder, cache=cache, dtype=dtype), tokenizer)
        return self._encoders[feature.name]

    def _tokenizer(self, feature):
        if feature.name in self._encoders:
            return self._encoders[feature.name][1]
        with self._hub_source_errors(feature):
            return load_tokenizer(feature.encoder, str(self._cache_folder()))

    def _hub_source_errors(self, feature):
        index = [f.name for f in self.config.input_features].index(feature.name)
        return hub_source_errors(encoder_source(feature.encoder),
                                 f"input_features[{index}].encoder.pretrained_model_name_or_path")

    def _cache_folder(self) -> Path:
        return cache_root(configured_cache_dir(self.config))

    @property
    def batch_size(self) -> int:
        bs = self.config.trainer.batch_size
        return DEFAULT_BATCH_SIZE if bs == "auto" else bs

    @property
    def eval_batch_size(self) -> int:
        ebs = self.config.trainer.eval_batch_size
        return max(2 * self.batch_size, 256) if ebs in (None, "auto") else ebs

    # -------------------------------------------------------------------------------------- preprocessing
    def _fit_metadata(self, train: pd.DataFrame) -> dict:
        meta = {}
        for f in self.config.input_features:
            meta[f.name] = FT.fit_feature(train, f, is_output=False) if f.type != "text" else \
                {"type": "text", "column": FT.column(f), "fill_value": f.preprocessing.fill_value,
                 "max_length": self._max_length(f), "cached": self.is_cached(f),
                 "encoder_fingerprint": fingerprint(f.encoder, self._max_length(f)) if self.is_cached(f) else None}
        for f in self.config.output_features:
            meta[f.name] = FT.fit_feature(train, f, is_output=True)
        return meta

    def _clean(self, df: pd.DataFrame, with_targets: bool, where: str) -> pd.DataFrame:
        features = [("input", f) for f in self.config.input_features]
        features += [("output", f) for f in self.config.output_features] if with_targets else []
        require_columns(df, {FT.column(f): f"{kind} feature {f.name!r}" for kind, f in features}, where)
        for _, f in features:
            df = FT.fill_missing(df, f, self.metadata[f.name], where, self.log)
        return df

    def _prepare(self, frames: dict[str, pd.DataFrame], with_targets: bool) -> dict[str, dict]:
        """Arrays per feature for each frame; cached text features are embedded in one pass over all frames."""
        frames = {k: self._clean(df, with_targets, k) for k, df in frames.items()}
        prepared = {k: {"n": len(df), "index": df.index, "inputs": {}, "targets": {}} for k, df in frames.items()}
        for f in self.config.input_features:
            for k, df in frames.items():
                if f.type != "text":
                    prepared[k]["inputs"][f.name] = FT.encode_input(df, f, self.metadata[f.name])
            if f.type == "text":
                texts = {k: self._texts(df, f) for k, df in frames.items()}
                if self.metadata[f.name]["cached"]:
                    vectors = self._embed(f, [t for k in frames for t in texts[k]])
                    start = 0
                    for k in frames:
                        prepared[k]["inputs"][f.name] = vectors[start:start + len(texts[k])]
                        start += len(texts[k])
                else:
                    tok = self._tokenizer(f)
                    for k in frames:
                        ids = token_ids(tok, texts[k], self.metadata[f.name]["max_length"])
                        prepared[k]["inputs"][f.name] = ids
        if with_targets:
            for f in self.config.output_features:
                for k, df in frames.items():
                    prepared[k]["targets"][f.name] = FT.encode_target(df, f, self.metadata[f.name])
                    table = self.soft_targets.get(k, {}).get(f.name)
                    if table is not None:
                        prepared[k].setdefault("soft_targets", {})[f.name] = soft_target(
                            table.loc[df.index], f, self.metadata[f.name])
        return prepared

    def _texts(self, df: pd.DataFrame, feature) -> list[str]:
        values = df[FT.column(feature)].astype(str)
        return (values.str.lower() if feature.preprocessing.lowercase else values).tolist()

    def _embed(self, feature, texts: list[str]) -> np.ndarray:
        """Row-aligned embeddings through the on-disk cache. One embedder (the cache's key index) serves a whole
        pass over the data, chunk after chunk; each pass (fit, predict, evaluate) starts with a fresh one."""
        meta = self.metadata[feature.name]
        if feature.name not in self._embedders:
            state = process_state()
            # under `accelerate launch` / torchrun a hub model not downloaded yet is fetched by the main process
            # first, so the cache key names its commit on every process
            with state.main_process_first():
                if not revision_known(feature.encoder):
                    self._encoder(feature)
                    meta["encoder_fingerprint"] = fingerprint(feature.encoder, meta["max_length"])
            cache = EmbeddingCache(self._cache_folder() / "embeddings" / meta["encoder_fingerprint"])

            def compute(missing: list[str]) -> np.ndarray:
                encoder, tokenizer = self._encoder(feature)
                return encoder.embed(missing, tokenizer, meta["max_length"], self._embed_precision())

            # while fitting, every process of a distributed run prepares the same data: they split the texts to
            # embed (each writes its shards; all then read every shard). predict/evaluate may run on one process.
            ranks = Ranks(state.process_index, state.num_processes, state.wait_for_everyone) if self._fitting else None
            self._embedders[feature.name] = CachedEmbedder(cache, compute, self.log, ranks=ranks)
        embedder = self._embedders[feature.name]
        vectors = embedder(texts)
        self.cache_stats = embedder.stats
        return vectors

    # ------------------------------------------------------------------------------ data larger than memory
    def streamed_splits(self, dataset, seed: int, log: Callable = print) -> Optional[dict]:
        """The splits of a Parquet file too big for the in-memory path (cadenza.data.stream.MIN_ROWS rows or
        more), as row numbers of the file; None where the in-memory path applies."""
        return stream.streamed_splits(dataset, self._stream_blocker, self.config.preprocessing, seed,
                                      f"in chunks of {stream.CHUNK_ROWS} rows", log)

    def _stream_blocker(self) -> Optional[str]:
        """Why this config cannot stream, or None."""
        for f in list(self.config.input_features) + list(self.config.output_features):
            if f.type == "text" and not self.is_cached(f):
                return f"text input {f.name!r} has a trained encoder (only cached embeddings are streamed)"
            if f.preprocessing.missing_value_strategy in ("bfill", "ffill"):
                return f"feature {f.name!r} fills missing values from neighbouring rows ({f.preprocessing.missing_value_strategy})"
        return None

    def _prepare_streamed(self, splits: dict, with_targets: bool, folder: Path) -> dict[str, dict]:
        """What _prepare gives, chunk by chunk: inputs go to row arrays on disk (embeddings through the cache),
        targets stay in memory (a few bytes a row). Rows dropped for missing values are left out by `rows`."""
        features = list(self.config.input_features) + (list(self.config.output_features) if with_targets else [])
        columns = list(dict.fromkeys(FT.column(f) for f in features))
        prepared = {}
        for k, rows in splits.items():
            store = stream.RowArrays(Path(folder) / k, len(rows))
            kept = np.zeros(len(rows), bool)
            targets: dict[str, np.ndarray] = {}
            for positions, chunk in rows.chunks(columns):
                part = self._prepare({k: chunk}, with_targets)[k]
                at = positions[chunk.index.get_indexer(part["index"])]
                kept[at] = True
                for name, values in part["inputs"].items():
                    store.write(name, at, np.asarray(values))
                for name, values in part["targets"].items():
                    if name not in targets:
                        targets[name] = np.zeros((len(rows),) + values.shape[1:], values.dtype)
                    targets[name][at] = values
                stream.release_freed_memory()
            index = np.flatnonzero(kept)
            prepared[k] = {"n": len(index), "rows": index if len(index) < len(rows) else None, "streamed": True,
                           "inputs": {name: store[name] for name in store.arrays},
                           "targets": {name: t[index] for name, t in targets.items()}}
        return prepared

    def _scratch(self):
        """A folder for one pass's row arrays, removed afterwards (under the cache folder: the same disk)."""
        root = self._cache_folder() / "rows"
        root.mkdir(parents=True, exist_ok=True)
        sweep_abandoned(root)  # the row arrays of a killed run's pass
        return tempfile.TemporaryDirectory(prefix=".pass.", suffix=f".{writer_tag()}.tmp", dir=root)

    def predict_to_file(self, dataset, path: Path, batch_size: Optional[int] = None) -> int:
        """Predictions of every row written to `path` (.csv/.parquet) chunk by chunk: a Parquet file is read a chunk
        at a time whatever its size, so memory does not grow with rows. Returns the rows written."""
        self._require_fitted()
        self._embedders = {}

        def chunks():
            if stream.parquet_rows(dataset) is not None:
                yield from (frame for _, frame in stream.whole_file(dataset).chunks())
            else:
                frame = read_dataset(dataset)
                yield from (frame.iloc[i:i + stream.CHUNK_ROWS] for i in range(0, len(frame), stream.CHUNK_ROWS))

        def predictions():
            for frame in chunks():
                data = self._prepare({"predict": frame}, with_targets=False)["predict"]
                yield self._predictions(self._run(data), index=None)
                stream.release_freed_memory()

        return stream.write_frames(predictions(), Path(path))

    def _embed_precision(self) -> device.Precision:
        precision = device.precision(self.config.trainer.use_mixed_precision, "embed")
        if not getattr(self, "_said_embed_precision", False):
            self.log(precision.describe("embed"))
            self._said_embed_precision = True
        return precision

    # ------------------------------------------------------------------------------------------- network
    def _build_net(self) -> EcdNet:
        inputs, sizes = {}, {}
        for f in self.config.input_features:
            meta = self.metadata[f.name]
            if f.type == "text":
                if meta["cached"]:
                    inputs[f.name] = torch.nn.Identity()
                    sizes[f.name] = meta.get("embedding_size") or self._embedding_size(f)
                else:
                    encoder, _ = self._encoder(f)
                    inputs[f.name], sizes[f.name] = encoder, encoder.output_size
            elif f.type == "category":
                inputs[f.name] = CategoryEmbedding(len(meta["vocab"]), f.encoder.embedding_size, f.encoder.dropout)
                sizes[f.name] = f.encoder.embedding_size
            else:
                inputs[f.name], sizes[f.name] = torch.nn.Identity(), 1
        return EcdNet(inputs, sizes, self.config.combiner, self.config.output_features, self.metadata)

    def _embedding_size(self, feature) -> int:
        return self._encoder(feature)[0].output_size

    def _batch(self, data: dict, index: np.ndarray, with_targets: bool) -> dict:
        inputs = {}
        # streamed data keeps the rows dropped for missing values in its arrays: `rows` maps around them
        stored = index if data.get("rows") is None else data["rows"][index]
        for f in self.config.input_features:
            value = data["inputs"][f.name]
            if f.type == "text" and not self.metadata[f.name]["cached"]:
                tok = self._tokenizer(f)
                padded = tok.pad({"input_ids": [value[i] for i in index]}, return_tensors="pt")
                inputs[f.name] = (padded["input_ids"], padded["attention_mask"])
            else:
                inputs[f.name] = torch.from_numpy(np.asarray(value[stored]))
        batch = {"inputs": inputs, "n": len(index)}
        if with_targets:
            batch["targets"] = {k: torch.from_numpy(v[index]) for k, v in data["targets"].items()}
            batch["soft_targets"] = {k: torch.from_numpy(v[index]) for k, v in data.get("soft_targets", {}).items()}
        return batch

    def _batches(self, data: dict, batch_size: int, shuffle_seed: Optional[int], with_targets: bool):
        order = np.arange(data["n"])
        if shuffle_seed is not None:
            order = np.random.default_rng(shuffle_seed).permutation(data["n"])
        for start in range(0, data["n"], batch_size):
            yield self._batch(data, order[start:start + batch_size], with_targets)

    def _loss_sum(self, net, batch) -> torch.Tensor:
        device = next(net.parameters()).device
        logits = net(_to(batch["inputs"], device))
        total = 0.0
        for f in self.config.output_features:
            target = batch.get("soft_targets", {}).get(f.name, batch["targets"][f.name]).to(device)
            total = total + f.loss.weight * output_loss(f, logits[f.name].float(), target, self.metadata[f.name])
        return total

    # ------------------------------------------------------------------------------------------ contract
    def fit(self, splits: dict[str, pd.DataFrame], *, run_dir: Optional[Path], resume: bool, seed: int,
            fingerprints: Optional[dict] = None, tracker=None, log: Callable = print) -> TrainResult:
        """splits: DataFrames, or cadenza.data.stream.FileRows for a Parquet file larger than memory."""
        with contextlib.ExitStack() as held:  # a streamed run's row arrays live until training ends
            self._fitting = True
            held.callback(setattr, self, "_fitting", False)
            return self._fit(splits, held, run_dir=run_dir, resume=resume, seed=seed, fingerprints=fingerprints,
                             tracker=tracker, log=log)

    def _fit(self, splits: dict, held: contextlib.ExitStack, *, run_dir: Optional[Path], resume: bool, seed: int,
             fingerprints: Optional[dict], tracker, log: Callable) -> TrainResult:
        self.log = log
        self._embedders = {}
        check_encoder_sources(self.config)
        train = splits["training"]
        check_not_empty(train, "training data")
        require_columns(train, {FT.column(f): f"feature {f.name!r}" for f in
                                list(self.config.input_features) + list(self.config.output_features)}, "training data")
        for f in self._text_inputs():
            if f.preprocessing.cache_encoder_embeddings and not self.is_cached(f):
                log(f"{f.name}: embeddings are not cached because the encoder is trained "
                    f"({'adapter' if f.encoder.adapter else 'trainable: true'})")
        if isinstance(train, stream.FileRows):  # vocabularies and statistics need the non-text columns only
            train = train.read(list(dict.fromkeys(FT.column(f) for f in list(self.config.input_features) +
                                                   list(self.config.output_features) if f.type != "text")))
        self.metadata = self._fit_metadata(train)
        frames = {k: df for k, df in splits.items() if len(df)}
        data = self._prepare_any(frames, True, held)
        if data["training"]["n"] == 0:
            raise DataError("training data: no rows left after dropping rows with missing values")
        for f in self._text_inputs():
            if self.metadata[f.name]["cached"]:
                self.metadata[f.name]["embedding_size"] = int(data["training"]["inputs"][f.name].shape[1])
        torch.manual_seed(seed)
        self.net = self._build_net()
        freeze_by_regex(self.net, self.config.trainer.layers_to_freeze_regex)
        validation = data.get("validation")
        if validation is not None and validation["n"] == 0:
            log("warning: validation: no rows left after dropping rows with missing values; training runs without "
                "validation (no early stopping, the last epoch's weights are kept)")
            validation = None
        train_data = data["training"]
        cfg = self.config.trainer
        # a streamed split's batches gather rows from disk: done a batch ahead, beside the step
        ahead = stream.prefetched if train_data.get("streamed") else (lambda batches: batches)
        task = TrainTask(
            batches=lambda epoch: ahead(self._batches(train_data, self.batch_size,
                                                      seed + epoch if cfg.should_shuffle else None, True)),
            num_batches=-(-train_data["n"] // self.batch_size),
            weight=lambda b: b["n"],
            loss_sum=self._loss_sum,
            # the network the loop trains: under FSDP2 a sharded copy of self.net, which gets its weights at the end
            evaluate=(lambda net: self._evaluate_prepared(validation, net)[0]) if validation else None,
            evaluate_training=lambda net: self._evaluate_prepared(train_data, net)[0],
            micro_batch_rows=self.batch_size,
        )
        # the head alone is too small for bf16 to pay; a trained encoder is not
        part = "train" if any(not self.metadata[f.name]["cached"] for f in self._text_inputs()) else "head"
        precision = device.precision(cfg.use_mixed_precision, part)
        log(precision.describe(part))
        with phase("imports"):
            # torch.optim's optimizers import torch's compiler stack on first use (about a second): counted here as
            # imports rather than as the head's epochs (a run that loads an encoder has it imported already)
            from torch import _dynamo  # noqa: F401  (not "import torch._dynamo": that makes torch a local name)
        threads = threads_for(self.net, self.batch_size)  # 1 for a small head: robust to a busy machine
        with phase("head epochs" if part == "head" else "epochs"), torch_threads(threads):
            result = fit(self.net, task, cfg, run_dir=run_dir, resume=resume, seed=seed, precision=precision,
                         fingerprints=fingerprints, tracker=tracker, log=log, backend=self.config.backend)
        note("head epochs" if part == "head" else "epochs", rows=train_data["n"] * len(result.statistics["training"]),
             threads=threads or result.throughput["threads"])
        result.precision = {"part": part, "precision": precision.name, "reason": precision.reason}
        self.net = self.net.cpu().eval()
        return result

    def _run(self, data: dict, net: Optional[torch.nn.Module] = None) -> dict[str, np.ndarray]:
        net = net if net is not None else self.net
        net.eval()
        device = next(net.parameters()).device
        outs: dict[str, list] = {f.name: [] for f in self.config.output_features}
        with torch.inference_mode(), torch_threads(threads_for(net, self.eval_batch_size)):
            for batch in self._batches(data, self.eval_batch_size, None, False):
                logits = net(_to(batch["inputs"], device))
                for name, value in logits.items():
                    outs[name].append(value.float().cpu())
        return {k: (torch.cat(v) if v else torch.zeros(0)).numpy() for k, v in outs.items()}

    def _evaluate_prepared(self, data: dict, net: Optional[torch.nn.Module] = None) -> tuple[dict, dict]:
        with phase("evaluation"):
            raw = self._run(data, net)
            results, combined = {}, 0.0
            for f in self.config.output_features:
                meta, logits, target = self.metadata[f.name], torch.from_numpy(raw[f.name]), data["targets"][f.name]
                t = torch.from_numpy(data.get("soft_targets", {}).get(f.name, target))  # the loss learns soft ones
                loss = float(output_loss(f, logits, t, meta)) / max(1, data["n"])
                combined += f.loss.weight * loss
                results[f.name] = {"loss": loss, **self._metrics(f, raw[f.name], target)}
            results["combined"] = {"loss": combined}
        return results, raw

    def _metrics(self, f, logits: np.ndarray, target: np.ndarray) -> dict:
        if f.type == "category":
            probs = _softmax(logits)
            return M.category_metrics(target, probs.argmax(1), probs, top_k=f.top_k)
        if f.type == "binary":
            return M.binary_metrics(target, _sigmoid(logits[:, 0]), f.threshold)
        if f.type == "set":
            return M.set_metrics(target, _sigmoid(logits) >= f.threshold)
        meta = self.metadata[f.name]
        return M.number_metrics(FT.denormalize(target, meta), FT.denormalize(logits[:, 0], meta))

    def _require_fitted(self):
        if self.net is None:
            raise ModelFolderError("this model is not trained yet: call train() or load a saved model")

    def predict(self, df: Union[pd.DataFrame, stream.FileRows], batch_size: Optional[int] = None) -> pd.DataFrame:
        self._require_fitted()
        self._embedders = {}
        with contextlib.ExitStack() as held:
            data = self._prepare_any({"predict": df}, False, held)["predict"]
            return self._predictions(self._run(data), index=None)

    def evaluate(self, df: Union[pd.DataFrame, stream.FileRows],
                 batch_size: Optional[int] = None) -> tuple[dict, pd.DataFrame]:
        self._require_fitted()
        self._embedders = {}
        check_not_empty(df, "evaluation data")
        with contextlib.ExitStack() as held:
            data = self._prepare_any({"evaluate": df}, True, held)["evaluate"]
            if data["n"] == 0:
                raise DataError("evaluation data: no rows left after dropping rows with missing values (see the "
                                "warnings above); evaluation needs rows with labels")
            results, raw = self._evaluate_prepared(data)
        return results, self._predictions(raw, index=None)

    def _prepare_any(self, frames: dict, with_targets: bool, held: contextlib.ExitStack) -> dict[str, dict]:
        """In memory for DataFrames; chunk by chunk into a scratch folder (removed when `held` closes) for
        FileRows."""
        with phase("preprocessing"):  # model load, tokenize and embed inside it count as themselves
            if any(isinstance(frame, stream.FileRows) for frame in frames.values()):
                folder = held.enter_context(self._scratch())
                return self._prepare_streamed(frames, with_targets, Path(folder))
            return self._prepare(frames, with_targets)

    def _predictions(self, raw: dict[str, np.ndarray], index) -> pd.DataFrame:
        columns: dict[str, object] = {}
        for f in self.config.output_features:
            meta, logits = self.metadata[f.name], raw[f.name]
            if f.type == "category":
                probs = _softmax(logits)
                vocab = meta["vocab"]
                columns[f"{f.name}_predictions"] = [vocab[i] for i in probs.argmax(1)]
                columns[f"{f.name}_probability"] = probs.max(1)
                for j, label in enumerate(vocab):
                    columns[f"{f.name}_probabilities_{label}"] = probs[:, j]
            elif f.type == "binary":
                p = _sigmoid(logits[:, 0])
                labels = meta.get("labels") or []
                hits = p >= f.threshold
                columns[f"{f.name}_predictions"] = [labels[int(h)] for h in hits] if labels else hits
                columns[f"{f.name}_probability"] = np.where(hits, p, 1 - p)
                columns[f"{f.name}_probabilities_true"] = p
            elif f.type == "set":
                p = _sigmoid(logits)
                vocab = meta["vocab"]
                columns[f"{f.name}_predictions"] = [[vocab[j] for j in np.flatnonzero(row >= f.threshold)] for row in p]
                for j, label in enumerate(vocab):
                    columns[f"{f.name}_probabilities_{label}"] = p[:, j]
            else:
                columns[f"{f.name}_predictions"] = FT.denormalize(logits[:, 0], meta)
        return pd.DataFrame(columns)

    # ------------------------------------------------------------------------------------- save and load
    def save(self, model_dir: Path) -> None:
        self._require_fitted()
        frozen = _frozen_pretrained(self.net)
        state = {k: v.detach().cpu().contiguous() for k, v in self.net.state_dict().items() if k not in frozen}
        save_file(unshared(state), str(Path(model_dir) / ECD_WEIGHTS))
        write_json(Path(model_dir) / METADATA_FILE, self.metadata)
        for f in self._text_inputs():
            if f.encoder.adapter is not None and f.name in self._encoders:
                # a plain PEFT folder too, so the adapted encoder can be used outside Cadenza
                self._encoders[f.name][0].backbone.save_pretrained(Path(model_dir) / "encoders" / f.name)

    @classmethod
    def load(cls, model_dir: Path, config) -> "EcdModel":
        """The model in a folder that Model.load has checked (cadenza.artifacts.check_model_folder). A frozen
        pretrained encoder is not in that folder, only its source: that must still be where the config says."""
        check_encoder_sources(config, why=FROZEN_ENCODER_SOURCE)
        model = cls(config)
        model_dir = Path(model_dir)
        model.metadata = read_json(model_dir / METADATA_FILE)
        model.net = model._build_net()
        state = load_file(str(model_dir / ECD_WEIGHTS))
        result = model.net.load_state_dict(state, strict=False)
        if result.unexpected_keys:
            raise ModelFolderError(f"{model_dir}: weights do not fit the config ({result.unexpected_keys[:3]} ...)")
        frozen = _frozen_pretrained(model.net)
        missing = [k for k in result.missing_keys if k not in frozen]
        if missing:
            raise ModelFolderError(f"{model_dir}: weights missing for {missing[:3]} ...")
        model.net.eval()
        return model


def soft_target(table: pd.DataFrame, feature, meta: dict) -> np.ndarray:
    """Class probabilities per row (columns: class names) as the loss's target. Each class name is encoded as the
    output encodes its labels: category → (rows, vocab) in the vocab's order (a class outside the vocab is dropped and
    each row renormalized); binary → (rows,), the summed probability of the classes that encode as true."""
    code = FT.encode_target(pd.DataFrame({meta["column"]: [str(c) for c in table.columns]}), feature, meta)
    probabilities = table.to_numpy(np.float64)
    if feature.type == "binary":
        return (probabilities @ code).astype(np.float32)
    if feature.type != "category":
        raise ValueError(f"soft targets need a category or binary output, not {feature.type}")
    out = np.zeros((len(table), len(meta["vocab"])))
    for j, index in enumerate(code):
        if index >= 0:
            out[:, index] += probabilities[:, j]
    total = out.sum(1, keepdims=True)
    return np.divide(out, total, out=np.zeros_like(out), where=total > 0).astype(np.float32)


def _frozen_pretrained(net) -> set[str]:
    """Frozen pretrained encoder weights are not saved: they are reloaded from the encoder's source."""
    return {n for n, p in net.named_parameters() if not p.requires_grad and ".backbone." in f".{n}"}


def _to(inputs: dict, device) -> dict:
    return {k: tuple(x.to(device) for x in v) if isinstance(v, tuple) else v.to(device) for k, v in inputs.items()}


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))
