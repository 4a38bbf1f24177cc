"""vLLM's tokenizer routes on the wire: /tokenize (a prompt, or chat messages through the template),
/detokenize, /version."""

from __future__ import annotations

from typing import Any

from pydantic import Field, ValidationInfo, field_validator

from llmadapter.protocol.base import WireRequest, WireResponse
from llmadapter.protocol.messages import ChatMessage, Tool
from llmadapter.protocol.requests import TokenId


class TokenizeCompletionRequest(WireRequest):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True  # vLLM: BOS and the like, as a completions prompt gets them
    return_token_strs: bool | None = False


class TokenizeChatRequest(WireRequest):
    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False
    add_special_tokens: bool = False  # the chat template writes the special tokens it wants
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[Tool] | None = None
    return_token_strs: bool | None = False

    @field_validator("continue_final_message")
    @classmethod
    def _check_continue(cls, value: bool, info: ValidationInfo) -> bool:
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("cannot continue the final message and add a generation prompt after it")
        return value

    def generation_prompt(self) -> bool:
        if self.add_generation_prompt is not None:
            return self.add_generation_prompt
        return not self.continue_final_message


class TokenizeResponse(WireResponse):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(WireRequest):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(WireResponse):
    prompt: str


class VersionResponse(WireResponse):
    version: str
