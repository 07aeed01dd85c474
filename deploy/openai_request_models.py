"""The OpenAI requests' models (completions, chat), strictly typed as pydantic validates them:
lists and dicts validated up to their first bad item, messages as TypedDicts (a body may hold a
million), unknown fields collected for ``parse_body`` to refuse by name."""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, FailFast, with_config
from typing_extensions import NotRequired, TypeAliasType, TypedDict


def _fail_fast(name: str, container: Any) -> Any:
    """``container`` (a list or dict type) validated up to its first bad item. Pydantic
    otherwise reports every bad item, about 10 us each: a 30 MiB body of them held the
    ingress, and every stream it serves, for minutes. (An alias: Annotated[..., FailFast()]
    cannot sit in a Union.)"""
    return TypeAliasType(name, Annotated[container, FailFast()])


TokenIds = _fail_fast("TokenIds", list[int])
Texts = _fail_fast("Texts", list[str])
TokenIdLists = _fail_fast("TokenIdLists", list[TokenIds])
LogitBias = _fail_fast("LogitBias", dict[str, float])
Tools = _fail_fast("Tools", list[dict[str, Any]])
Metadata = _fail_fast("Metadata", dict[str, str])


class RequestModel(BaseModel):
    """A request object: strict types; a field it does not define is refused by parse_body,
    naming the first (collected here rather than refused by pydantic, which reports every
    one: a body of millions of them held the ingress for seconds)."""

    model_config = ConfigDict(extra="allow", strict=True)


class StreamOptions(RequestModel):
    include_usage: Optional[bool] = None


class _Common(RequestModel):
    """Fields both endpoints share."""

    model: Optional[str] = None
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: Optional[int] = None
    stream: Optional[bool] = None
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, Texts]] = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[LogitBias] = None
    user: Optional[str] = None
    # extensions
    top_k: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[TokenIds] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    return_token_ids: Optional[bool] = None  # vLLM's: each choice's prompt and output token ids
    response_format: Optional[dict[str, Any]] = None
    structured_outputs: Optional[dict[str, Any]] = None  # vLLM's: exactly one of json, regex, choice, grammar


class CompletionRequest(_Common):
    prompt: Union[str, TokenIds, Texts, TokenIdLists]
    echo: Optional[bool] = None
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None


# Messages and their parts are TypedDicts, not models: a 32 MiB body holds a million of them, and
# pydantic validates a TypedDict about 10 x faster than it builds a model (0.6 against 6 us a
# message on the 2-core box), all of it holding the GIL, so the ingress's event loop and every
# stream on it with it.
@with_config(ConfigDict(extra="allow", strict=True))
class ContentPart(TypedDict):
    type: str
    text: NotRequired[Optional[str]]


ContentParts = _fail_fast("ContentParts", list[ContentPart])


@with_config(ConfigDict(extra="allow", strict=True))
class ChatMessage(TypedDict):
    # extra fields (tool_calls, tool_call_id, reasoning_content...) pass on to the chat template
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: NotRequired[Optional[Union[str, ContentParts]]]
    name: NotRequired[Optional[str]]
    tool_calls: NotRequired[Optional[list[dict[str, Any]]]]  # an assistant's earlier calls
    tool_call_id: NotRequired[Optional[str]]  # the call a tool message answers


ChatMessages = _fail_fast("ChatMessages", list[ChatMessage])


class ChatRequest(_Common):
    messages: ChatMessages
    max_completion_tokens: Optional[int] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[Tools] = None
    tool_choice: Optional[Union[str, dict[str, Any]]] = None
    parallel_tool_calls: Optional[bool] = None
    store: Optional[bool] = None
    metadata: Optional[Metadata] = None
    service_tier: Optional[str] = None
    reasoning_effort: Optional[str] = None
    chat_template_kwargs: Optional[dict[str, Any]] = None
