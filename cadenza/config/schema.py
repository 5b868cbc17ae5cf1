"""The one typed schema of a Cadenza config: validation, defaults and the configuration docs all come from here.

Key names follow Ludwig's (model_type, input_features, output_features, combiner, trainer, preprocessing,
adapter, quantization, prompt, generation, backend, ...). Unlike Ludwig, every section forbids unknown keys,
so a typo or a misplaced key is an error that names its path instead of being dropped.
Where Ludwig's default is poor for LLMs, ours differs; `Field(description=...)` says so ("Ludwig: ...").
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, ClassVar, Iterable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic.fields import FieldInfo


def range_text(metadata: Iterable[Any]) -> str:
    """A number's range as the docs and the error messages say it ('in [0, 1)', '≥ 1', '> 0'), from the ge/gt/le/lt
    metadata pydantic keeps for Field(ge=...); '' when unbounded."""
    low = high = None
    for meta in metadata:
        for attr, bracket in (("ge", "["), ("gt", "("), ("le", "]"), ("lt", ")")):
            value = getattr(meta, attr, None)
            if value is not None and attr.startswith("g"):
                low = (bracket, value)
            elif value is not None:
                high = (bracket, value)
    if low and high:  # interval notation reads best when both ends are bounded
        return f"in {low[0]}{low[1]:g}, {high[1]:g}{high[0]}"
    if low:
        return f"{'≥' if low[0] == '[' else '>'} {low[1]:g}"
    if high:
        return f"{'≤' if high[0] == ']' else '<'} {high[1]:g}"
    return ""


def annotated_range(annotation: Any) -> str:
    """The range stated inside a type (`Optional[AtLeastOne]`, `Union[AtLeastOne, Literal["auto"]]`)."""
    if typing.get_origin(annotation) is Annotated:
        metadata = typing.get_args(annotation)[1:]
        return range_text([m for item in metadata for m in getattr(item, "metadata", [item])])
    return next(filter(None, map(annotated_range, typing.get_args(annotation))), "")


def field_range(field: FieldInfo) -> str:
    """A number field's range, stated on the field or inside its type."""
    return range_text(field.metadata) or annotated_range(field.annotation)


# Kinds of numbers that recur, each with its range stated once; the docs and the error messages show the ranges.
AtLeastOne = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
Probability = Annotated[float, Field(ge=0, le=1)]
DropoutRate = Annotated[float, Field(ge=0, lt=1)]  # 1 would drop everything
TokenId = Annotated[int, Field(ge=0)]


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, values are checked on assignment too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


# --------------------------------------------------------------------------------------------- adapters
class LoraBase(Section):
    """The keys LoRA and AdaLoRA share."""

    type: Literal["lora"] = "lora"
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: Optional[PositiveFloat] = Field(None, description="LoRA scaling alpha; null means 2 * r (Ludwig's default).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: Optional[Union[list[str], str]] = Field(
        None, description="Module names (or a regex) to adapt; null lets PEFT pick the architecture's default."
    )
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    bias: Literal["none", "all", "lora_only"] = "none"
    postprocessor: "AdapterPostprocessor" = Field(default_factory=lambda: AdapterPostprocessor())
    pretrained_adapter_weights: Optional[str] = Field(
        None, description="A saved adapter folder to continue training from."
    )


class LoraConfig(LoraBase):
    init_lora_weights: Union[bool, Literal["default", "gaussian", "eva", "olora", "pissa", "corda", "loftq",
                                           "orthogonal"]] = Field(
        "default", description="How the adapter starts: default (B = 0), gaussian, orthogonal; pissa, olora, corda "
        "(move the base's principal part into the adapter; saved converted to a plain LoRA on the original base); "
        "eva (from the training rows' activations); loftq (needs CUDA + bitsandbytes).")
    loftq_config: Optional["LoftqConfig"] = Field(None, description="With init_lora_weights: loftq.")
    eva_config: Optional["EvaConfig"] = Field(None, description="With init_lora_weights: eva.")
    rank_pattern: Optional[dict[str, AtLeastOne]] = Field(
        None, description="Per-module ranks, module name (or regex) -> r, e.g. {o_proj: 4}.")
    alpha_pattern: Optional[dict[str, PositiveFloat]] = Field(
        None, description="Per-module alphas, module name (or regex) -> alpha.")
    layer_replication: Optional[list[tuple[NonNegativeInt, NonNegativeInt]]] = Field(
        None, description="Build a deeper model from [start, end) layer ranges of the base (shared weights, "
        "separate adapters), e.g. [[0, 2], [1, 2]].")
    loraplus_lr_ratio: Optional[PositiveFloat] = Field(
        None, description="LoRA+: the B matrices learn at learning_rate x this ratio (e.g. 16).")

    @model_validator(mode="after")
    def _init_options_agree(self):
        init = self.init_lora_weights
        if self.loftq_config is not None and init != "loftq":
            raise ValueError("loftq_config is used only with init_lora_weights: loftq")
        if self.eva_config is not None and init != "eva":
            raise ValueError("eva_config is used only with init_lora_weights: eva")
        if init in CONVERTED_INITS and self.use_rslora and (self.rank_pattern or self.alpha_pattern):
            # PEFT cannot convert such an adapter back to a plain LoRA on the original base
            raise ValueError(f"init_lora_weights: {init} with use_rslora cannot be combined with rank_pattern or "
                             "alpha_pattern (the saved adapter could not be converted for the original base model)")
        return self


# Initialisers that change the base weights: the adapter is saved converted to a plain LoRA on the original base.
CONVERTED_INITS = ("pissa", "olora", "corda")


class LoftqConfig(Section):
    loftq_bits: Literal[4, 8] = Field(4, description="Bits of the quantized base weights LoftQ approximates.")
    loftq_iter: AtLeastOne = Field(1, description="Alternating quantize/SVD iterations.")


class EvaConfig(Section):
    rho: float = Field(2.0, ge=1, description="How far a module's rank may grow above r when ranks are redistributed.")
    tau: float = Field(0.99, gt=0, le=1, description="Stop the calibration once the components are this stable.")
    use_label_mask: bool = Field(True, description="Calibrate on response (target) tokens only.")
    whiten: bool = Field(False, description="Whiten the singular vectors.")
    adjust_scaling_factors: bool = Field(True, description="Keep alpha / r constant when ranks are redistributed.")


class AdapterPostprocessor(Section):
    merge_adapter_into_base_model: bool = Field(
        False, description="After training, merge the adapter and save a plain transformers model."
    )
    progressbar: bool = False


class AdaloraConfig(LoraBase):
    type: Literal["adalora"] = "adalora"  # type: ignore[assignment]
    target_r: int = Field(8, ge=1)
    init_r: int = Field(12, ge=1)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    deltaT: int = Field(1, ge=1)
    total_step: Optional[AtLeastOne] = Field(None, description="Total training steps; null fills it from the trainer.")


class IA3Config(Section):
    type: Literal["ia3"] = "ia3"
    target_modules: Optional[Union[list[str], str]] = None
    feedforward_modules: Optional[Union[list[str], str]] = None
    postprocessor: AdapterPostprocessor = Field(default_factory=AdapterPostprocessor)
    pretrained_adapter_weights: Optional[str] = None


class LohaConfig(Section):
    type: Literal["loha"] = "loha"
    r: int = Field(8, ge=1)
    alpha: float = Field(8, gt=0)
    rank_dropout: DropoutRate = 0.0
    module_dropout: DropoutRate = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    postprocessor: AdapterPostprocessor = Field(default_factory=AdapterPostprocessor)
    pretrained_adapter_weights: Optional[str] = None


class LokrConfig(LohaConfig):
    type: Literal["lokr"] = "lokr"  # type: ignore[assignment]
    decompose_both: bool = False
    decompose_factor: int = Field(-1, ge=-1)


class VeraConfig(Section):
    type: Literal["vera"] = "vera"
    r: int = Field(256, ge=1)
    target_modules: Optional[Union[list[str], str]] = None
    vera_dropout: DropoutRate = 0.0
    postprocessor: AdapterPostprocessor = Field(default_factory=AdapterPostprocessor)
    pretrained_adapter_weights: Optional[str] = None


class OftConfig(Section):
    type: Literal["oft"] = "oft"
    r: int = Field(0, ge=0, description="Number of OFT blocks (0: derived from oft_block_size).")
    oft_block_size: int = Field(32, ge=0)
    module_dropout: DropoutRate = 0.0
    target_modules: Optional[Union[list[str], str]] = None
    postprocessor: AdapterPostprocessor = Field(default_factory=AdapterPostprocessor)
    pretrained_adapter_weights: Optional[str] = None


Adapter = Annotated[
    Union[LoraConfig, AdaloraConfig, IA3Config, LohaConfig, LokrConfig, VeraConfig, OftConfig],
    Field(discriminator="type"),
]


class QuantizationConfig(Section):
    """bitsandbytes quantization (QLoRA); needs CUDA."""

    backend: Literal["bitsandbytes"] = Field("bitsandbytes", description="Quantization library (only bitsandbytes).")
    bits: Literal[4, 8] = 4
    llm_int8_threshold: float = Field(6.0, gt=0)
    llm_int8_has_fp16_weight: bool = False
    bnb_4bit_compute_dtype: Literal["float32", "float16", "bfloat16"] = Field(
        "bfloat16", description="Ludwig: float16. bfloat16 does not overflow and is native on Ampere+."
    )
    bnb_4bit_use_double_quant: bool = True
    bnb_4bit_quant_type: Literal["fp4", "nf4"] = "nf4"


# --------------------------------------------------------------------------------------------- encoders
Reduce = Literal["mean", "last", "cls", "max", "sum", "cls_pooled"]


class AutoTransformerEncoder(Section):
    """Any Hugging Face `AutoModel` as a text encoder (BERT-like or decoder-only LLM); no LM head is loaded."""

    type: Literal["auto_transformer"] = "auto_transformer"
    pretrained_model_name_or_path: str = Field(
        ..., description="Hub id, local folder, .gguf file, or a packaged short name (`minilm`, `smollm2`)."
    )
    trainable: bool = Field(False, description="Train the encoder's weights (full fine-tuning).")
    reduce_output: Reduce = Field(
        "mean",
        description="Pooling: mean over non-pad tokens, last non-pad token, cls (first token), max, sum. "
        "`cls_pooled` means cls here. Ludwig: sum, which scales with length and hurts linear probes.",
    )
    max_sequence_length: Optional[int] = Field(
        None, ge=1, description="Caps preprocessing.max_sequence_length when set."
    )
    use_pretrained: bool = Field(True, description="false builds the architecture with random weights.")
    pretrained_kwargs: Optional[dict[str, Any]] = Field(None, description="Extra kwargs for from_pretrained.")
    trust_remote_code: bool = False
    adapter: Optional[Adapter] = Field(None, description="A PEFT adapter trained on the encoder.")
    vocab_size: Optional[AtLeastOne] = Field(
        None, description="Accepted for Ludwig compatibility; taken from the model.")
    saved_weights_in_checkpoint: bool = Field(
        False, description="Accepted for Ludwig compatibility; Cadenza saves trained encoder weights always."
    )


class LLMEncoder(Section):
    """Ludwig's `llm` encoder: a causal LM's last hidden state, pooled."""

    type: Literal["llm"] = "llm"
    base_model: str = Field(..., description="Hub id, local folder, .gguf file or packaged short name.")
    trainable: bool = False
    reduce_output: Reduce = "last"
    max_sequence_length: Optional[int] = Field(None, ge=1)
    adapter: Optional[Adapter] = None
    pretrained_kwargs: Optional[dict[str, Any]] = None
    trust_remote_code: bool = False


class DenseEncoder(Section):
    """Number/binary inputs go in as they are (after normalisation)."""

    type: Literal["passthrough", "dense"] = "passthrough"


class CategoryEncoder(Section):
    type: Literal["dense", "onehot", "sparse"] = "dense"
    embedding_size: int = Field(50, ge=1)
    dropout: DropoutRate = 0.0


TextEncoder = Annotated[Union[AutoTransformerEncoder, LLMEncoder], Field(discriminator="type")]


# ---------------------------------------------------------------------------------------- preprocessing
MissingStrategy = Literal["fill_with_const", "fill_with_mode", "fill_with_mean", "fill_with_false", "bfill", "ffill", "drop_row"]


_HF_ONLY = "Ludwig key for its own tokenizers; no effect with hf_tokenizer (in Ludwig either)."


class TextPreprocessing(Section):
    max_sequence_length: int = Field(256, ge=1, description="Tokens kept per text (truncation).")
    missing_value_strategy: MissingStrategy = "fill_with_const"
    fill_value: str = ""
    lowercase: bool = False
    cache_encoder_embeddings: bool = Field(
        True,
        description="With a frozen encoder, embed each row once and train the head on the cached vectors. "
        "Ludwig: false. Ignored (with a notice) when the encoder is trainable or adapted.",
    )
    tokenizer: Literal["hf_tokenizer"] = "hf_tokenizer"
    pretrained_model_name_or_path: Optional[str] = Field(None, description="Tokenizer source; default: the encoder's.")
    # Ludwig's keys for its own word tokenizers; with hf_tokenizer (the only one here) they change nothing, in
    # Ludwig as here: the model's tokenizer has its own vocabulary and special tokens, and pooling ignores padding
    most_common: int = Field(20000, ge=1, description=_HF_ONLY)
    padding: Literal["left", "right"] = Field("right", description=_HF_ONLY)
    padding_symbol: str = Field("<PAD>", description=_HF_ONLY)
    unknown_symbol: str = Field("<UNK>", description=_HF_ONLY)


class TextInputPreprocessing(TextPreprocessing):
    format: Literal["text", "messages"] = Field(
        "text", description="llm: `messages` when each cell is a conversation (OpenAI {role, content} or ShareGPT "
        "{from, value} turns; a list, or its JSON text in CSV), rendered with the chat template and trained on "
        "every assistant turn (docs/llm.md, Chat data). It must then be the only input."
    )


class NumberPreprocessing(Section):
    missing_value_strategy: MissingStrategy = "fill_with_const"
    fill_value: float = 0.0
    normalization: Optional[Literal["zscore", "minmax", "log1p", "iq"]] = Field(
        None, description="null: none. Number inputs and outputs default to zscore (as in Ludwig); predictions "
        "of a normalised output are mapped back to the original scale."
    )


class CategoryPreprocessing(Section):
    missing_value_strategy: MissingStrategy = "fill_with_const"
    fill_value: str = "<UNK>"
    lowercase: bool = False
    most_common: int = Field(10000, ge=1)


class BinaryPreprocessing(Section):
    missing_value_strategy: MissingStrategy = "fill_with_false"
    fill_value: Optional[Union[bool, str, int]] = None
    fallback_true_label: Optional[str] = None


class SetPreprocessing(Section):
    missing_value_strategy: MissingStrategy = "fill_with_const"
    fill_value: str = ""
    tokenizer: Literal["space", "comma", "pipe", "space_punct"] = "space"
    lowercase: bool = False
    most_common: int = Field(10000, ge=1)


# --------------------------------------------------------------------------------------------- features
class FeatureBase(Section):
    name: str = Field(..., description="Feature name; also the column unless `column` is set.")
    column: Optional[str] = Field(None, description="Data column; default: the name.")
    proc_column: Optional[str] = Field(None, description="Accepted for Ludwig compatibility; unused.")

    # Defaults that depend on where a section sits (a number output's decoder is a regressor, outputs drop rows
    # with a missing label). They fill a partly written section too: `preprocessing: {fill_value: 1}` on a
    # number input keeps zscore instead of falling back to the section class's own default.
    context_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _fill_context_defaults(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.context_defaults:
            return data
        data = dict(data)
        for section, defaults in cls.context_defaults.items():
            given = data.get(section)
            if isinstance(given, dict):
                data[section] = {**defaults, **given}
        return data


def _in_context(section_cls: type[Section], feature_cls_defaults: dict[str, Any]):
    """default_factory for a section that is omitted entirely: the same context defaults."""
    return Field(default_factory=lambda: section_cls(**feature_cls_defaults))


class TextInput(FeatureBase):
    type: Literal["text"]
    encoder: Optional[TextEncoder] = Field(
        None, description="Required for ecd. For llm the input is placed in the prompt and has no encoder."
    )
    preprocessing: TextInputPreprocessing = Field(default_factory=TextInputPreprocessing)


class NumberInput(FeatureBase):
    type: Literal["number"]
    encoder: DenseEncoder = Field(default_factory=DenseEncoder)
    context_defaults: ClassVar = {"preprocessing": {"normalization": "zscore"}}
    preprocessing: NumberPreprocessing = _in_context(NumberPreprocessing, context_defaults["preprocessing"])


class CategoryInput(FeatureBase):
    type: Literal["category"]
    encoder: CategoryEncoder = Field(default_factory=CategoryEncoder)
    preprocessing: CategoryPreprocessing = Field(default_factory=CategoryPreprocessing)


class BinaryInput(FeatureBase):
    type: Literal["binary"]
    encoder: DenseEncoder = Field(default_factory=DenseEncoder)
    preprocessing: BinaryPreprocessing = Field(default_factory=BinaryPreprocessing)


InputFeature = Annotated[Union[TextInput, NumberInput, CategoryInput, BinaryInput], Field(discriminator="type")]


class Decoder(Section):
    type: Literal["classifier", "regressor", "mlp_classifier", "projector"] = Field(
        "classifier", description="The output layer; all are a linear projection here, after `fc_layers`."
    )
    num_fc_layers: int = Field(0, ge=0, description="Hidden layers between the combiner and the projection.")
    fc_output_size: int = Field(256, ge=1)
    fc_dropout: DropoutRate = 0.0
    fc_activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"


class Loss(Section):
    type: Optional[
        Literal[
            "softmax_cross_entropy",
            "binary_weighted_cross_entropy",
            "sigmoid_cross_entropy",
            "mean_squared_error",
            "mean_absolute_error",
            "huber",
            "next_token_softmax_cross_entropy",
        ]
    ] = Field(None, description="null: the feature type's natural loss.")
    class_weights: Optional[Union[list[float], dict[str, float]]] = None
    weight: float = Field(1.0, ge=0, description="This output's weight in the total loss.")
    positive_class_weight: Optional[PositiveFloat] = None
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    class_similarities: Optional[list[list[float]]] = Field(None, description="Not supported: must stay null.")
    class_similarities_temperature: float = Field(0, ge=0, description="Not supported: must stay 0 (off).")

    @field_validator("class_weights")
    @classmethod
    def _non_negative_weights(cls, weights):
        # Checked here rather than typed per item, so the message names class_weights and not a union member
        values = weights.values() if isinstance(weights, dict) else weights or []
        if any(w < 0 for w in values):
            raise ValueError(f"class weights must be ≥ 0, got {weights}")
        return weights


class OutputBase(FeatureBase):
    decoder: Decoder = Field(default_factory=Decoder)
    loss: Loss = Field(default_factory=Loss)
    dependencies: list[str] = Field(default_factory=list, description="Not supported; must be empty.")


class CategoryOutput(OutputBase):
    type: Literal["category"]
    top_k: int = Field(3, ge=1, description="Hits@k is reported for this k.")
    context_defaults: ClassVar = {"preprocessing": {"missing_value_strategy": "drop_row"}}
    preprocessing: CategoryPreprocessing = _in_context(CategoryPreprocessing, context_defaults["preprocessing"])
    match: Optional[dict[str, "MatchRule"]] = Field(
        None, description="llm only: label -> rule that finds the label in generated text."
    )
    fallback_label: Optional[str] = Field(None, description="llm only: label when no rule matches.")


class MatchRule(Section):
    type: Literal["contains", "regex"] = Field(
        "contains", description="contains: the generated text contains `value`; regex: `value` matches it."
    )
    value: str


class BinaryOutput(OutputBase):
    type: Literal["binary"]
    threshold: float = Field(0.5, gt=0, lt=1)
    context_defaults: ClassVar = {"preprocessing": {"missing_value_strategy": "drop_row"},
                                  "decoder": {"type": "regressor"}}
    decoder: Decoder = _in_context(Decoder, context_defaults["decoder"])
    preprocessing: BinaryPreprocessing = _in_context(BinaryPreprocessing, context_defaults["preprocessing"])


class NumberOutput(OutputBase):
    type: Literal["number"]
    context_defaults: ClassVar = {"preprocessing": {"missing_value_strategy": "drop_row", "normalization": "zscore"},
                                  "decoder": {"type": "regressor"}}
    decoder: Decoder = _in_context(Decoder, context_defaults["decoder"])
    preprocessing: NumberPreprocessing = _in_context(NumberPreprocessing, context_defaults["preprocessing"])


class SetOutput(OutputBase):
    type: Literal["set"]
    threshold: float = Field(0.5, gt=0, lt=1)
    context_defaults: ClassVar = {"preprocessing": {"missing_value_strategy": "drop_row"}}
    preprocessing: SetPreprocessing = _in_context(SetPreprocessing, context_defaults["preprocessing"])


class TextOutput(OutputBase):
    """llm only: the response the model learns to generate."""

    type: Literal["text"]
    context_defaults: ClassVar = {"preprocessing": {"missing_value_strategy": "drop_row", "max_sequence_length": 512}}
    preprocessing: TextPreprocessing = _in_context(TextPreprocessing, context_defaults["preprocessing"])


OutputFeature = Annotated[
    Union[CategoryOutput, BinaryOutput, NumberOutput, SetOutput, TextOutput], Field(discriminator="type")
]


# --------------------------------------------------------------------------------------------- combiner
Initializer = Literal["xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "normal", "uniform", "zeros", "ones"]


class ConcatCombiner(Section):
    type: Literal["concat"] = "concat"
    num_fc_layers: int = Field(1, ge=0, description="Hidden MLP layers over the concatenated inputs.")
    output_size: int = Field(256, ge=1, description="Width of each hidden layer.")
    fc_layers: Optional[list[dict[str, Any]]] = Field(
        None, description="Per-layer list ({output_size, dropout, activation}); overrides num_fc_layers."
    )
    dropout: float = Field(0.0, ge=0, lt=1)
    activation: Literal["relu", "gelu", "tanh", "silu"] = "relu"
    norm: Optional[Literal["batch", "layer"]] = None
    flatten_inputs: bool = False
    residual: bool = False
    use_bias: bool = Field(True, description="Hidden layers have a bias.")
    weights_initializer: Initializer = Field("xavier_uniform", description="Hidden layers' weight initializer.")
    bias_initializer: Initializer = Field("zeros", description="Hidden layers' bias initializer.")
    norm_params: Optional[dict[str, Any]] = Field(
        None, description="Keyword arguments of the norm layer (e.g. {eps: 1e-5, momentum: 0.1}).")


# ---------------------------------------------------------------------------------------------- trainer
class Optimizer(Section):
    type: Literal["adamw", "adam", "sgd"] = Field("adamw", description="Ludwig: adam. AdamW decouples weight decay.")
    betas: tuple[DropoutRate, DropoutRate] = (0.9, 0.999)  # a moment coefficient lies in [0, 1) like a dropout rate
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.0, ge=0, lt=1)


class LRScheduler(Section):
    decay: Optional[Literal["linear", "cosine", "exponential", "constant"]] = Field(
        None, description="null: constant after warm-up."
    )
    warmup_fraction: float = Field(0.0, ge=0, le=1, description="Fraction of all steps spent warming up.")
    warmup_evaluations: float = Field(0, ge=0, description="Warm-up length in epochs (Ludwig name).")
    decay_rate: float = Field(0.96, gt=0, le=1, description="exponential: factor per epoch.")
    min_lr_fraction: float = Field(0.0, ge=0, le=1, description="cosine/linear floor as a fraction of the peak.")
    reduce_on_plateau: int = Field(
        0, ge=0, description="Multiply the learning rate by reduce_rate after this many validation evaluations "
        "without improvement (and again after each further such run); 0: off.")
    reduce_rate: float = Field(0.1, gt=0, le=1, description="Factor applied by reduce_on_plateau.")


class GradientClipping(Section):
    clipglobalnorm: Optional[PositiveFloat] = Field(0.5, description="Max global grad norm; null disables.")
    clipnorm: Optional[PositiveFloat] = None
    clipvalue: Optional[PositiveFloat] = None


class TrainerConfig(Section):
    type: Literal["finetune", "trainer", "none", "dpo", "orpo", "kto"] = Field(
        "finetune", description="`none`: no training (zero/few-shot LLM use). Ludwig's llm default is none. "
        "`dpo` / `orpo` / `kto`: preference tuning of an llm (see docs/llm.md, Preference tuning)."
    )
    epochs: int = Field(10, ge=1, description="Ludwig: 100.")
    train_steps: Optional[int] = Field(None, ge=1, description="Stop after this many optimizer steps.")
    batch_size: Union[AtLeastOne, Literal["auto"]] = Field(
        "auto", description="Rows per micro-batch; auto picks 64 for ecd and a memory-fitted size for llm."
    )
    eval_batch_size: Optional[Union[AtLeastOne, Literal["auto"]]] = Field(
        None, description="Rows per evaluation/prediction batch; null or auto: 2 * batch_size (ecd: at least 256).")
    max_batch_size: int = Field(1024, ge=1, description="Upper bound for batch_size: auto.")
    gradient_accumulation_steps: Union[AtLeastOne, Literal["auto"]] = Field(
        1, description="Micro-batches per optimizer step; the loss is weighted by rows (ecd) or tokens (llm)."
    )
    learning_rate: Optional[float] = Field(
        None, gt=0, description="null: 1e-3 for ecd, 2e-4 for llm with an adapter, 2e-5 for full llm fine-tuning."
    )
    optimizer: Optimizer = Field(default_factory=Optimizer)
    learning_rate_scheduler: LRScheduler = Field(default_factory=LRScheduler)
    regularization_lambda: float = Field(0.0, ge=0, description="Strength of regularization_type.")
    regularization_type: Optional[Literal["l1", "l2", "l1_l2"]] = Field(
        "l2", description="l2: added to the optimizer's weight decay; l1: lambda * sign(w) added to each gradient; "
        "l1_l2: both.")
    increase_batch_size_on_plateau: int = Field(0, ge=0, description="Not supported: must stay 0 (off).")
    gradient_clipping: GradientClipping = Field(default_factory=GradientClipping)
    early_stop: int = Field(5, ge=-1, description="Evaluations without improvement before stopping (one per epoch, "
                            "more with eval_steps); -1 disables.")
    eval_steps: Optional[int] = Field(
        None, ge=1, description="Also evaluate on the validation split every this many optimizer steps (null: at "
        "each epoch end only). The best weights and early stopping then follow these evaluations too.")
    effective_batch_size: Union[AtLeastOne, Literal["auto"]] = Field(
        "auto", description="Rows per optimizer step over all processes. An int sets gradient_accumulation_steps "
        "(when that is auto) to effective_batch_size / (batch_size x processes).")
    validation_field: Optional[str] = Field(
        "combined", description="The output feature whose validation_metric picks the best weights and drives early "
        "stopping and reduce_on_plateau, or `combined` (the loss-weighted sum of the output losses). Left out (or "
        "null) while validation_metric names another metric than loss: the output feature that computes it "
        "(Ludwig's rule; an error when several do). Ludwig: the first output feature.")
    validation_metric: Optional[str] = Field(
        "loss", description="A metric that validation_field computes while training, see [Metrics](#metrics); "
        "Ludwig's long names (mean_squared_error, ...) work too; null: loss. Ludwig: the first output type's own "
        "default (accuracy, roc_auc, mean_squared_error, jaccard; loss for text).")
    evaluate_training_set: bool = Field(
        False, description="Also compute the validation metrics on the training split each epoch (written under "
        "`metrics` in training_statistics.json). Ludwig: true; costs a full extra pass per epoch.")
    should_shuffle: bool = True
    checkpoints_per_epoch: int = Field(1, ge=0, description="Resume points written per epoch.")
    steps_per_checkpoint: int = Field(0, ge=0)
    use_mixed_precision: Optional[bool] = Field(
        None, description="bf16 autocast; null: on where the hardware runs bf16 fast (CUDA Ampere+, CPUs with AMX)."
    )
    compile: bool = False
    enable_gradient_checkpointing: bool = False
    layers_to_freeze_regex: Optional[str] = Field(None, description="Parameters whose names match are frozen.")
    skip_all_evaluation: bool = False
    # llm-only
    packing: bool = Field(True, description="llm: pack rows padding-free into one sequence per micro-batch.")
    train_on_inputs: bool = Field(False, description="llm: also compute the loss on prompt tokens.")
    packing_max_sequences_per_pack: Optional[int] = Field(
        None, ge=1, description="llm with packing (Ludwig's meaning): a micro-batch holds batch_size packs of up to "
        "this many rows, i.e. batch_size x this many rows; null: batch_size rows.")
    max_tokens_per_batch: Optional[int] = Field(
        None, ge=1, description="llm with packing: token budget per micro-batch (null: chosen by batch_size)."
    )
    learning_rate_scaling: Optional[Literal["constant", "sqrt", "linear"]] = Field(
        None, description="With N processes (torchrun / accelerate launch) the learning rate is multiplied by N "
        "(linear) or sqrt(N) (sqrt); null or constant: unchanged. Ludwig: linear.")
    # llm preference trainers (type dpo / orpo / kto)
    rejected_column: str = Field(
        "rejected", description="dpo/orpo/kto: the column of rejected completions (the output feature holds the "
        "chosen ones).")
    dpo_beta: PositiveFloat = Field(0.1, description="dpo: strength of the pull towards the reference model.")
    dpo_loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="dpo: sigmoid (DPO) or ipo (squared loss on per-token log-ratio margins, as TRL).")
    dpo_label_smoothing: float = Field(
        0.0, ge=0, le=0.5, description="dpo sigmoid: assumed fraction of flipped labels (conservative DPO).")
    dpo_reference_free: bool = Field(
        False, description="dpo: no reference model (its log-probs taken as 0), as Ludwig's dpo.")
    precompute_ref_log_probs: bool = Field(
        False, description="dpo: compute the reference model's log-probs of every training and validation pair "
        "once before training and keep them, instead of a frozen copy of the model (full fine-tuning) or a pass "
        "with the adapter switched off at each step (TRL's name).")
    orpo_beta: PositiveFloat = Field(0.1, description="orpo: weight of the odds-ratio term next to the NLL.")
    kto_beta: PositiveFloat = Field(0.1, description="kto: strength of the pull towards the reference model.")
    kto_desirable_weight: PositiveFloat = Field(1.0, description="kto: weight of desirable examples' losses.")
    kto_undesirable_weight: PositiveFloat = Field(1.0, description="kto: weight of undesirable examples' losses.")
    kto_label_column: Optional[str] = Field(
        None, description="kto: a boolean column (true: desirable) for unpaired data, the output feature holding "
        "each row's completion; null: each chosen/rejected pair gives one desirable and one undesirable example.")


# -------------------------------------------------------------------------------------------- top level
class SplitConfig(Section):
    type: Literal["random", "fixed", "stratify"] = Field(
        "random", description="random: shuffled by the seed; fixed: read from `column`; stratify: random within each "
        "value of `column`, so every split keeps its proportions."
    )
    probabilities: tuple[Probability, Probability, Probability] = (0.7, 0.1, 0.2)
    column: Optional[str] = Field(
        None, description="fixed: the split column (0/1/2 or train/validation/test); stratify: the label column."
    )

    @model_validator(mode="after")
    def _check(self):
        if abs(sum(self.probabilities) - 1.0) > 1e-6:
            raise ValueError(f"split probabilities must sum to 1, got {sum(self.probabilities):g}")
        if self.type in ("fixed", "stratify") and not self.column:
            raise ValueError(f"split type {self.type!r} needs `column`")
        return self


class GlobalPreprocessing(Section):
    split: SplitConfig = Field(default_factory=SplitConfig)
    sample_ratio: float = Field(1.0, gt=0, le=1)
    sample_size: Optional[int] = Field(None, ge=1)
    global_max_sequence_length: Optional[int] = Field(
        None, ge=1, description="llm: prompt + response tokens kept per row (truncated rows are counted)."
    )
    oversample_minority: Optional[float] = Field(None, description="Not supported; must be null.")
    undersample_majority: Optional[float] = Field(None, description="Not supported; must be null.")
    cache_dir: Optional[str] = Field(
        None, description="Cadenza's cache folder (embeddings/, tokens/, models/); wins over backend.cache_dir and "
        "$CADENZA_CACHE_DIR; default ~/.cache/cadenza.")


class PromptRetrieval(Section):
    type: Optional[Literal["random", "semantic"]] = Field(
        None, description="How few-shot examples are picked from the training rows: at random or the most similar "
        "(semantic); null: none."
    )
    k: int = Field(0, ge=0, description="Examples inserted into the prompt (forced to >= 1 when type is set).")
    model_name: Optional[str] = Field(None, description="semantic: a sentence-embedding model (default: minilm).")
    index_name: Optional[str] = None


class PromptConfig(Section):
    template: Optional[str] = Field(
        None, description="Prompt with {column} placeholders, plus {__task__}, {__sample__}, {__context__}."
    )
    task: Optional[str] = Field(None, description="Task description; with no template a default one is used.")
    use_chat_template: Optional[bool] = Field(
        None, description="Wrap the prompt in the tokenizer's chat template; null: yes when the model has one."
    )
    system_prompt: Optional[str] = None
    retrieval: PromptRetrieval = Field(default_factory=PromptRetrieval)


class GenerationConfig(Section):
    """Mirrors transformers.GenerationConfig. Ludwig samples at temperature 0.1 by default; we decode greedily."""

    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per row. Ludwig: 32.")
    min_new_tokens: Optional[NonNegativeInt] = None
    do_sample: bool = Field(
        False, description="Sample instead of greedy/beam decoding. Ludwig: true (at temperature 0.1); greedy "
        "decoding makes predictions reproducible."
    )
    temperature: Optional[NonNegativeFloat] = Field(
        None, description="Sampling temperature (with do_sample; 0 means greedy, so it needs do_sample: false). "
        "Ludwig: 0.1.")
    top_k: Optional[NonNegativeInt] = Field(None, description="Sample among the k likeliest tokens (0: no limit).")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    num_beams: int = Field(1, ge=1)
    repetition_penalty: Optional[PositiveFloat] = None
    no_repeat_ngram_size: Optional[NonNegativeInt] = None
    length_penalty: Optional[float] = None
    early_stopping: Optional[bool] = None
    num_return_sequences: int = Field(1, ge=1)
    pad_token_id: Optional[TokenId] = None
    eos_token_id: Optional[Union[TokenId, list[TokenId]]] = None
    bos_token_id: Optional[TokenId] = None


class ModelParameters(Section):
    rope_scaling: Optional[dict[str, Any]] = None
    neftune_noise_alpha: float = Field(0.0, ge=0)


class DdpOptions(Section):
    """`backend.ddp`: settings of torch's DistributedDataParallel (type ddp)."""

    find_unused_parameters: bool = Field(
        False, description="Needed only when a trainable parameter gets no gradient in some step; costs a graph "
        "traversal per step.")
    bucket_cap_mb: Optional[PositiveFloat] = Field(None, description="Gradient all-reduce bucket size (null: 25 MB).")


class FsdpOptions(Section):
    """`backend.fsdp`: settings of FSDP2 (torch's fully_shard, applied by Cadenza on CPU and GPU processes; type
    fsdp)."""

    reshard_after_forward: bool = Field(
        True, description="true: each layer's parameters are sharded again after its forward (ZeRO-3: least "
        "memory); false: kept gathered until its backward (ZeRO-2-like: less communication, more memory).")
    auto_wrap: Literal["transformer", "size", "none"] = Field(
        "transformer", description="The units that are gathered one at a time: transformer: each transformer layer "
        "(the model's `_no_split_modules` classes); size: each submodule above min_num_params; none: the whole model.")
    min_num_params: int = Field(100_000_000, ge=1, description="auto_wrap: size: parameters per unit.")
    cpu_offload: bool = Field(
        False, description="GPU processes: keep the shards of parameters, gradients and optimizer state in CPU memory "
        "(the optimizer step runs on the CPU): the largest models on the fewest GPUs, much slower. Refused on CPU "
        "processes (everything is in CPU memory there).")
    activation_checkpointing: bool = Field(
        False, description="Recompute each wrapped layer's activations in the backward instead of keeping them.")


class DeepSpeedOptions(Section):
    """`backend.deepspeed`: DeepSpeed's ZeRO engine (type deepspeed; GPU processes, or CPU processes over gloo)."""

    zero_stage: Literal[0, 1, 2, 3] = Field(
        2, description="0: data parallel only; 1: optimizer state partitioned; 2: and gradients; 3: and parameters.")
    offload_optimizer_device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where ZeRO keeps the optimizer state (stage 1-3; GPU processes only).")
    offload_param_device: Literal["none", "cpu", "nvme"] = Field(
        "none", description="Where ZeRO keeps the parameters (stage 3 only; GPU processes only).")
    config_file: Optional[str] = Field(
        None, description="A DeepSpeed JSON config; replaces the keys above. Its micro-batch size, accumulation "
        "steps and clipping are the trainer's (absent or `auto`: filled in; other values: an error), and its "
        "fp16/bf16 sections must stay off (precision is trainer.use_mixed_precision's).")

    @model_validator(mode="after")
    def _offload_params_needs_stage_3(self):
        if self.offload_param_device != "none" and self.zero_stage != 3:
            raise ValueError("offload_param_device needs zero_stage: 3 (only stage 3 shards parameters)")
        return self


class BackendConfig(Section):
    type: Literal["local", "ddp", "fsdp", "deepspeed"] = Field(
        "local", description="How the processes of `torchrun` / `accelerate launch` share the work (one process: "
        "plain training whatever the type). local and ddp: every process holds the whole model and gradients are "
        "averaged (DistributedDataParallel). fsdp (FSDP2): parameters, gradients and optimizer state sharded over "
        "the processes (CPU and GPU). deepspeed: DeepSpeed's ZeRO engine partitions optimizer state (stage 1), "
        "gradients (2) and parameters (3) (CPU processes over gloo, and GPU). See [docs/distributed.md](distributed.md).")
    ddp: Optional[DdpOptions] = Field(None, description="type ddp: DistributedDataParallel settings.")
    fsdp: Optional[FsdpOptions] = Field(None, description="type fsdp: FSDP2 settings (null: the defaults).")
    deepspeed: Optional[DeepSpeedOptions] = Field(None, description="type deepspeed: ZeRO settings (null: stage 2).")
    cache_dir: Optional[str] = None
    cache_credentials: Optional[dict[str, Any]] = None
    trainer: Optional[dict[str, Any]] = Field(None, description="Accepted for Ludwig compatibility (strategy hints).")

    @model_validator(mode="after")
    def _options_match_type(self):
        for name in ("ddp", "fsdp", "deepspeed"):
            if getattr(self, name) is not None and self.type != name:
                raise ValueError(f"backend.{name} is set but backend.type is {self.type!r}: set type: {name} "
                                 f"or remove the {name} section")
        return self


class Defaults(Section):
    """Per-type defaults merged into every feature of that type (Ludwig's `defaults`)."""

    text: Optional[dict[str, Any]] = None
    number: Optional[dict[str, Any]] = None
    category: Optional[dict[str, Any]] = None
    binary: Optional[dict[str, Any]] = None
    set: Optional[dict[str, Any]] = None


# --------------------------------------------------------------------------------------------- hyperopt
SearchSpace = Literal["choice", "grid_search", "uniform", "quniform", "loguniform", "qloguniform", "randint",
                      "qrandint", "lograndint", "qlograndint"]
_RANGE_SPACES = ("uniform", "quniform", "loguniform", "qloguniform", "randint", "qrandint", "lograndint",
                 "qlograndint")


class HyperoptParameter(Section):
    """One searched key's space, as in Ludwig (Ray Tune's names); see docs/hyperopt.md."""

    space: SearchSpace = Field(..., description="choice / grid_search take categories / values; the others a range "
                               "[lower, upper] (randint and lograndint: upper excluded); q* round to multiples of q.")
    categories: Optional[list[Any]] = Field(None, description="choice: the values to pick from.")
    values: Optional[list[Any]] = Field(None, description="grid_search: the values to try.")
    lower: Optional[float] = Field(None, description="Range spaces: the smallest value.")
    upper: Optional[float] = Field(None, description="Range spaces: the largest value.")
    q: Optional[PositiveFloat] = Field(None, description="q* spaces: the step values are rounded to.")
    base: Optional[PositiveFloat] = Field(None, description="Accepted for Ludwig compatibility (log spaces).")

    @model_validator(mode="after")
    def _space_keys(self):
        if self.space == "choice" and not self.categories:
            raise ValueError("space choice needs a non-empty `categories` list")
        if self.space == "grid_search" and not self.values:
            raise ValueError("space grid_search needs a non-empty `values` list")
        if self.space in _RANGE_SPACES:
            if self.lower is None or self.upper is None:
                raise ValueError(f"space {self.space} needs `lower` and `upper`")
            if self.lower >= self.upper:
                raise ValueError(f"lower ({self.lower:g}) must be below upper ({self.upper:g})")
            if "log" in self.space and self.lower <= 0:
                raise ValueError(f"space {self.space} needs lower > 0, got {self.lower:g}")
            if self.space.startswith("q") and self.q is None:
                raise ValueError(f"space {self.space} needs `q`")
        return self


class SearchAlgConfig(Section):
    type: str = Field("variant_generator", description="Accepted for Ludwig compatibility; the executor's "
                      "`sampler` picks the search algorithm.")
    random_state: Optional[NonNegativeInt] = Field(None, description="Seed of the sampler (default: --random_seed).")


class HyperoptExecutor(Section):
    type: Literal["optuna"] = Field("optuna", description="Trials run in this process, one after another, by "
                                    "Optuna (Ludwig 0.15+). Ludwig's default `ray` is not available.")
    num_samples: AtLeastOne = Field(10, description="Trials to run (in total over every process on one storage).")
    time_budget_s: Optional[PositiveFloat] = Field(None, description="Stop starting trials after this many seconds.")
    sampler: Literal["auto", "tpe", "gp", "cmaes", "random"] = Field(
        "auto", description="auto: a grid over grid_search values when every space is grid_search, else tpe.")
    pruner: Optional[Literal["median", "hyperband"]] = Field(
        None, description="Stop trials whose per-epoch validation score is poor (split: validation).")
    storage: Optional[str] = Field(None, description="An RDB URL (sqlite:///study.db, postgresql://...): processes "
                                   "on one storage and experiment name share one study.")


class HyperoptConfig(Section):
    """Hyperparameter search (`cadenza hyperopt`); training ignores this section."""

    output_feature: str = Field("combined", description="The output feature scored (combined: all of them).")
    metric: str = Field("loss", description="The metric of output_feature to optimize.")
    goal: Literal["minimize", "maximize"] = Field("minimize", description="Whether a lower or a higher score wins.")
    split: Literal["training", "validation", "test"] = Field("validation", description="The split scored.")
    parameters: dict[str, HyperoptParameter] = Field(
        ..., description="Dotted config paths (trainer.learning_rate, input_features.review.encoder."
        "reduce_output; features by name) -> search space.")
    search_alg: SearchAlgConfig = Field(default_factory=SearchAlgConfig, description="Ludwig's search algorithm "
                                        "section (seed only here).")
    executor: HyperoptExecutor = Field(default_factory=HyperoptExecutor, description="How the trials run.")


# ------------------------------------------------------------------------------------------- distillation
class DistillTeacher(Section):
    """The llm that labels the rows (docs/distill.md): a config (zero-/few-shot) or a trained model folder."""

    config: Optional[Union[str, dict[str, Any]]] = Field(
        None, description="An llm config, inline or the path of its YAML file, used as it is (trainer.type: none: "
        "zero-shot use of its base_model), with a category output.")
    model: Optional[str] = Field(
        None, description="Instead of config: a trained llm's run or model folder (fine-tuned, or few-shot: trained "
        "with trainer.type: none and prompt.retrieval).")
    method: Literal["score", "generate"] = Field(
        "score", description="score: the likeliest class, by the log-likelihood of each class's answer text (its "
        "verbalizer entry, then end-of-sequence) after the prompt, all of a batch in one forward pass; generate: "
        "generate text and read the class with the output's match rules (as zero-shot predict does; slower).")
    verbalizer: Optional[dict[str, str]] = Field(
        None, description="class → the answer text scored for it, e.g. {fresh: positive, rotten: negative}; a "
        "class not named here is scored by its own name. Its keys are classes, like the output's match keys.")
    batch_size: AtLeastOne = Field(16, description="Rows per forward pass (score) or per generate call.")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.config is None) == (self.model is None):
            raise ValueError("give the teacher either `config` (an llm config, inline or a YAML path) or `model` "
                             "(a trained llm's folder)")
        return self


class DistillConfig(Section):
    """`cadenza distill`: an llm teacher labels rows, this (ecd) config is the student trained on its labels."""

    teacher: DistillTeacher = Field(..., description="The llm that labels the rows.")
    output_feature: Optional[str] = Field(
        None, description="The student's category or binary output feature that the teacher's labels fill (null: "
        "the only output feature).")
    rows: Optional[AtLeastOne] = Field(
        None, description="Rows of the training split the teacher labels for the student (null: all). The "
        "validation split is labelled by the teacher too; the test split keeps its true labels and scores both.")
    targets: Literal["hard", "soft"] = Field(
        "hard", description="What the student learns. hard: the teacher's likeliest class, as a label; soft: the "
        "teacher's class probabilities (method: score), its loss the cross-entropy against them (knowledge "
        "distillation; a binary student learns the probability of its true class). Hard won on the packaged data "
        "(docs/distill.md).")
    temperature: PositiveFloat = Field(
        1.0, description="soft targets: the student learns softmax(log-likelihoods / temperature) of the teacher's "
        "answers; below 1 sharpens them toward its hard labels, above 1 flattens them. The student trains and "
        "predicts at 1.")

    @field_validator("targets")
    @classmethod
    def _targets_need_probabilities(cls, targets, info):
        teacher = info.data.get("teacher")
        if targets == "soft" and teacher is not None and teacher.method == "generate":
            raise ValueError("soft targets are the teacher's class probabilities, which method: generate does not "
                             "give (it reads one class from generated text): use targets: hard, or method: score")
        return targets

    @field_validator("temperature")
    @classmethod
    def _temperature_is_for_soft_targets(cls, temperature, info):
        if info.data.get("targets") == "hard" and temperature != 1.0:
            raise ValueError("the temperature reshapes the teacher's probabilities, which hard targets do not use: "
                             "remove it, or set targets: soft")
        return temperature


class CadenzaConfig(Section):
    model_type: Literal["ecd", "llm"] = Field("ecd", description="ecd: predictive heads; llm: generative.")
    base_model: Optional[str] = Field(
        None, description="llm: hub id, local folder, .gguf file or packaged short name (`smollm2`)."
    )
    input_features: list[InputFeature] = Field(..., min_length=1)
    output_features: list[OutputFeature] = Field(..., min_length=1)
    combiner: ConcatCombiner = Field(default_factory=ConcatCombiner)
    trainer: TrainerConfig = Field(default_factory=TrainerConfig)
    preprocessing: GlobalPreprocessing = Field(default_factory=GlobalPreprocessing)
    defaults: Optional[Defaults] = None
    adapter: Optional[Adapter] = Field(None, description="llm: PEFT adapter; null means full fine-tuning.")
    quantization: Optional[QuantizationConfig] = Field(None, description="llm: 4/8-bit QLoRA (CUDA only).")
    prompt: PromptConfig = Field(default_factory=PromptConfig)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    model_parameters: Optional[ModelParameters] = None
    backend: BackendConfig = Field(default_factory=BackendConfig)
    hyperopt: Optional[HyperoptConfig] = Field(None, description="Hyperparameter search (docs/hyperopt.md).")
    distill: Optional[DistillConfig] = Field(
        None, description="ecd: train this model on an llm teacher's labels with `cadenza distill` (docs/distill.md).")
    trust_remote_code: bool = Field(False, description="llm: run the model repo's own code (only when you trust it).")
    ludwig_version: Optional[str] = Field(None, description="Written by Ludwig into saved configs; ignored.")
    cadenza_version: Optional[str] = Field(None, description="Written into saved configs; informational.")


LoraConfig.model_rebuild()
CategoryOutput.model_rebuild()


# Meanings of keys that recur across sections (the reference docs use these where a field has no description
# of its own). Kept here so the schema stays the one source of what every key means.
COMMON_DESCRIPTIONS = {
    "type": "Selects the variant of this section.",
    "activation": "Activation after each hidden layer.", "fc_activation": "Activation of the decoder's hidden layers.",
    "dropout": "Dropout probability.", "fc_dropout": "Dropout after each decoder hidden layer.",
    "fc_output_size": "Width of each decoder hidden layer.", "norm": "Normalisation after each hidden layer.",
    "flatten_inputs": "Accepted for Ludwig compatibility; inputs are vectors already.",
    "residual": "Add each hidden layer's input to its output where their widths match (skip connections).",
    "adapter": "A PEFT adapter (see the adapter sections).", "alpha": "Scaling factor.",
    "r": "Rank (or number of blocks) of the adapter.", "bias": "Which biases the adapter trains.",
    "target_modules": "Module names (or a regex) to adapt; null lets PEFT pick the architecture's default.",
    "feedforward_modules": "Which target modules are feed-forward layers (IA3 scales their input).",
    "rank_dropout": "Dropout on the adapter's rank dimension.", "module_dropout": "Probability of skipping the adapter "
    "for a module during training.", "vera_dropout": "Dropout in VeRA layers.",
    "decompose_both": "LoKr: decompose both Kronecker factors.", "decompose_factor": "LoKr: Kronecker factor size (-1: "
    "automatic).", "oft_block_size": "OFT block size (0: derived from r).",
    "target_r": "AdaLoRA: average target rank.", "init_r": "AdaLoRA: initial rank.", "tinit": "AdaLoRA: warm-up steps "
    "before pruning ranks.", "tfinal": "AdaLoRA: final fine-tuning steps at the target rank.",
    "deltaT": "AdaLoRA: steps between rank allocations.",
    "postprocessor": "What happens to the adapter after training (merging).",
    "pretrained_adapter_weights": "A saved adapter folder to continue training from.",
    "progressbar": "Show a progress bar while merging.",
    "bits": "Quantize the frozen base weights to 4 or 8 bits.", "bnb_4bit_quant_type": "4-bit data type.",
    "bnb_4bit_use_double_quant": "Quantize the quantization constants too (saves ~0.4 bit/param).",
    "llm_int8_threshold": "8-bit: outlier threshold kept in 16 bits.",
    "llm_int8_has_fp16_weight": "8-bit: keep fp16 main weights (for training them).",
    "betas": "Adam(W) moment coefficients.", "eps": "Adam(W) epsilon.", "momentum": "SGD momentum.",
    "weight_decay": "Weight decay.", "clipnorm": "Alias of clipglobalnorm (Ludwig).",
    "clipvalue": "Clip each gradient element to ±value.",
    "compile": "torch.compile the trained module in place (dynamic shapes). Compiling costs tens of seconds on "
    "CPU (and needs a C++ compiler there), so it pays off on long runs only.",
    "enable_gradient_checkpointing": "Recompute activations in the backward pass: less memory, ~30% more compute.",
    "should_shuffle": "Shuffle training rows every epoch (deterministically from the seed).",
    "skip_all_evaluation": "No validation during training (no early stopping either).",
    "steps_per_checkpoint": "Also write a resume checkpoint every this many steps (0: only per epoch).",
    "class_weights": "Per-class loss weights: a list in vocabulary order or a label → weight mapping.",
    "label_smoothing": "Label smoothing for cross-entropy.", "positive_class_weight": "Binary: weight of positives.",
    "embedding_size": "Width of the category embedding.", "fallback_true_label": "Binary: the label read as true "
    "when values are not true/false-like.", "fill_value": "Value used by fill_with_const.",
    "missing_value_strategy": "What to do with missing values (outputs drop the row by default).",
    "lowercase": "Lower-case values before use.", "most_common": "Largest vocabulary kept (most frequent first).",
    "max_sequence_length": "Maximum tokens.", "tokenizer": "How values are tokenized.",
    "threshold": "Probability above which a label is predicted.", "trainable": "Train the encoder's weights.",
    "reduce_output": "Pooling of token states into one vector.", "pretrained_kwargs": "Extra from_pretrained kwargs.",
    "trust_remote_code": "Run the model repo's own code (only when you trust it).",
    "probabilities": "training/validation/test fractions.", "sample_ratio": "Use this fraction of the rows.",
    "sample_size": "Use this many rows (sampled with the seed).", "value": "Text (contains) or regular expression.",
    "system_prompt": "llm: system message when the chat template is used.", "index_name": "Accepted for Ludwig "
    "compatibility.", "cache_credentials": "Accepted for Ludwig compatibility.",
    "cache_dir": "Cadenza's cache folder when preprocessing.cache_dir is not set; wins over $CADENZA_CACHE_DIR.",
    "rope_scaling": "RoPE scaling merged into the base model's config: {type: linear | dynamic | yarn | "
    "longrope | llama3, factor: 2.0, ...} (Ludwig's form; `rope_type` works too). The model keeps its rope_theta.",
    "neftune_noise_alpha": "NEFTune: uniform noise of size alpha/sqrt(L*d) on the input embeddings while "
    "training (L: the longest row of the micro-batch, d: the hidden size); 5 is the paper's usual value; 0: off.",
    "max_new_tokens": "Most tokens generated per row.", "min_new_tokens": "Fewest tokens generated per row.",
    "do_sample": "Sample instead of greedy/beam decoding.", "temperature": "Sampling temperature.",
    "top_k": "Sample among the k likeliest tokens.", "top_p": "Nucleus sampling mass.",
    "num_beams": "Beam search width (1: none).", "repetition_penalty": "Penalty for repeated tokens (>1 discourages).",
    "no_repeat_ngram_size": "Forbid repeating n-grams of this size.", "length_penalty": "Beam search length penalty.",
    "early_stopping": "Beam search stopping rule.", "num_return_sequences": "Generations per row.",
    "pad_token_id": "Override the pad token id.", "eos_token_id": "Override the EOS token id(s).",
    "bos_token_id": "Override the BOS token id.", "text": "Defaults for text features.",
    "number": "Defaults for number features.", "category": "Defaults for category features.",
    "binary": "Defaults for binary features.", "set": "Defaults for set features.",
    "input_features": "The model's inputs (columns).", "output_features": "What the model predicts (columns).",
    "combiner": "How input representations are combined (ecd).", "trainer": "How training runs.",
    "preprocessing": "Data preprocessing.", "defaults": "Per-type defaults merged into every feature of that type.",
    "prompt": "How rows become prompts (llm).", "generation": "Decoding settings (llm).",
    "model_parameters": "Changes to the base model (llm).", "backend": "Where training runs.",
    "encoder": "How this input is encoded.", "decoder": "The output layer.", "loss": "The loss of this output.",
    "optimizer": "The optimizer.", "learning_rate_scheduler": "Warm-up and decay of the learning rate.",
    "gradient_clipping": "Gradient clipping.", "split": "How the data set is split.",
    "retrieval": "Few-shot examples inserted into the prompt.",
}
