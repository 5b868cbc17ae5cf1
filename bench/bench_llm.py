"""LoRA (r=8) fine-tune of the packaged SmolLM2-135M-Instruct on chatterbot question/answer pairs, one epoch:
Cadenza's llm path against a plain transformers+peft loop (fp32, length-grouped padded batches of 8) on the
same tokens (same chat-templated prompts, loss on answers + EOS only), model and machine.

Each variant runs in its own process (so its peak RSS is its own), back to back:
  baseline   model(input_ids, attention_mask, labels) on padded batches; HF's loss over full-vocab logits
  cadenza_noprefix  the same without prefix sharing (ablation)
  cadenza    LlmModel.fit: padding-free packed micro-batches of 8 rows, shared system-prompt prefix computed
             once per micro-batch, LM head on answer positions only
Reported: tokens/s (all tokens of the rows, prompt included), answer tokens/s, MFU (4N FLOPs per token the
model really computed: Cadenza runs a prompt prefix shared by a micro-batch's rows once), peak RSS, and
validation loss (mean over answer tokens of held-out pairs) after the epoch.

    python bench/bench_llm.py [--rows 300] [--val 100] [--variants baseline,cadenza]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def data(rows: int, val: int):
    from cadenza import assets

    pairs = assets.chatterbot_pairs().sample(frac=1.0, random_state=0).reset_index(drop=True)
    return pairs.iloc[:rows].reset_index(drop=True), pairs.iloc[rows:rows + val].reset_index(drop=True)


def config(batch: int) -> dict:
    return {"model_type": "llm", "base_model": "smollm2",
            "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}],
            "adapter": {"type": "lora", "r": 8, "dropout": 0.05},
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": batch, "learning_rate": 2e-4,
                        "gradient_clipping": {"clipglobalnorm": None}}}


def run_cadenza(rows: int, val: int, batch: int, share_prefix: bool = True) -> dict:
    from cadenza.config import load_config
    from cadenza.llm import LlmModel
    from cadenza.llm import model as llm_model

    if not share_prefix:  # ablation: plain packing, to show what the shared prefix adds
        llm_model.can_share_prefix = lambda m: False

    train, valid = data(rows, val)
    m = LlmModel(load_config(config(batch)))
    result = m.fit({"training": train, "validation": valid}, run_dir=None, resume=False, seed=0,
                   log=lambda s: print(s, file=sys.stderr))
    stats = result.statistics
    from cadenza.llm import batching
    from cadenza.llm.loss import can_share_prefix

    rows = m._train_rows
    computed = sum(batching.computed_tokens(rows, g, packed=True, share_prefix=share_prefix and can_share_prefix(m.model))
                   for g in m._train_groups(rows, 0, 0, batch))
    seconds = stats["training"][0]["seconds"]
    questions = ["Hello, how are you?", "What is your favorite book?", "Do you like music?"]
    for q, a in zip(questions, m.generate(questions, max_new_tokens=48)):
        print(f"  Q: {q}\n  A: {a}", file=sys.stderr)
    return {"tokens_per_second": result.throughput["tokens_per_second"],
            "computed_tokens_per_second": computed / seconds,
            "answer_tokens_per_second": result.throughput["target_tokens_per_second"],
            "train_seconds": stats["training"][0]["seconds"], "validation_loss": stats["validation"][0]["answer"]["loss"]}


def run_baseline(rows: int, val: int, batch: int) -> dict:
    """What a user writes with transformers + peft: padded batches, labels -100 on prompt/padding, HF's loss."""
    import numpy as np
    import peft
    import torch

    from cadenza.config import load_config
    from cadenza.llm import LlmModel
    from cadenza.llm.batching import length_grouped

    torch.manual_seed(0)
    train, valid = data(rows, val)
    helper = LlmModel(load_config(config(batch)))
    helper._ensure_base(log=lambda s: None)  # only to tokenize exactly the same prompts and answers
    tr = helper._tokenize(train.to_dict("records"), with_targets=True)
    va = helper._tokenize(valid.to_dict("records"), with_targets=True)
    model = peft.get_peft_model(helper.model, peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05,
                                                              task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    pad = helper.tokenizer.pad_token_id

    def collate(rows, idx):
        width = max(len(rows.ids[i]) for i in idx)
        ids = torch.full((len(idx), width), pad)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        labels = torch.full((len(idx), width), -100)
        for r, i in enumerate(idx):
            n, p = len(rows.ids[i]), int(rows.prompt_lens[i])
            ids[r, :n] = torch.from_numpy(rows.ids[i])
            mask[r, :n] = 1
            labels[r, p:n] = ids[r, p:n]
        return ids, mask, labels

    batches = length_grouped(list(np.random.default_rng(0).permutation(len(tr))), tr.lengths, batch,
                             np.random.default_rng(0))
    model.train()
    t0 = time.perf_counter()
    for idx in batches:
        ids, mask, labels = collate(tr, idx)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    seconds = time.perf_counter() - t0
    model.eval()
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(va), 16):
            ids, mask, labels = collate(va, list(range(start, min(start + 16, len(va)))))
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            tgt = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                             ignore_index=-100, reduction="sum"))
            count += int((tgt != -100).sum())
    tokens = int(tr.lengths.sum())
    answers = int(tr.target_tokens().sum())
    return {"tokens_per_second": tokens / seconds, "answer_tokens_per_second": answers / seconds,
            "computed_tokens_per_second": tokens / seconds,  # padding not counted
            "train_seconds": seconds, "validation_loss": total / count}


def child(variant: str, rows: int, val: int, batch: int) -> None:
    if variant == "baseline":
        out = run_baseline(rows, val, batch)
    else:
        out = run_cadenza(rows, val, batch, share_prefix=variant == "cadenza")
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--val", type=int, default=100)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--variants", default="baseline,cadenza_noprefix,cadenza")
    ap.add_argument("--child")
    a = ap.parse_args()
    if a.child:
        return child(a.child, a.rows, a.val, a.batch)
    import torch

    from cadenza.trainer import peak_flops

    n_params = 134_515_008  # SmolLM2-135M
    peak = peak_flops(False)
    print(f"torch threads {torch.get_num_threads()}, fp32 matmul peak {peak / 1e9:.0f} GFLOPS")
    results = {}
    for variant in a.variants.split(","):
        proc = subprocess.run([sys.executable, __file__, "--child", variant, "--rows", str(a.rows), "--val",
                               str(a.val), "--batch", str(a.batch)], capture_output=True, text=True,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
        line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            print(proc.stderr[-3000:])
            raise SystemExit(f"{variant} failed")
        r = json.loads(line[7:])
        if variant == "cadenza":
            print("\n".join(l for l in proc.stderr.splitlines() if l.startswith("  ")))
        # MFU from the tokens each variant really ran through the model (Cadenza runs shared prefixes once)
        r["mfu"] = 4 * n_params * r["computed_tokens_per_second"] / peak
        results[variant] = r
        print(f"{variant:16s} {r['tokens_per_second']:7.1f} tokens/s  {r['answer_tokens_per_second']:6.1f} answer "
              f"tokens/s  MFU {100 * r['mfu']:4.1f}%  {r['train_seconds']:6.1f} s  peak RSS {r['peak_rss_mb']:5.0f} MB"
              f"  validation loss {r['validation_loss']:.4f}")
    for name in ("cadenza_noprefix", "cadenza"):
        if "baseline" in results and name in results:
            print(f"{name} speed-up over baseline: "
                  f"{results[name]['tokens_per_second'] / results['baseline']['tokens_per_second']:.2f}x")


if __name__ == "__main__":
    main()
