"""Conversations: chat data rows in one shape, the chat template, and which tokens are answers.

Every chat format (OpenAI `messages`, ShareGPT `conversations`, prompt / completion, Alpaca)
becomes a list of {"role", "content"} messages. The tokenizer's chat template renders it, and
the answer tokens (each assistant message with the markup that ends its turn) are the targets of
training and of the answer-only metrics.
"""

from __future__ import annotations

import json
from pathlib import Path

from omegaconf import DictConfig

# data.format: plain text, or one of the chat formats.
FORMATS = ("text", "messages", "prompt_completion", "alpaca")
# Role names of the formats in use (ShareGPT's `from` values included), as OpenAI spells them.
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "human": "user", "gpt": "assistant",
         "bot": "assistant", "model": "assistant"}
# The template of the offline default (and `data.chat_template=chatml`), with its two special tokens.
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
          "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class ChatDataError(ValueError):
    """A row or a template that cannot give answer tokens to train on."""


def is_chat(data: DictConfig) -> bool:
    return data.format != "text"


def conversation(row: dict, data: DictConfig, where: str) -> list[dict]:
    """One row of chat data as messages; `where` names the row in errors."""
    fields = data.fields

    def field(name: str):
        key = fields[name]
        if key not in row:
            raise ChatDataError(f"{where} has no field {key!r} (data.fields.{name}); fields: {', '.join(row)}.")
        return row[key]

    def turns(value) -> list[dict]:
        messages = []
        for turn in value:
            role = turn.get(fields.role)
            if role not in ROLES:
                raise ChatDataError(f"{where}: role {role!r} (data.fields.role={fields.role!r}) is none of "
                                    f"{', '.join(ROLES)}.")
            messages.append({"role": ROLES[role], "content": str(turn.get(fields.content, ""))})
        return messages

    if data.format == "messages":
        messages = turns(field("messages"))
    elif data.format == "prompt_completion":
        prompt, completion = field("prompt"), field("completion")
        # The conversational variant holds message lists (as TRL writes them).
        messages = turns(prompt) if isinstance(prompt, list) else [{"role": "user", "content": str(prompt)}]
        messages += turns(completion) if isinstance(completion, list) else [{"role": "assistant", "content": str(completion)}]
    else:  # alpaca
        extra = row.get(fields.input) or ""
        instruction = str(field("instruction")) + (f"\n\n{extra}" if extra else "")
        messages = [{"role": "user", "content": instruction}, {"role": "assistant", "content": str(field("output"))}]
    if fields.system and row.get(fields.system) and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": str(row[fields.system])})
    if not any(m["role"] == "assistant" for m in messages):
        raise ChatDataError(f"{where} has no assistant message: nothing to train on.")
    return messages


def template_for(data: DictConfig, tokenizer) -> str:
    """data.chat_template ('chatml' or a Jinja template), else the tokenizer's own."""
    chosen = data.chat_template
    if chosen == "chatml":
        return CHATML
    if chosen:
        return str(chosen)
    if not tokenizer.chat_template:
        raise ChatDataError("The tokenizer has no chat template; set data.chat_template (chatml or a Jinja "
                            "template) for chat data.")
    return tokenizer.chat_template


def render(tokenizer, messages: list[dict], **kwargs) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)


def answer_spans(tokenizer, messages: list[dict], where: str) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character span of each answer: what the template adds
    for an assistant message after the prompt that asks for it (its generation prompt), which
    includes the end-of-turn markup, so the model learns to stop."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(tokenizer, messages[:i], add_generation_prompt=True)
        through = render(tokenizer, messages[: i + 1])
        if not (through.startswith(prompt) and text.startswith(through)):
            raise ChatDataError(
                f"{where}: the chat template renders the conversation up to assistant message {i} differently from "
                "its beginning in the whole conversation, so its answer tokens cannot be told apart. Template: "
                f"{tokenizer.chat_template[:200]!r}")
        if len(through) == len(prompt):
            raise ChatDataError(f"{where}: the chat template renders no text for assistant message {i}. Template: "
                                f"{tokenizer.chat_template[:200]!r}")
        spans.append((len(prompt), len(through)))
    return text, spans


def tokenize_answers(tokenizer, messages: list[dict], where: str) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation (as apply_chat_template gives them) and, per token,
    whether it lies in an answer."""
    text, spans = answer_spans(tokenizer, messages, where)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    targets = [any(start < end_span and end > start_span for start_span, end_span in spans)
               for start, end in encoded["offset_mapping"]]
    return encoded["input_ids"], targets


def prompt_before_answer(messages: list[dict]) -> list[dict]:
    """The conversation before its last answer: what a client sends to have it answered."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of `messages` rendered with the generation prompt, as apply_chat_template gives them."""
    return tokenizer(render(tokenizer, messages, add_generation_prompt=True), add_special_tokens=False)["input_ids"]


def heldout_chat_prompts(prepared: Path) -> list[list[dict]]:
    """The held-out conversations the prepare stage kept, each before its last answer."""
    rows = (Path(prepared) / "heldout.jsonl").read_text().splitlines()
    return [prompt_before_answer(json.loads(row)["messages"]) for row in rows]
