"""How chat messages become a prompt: the tokenizer's chat template, with tools, the generation prompt or a
continued final message (vLLM's fields), template kwargs, and a reasoning effort the template reads."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

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

    def render(
        self,
        messages: Sequence[ChatMessage],
        *,
        generation_prompt: bool = True,
        continue_final: bool = False,
        template_kwargs: Mapping[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        tool_choice: Any = None,
        tool_choice_param: str = "tool_choice",
        reasoning_effort: str | None = None,
    ) -> str:
        """The prompt text; InvalidRequestError naming the field the template cannot honour."""
        if not self.tokenizer.chat_template:
            raise InvalidRequestError(
                "This model's tokenizer has no chat template; use the completions task.", param="messages"
            )
        kwargs = self._template_kwargs(template_kwargs or {})
        if tools and tool_choice != "none":
            if "tools" not in self.source:
                raise InvalidRequestError("This model's chat template does not support tools.", param="tools")
            if tool_choice not in (None, "auto"):
                raise InvalidRequestError(
                    f"Only {tool_choice_param} 'auto' or 'none' is supported: the engine cannot force a "
                    "tool call.",
                    param=tool_choice_param,
                )
            kwargs["tools"] = tools
        kwargs = {**self._reasoning(reasoning_effort), **kwargs}
        try:
            text = self.tokenizer.apply_chat_template(
                [m.to_template() for m in messages],
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
