"""`LlmModel`: the generative model type (`model_type: llm`), following the contract in docs/architecture.md."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import torch

from .. import device
from ..train import loop as trainer_mod
from ..train.sharding import enable_activation_checkpointing
from ..adapters import (apply_adapter, load_adapter, needs_calibration, needs_conversion, save_adapter,
                        snapshot_initial_adapter)
from ..artifacts import (LLM_WEIGHTS, METADATA_FILE, MODEL_DIR, RETRIEVAL_FILE, check_adapter_folder,
                         check_local_source, read_json, write_json)
from ..data import assets, stream
from ..data.cache import cache_root, configured_cache_dir
from ..data.read import require_columns
from ..phases import phase
from ..errors import DataError, ModelFolderError
from ..config.schema import CadenzaConfig
from . import batching, chat, preference, token_store, train
from .generate import generate as generate_ids
from .generate import hf_generation_config
from .likelihood import candidate_log_likelihoods
from .load import fix_special_tokens, load_causal_lm, load_tokenizer, plain_model_dir
from .loss import TargetLoss, can_share_prefix, causal_lm_of
from .outputs import category_scores, extract_label, text_scores
from .prompt import PromptBuilder
from .retrieval import Retriever
from .tokenize import TokenizedRows, tokenize_rows, tokenizer_fingerprint

CALIBRATION_ROWS = 256  # EVA/CorDA calibration: PEFT's CorDA guide finds a few hundred rows enough
# rows read, prompted and tokenized at a time from a streamed Parquet file: the chunk's records, prompt texts and
# the tokenizer's lists of Python ints cost ~2-3 KB a row while they live, so a small chunk keeps that small
TOKENIZE_ROWS = 8192
CPU_AUTO_BATCH = 8  # on CPU bigger micro-batches do not raise tokens/s; more optimizer steps help convergence
BASE_NOT_SAVED = ("the model folder holds no copy of the base model (only the adapter trained on it): restore "
                  "that folder, or point base_model in model_hyperparameters.json at a copy of the same model")


class LlmModel:
    def __init__(self, config: CadenzaConfig):
        self.config = config
        self.model = None        # the causal LM (PEFT-wrapped when an adapter is trained or loaded)
        self.tokenizer = None
        self.builder: Optional[PromptBuilder] = None
        self.retriever: Optional[Retriever] = None
        self.labels: list[str] = []  # category output: the label vocabulary
        self.weights_kind = "base"   # what save() writes: base | adapter | merged | full
        self.truncated_rows = 0
        self._prepared = False
        self._initial_adapter = None  # PiSSA/OLoRA/CorDA: the adapter before training, to save it converted
        out = config.output_features[0]
        self.output = out
        self.output_column = out.column or out.name
        self.inputs = [f.column or f.name for f in config.input_features]
        # chat data (preprocessing.format: messages): conversations in a column, targets = their assistant turns
        self.chat = chat.ChatData(config) if chat.chat_column(config) else None
        if self.chat:
            chat.check_config(config)
        self._build_labels({})  # zero-shot without fit: the labels the config names

    # ------------------------------------------------------------------------------------------- loading
    def _cache(self) -> Path:
        return cache_root(configured_cache_dir(self.config))

    def _dtype(self) -> torch.dtype:
        # full fine-tuning keeps fp32 master weights (bf16 autocast does the fast part); frozen bases may go bf16
        training_full = self.config.trainer.type != "none" and self.config.adapter is None
        return torch.float32 if training_full else _weights_precision(self.config).dtype

    def _ensure_base(self, log=print) -> None:
        if self.model is not None:
            return
        with phase("model load"):
            source = plain_model_dir(self.config.base_model, str(self._cache()), log=log)
            self.tokenizer = load_tokenizer(source, self.config.trust_remote_code)
            self.model = load_causal_lm(source, dtype=self._dtype(), trust_remote_code=self.config.trust_remote_code,
                                        quantization=self.config.quantization, rope_scaling=self._rope_scaling())
        log(f"base model weights in {str(self._dtype()).replace('torch.', '')} "
            f"({_weights_precision(self.config).reason})")
        # FSDP2 shards a copy of the model onto the GPUs: the whole model stays in CPU memory until training ends
        if device.is_cuda() and self.config.quantization is None and not self._sharded():
            self.model.to("cuda")
        self._ensure_builder()

    def _sharded(self) -> bool:
        from ..train.backend import sharding_options

        return sharding_options(self.config.backend, trainer_mod.process_state().num_processes) is not None

    def _rope_scaling(self) -> Optional[dict]:
        params = self.config.model_parameters
        return params.rope_scaling if params else None

    def _ensure_builder(self) -> None:
        if self.builder is None:
            self.builder = PromptBuilder(self.config, self.tokenizer)

    # -------------------------------------------------------------------------------------------- prompts
    def _records(self, df: pd.DataFrame, need_output: bool) -> list[dict]:
        if self.chat:  # the references are the conversations' own final assistant turns
            return self.chat.records(df)
        cols = {c: f"input_features ({c})" for c in self.inputs}
        if need_output:
            cols[self.output_column] = f"output_features ({self.output_column})"
        require_columns(df, cols, "llm data")
        return df.to_dict("records")

    def _answered_records(self, df: pd.DataFrame, where: str, log) -> list[dict]:
        """The rows to learn from (training, validation, few-shot examples). A row without an answer would teach
        the model to answer nothing (its target is the end-of-sequence token alone): it is dropped and counted."""
        if self.chat:
            return self.chat.training_records(df, where, log)
        records = self._records(df, need_output=True)
        answered, counts = self._answered(records)
        self._warn_unanswered(where, counts, log)
        return [r for r, keep in zip(records, answered) if keep]

    def _answered(self, records: list[dict]) -> tuple[np.ndarray, dict]:
        """Which records have an answer, and the counts of what is left out (a streamed pass adds them up over its
        chunks, so its warnings are the in-memory path's)."""
        answers = [r.get(self.output_column) for r in records]
        answered = np.fromiter((not _is_blank(a) for a in answers), dtype=bool, count=len(answers))
        counts = {"rows": len(records), "kept": int(answered.sum()),
                  "missing": sum(_is_missing(a) for a, ok in zip(answers, answered) if not ok),
                  "blank_inputs": {c: sum(_is_blank(r.get(c)) for r, ok in zip(records, answered) if ok)
                                   for c in self.inputs}}
        return answered, counts

    def _warn_unanswered(self, where: str, counts: dict, log) -> None:
        rows, kept, missing = counts["rows"], counts["kept"], counts["missing"]
        if kept < rows:
            log(f"warning: {where}: dropped {rows - kept} of {rows} rows with no answer in "
                f"output column {self.output_column!r} ({missing} missing, {rows - kept - missing} "
                "empty text); fill them or remove those rows")
        for column, blank in counts["blank_inputs"].items():
            if blank:
                log(f"warning: {where}: {blank} of {kept} rows have no value in input column {column!r}; "
                    "their prompts carry an empty text for it")

    def _prompts(self, records: list[dict], self_index: bool = False) -> list[str]:
        contexts = [""] * len(records)
        if self.retriever is not None:
            texts = [self.builder.user_text(r) for r in records]
            chosen = self.retriever.select(texts, list(range(len(records))) if self_index else None)
            contexts = [self.builder.context(rows) for rows in chosen]
        return [self.builder.prompt(r, c) for r, c in zip(records, contexts)]

    def _tokenize(self, records: list[dict], with_targets: bool, self_index: bool = False,
                  cache: bool = True) -> TokenizedRows:
        if self.chat:
            return self.chat.tokenize(self.tokenizer, records, with_targets,
                                      self.config.preprocessing.global_max_sequence_length)
        prompts = self._prompts(records, self_index)
        targets = [self.builder.target(p, r.get(self.output_column)) for p, r in zip(prompts, records)] \
            if with_targets else None
        return tokenize_rows(self.tokenizer, prompts, targets,
                             max_len=self.config.preprocessing.global_max_sequence_length,
                             add_special_tokens=self.builder.add_special_tokens,
                             cache_dir=self._cache() / "tokens" if cache else None)

    # ---------------------------------------------------------------------------- data larger than memory
    def streamed_splits(self, dataset, seed: int, log=print) -> Optional[dict]:
        """The splits of a Parquet file of cadenza.data.stream.MIN_ROWS rows or more, as row numbers of the file
        (tokenized chunk by chunk into an on-disk store by `_streamed_tokens`); None where the in-memory path
        applies."""
        return stream.streamed_splits(dataset, self._stream_blocker, self.config.preprocessing, seed,
                                      f"and tokenized {TOKENIZE_ROWS} rows at a time into a token store on disk", log)

    def _stream_blocker(self) -> Optional[str]:
        """Why this config needs every row in memory, or None."""
        t = self.config.trainer
        if self.chat:
            return "chat data (preprocessing.format: messages) is tokenized in memory"
        if preference.is_preference(t.type):
            return f"trainer.type {t.type} pairs its rows in memory"
        if t.type == "none":
            return "trainer.type none trains nothing (zero-/few-shot): there is nothing to tokenize"
        if self.config.prompt.retrieval.type:
            return "prompt.retrieval picks few-shot examples among all training rows, held in memory"
        return None

    def _streamed_tokens(self, rows: stream.FileRows, where: str, log) -> TokenizedRows:
        """The answered rows of a streamed split, tokenized TOKENIZE_ROWS at a time into a token store on disk
        (cadenza.llm.token_store) - or the store a previous run left for the same rows, tokenizer and prompt. Rows
        are in the split's order, as the in-memory path has them."""
        require_columns(rows, {**{c: f"input_features ({c})" for c in self.inputs},
                               self.output_column: f"output_features ({self.output_column})"}, "llm data")
        folder = self._cache() / "tokens" / f"stream-{self._store_key(rows)}"
        found = token_store.read(folder)
        if found is None:
            if len(self.tokenizer) >= 2 ** 31:
                raise DataError(f"the tokenizer has {len(self.tokenizer)} tokens: the token store keeps int32 ids")
            counts = {"rows": 0, "kept": 0, "missing": 0, "blank_inputs": dict.fromkeys(self.inputs, 0)}

            def chunks():
                columns = list(dict.fromkeys(self.inputs + [self.output_column]))
                for positions, frame in rows.chunks(columns, rows=TOKENIZE_ROWS):
                    records = self._records(frame, need_output=True)
                    answered, part = self._answered(records)
                    for key in ("rows", "kept", "missing"):
                        counts[key] += part[key]
                    for column, blank in part["blank_inputs"].items():
                        counts["blank_inputs"][column] += blank
                    kept = [r for r, keep in zip(records, answered) if keep]
                    yield positions[answered], self._tokenize(kept, with_targets=True, cache=False)

            with phase("tokenize"):
                found = token_store.write(folder, chunks(), len(rows), counts)
            log(f"{where}: {found[1]['kept']:,} rows tokenized into {folder}")
        else:
            log(f"{where}: {found[1]['kept']:,} tokenized rows reused from {folder}")
        tokens, counts = found
        self._warn_unanswered(where, counts, log)
        return tokens

    def _store_key(self, rows: stream.FileRows) -> str:
        """Everything the stored tokens depend on: the file and its rows, the tokenizer (its chat template too),
        the prompt, the columns and the maximum length."""
        parts = {"store": token_store.VERSION, "data": rows.fingerprint()["sha256"],
                 "tokenizer": tokenizer_fingerprint(self.tokenizer),
                 "chat_template": getattr(self.tokenizer, "chat_template", None), "prompt": self.builder.metadata(),
                 "task": self.config.prompt.task, "add_special_tokens": self.builder.add_special_tokens,
                 "max_len": self.config.preprocessing.global_max_sequence_length}
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]

    def _build_retriever(self, train_records: list[dict], seed: int) -> None:
        r = self.config.prompt.retrieval
        if r.type is None or not train_records:
            return
        texts = [self.builder.user_text(x) for x in train_records]
        keep = [{c: x.get(c) for c in self.inputs + [self.output_column]} for x in train_records]
        self.retriever = Retriever(r.type, r.k, keep, texts, seed=seed, model_name=r.model_name)

    def _build_labels(self, splits: dict) -> None:
        if self.output.type != "category":
            return
        labels: list[str] = list((self.output.match or {}).keys())
        train = splits.get("training")
        if train is not None and self.output_column in getattr(train, "columns", []):
            by_count = _labels_by_count(train, self.output_column) if isinstance(train, stream.FileRows) else \
                train[self.output_column].dropna().astype(str).value_counts().index
            for value in by_count:
                if value not in labels:
                    labels.append(value)
        if self.output.fallback_label and self.output.fallback_label not in labels:
            labels.append(self.output.fallback_label)
        self.labels = labels

    # ------------------------------------------------------------------------------------------- training
    def _batch_size(self, eval_: bool = False) -> int:
        t = self.config.trainer
        size = t.batch_size if isinstance(t.batch_size, int) else None
        if size is None:
            size = self._auto_batch_size()
        if eval_:
            e = t.eval_batch_size
            return e if isinstance(e, int) else 2 * size
        return size

    def _auto_batch_size(self) -> int:
        """CPU: a fixed 8 rows. CUDA: the largest power of two (<= max_batch_size, 64) whose forward/backward
        on the longest training rows fits in memory."""
        if not device.is_cuda() or not getattr(self, "_train_rows", None) or not self._prepared:
            return CPU_AUTO_BATCH  # (before the adapter is applied a probe would measure the wrong model)
        if getattr(self, "_auto_size", None):
            return self._auto_size
        rows = self._train_rows
        longest = np.argsort(-rows.lengths, kind="stable")[:64].tolist()  # (a stable sort, as sorted() was)
        size, best = 1, 1
        cap = min(self.config.trainer.max_batch_size, 64, len(rows))
        module = TargetLoss(self.model)
        while size <= cap:
            try:
                batch = batching.make_batch(rows, [longest[i % len(longest)] for i in range(size)],
                                            packed=self.config.trainer.packing, pad_id=self.tokenizer.pad_token_id)
                module(batch).backward()
                best, size = size, size * 2
            except torch.cuda.OutOfMemoryError:
                break
            finally:
                self.model.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
        self._auto_size = best
        return best

    def _prepare_for_training(self, log) -> None:
        cfg, t = self.config, self.config.trainer
        model = self.model
        if cfg.quantization is not None:
            import peft

            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=t.enable_gradient_checkpointing)
        if t.enable_gradient_checkpointing:
            enable_activation_checkpointing(causal_lm_of(model))
        if cfg.adapter is not None:
            adapter = cfg.adapter
            if adapter.pretrained_adapter_weights:
                adapter = adapter.model_copy(update={"pretrained_adapter_weights":
                                                     str(_adapter_folder(adapter.pretrained_adapter_weights))})
                log(f"continuing training of the adapter in {adapter.pretrained_adapter_weights}")
            calibration = None
            rows = getattr(self, "_train_rows", None)  # set by fit's supervised path
            if needs_calibration(adapter) and rows is not None:  # EVA/CorDA: forward passes over training rows
                pad, on = self.tokenizer.pad_token_id, next(model.parameters()).device
                calibration = lambda: list(_calibration_batches(rows, pad, self._batch_size(), on))  # noqa: E731
            model = apply_adapter(model, adapter, "CAUSAL_LM", total_steps=getattr(self, "_total_steps", None),
                                  calibration=calibration)
            if needs_conversion(adapter):
                self._initial_adapter = snapshot_initial_adapter(model)
            self.weights_kind = "adapter"
        else:
            for p in model.parameters():
                p.requires_grad_(True)
            self.weights_kind = "full"
        frozen = trainer_mod.freeze_by_regex(model, t.layers_to_freeze_regex)
        if frozen:
            log(f"froze {frozen} parameter tensors matching {t.layers_to_freeze_regex!r}")
        self.model = model
        self._prepared = True
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log(f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)")

    def fit(self, splits: dict[str, pd.DataFrame], *, run_dir: Optional[Path], resume: bool, seed: int,
            fingerprints: Optional[dict] = None, tracker=None, log=print) -> trainer_mod.TrainResult:
        """The generative recipe in cadenza/llm/train.py: data -> load -> loss (sft, dpo, orpo, kto) -> loop."""
        return train.fit(self, splits, run_dir=run_dir, resume=resume, seed=seed, fingerprints=fingerprints,
                         tracker=tracker, log=log)

    def _score(self, rows: TokenizedRows, module: Optional[torch.nn.Module] = None) -> tuple[float, int, int]:
        module = module if module is not None else TargetLoss(self.model)
        was = module.training
        module.eval()
        total = count = correct = 0
        t = self.config.trainer
        try:
            for g in batching.eval_groups(rows, self._batch_size(eval_=True),
                                          t.max_tokens_per_batch if t.packing else None):
                b = batching.make_batch(rows, g, packed=t.packing, train_on_inputs=False,
                                        pad_id=self.tokenizer.pad_token_id, share_prefix=can_share_prefix(self.model))
                s, n, c = module.score(b)
                total, count, correct = total + s, count + n, correct + c
        finally:
            module.train(was)
        return total / max(count, 1), count, correct

    # ------------------------------------------------------------------------------------------- merging
    def _should_merge(self) -> bool:
        a = self.config.adapter
        return a is not None and a.postprocessor.merge_adapter_into_base_model and self.weights_kind == "adapter"

    @torch.no_grad()
    def _merge(self, log=print) -> None:
        """merge_and_unload, then check the merged model's logits equal the adapter model's on a probe."""
        probe = self.tokenizer(["The quick brown fox jumps over the lazy dog.", "Hello"], return_tensors="pt",
                               padding=True)
        device = next(self.model.parameters()).device
        probe = {k: v.to(device) for k, v in probe.items()}
        self.model.eval()
        before = self.model(**probe).logits.float()
        merged = self.model.merge_and_unload()
        merged.eval()
        after = merged(**probe).logits.float()
        mask = probe["attention_mask"].bool()
        diff = (before - after).abs()[mask].max().item()
        scale = before[mask].abs().max().item()
        tol = 1e-3 if merged.dtype == torch.float32 else 3e-2
        if not diff <= tol * max(1.0, scale):
            raise RuntimeError(f"merged model's logits differ from the adapter model's by {diff:.3g} "
                               f"(tolerance {tol * max(1.0, scale):.3g}); refusing to save a wrong merge")
        log(f"adapter merged into the base model (max logit difference {diff:.2e})")
        self.model = merged
        self.weights_kind = "merged"

    # ------------------------------------------------------------------------------------------ inference
    def _generation_config(self, **overrides):
        base = getattr(causal_lm_of(self.model), "generation_config", None)
        return hf_generation_config(self.config.generation, self.tokenizer, base=base, **overrides)

    def _generate_records(self, records: list[dict], batch_size: Optional[int]) -> list[str]:
        rows = self._tokenize(records, with_targets=False)
        generation_config = self._generation_config()
        if self.chat:
            self.chat.stop_at_end_of_turn(generation_config, self.tokenizer)
        with phase("generate"):
            return generate_ids(self.model, self.tokenizer, rows.ids, generation_config,
                                batch_size=batch_size or self._batch_size(eval_=True))

    def generate(self, prompts: list[str], **generation_overrides) -> list[str]:
        """Continue raw prompts (no prompt.template; the chat template is applied when the model uses one)."""
        self._ensure_base()
        batch_size = generation_overrides.pop("batch_size", None)
        if self.builder.use_chat:
            texts = [self.tokenizer.apply_chat_template(
                ([{"role": "system", "content": self.config.prompt.system_prompt}] if self.config.prompt.system_prompt
                 else []) + [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                for p in prompts]
        else:
            texts = list(prompts)
        ids = self.tokenizer(texts, add_special_tokens=self.builder.add_special_tokens)["input_ids"]
        return generate_ids(self.model, self.tokenizer, ids, self._generation_config(**generation_overrides),
                            batch_size=batch_size or self._batch_size(eval_=True))

    def predict(self, df: pd.DataFrame, batch_size: Optional[int] = None) -> pd.DataFrame:
        self._ensure_base()
        if isinstance(df, stream.FileRows):  # a streamed test split: its predictions are a DataFrame anyway
            df = df.read()
        records = self._records(df, need_output=False)
        texts = self._generate_records(records, batch_size)
        name = self.output.name
        out = pd.DataFrame(index=df.index)
        if self.output.type == "category":
            labels = [extract_label(t, self.labels, self.output.match, self.output.fallback_label) for t in texts]
            out[f"{name}_predictions"] = labels
            out[f"{name}_response"] = texts
            probs = self._label_probabilities(records)
            if probs is not None:
                index = {label: i for i, label in enumerate(self.labels)}
                out[f"{name}_probability"] = [probs[r, index[x]] if x in index else np.nan for r, x in enumerate(labels)]
                for i, label in enumerate(self.labels):
                    out[f"{name}_probabilities_{label}"] = probs[:, i]
        else:
            out[f"{name}_predictions"] = texts
        return out

    @torch.no_grad()
    def _label_probabilities(self, records: list[dict]) -> Optional[np.ndarray]:
        """P(label | prompt) for every label, from the model's own likelihood of each label's text + EOS as the
        answer, normalised over the labels. (The extracted label comes from the generation; these scores say
        how the model ranks the labels, and give hits@k.) Each row's prompt runs once and its key/value cache serves
        all its candidates (cadenza.llm.likelihood)."""
        if not self.labels:
            return None
        prompts = self._prompts(records)
        k = len(self.labels)
        rows = tokenize_rows(self.tokenizer, [p for p in prompts for _ in range(k)],
                             [self.builder.target(p, label) for p in prompts for label in self.labels],
                             max_len=self.config.preprocessing.global_max_sequence_length,
                             add_special_tokens=self.builder.add_special_tokens)
        pad, size = self.tokenizer.pad_token_id, self._batch_size(eval_=True)

        def prompt(i: int) -> np.ndarray:
            return rows.ids[i][:rows.prompt_lens[i]]

        def candidate(i: int) -> np.ndarray:  # the label's tokens and EOS
            return rows.ids[i][rows.prompt_lens[i]:]

        scores = np.zeros((len(records), k))
        # a prompt cut short to make room for a longer label differs between its candidates: those score one by one
        whole = [r for r in range(len(records))
                 if all(np.array_equal(prompt(r * k), prompt(r * k + j)) for j in range(1, k))]
        cut = sorted(set(range(len(records))) - set(whole))
        if whole:
            scores[whole] = candidate_log_likelihoods(self.model, [prompt(r * k) for r in whole],
                                                      [[candidate(r * k + j) for j in range(k)] for r in whole],
                                                      pad_id=pad, batch_size=size)
        if cut:
            pairs = [r * k + j for r in cut for j in range(k)]
            scores[cut] = candidate_log_likelihoods(self.model, [prompt(i) for i in pairs],
                                                    [[candidate(i)] for i in pairs], pad_id=pad,
                                                    batch_size=size).reshape(len(cut), k)
        return torch.softmax(torch.from_numpy(scores), 1).numpy()

    def evaluate(self, df: pd.DataFrame, batch_size: Optional[int] = None) -> tuple[dict, pd.DataFrame]:
        with phase("evaluation"):  # the loss and the scores (the generation counts as generate)
            return self._evaluate(df, batch_size)

    def _evaluate(self, df: pd.DataFrame, batch_size: Optional[int]) -> tuple[dict, pd.DataFrame]:
        self._ensure_base()
        if isinstance(df, stream.FileRows):  # a streamed test split: its predictions are a DataFrame anyway
            df = df.read()
        records = self._records(df, need_output=True)
        if not records:
            raise DataError("evaluate: the data set has no rows")
        predictions = self.predict(df, batch_size=batch_size)
        name = self.output.name
        rows = self._tokenize(records, with_targets=True)
        loss, n, correct = self._score(rows)
        metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "token_accuracy": correct / max(n, 1)}
        truth = [self.chat.reference(r) if self.chat else r.get(self.output_column) for r in records]
        if self.output.type == "category":
            labels = self.labels or sorted({str(x) for x in truth})
            columns = [f"{name}_probabilities_{label}" for label in labels]
            probs = predictions[columns].to_numpy() if all(c in predictions for c in columns) else None
            metrics.update(category_scores([str(x) for x in truth], list(predictions[f"{name}_predictions"]),
                                           labels, top_k=self.output.top_k, probabilities=probs))
        else:
            metrics.update(text_scores(list(predictions[f"{name}_predictions"]), ["" if x is None else str(x)
                                                                                   for x in truth]))
        if preference.is_preference(self.config.trainer.type):  # rewards/* on these pairs, as in validation
            metrics.update(train.held_out_rewards(self, df))
        return {name: metrics, "combined": {"loss": loss}}, predictions

    # ---------------------------------------------------------------------------------------- save/load
    def save(self, model_dir: Path) -> None:
        model_dir = Path(model_dir)
        self._ensure_base()
        weights = model_dir / LLM_WEIGHTS
        weights.mkdir(parents=True, exist_ok=True)
        if self.weights_kind == "adapter":  # PiSSA/OLoRA/CorDA: converted to a LoRA on the original base
            save_adapter(self.model, weights, self._initial_adapter)
        elif self.weights_kind in ("merged", "full"):
            self.model.save_pretrained(weights, safe_serialization=True)
        self.tokenizer.save_pretrained(weights)
        self._generation_config().save_pretrained(weights)
        if self.retriever is not None:
            write_json(model_dir / RETRIEVAL_FILE, self.retriever.examples)
        write_json(model_dir / METADATA_FILE, {
            "model_type": "llm", "base_model": self.config.base_model, "weights": self.weights_kind,
            "prompt": self.builder.metadata(), "labels": self.labels, "truncated_rows": self.truncated_rows,
            "tokenizer_fingerprint": tokenizer_fingerprint(self.tokenizer),
            "global_max_sequence_length": self.config.preprocessing.global_max_sequence_length,
        })

    @classmethod
    def load(cls, model_dir: Path, config: CadenzaConfig) -> "LlmModel":
        """The model in a folder that Model.load has checked (cadenza.artifacts.check_model_folder). An adapter
        (or an untrained model) is saved without its base model: that must still be where the config says."""
        model_dir = Path(model_dir)
        weights = model_dir / LLM_WEIGHTS
        meta = read_json(model_dir / METADATA_FILE)
        self = cls(config)
        self.labels, self.weights_kind = list(meta.get("labels") or []), meta.get("weights", "base")
        self.truncated_rows = meta.get("truncated_rows", 0)
        trust = config.trust_remote_code
        if self.weights_kind in ("merged", "full"):
            self.tokenizer = load_tokenizer(str(weights), trust)
            self.model = load_causal_lm(str(weights), dtype=_weights_precision(config).dtype, trust_remote_code=trust)
        else:
            check_local_source(assets.resolve_model_name(config.base_model), "base_model", BASE_NOT_SAVED)
            source = plain_model_dir(config.base_model, str(self._cache()))
            self.tokenizer = load_tokenizer(str(weights), trust)
            self.model = load_causal_lm(source, dtype=_weights_precision(config).dtype, trust_remote_code=trust,
                                        quantization=config.quantization, rope_scaling=self._rope_scaling())
            if self.weights_kind == "adapter":
                self.model = load_adapter(self.model, weights, is_trainable=False)
        fix_special_tokens(self.tokenizer)
        if device.is_cuda() and config.quantization is None:
            self.model.to("cuda")
        self.model.eval()
        self._ensure_builder()
        if (model_dir / RETRIEVAL_FILE).is_file() and config.prompt.retrieval.type:
            examples = read_json(model_dir / RETRIEVAL_FILE)
            r = config.prompt.retrieval
            texts = [self.builder.user_text(x) for x in examples]
            self.retriever = Retriever(r.type, r.k, examples, texts, model_name=r.model_name)
        return self


def _is_missing(value) -> bool:
    """None, NaN, NaT or pd.NA: a cell with no value."""
    return value is None or (pd.api.types.is_scalar(value) and not isinstance(value, str) and bool(pd.isna(value)))


def _is_blank(value) -> bool:
    """A missing cell or a text of only white space: nothing to put in a prompt or to learn as an answer."""
    return _is_missing(value) or not str(value).strip()


def _labels_by_count(rows: stream.FileRows, column: str) -> list[str]:
    """The values of `frame[column].dropna().astype(str).value_counts()` of a streamed split, one column read a
    chunk at a time: most frequent first, ties in order of first appearance in the split (as value_counts has
    them: a stable sort of the values in that order)."""
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for positions, frame in rows.chunks([column]):
        present = frame[column].notna().to_numpy()
        part = pd.DataFrame({"value": frame[column][present].astype(str).to_numpy(), "at": positions[present]})
        for value, n, at in part.groupby("value", sort=False)["at"].agg(["size", "min"]).itertuples():
            counts[value] = counts.get(value, 0) + int(n)
            first[value] = min(first.get(value, int(at)), int(at))
    return sorted(counts, key=lambda value: (-counts[value], first[value]))


def _weights_precision(config: CadenzaConfig) -> device.Precision:
    """The dtype of frozen (or inference-only) base weights, from trainer.use_mixed_precision and the hardware."""
    return device.precision(config.trainer.use_mixed_precision, "weights")


def _adapter_folder(path: str) -> Path:
    """Accept an adapter folder, a Cadenza model folder or a run folder for adapter.pretrained_adapter_weights;
    the adapter in it must be whole, with safetensors weights."""
    check_local_source(path, "adapter.pretrained_adapter_weights")
    p = Path(path).expanduser()
    for candidate in (p, p / LLM_WEIGHTS, p / MODEL_DIR / LLM_WEIGHTS):
        if (candidate / "adapter_config.json").is_file():
            check_adapter_folder(candidate)
            return candidate
    raise ModelFolderError(f"adapter.pretrained_adapter_weights: no adapter_config.json in {p}, {p / LLM_WEIGHTS} "
                           f"or {p / MODEL_DIR / LLM_WEIGHTS}")


def _calibration_batches(rows: TokenizedRows, pad_id: int, size: int, on: torch.device):
    """Padded batches of the first CALIBRATION_ROWS training rows for EVA/CorDA calibration; labels mark the
    response tokens (EVA's use_label_mask) and are -100 on the prompt and the padding."""
    for start in range(0, min(len(rows), CALIBRATION_ROWS), size):
        chunk = [(ids, int(n)) for ids, n in zip(rows.ids[start:start + size], rows.prompt_lens[start:start + size])]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, (ids, prompt_len) in enumerate(chunk):
            input_ids[i, :len(ids)] = torch.from_numpy(ids)
            labels[i, prompt_len:len(ids)] = torch.from_numpy(ids[prompt_len:])
            mask[i, :len(ids)] = 1
        yield {"input_ids": input_ids.to(on), "attention_mask": mask.to(on), "labels": labels.to(on)}
