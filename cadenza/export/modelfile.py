"""The Ollama Modelfile written beside model.gguf (`ollama create NAME -f Modelfile`): the prompt format the model
was fine-tuned with as an Ollama TEMPLATE, its system prompt, stop tokens and decoding settings.

A chat model whose chat template renders ChatML (SmolLM2, Qwen, ...) gets Ollama's ChatML template; the check is
what the template renders, not how it is written. A model fine-tuned on a plain prompt template with one input
gets that template around `{{ .Prompt }}`. Anything else keeps Ollama's default, with a comment saying why."""

from __future__ import annotations

import json
import string

from ..llm.prompt import PromptBuilder

CHATML_TEMPLATE = """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ if .Prompt }}<|im_start|>user
{{ .Prompt }}<|im_end|>
{{ end }}<|im_start|>assistant
{{ .Response }}<|im_end|>
"""
CHATML_STOPS = ["<|im_start|>", "<|im_end|>"]
SYSTEM, USER = "\x00system\x00", "\x00user\x00"  # sentinels no template writes on its own


def modelfile(builder: PromptBuilder, tokenizer, generation, gguf_name: str = "model.gguf") -> str:
    """The Modelfile's text. `builder` is the model's prompt builder, `generation` its `generation:` section."""
    lines = ["# written by `cadenza export_model -f gguf`; `ollama create NAME -f Modelfile`", f"FROM ./{gguf_name}"]
    template, system, stops, why = _prompt_format(builder, tokenizer)
    if why:
        lines.append(f"# {why}")
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for stop in _unique(stops + [tokenizer.eos_token]):
        lines.append(f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}")
    lines += [f"PARAMETER {key} {value}" for key, value in _decoding(generation)]
    return "\n".join(lines) + "\n"


def _prompt_format(builder: PromptBuilder, tokenizer) -> tuple[str | None, str | None, list[str], str]:
    """(TEMPLATE or None for Ollama's default, SYSTEM, stop strings, a comment when the format is not kept)."""
    user = plain_template(builder)
    why = "" if user is not None else (f"Cadenza's prompt ({builder.template!r} over inputs {builder.inputs}) "
                                       "cannot be written as an Ollama template: send prompts already in that form")
    user = user if user is not None else "{{ .Prompt }}"
    if not builder.use_chat:
        return user, None, [], why
    configured_system = builder.config.prompt.system_prompt
    default_system = chatml_default_system(tokenizer)
    if default_system is None:
        return None, configured_system, [], ("the chat template does not render ChatML, so it cannot be converted: "
                                             "Ollama's default template for this model is used")
    # the user turn carries Cadenza's prompt template, as in training
    return (CHATML_TEMPLATE.replace("{{ .Prompt }}<|im_end|>", user + "<|im_end|>"),
            configured_system or default_system, list(CHATML_STOPS), why)


def chatml_default_system(tokenizer) -> str | None:
    """The system message the chat template writes when none is given ("" for none), or None when the template
    does not render ChatML."""
    def render(messages):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    try:
        with_system = render([{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}])
        without = render([{"role": "user", "content": USER}])
    except Exception:  # a template that needs other roles or arguments is not ChatML
        return None
    turn = f"<|im_start|>user\n{USER}<|im_end|>\n<|im_start|>assistant\n"
    if with_system != f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" + turn:
        return None
    if without == turn:
        return ""
    prefix, end = "<|im_start|>system\n", "<|im_end|>\n" + turn
    if without.startswith(prefix) and without.endswith(end):
        return without[len(prefix):-len(end)]
    return None


def plain_template(builder: PromptBuilder) -> str | None:
    """Cadenza's plain prompt template with its one input as `{{ .Prompt }}`, or None when it cannot be."""
    if len(builder.inputs) != 1:
        return None
    if builder.template is None:
        return "{{ .Prompt }}"
    parts = []
    for literal, field, _, _ in string.Formatter().parse(builder.template):
        if "{{" in literal or "}}" in literal:
            return None  # Ollama would read these as template actions
        parts.append(literal)
        if field == builder.inputs[0]:
            parts.append("{{ .Prompt }}")
        elif field == "__task__":
            parts.append(builder.config.prompt.task or "")
        elif field:  # __sample__ (the row as JSON) or __context__ (retrieved examples)
            return None
    return "".join(parts)


def _decoding(generation) -> list[tuple[str, object]]:
    params: list[tuple[str, object]] = [("num_predict", generation.max_new_tokens)]
    if not generation.do_sample:
        params.append(("temperature", 0))  # Cadenza decodes greedily
    else:
        params += [(key, value) for key, value in (("temperature", generation.temperature),
                                                   ("top_k", generation.top_k), ("top_p", generation.top_p))
                   if value is not None]
    if generation.repetition_penalty is not None:
        params.append(("repeat_penalty", generation.repetition_penalty))
    return params


def _unique(items: list) -> list:
    return [x for i, x in enumerate(items) if x and x not in items[:i]]
