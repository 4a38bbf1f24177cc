"""OpenAI wire models (pydantic v2): requests that validate and convert themselves, responses, stream
chunks, errors, and vLLM's tokenizer routes.

    base       strict requests, responses that keep the spec's required nulls
    messages   chat messages by role, content parts, tools
    optional   the spec's optional fields accepted at their no-op values (one table)
    requests   chat / completions / embeddings requests, parse_request
    responses  answers, chunks, errors, model cards
    tokenize   /tokenize, /detokenize, /version
"""

from llmadapter.protocol.messages import (
    ChatMessage,
    FunctionCall,
    FunctionDefinition,
    RefusalContentPart,
    TextContentPart,
    Tool,
    ToolCall,
)
from llmadapter.protocol.optional import StreamOptions
from llmadapter.protocol.requests import (
    MAX_N,
    MAX_STOP_SEQUENCES,
    ChatCompletionRequest,
    CompletionRequest,
    EmbeddingInput,
    EmbeddingRequest,
    RequestT,
    parse_request,
)
from llmadapter.protocol.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    EmbeddingData,
    EmbeddingResponse,
    EmbeddingUsage,
    ErrorBody,
    ErrorResponse,
    FinishReason,
    ModelCard,
    ModelList,
    PromptLogprob,
    PromptLogprobs,
    TokenLogprob,
    TopLogprob,
    Usage,
    new_id,
    now,
)
from llmadapter.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    VersionResponse,
)

__all__ = [
    "MAX_N",
    "MAX_STOP_SEQUENCES",
    "AssistantMessage",
    "ChatChoice",
    "ChatChunkChoice",
    "ChatCompletionChunk",
    "ChatCompletionRequest",
    "ChatCompletionResponse",
    "ChatMessage",
    "ChoiceLogprobs",
    "CompletionChoice",
    "CompletionChunk",
    "CompletionLogprobs",
    "CompletionRequest",
    "CompletionResponse",
    "DeltaMessage",
    "DetokenizeRequest",
    "DetokenizeResponse",
    "EmbeddingData",
    "EmbeddingInput",
    "EmbeddingRequest",
    "EmbeddingResponse",
    "EmbeddingUsage",
    "ErrorBody",
    "ErrorResponse",
    "FinishReason",
    "FunctionCall",
    "FunctionDefinition",
    "ModelCard",
    "ModelList",
    "PromptLogprob",
    "PromptLogprobs",
    "RefusalContentPart",
    "RequestT",
    "StreamOptions",
    "TextContentPart",
    "TokenLogprob",
    "TokenizeChatRequest",
    "TokenizeCompletionRequest",
    "TokenizeResponse",
    "Tool",
    "ToolCall",
    "TopLogprob",
    "Usage",
    "VersionResponse",
    "new_id",
    "now",
    "parse_request",
]
