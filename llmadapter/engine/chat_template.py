"""How chat messages become a prompt: the tokenizer's chat template, with tools, the generation prompt or a
continued final message (vLLM's fields), template kwargs, and a reasoning effort the template reads."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

from llmadapter.engine.tool_calls import assistant_call_text, generic_prompt
from llmadapter.errors import InvalidRequestError
from llmadapter.protocol import ChatMessage

# Variables through which chat templates of reasoning models take the effort (vLLM passes both).
_REASONING_VARIABLES = ("reasoning_effort", "enable_thinking")
_VARIADIC = (inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)


class ChatTemplate:
    """One tokenizer's chat template, rendered for requests (chat completions and /tokenize)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else ""
        # apply_chat_template's own parameters: a template kwarg by one of these names would change how
        # it renders (or clash with a field of the request), not what the template reads.
        parameters = inspect.signature(tokenizer.apply_chat_template).parameters.values()
        self._reserved = {p.name for p in parameters if p.kind not in _VARIADIC} | {"messages"}

    @property
    def renders_tools(self) -> bool:
        """Whether the template itself writes `tools` into the prompt (else the generic prompt does)."""
        return "tools" in self.source

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        generation_prompt: bool = True,
        continue_final: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        reasoning_effort: str | None = None,
    ) -> str:
        """The prompt text; InvalidRequestError naming the field the template cannot honour."""
        if not self.tokenizer.chat_template:
            raise InvalidRequestError(
                "This model's tokenizer has no chat template; use the completions task.", param="messages"
            )
        kwargs = self._template_kwargs(template_kwargs or {})
        chat = [m.to_template() for m in messages]
        if tools and tool_choice != "none":
            if self.renders_tools:
                kwargs["tools"] = tools
            else:
                chat = _generic_tools(chat, generic_prompt(tools, allow_text=tool_choice in (None, "auto")))
        kwargs = {**self._reasoning(reasoning_effort), **kwargs}
        try:
            text = self.tokenizer.apply_chat_template(
                chat,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                continue_final_message=continue_final,
                **kwargs,
            )
        except Exception as exc:  # jinja raises for conversations the template refuses
            raise InvalidRequestError(
                f"The chat template rejected the messages: {exc}", param="messages"
            ) from None
        return str(text)

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        # The template already wrote any BOS it wants: adding special tokens again would double it.
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def _template_kwargs(self, given: Mapping[str, Any]) -> dict[str, Any]:
        clash = sorted(set(given) & self._reserved)
        if clash:
            raise InvalidRequestError(
                f"Invalid value for 'chat_template_kwargs': '{clash[0]}' is a parameter of the template "
                "renderer, not a template variable; use the request field of that name where there is one.",
                param="chat_template_kwargs",
            )
        return dict(given)

    def _reasoning(self, effort: str | None) -> dict[str, Any]:
        """What the template reads for `effort`; a template with no reasoning switch takes only 'none'."""
        reads = [name for name in _REASONING_VARIABLES if name in self.source]
        if effort is None or (effort == "none" and not reads):
            return {}
        if not reads:
            raise InvalidRequestError(
                f"Unsupported value: 'reasoning_effort' {effort!r} asks for reasoning, and this model's chat "
                "template has no reasoning switch (it reads neither reasoning_effort nor enable_thinking).",
                param="reasoning_effort",
                code="unsupported_value",
            )
        values = {"reasoning_effort": effort, "enable_thinking": effort != "none"}
        return {name: values[name] for name in reads}


def _generic_tools(chat: list[dict[str, Any]], prompt: str) -> list[dict[str, Any]]:
    """The conversation for a template without tools: the tools described in the system message, and
    earlier assistant calls written in the JSON they were asked in (llama.cpp's generic handler)."""
    out = [
        {**m, "content": assistant_call_text(m["tool_calls"])} if m.get("tool_calls") else dict(m)
        for m in chat
    ]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{prompt}"
    else:
        out.insert(0, {"role": "system", "content": prompt})
    return out
