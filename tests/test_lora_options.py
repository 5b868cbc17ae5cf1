"""Every LoRA option of PEFT in Ludwig's spelling, conversion of base-changing initialisers (PiSSA, OLoRA, CorDA) to
plain LoRA adapters on the original base, LoRA+, and `cadenza merge` (PEFT's linear/TIES/DARE) on the tiny Llama."""

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from cadenza import Model
from cadenza.adapters import LoraDropout, apply_adapter, load_adapter, lora_plus_lr_ratio
from cadenza.cli import main as cli_main
from cadenza.config.load import load_config
from cadenza.errors import ConfigError, HardwareError
from cadenza.llm.load import load_causal_lm
from cadenza.llm.merge import merge_models
from cadenza.train.loop import build_optimizer
from conftest import tolerance

# plain PEFT (as a user of the saved adapter runs it) reads transformers' deprecated flag
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
DATA = Path(__file__).parent / "data"
PROBE = torch.tensor([[1, 504, 3012, 2733, 314, 260, 4152, 47]])  # a few tokens of SmolLM2's vocabulary


def frame(n=16):
    colours = ["red", "green", "blue"]
    return pd.DataFrame({"question": [f"name colour {i}" for i in range(n)],
                         "answer": [colours[i % 3] for i in range(n)]})


def config(base, adapter, **trainer):
    return {"model_type": "llm", "base_model": str(base),
            "input_features": [{"name": "question", "type": "text"}],
            "output_features": [{"name": "answer", "type": "text"}],
            "adapter": adapter, "generation": {"max_new_tokens": 4},
            "trainer": {"type": "finetune", "epochs": 1, "batch_size": 8, "learning_rate": 0.01, **trainer}}


def train(cfg, tmp_path, name="run", df=None):
    model = Model(cfg, log=lambda *_: None)
    out = model.train(training_set=frame() if df is None else df, output_directory=tmp_path, model_name=name)
    return model, out


def ludwig_example(name, base):
    return yaml.safe_load((DATA / name).read_text().replace("TINY_LLAMA", str(base)))  # the only change


@torch.no_grad()
def logits(module):
    return module.eval()(input_ids=PROBE).logits.float()


@torch.no_grad()
def plain_peft_logits(base_dir, adapter_dir):
    """The adapter as anyone loads it: plain PEFT on the unmodified fp32 base model."""
    import peft

    base = load_causal_lm(str(base_dir), dtype=torch.float32)
    return logits(peft.PeftModel.from_pretrained(base, str(adapter_dir)))


# -------------------------------------------------------------------------------- base-changing initialisers
def test_ludwig_pissa_example_runs_unchanged_and_loads_with_plain_peft(tiny_llama_dir, tmp_path, cache_dir):
    raw = ludwig_example("ludwig_pissa_lora.yaml", tiny_llama_dir)
    assert raw["adapter"]["init_lora_weights"] == "pissa" and raw["adapter"]["use_rslora"] is True
    df = frame().rename(columns={"question": "instruction", "answer": "output"})
    model, out = train(raw, tmp_path, df=df)
    assert out.statistics["steps"] == 3 * 4  # 3 epochs of 16 rows in batches of 4
    saved = json.loads((out.model_dir / "model_weights" / "adapter_config.json").read_text())
    assert saved["r"] == 32 and saved["init_lora_weights"] is True  # a plain LoRA of twice the rank
    trained = logits(model.model.model)
    assert torch.allclose(plain_peft_logits(tiny_llama_dir, out.model_dir / "model_weights"), trained, atol=3e-2)


@pytest.mark.usefixtures("simulated_hardware")
@pytest.mark.parametrize("init", ["pissa", "olora", "corda"])
def test_converted_adapter_gives_the_trained_logits_on_the_original_base(tiny_llama_dir, tmp_path, cache_dir,
                                                                          simulated_hardware, init):
    if init == "corda":
        pytest.importorskip("attr", reason="PEFT's CorDA imports attrs")
    model, out = train(config(tiny_llama_dir, {"type": "lora", "r": 4, "dropout": 0.0, "init_lora_weights": init},
                              epochs=2), tmp_path)
    weights = out.model_dir / "model_weights"
    saved = json.loads((weights / "adapter_config.json").read_text())
    assert saved["r"] == 8 and saved["init_lora_weights"] is True
    trained = logits(model.model.model)
    base = logits(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32))
    tol = tolerance(simulated_hardware, 1e-4, 3e-2)  # bf16 frozen weights: the residual W - AB is rounded
    assert (trained - base).abs().max() > 10 * tol  # training moved the model well beyond the tolerance
    assert (plain_peft_logits(tiny_llama_dir, weights) - trained).abs().max() < tol
    # and Cadenza's own loading of the folder (the base from base_model, the converted adapter on it)
    assert (logits(Model.load(out.model_dir, log=lambda *_: None).model.model) - trained).abs().max() < tol


def test_ludwig_loftq_example_needs_a_gpu(tiny_llama_dir, tmp_path, cache_dir):
    """LoftQ quantizes the base with bitsandbytes on CUDA (PEFT has no CPU path): the config is valid, the run
    stops with a HardwareError before training."""
    if torch.cuda.is_available():
        pytest.skip("a CUDA machine runs LoftQ")
    raw = ludwig_example("ludwig_loftq_lora.yaml", tiny_llama_dir)
    cfg = load_config(raw)
    assert cfg.adapter.init_lora_weights == "loftq" and cfg.adapter.loftq_config.loftq_bits == 4
    df = frame().rename(columns={"question": "instruction", "answer": "output"})
    with pytest.raises(HardwareError, match="loftq .*CUDA GPU"):
        Model(raw, log=lambda *_: None).train(training_set=df, output_directory=tmp_path)


def test_eva_initialises_from_the_training_rows(tiny_llama_dir, tmp_path, cache_dir):
    model, out = train(config(tiny_llama_dir, {"type": "lora", "r": 4, "init_lora_weights": "eva",
                                               "eva_config": {"rho": 1.0}},
                              learning_rate=1e-9, use_mixed_precision=False), tmp_path)
    # EVA's A holds the top right-singular vectors of each module's inputs: orthonormal rows (a default A is not)
    lora_a = next(m.weight for n, m in model.model.model.named_modules() if n.endswith("q_proj.lora_A.default"))
    assert torch.allclose(lora_a @ lora_a.T, torch.eye(lora_a.shape[0]), atol=1e-4)
    assert (out.model_dir / "model_weights" / "adapter_model.safetensors").is_file()


# ----------------------------------------------------------------------------------- options reach PEFT
def test_lora_options_reach_peft(tiny_llama_dir):
    adapter = load_config(config(tiny_llama_dir, {
        "type": "lora", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "use_rslora": True,
        "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"v_proj": 6}, "layer_replication": [[0, 2], [1, 2]],
        "init_lora_weights": "gaussian"})).adapter
    model = apply_adapter(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32), adapter, "CAUSAL_LM")
    layers = model.base_model.model.model.layers
    assert len(layers) == 3  # layers 0, 1 and 1 again
    q, v = layers[0].self_attn.q_proj, layers[0].self_attn.v_proj
    assert q.lora_A["default"].weight.shape[0] == 4 and v.lora_A["default"].weight.shape[0] == 2
    assert q.scaling["default"] == pytest.approx(8 / 4 ** 0.5) and v.scaling["default"] == pytest.approx(6 / 2 ** 0.5)
    assert q.lora_B["default"].weight.abs().max() == 0  # gaussian: A is drawn, B starts at zero


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_dropout_drops_p_of_every_element_position_and_scales_the_rest(dtype):
    x = torch.rand(2000, 576, dtype=dtype) + 0.5  # no zeros of its own
    torch.manual_seed(3)
    out = LoraDropout(0.05).train()(x)
    dropped = out == 0
    # four elements share a 64-bit random word: each of the four positions must drop at the rate p
    for position in range(4):
        assert dropped.view(-1, 4)[:, position].float().mean().item() == pytest.approx(0.05, abs=0.003)
    scale = 65536 / (65536 - round(0.05 * 65536))
    assert torch.equal(out[~dropped], x[~dropped] * torch.tensor(scale, dtype=dtype))
    torch.manual_seed(3)
    assert torch.equal(LoraDropout(0.05).train()(x), out)  # the run's seed decides the mask
    leaf = x.clone().requires_grad_()
    kept = LoraDropout(0.05).train()(leaf)
    kept.sum().backward()  # the gradient passes where the element was kept, scaled like it
    assert torch.equal(leaf.grad, (kept != 0).to(dtype) * torch.tensor(scale, dtype=dtype))
    assert torch.equal(LoraDropout(0.05).eval()(x), x) and torch.equal(LoraDropout(0.0).train()(x), x)
    meta = LoraDropout(0.05).train()(torch.empty(3, 4, device="meta"))  # other devices: nn.Dropout
    assert meta.device.type == "meta" and meta.shape == (3, 4)


def test_lora_adapters_train_with_the_fast_dropout(tiny_llama_dir, tmp_path):
    adapter = load_config(config(tiny_llama_dir, {"type": "lora", "r": 4, "dropout": 0.1})).adapter
    model = apply_adapter(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32), adapter, "CAUSAL_LM")
    dropouts = [m.lora_dropout["default"] for m in model.modules() if hasattr(m, "lora_dropout")]
    assert dropouts and all(type(d) is LoraDropout and d.p == 0.1 for d in dropouts)
    model.save_pretrained(tmp_path)  # no weights of its own: the saved adapter is plain PEFT's
    again = load_adapter(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32), tmp_path, is_trainable=True)
    assert all(type(m.lora_dropout["default"]) is LoraDropout for m in again.modules() if hasattr(m, "lora_dropout"))


def test_dora_and_orthogonal(tiny_llama_dir):
    adapter = load_config(config(tiny_llama_dir, {"type": "lora", "r": 4, "use_dora": True,
                                                  "init_lora_weights": "orthogonal"})).adapter
    model = apply_adapter(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32), adapter, "CAUSAL_LM")
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    assert "default" in q.lora_magnitude_vector
    a, b = q.lora_A["default"].weight, q.lora_B["default"].weight
    # A and B are drawn from orthogonal halves of one basis: both nonzero, their product (the update) zero
    assert a.abs().min() > 0 and b.abs().max() > 0 and (b @ a).abs().max() < 1e-6


@pytest.mark.parametrize("adapter, message", [
    ({"type": "lora", "loftq_config": {"loftq_bits": 4}}, "loftq_config is used only with init_lora_weights: loftq"),
    ({"type": "lora", "eva_config": {"rho": 2.0}}, "eva_config is used only with init_lora_weights: eva"),
    ({"type": "adalora", "init_lora_weights": "pissa"}, "adapter.init_lora_weights"),
    ({"type": "lora", "init_lora_weights": "pissa", "use_rslora": True, "rank_pattern": {"q_proj": 2}},
     "could not be converted"),
    ({"type": "lora", "init_lora_weights": "pisa"}, "init_lora_weights"),
    ({"type": "lora", "loraplus_lr_ratio": 0}, "loraplus_lr_ratio"),
])
def test_inconsistent_lora_options_are_config_errors(tiny_llama_dir, adapter, message):
    with pytest.raises(ConfigError, match=message):
        load_config(config(tiny_llama_dir, adapter))


# --------------------------------------------------------------------------------------------------- LoRA+
def test_loraplus_groups_b_matrices(tiny_llama_dir):
    cfg = load_config(config(tiny_llama_dir, {"type": "lora", "r": 4, "loraplus_lr_ratio": 16}, learning_rate=1e-3))
    model = apply_adapter(load_causal_lm(str(tiny_llama_dir), dtype=torch.float32), cfg.adapter, "CAUSAL_LM")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    ratio = lora_plus_lr_ratio(cfg.adapter)
    optimizer = build_optimizer([p for _, p in named], cfg.trainer, lr_ratios=[ratio(n) for n, _ in named])
    assert [g["lr"] for g in optimizer.param_groups] == [pytest.approx(1e-3), pytest.approx(16e-3)]
    fast = {id(p) for p in optimizer.param_groups[1]["params"]}
    assert fast == {id(p) for n, p in named if "lora_B" in n} and fast


def test_loraplus_trains_b_faster(tiny_llama_dir, tmp_path, cache_dir):
    """One Adam step moves each weight by about the learning rate: B (from zero) moves ratio times as far."""
    moved = {}
    for ratio in (None, 16):
        adapter = {"type": "lora", "r": 4, "dropout": 0.0, "loraplus_lr_ratio": ratio}
        model, _ = train(config(tiny_llama_dir, adapter, learning_rate=1e-3, batch_size=16), tmp_path / str(ratio))
        moved[ratio] = max(p.abs().max().item() for n, p in model.model.model.named_parameters() if "lora_B" in n)
    assert moved[None] < 2e-3 < 8e-3 < moved[16]


# --------------------------------------------------------------------------------------------------- merge
@pytest.fixture(scope="module")
def two_adapters(tiny_llama_dir, tmp_path_factory):
    """Two LoRA adapters on the tiny Llama (the first with rsLoRA scaling), trained on different answers."""
    import os

    tmp = tmp_path_factory.mktemp("adapters")
    os.environ["CADENZA_CACHE_DIR"] = str(tmp / "cache")
    try:
        df_b = frame().assign(answer=lambda d: d.answer.str.upper())
        # fp32 throughout (use_mixed_precision: false), so the merged logits can be compared tightly
        # the first one with rsLoRA: PEFT builds the merged adapter's config from the first adapter's
        _, a = train(config(tiny_llama_dir, {"type": "lora", "r": 4, "dropout": 0.0, "use_rslora": True},
                            use_mixed_precision=False), tmp, "a")
        _, b = train(config(tiny_llama_dir, {"type": "lora", "r": 4, "dropout": 0.0}, use_mixed_precision=False),
                     tmp, "b", df=df_b)
    finally:
        del os.environ["CADENZA_CACHE_DIR"]
    return a.model_dir, b.model_dir


def adapter_factors(model_dir):
    """Per module: (A, B, scaling) of a saved adapter, read from the files."""
    from safetensors.torch import load_file

    cfg = json.loads((model_dir / "model_weights" / "adapter_config.json").read_text())
    scaling = cfg["lora_alpha"] / (cfg["r"] ** 0.5 if cfg["use_rslora"] else cfg["r"])
    tensors = load_file(str(model_dir / "model_weights" / "adapter_model.safetensors"))
    return {k.removesuffix(".lora_A.weight"): (v.float(), tensors[k.replace("lora_A", "lora_B")].float(), scaling)
            for k, v in tensors.items() if k.endswith("lora_A.weight")}


def ties_by_hand(stack, weights, density):
    """TIES: keep each tensor's top `density` entries by magnitude, elect the sign of their sum per entry, average
    the weighted entries that agree with it."""
    kept = []
    for t in stack:
        k = int(density * t.numel())
        threshold = t.abs().flatten().kthvalue(t.numel() - k + 1).values
        kept.append(torch.where(t.abs() >= threshold, t, torch.zeros_like(t)))
    kept = torch.stack(kept)
    sign = torch.where(kept.sum(0) >= 0, 1.0, -1.0)
    agree = torch.sign(kept) == sign
    weighted = kept * torch.tensor(weights).view(-1, *[1] * (kept.dim() - 1))
    return (weighted * agree).sum(0) / agree.sum(0).clamp(min=1)


def expected_logits(base_dir, adapters, weights, combine):
    """The base with each adapted weight W + B_m A_m, where PEFT combines the A and B stacks separately, each
    scaled by sqrt(weight x scaling) (the merged adapter's own scaling is 1)."""
    base = load_causal_lm(str(base_dir), dtype=torch.float32)
    params = dict(base.named_parameters())
    factors = [adapter_factors(d) for d in adapters]
    with torch.no_grad():
        for module in factors[0]:
            c = [(w * f[module][2]) ** 0.5 for w, f in zip(weights, factors)]
            a = combine(torch.stack([f[module][0] for f in factors]), c)
            b = combine(torch.stack([f[module][1] for f in factors]), c)
            params[module.removeprefix("base_model.model.") + ".weight"] += b @ a
    return logits(base)


def test_linear_merge_matches_the_formula(tiny_llama_dir, two_adapters, tmp_path, cache_dir):
    out = merge_models(two_adapters, tmp_path / "merged", weights=[0.7, 0.3], log=lambda *_: None)
    merged = logits(Model.load(out, log=lambda *_: None).model.model)
    linear = lambda stack, c: (stack * torch.tensor(c).view(-1, 1, 1)).sum(0)  # noqa: E731
    expected = expected_logits(tiny_llama_dir, two_adapters, [0.7, 0.3], linear)
    assert (merged - expected).abs().max() < 1e-4
    # not the trivial answers: each adapter alone, or a plain average of the deltas, gives other logits
    for alone in two_adapters:
        assert (merged - logits(Model.load(alone, log=lambda *_: None).model.model)).abs().max() > 1e-2


def test_ties_merge_matches_the_formula(tiny_llama_dir, two_adapters, tmp_path, cache_dir):
    out = merge_models(two_adapters, tmp_path / "ties", weights=[1.0, 1.0], combination="ties", density=0.5,
                       log=lambda *_: None)
    merged = logits(Model.load(out, log=lambda *_: None).model.model)
    expected = expected_logits(tiny_llama_dir, two_adapters, [1.0, 1.0], lambda s, c: ties_by_hand(s, c, 0.5))
    assert (merged - expected).abs().max() < 1e-4


def test_cli_merges_dare_into_the_base_model(tiny_llama_dir, two_adapters, tmp_path, cache_dir):
    """dare_linear with density 1 drops nothing: it equals linear; --merge_into_base writes a plain model that
    predict loads (and whose logits equal the combined adapter's)."""
    args = ["merge", "-m", str(two_adapters[0]), "-m", str(two_adapters[1]), "--weights", "0.5", "0.5"]
    assert cli_main(args + ["--combination", "dare_linear", "--density", "1.0", "-o", str(tmp_path / "d"),
                            "--merge_into_base"]) == 0
    assert cli_main(args + ["-o", str(tmp_path / "lin")]) == 0
    assert (tmp_path / "d" / "model_weights" / "model.safetensors").is_file()
    full = Model.load(tmp_path / "d", log=lambda *_: None)
    assert (logits(full.model.model) - logits(Model.load(tmp_path / "lin", log=lambda *_: None).model.model)
            ).abs().max() < 1e-3
    assert len(full.predict(frame(2))) == 2


@pytest.mark.parametrize("extra, message", [
    (["--weights", "1", "2", "3"], "3 weights for 2 models"),
    (["--combination", "ties"], "ties needs a density"),
    (["--combination", "linear", "--density", "0.5"], "linear takes no density"),
    (["--combination", "average"], "'average' is not one of"),
])
def test_cli_merge_argument_errors(two_adapters, tmp_path, capsys, extra, message):
    code = cli_main(["merge", "-m", str(two_adapters[0]), "-m", str(two_adapters[1]), "-o", str(tmp_path / "x")]
                    + extra)
    assert code == 2 and message in capsys.readouterr().err and not (tmp_path / "x").exists()
