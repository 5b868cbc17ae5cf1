"""GPU benchmark: LoRA, 4-bit QLoRA and full fine-tuning of SmolLM2-135M-Instruct, Cadenza vs the plain
transformers+peft loop, one epoch each: tokens/s, MFU and peak GPU memory, side by side in one run (≤ 8 minutes on
one modern GPU).

    python bench/bench_gpu.py                              # CUDA: writes bench/results/gpu.txt and gpu.json
    python bench/bench_gpu.py --tiny --base DIR --out D    # CPU smoke run on a tiny model folder (tests run this)

Per mode (same model, rows, batches of --batch rows, one epoch; every variant in its own process):
  plain    the loop a user writes from the HF docs (bench/bench_llm.py's baseline): length-grouped right-padded
           batches, model(..., labels).loss, AdamW; bf16 autocast over fp32 weights where the device runs bf16
           fast (as Trainer(bf16=True)). lora: peft LoRA r=8 on q/v; qlora: the base loaded 4-bit nf4 with double
           quantization and bf16 compute (BitsAndBytesConfig), peft.prepare_model_for_kbit_training without
           gradient checkpointing, then the same LoRA; full: every weight trained, lr 2e-5.
  cadenza  cadenza.Model with model_type llm, the same adapter / `quantization: {bits: 4}` / no adapter, trainer
           {epochs 1, batch_size --batch, learning_rate}; everything else Cadenza's defaults (auto precision).
Figures: tokens/s = the rows' non-pad tokens (the same count for both) / seconds of the training epoch (loading
excluded); MFU = T*(4N + 12*L*d*T) per row for LoRA and QLoRA, T*(6N + 12*L*d*T) for full fine-tuning, over
cadenza.device.peak_flops of the precision the variant computes in; peak memory = torch.cuda.max_memory_allocated
of the whole process (peak RSS on a CPU). QLoRA needs CUDA and bitsandbytes: elsewhere its rows say skipped.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
for folder in (HERE.parent, HERE):  # run from a checkout without installing; bench_llm's helpers beside this file
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from bench_llm import LORA, SEED, chat_pairs, convert_gguf, encode, padded_batch, peak_rss_mb  # noqa: E402

MODES = {"lora": 2e-4, "qlora": 2e-4, "full": 2e-5}  # mode → learning rate
BUDGET_S = 480  # the whole benchmark, on a GPU


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def peak_memory_mb() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else peak_rss_mb()


def model_flops(lengths: list[int], n_params: int, layers: int, width: int, full: bool) -> float:
    """Forward 2N, activation gradients 2N, weight gradients 2N only when the weights train; attention as nanoGPT."""
    per_param = 6 if full else 4
    return float(sum(t * (per_param * n_params + 12 * layers * width * t) for t in lengths))


def qlora_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "needs bitsandbytes (pip install bitsandbytes)"
    return None


# ------------------------------------------------------------------------------------------- children
def child_plain(a) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from transformers.trainer_pt_utils import get_length_grouped_indices

    from cadenza.device import hardware

    torch.manual_seed(SEED)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bool(hardware().bf16_units)
    tok = AutoTokenizer.from_pretrained(a.base)
    kwargs = {"dtype": torch.float32}
    if a.mode == "qlora":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
        kwargs["device_map"] = {"": 0}
    model = AutoModelForCausalLM.from_pretrained(a.base, **kwargs)
    # bitsandbytes packs two 4-bit weights into each uint8 element
    n_params = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    if a.mode == "qlora":
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if a.mode in ("lora", "qlora"):
        model = peft.get_peft_model(model, peft.LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"],
                                                           lora_dropout=LORA["dropout"], task_type="CAUSAL_LM"))
    if a.mode != "qlora":  # a 4-bit model is placed by device_map and refuses .to()
        model.to(device)
    model.train()
    train, _ = chat_pairs(a.rows, 0)
    rows = [encode(tok, q, ans) for q, ans in zip(train.question, train.answer)]
    lengths = [len(ids) for ids, _ in rows]
    gen = torch.Generator().manual_seed(SEED)  # length grouping and batch order as in bench_llm.py's baseline
    order = get_length_grouped_indices(lengths, a.batch, mega_batch_mult=50, generator=gen)
    batches = [order[i:i + a.batch] for i in range(0, len(order), a.batch)]
    batches = [batches[i] for i in torch.randperm(len(batches), generator=gen).tolist()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=MODES[a.mode], weight_decay=0.0)
    losses = []
    t0 = time.perf_counter()
    for idx in batches:
        input_ids, attention_mask, labels = (t.to(device) for t in padded_batch(tok, [rows[i] for i in idx]))
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    cfg = model.config
    return {"train_seconds": seconds, "tokens": sum(lengths), "bf16": bf16, "peak_memory_mb": peak_memory_mb(),
            "flops": model_flops(lengths, n_params, cfg.num_hidden_layers, cfg.hidden_size, a.mode == "full"),
            "train_loss": float(torch.stack(losses).float().mean()), "steps": len(batches)}


def child_cadenza(a) -> dict:
    import torch

    from cadenza import Model

    train, _ = chat_pairs(a.rows, 0)
    config = {"model_type": "llm", "base_model": a.base,
              "input_features": [{"name": "question", "type": "text"}],
              "output_features": [{"name": "answer", "type": "text"}],
              "trainer": {"type": "finetune", "epochs": 1, "batch_size": a.batch, "learning_rate": MODES[a.mode]}}
    if a.mode in ("lora", "qlora"):
        config["adapter"] = {"type": "lora", "r": LORA["r"]}
    if a.mode == "qlora":
        config["quantization"] = {"bits": 4}
    out = Model(config, log=lambda m: log(f"  [cadenza {a.mode}] {m}")).train(
        training_set=train, output_directory=str(Path(a.workdir) / f"cadenza_{a.mode}"), random_seed=SEED,
        skip_save_model=True, skip_save_log=True)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    epoch = out.statistics["training"][0]
    return {"train_seconds": epoch["seconds"], "bf16": out.statistics["precision"]["precision"] == "bf16",
            "peak_memory_mb": peak_memory_mb(), "train_loss": epoch["loss"], "steps": out.statistics["steps"],
            "reported_tokens_per_second": out.throughput.get("tokens_per_second"),
            "reported_mfu": out.throughput.get("mfu")}


def child_prepare(a) -> dict:
    """The packaged GGUF as a plain fp32 folder both sides load (Cadenza caches its own copy on first use)."""
    t0 = time.perf_counter()
    convert_gguf(Path(a.base))
    return {"seconds": time.perf_counter() - t0}


CHILDREN = {"plain": child_plain, "cadenza": child_cadenza, "prepare": child_prepare}


# ---------------------------------------------------------------------------------------------- parent
def run_child(variant: str, mode: str, a, env: dict, timeout: float) -> dict:
    args = [sys.executable, __file__, "--variant", variant, "--mode", mode, "--base", a.base, "--workdir", a.workdir,
            "--rows", str(a.rows), "--batch", str(a.batch)]
    log(f"--- {variant} {mode}")
    try:
        done = subprocess.run(args, stdout=subprocess.PIPE, text=True, env=env, timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return {"skipped": "out of time"}
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode or line is None:
        return {"skipped": f"failed (exit {done.returncode}; its log is above)"}
    return json.loads(line[len("RESULT "):])


def table(results: dict, peaks: dict) -> str:
    lines = [f"{'mode':<7}{'variant':<9}{'precision':>10}{'train s':>9}{'tokens/s':>11}{'MFU':>8}{'peak mem MB':>13}"
             f"{'train loss':>12}{'steps':>7}   vs plain"]
    for mode in MODES:
        plain = results.get(f"plain {mode}", {})
        for variant in ("plain", "cadenza"):
            r = results.get(f"{variant} {mode}", {})
            if "train_seconds" not in r:
                lines.append(f"{mode:<7}{variant:<9}  skipped: {r.get('skipped', 'not run')}")
                continue
            tokens = plain.get("tokens") or r.get("tokens")  # the same rows: the plain loop's count for both
            flops = plain.get("flops") or r.get("flops")
            mfu = f"{100 * flops / r['train_seconds'] / peaks[r['bf16']]:7.1f}%" if flops else f"{'?':>8}"
            ratio = f"{plain['train_seconds'] / r['train_seconds']:.2f}x" if "train_seconds" in plain else "?"
            lines.append(f"{mode:<7}{variant:<9}{'bf16' if r['bf16'] else 'fp32':>10}{r['train_seconds']:9.2f}"
                         f"{tokens / r['train_seconds'] if tokens else 0:11.0f}{mfu}{r['peak_memory_mb']:13.0f}"
                         f"{r['train_loss']:12.4f}{r['steps']:7d}   {ratio if variant == 'cadenza' else ''}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a CPU smoke run: few rows, the model folder given by --base")
    ap.add_argument("--base", help="a transformers model folder (default: the packaged SmolLM2 GGUF, converted)")
    ap.add_argument("--rows", type=int, default=None, help="training pairs (default 1024; 16 with --tiny)")
    ap.add_argument("--batch", type=int, default=None, help="rows per batch (default 16; 4 with --tiny)")
    ap.add_argument("--modes", default=",".join(MODES), help="comma list of lora, qlora, full")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run (later rows skipped)")
    ap.add_argument("--out", default=str(HERE / "results"), help="folder for gpu.txt and gpu.json")
    ap.add_argument("--workdir", help="(internal) scratch folder")
    ap.add_argument("--variant", choices=sorted(CHILDREN), help="(internal) run one measurement in this process")
    ap.add_argument("--mode", choices=sorted(MODES), help="(internal) the mode of --variant")
    a = ap.parse_args()
    a.rows = a.rows or (16 if a.tiny else 1024)
    a.batch = a.batch or (4 if a.tiny else 16)
    if a.variant:
        print("RESULT " + json.dumps(CHILDREN[a.variant](a)), flush=True)
        return
    if a.tiny and not a.base:
        raise SystemExit("--tiny needs --base: a small transformers model folder (tests build one)")

    import torch

    from cadenza.device import hardware, peak_flops

    started = time.perf_counter()
    hw = hardware()
    if not a.tiny and hw.device != "cuda":
        raise SystemExit("no CUDA device: this benchmark is for GPUs (use --tiny --base DIR for a CPU smoke run)")
    a.workdir = tempfile.mkdtemp(prefix="cadenza-bench-gpu-")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "CADENZA_CACHE_DIR": str(Path(a.workdir) / "cadenza_cache")}
    results: dict[str, dict] = {}
    if not a.base:
        a.base = str(Path(a.workdir) / "smollm2-fp32")
        results["prepare"] = run_child("prepare", "lora", a, env, a.budget)
    peaks = {False: peak_flops(False), True: peak_flops(True)}
    for mode in a.modes.split(","):
        missing = qlora_missing() if mode == "qlora" else None
        for variant in ("plain", "cadenza"):
            left = a.budget - (time.perf_counter() - started)
            results[f"{variant} {mode}"] = {"skipped": missing} if missing else run_child(variant, mode, a, env, left)
    header = (f"Cadenza GPU benchmark  |  {hw.name} ({hw.device}), torch {torch.__version__}; peak "
              f"{peaks[True] / 1e12:.2f} TFLOPS bf16 / {peaks[False] / 1e12:.2f} fp32 (cadenza.device.peak_flops)\n"
              f"{Path(a.base).name}, one epoch of {a.rows} chatterbot pairs in batches of {a.batch}; LoRA r={LORA['r']}"
              f"; total wall time {time.perf_counter() - started:.0f} s")
    note = ("train loss: plain = mean of its batches' mean losses; cadenza = mean over the epoch's target tokens. "
            "vs plain: cadenza tokens/s over the plain loop's")
    report = header + "\n\n" + table(results, peaks) + "\n" + note
    print(report)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.txt").write_text(report + "\n")
    (out / "gpu.json").write_text(json.dumps({"device": hw.name, "rows": a.rows, "batch": a.batch,
                                              "results": results}, indent=1))


if __name__ == "__main__":
    main()
