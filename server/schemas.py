"""Request and response bodies of the HTTP API (pydantic lives here and nowhere in the runtime).

Requests accept unknown fields (they are logged, as vLLM does); every range is checked here so
that a 400 names the field. Counts are in bytes: `max_tokens` and the usage fields say tokens only
because OpenAI clients read those names.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from blt_runtime.sampling import MIN_REPETITION

Byte = Annotated[int, Field(ge=0, le=255)]
INT64 = 2**63


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = Field(False, description="with include_usage (vLLM's): every chunk carries the "
                                                            "usage so far")


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs: one of these constrains the completion (a grammar in GBNF or Lark's syntax)."""

    model_config = ConfigDict(extra="allow")

    regex: str | None = None
    choice: list[str] | None = None
    json_schema: Any = Field(None, alias="json")  # (pydantic's BaseModel has a method called json)
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None


class ResponseFormat(BaseModel):
    """OpenAI's: text, json_object (any JSON value) or json_schema ({"name", "schema", "strict"})."""

    model_config = ConfigDict(extra="allow")

    type: str = "text"
    json_schema: dict[str, Any] | None = None


class SamplingFields(BaseModel):
    """What a completion and a chat completion request share: how the bytes are chosen, when they stop,
    the guides, and how the answer comes back."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    temperature: float | None = Field(1.0, ge=0.0, le=100.0, description="0 means greedy")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(0, ge=-1, description="0 or -1: off")
    min_p: float | None = Field(0.0, ge=0.0, le=1.0)
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stop: str | list[str] | None = Field(None, description="stop strings, matched on bytes")
    stop_token_ids: list[Byte] | None = Field(None, max_length=256, description="bytes that stop the completion, as "
                                                                            "one-byte stop strings (vLLM's, the ids "
                                                                            "being bytes); stop_reason is the byte")
    n: int = Field(1, ge=1, le=64)
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(1.0, ge=MIN_REPETITION, le=10.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, description="bytes to generate before EOS or a stop string may end the "
                                                 "completion (vLLM's min_tokens); at most max_tokens")
    include_stop_str_in_output: bool = Field(False, description="keep the matched stop string in the text (vLLM)")
    logit_bias: dict[str, float] | None = Field(
        None, description="byte value ('0'..'255') -> a bias in [-100, 100] added to its logit before the "
                          "penalties and sampling; -100 all but bans a byte, 100 all but forces it")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    priority: int = Field(0, description="with --scheduling-policy priority: lower leaves the waiting queue first, "
                                         "and preempts a running request of a higher value where no slot is free "
                                         "(vLLM's); else it must be 0")
    return_patches: bool = Field(False, description="report where each choice's patches begin (BLT extension)")
    guided_regex: str | None = Field(None, description="the completion must match this regular expression "
                                                       "(vLLM's; Python's syntax, a subset: "
                                                       "blt_runtime/regex_syntax.py)")
    guided_choice: list[str] | None = Field(None, description="the completion must be one of these (vLLM's)")
    structured_outputs: StructuredOutputs | None = Field(None, description="vLLM's: {\"regex\": ...}, "
                                                                           "{\"choice\": [...]}, {\"json\": schema} or "
                                                                           "{\"json_object\": true}")
    guided_json: Any = Field(None, description="the completion must be JSON this schema validates (a subset of "
                                               "JSON Schema: blt_runtime/json_guide.py; vLLM's)")
    guided_grammar: str | None = Field(None, description="the completion must be text this grammar derives: GBNF "
                                                         "(llama.cpp's format, its root) or Lark's (its start), as "
                                                         "vLLM takes them; recursion at any depth: "
                                                         "blt_runtime/grammar.py, pushdown.py)")
    guided_whitespace_pattern: str | None = Field(
        None, description="what a JSON guide allows after ':' and ',' and inside brackets, a pattern of JSON's "
                          "whitespace (vLLM's; '[ \\n]*' takes pretty-printed JSON); default: compact JSON")
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema")
    allowed_token_ids: list[Byte] | None = Field(None, max_length=256, description="only these bytes are generated "
                                                                               "(vLLM's; EOS stays allowed)")
    bad_words: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=64, description="never generated: none of these occurs in the completion (vLLM's)")

    @model_validator(mode="after")
    def _stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop: at most 16 stop strings")
        return self


class CompletionRequest(SamplingFields):
    prompt: str | list[Byte] | list[str] | list[list[Byte]] = Field(
        description="text (UTF-8), a list of ints 0..255 (raw bytes), or a list of either (one per prompt)")
    max_tokens: int | None = Field(256, ge=0, description="bytes to generate (up to 3 more finish a character); "
                                                         "left out or null: 256, or what the context leaves after "
                                                         "the prompt where that is less")
    logprobs: int | None = Field(None, ge=0, le=20, description="top-N alternatives per generated byte")
    echo: bool = False
    truncate_prompt_tokens: int | None = Field(
        None, ge=-1, description="keep only the prompt's last N bytes (vLLM); -1: as many as fit in the context "
                                 "with max_tokens")
    best_of: int | None = Field(None, ge=1, description="accepted up to n (no effect); more is refused")
    suffix: str | None = Field(None, description="accepted when empty; this server does not fill in the middle")


class ContentPart(BaseModel):
    """A part of a message's content: text only (this server reads no images or audio)."""

    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    """A message of the conversation; fields beyond these (tool_calls, tool_call_id) reach the template."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class TemplateFields(BaseModel):
    """How the chat template renders a conversation: what a chat completion and /tokenize both take."""

    model_config = ConfigDict(extra="allow")

    add_generation_prompt: bool = Field(True, description="end the prompt with the template's opening of an "
                                                          "assistant message (vLLM)")
    continue_final_message: bool = Field(False, description="the prompt ends inside the last message, which the "
                                                            "completion continues (vLLM; not with "
                                                            "add_generation_prompt)")
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="more variables for the chat template "
                                                                          "(vLLM)")
    tools: list[dict[str, Any]] | None = Field(None, description="functions ({'type': 'function', 'function': "
                                                                 "{'name', 'description', 'parameters'}}), given to "
                                                                 "the template; with a chat completion, called as "
                                                                 "tool_choice says")


class ChatCompletionRequest(TemplateFields, SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1, description="the conversation; the server's chat template "
                                                                  "turns it into the prompt's text")
    max_completion_tokens: int | None = Field(None, ge=0, description="bytes to generate; left out: what the "
                                                                      "context leaves after the prompt (vLLM)")
    max_tokens: int | None = Field(None, ge=0, description="the older name of max_completion_tokens")
    logprobs: bool | None = Field(False, description="the logprob of each generated byte")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="with logprobs: top-N alternatives per byte")
    tool_choice: str | dict[str, Any] | None = Field(None, description="'none' (the default without tools): the "
                                                     "tools are for the template; 'required': one or more calls "
                                                     "of the tools; {'type': 'function', 'function': {'name': N}}: "
                                                     "a call of N; each call's arguments held to the function's "
                                                     "parameters schema. 'auto' (the default with tools): text, "
                                                     "calls or both, as the model writes them, read by the server's "
                                                     "tool-call parser (--enable-auto-tool-choice; else a 400)")
    parallel_tool_calls: bool | None = Field(None, description="with tool_choice 'required' or 'auto': false, one call "
                                                               "only")
    echo: bool = Field(False, description="the answer begins with the last message's content where that is the "
                                          "assistant's (with continue_final_message: the whole message; vLLM)")


class Logprobs(BaseModel):
    tokens: list[str] = Field(description="each byte as text when it is a whole character, else 'bytes:\\xNN'")
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]
    bytes: list[list[int]] = Field(description="the raw bytes of each entry")


class ChoiceEnd(BaseModel):
    """What a choice of either kind says besides its text: its index, why it ended, where its patches begin."""

    index: int
    finish_reason: Literal["stop", "length"] | None = None
    stop_reason: str | int | None = Field(None, description="the stop string matched, or the byte of "
                                                              "stop_token_ids")
    patch_starts: list[int] | None = Field(None, description="completion byte offsets where patches begin")


class CompletionChoice(ChoiceEnd):
    text: str
    logprobs: Logprobs | None = None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt bytes not prefilled: their state was copied from another "
                                           "request's prefill of the same prefix, or left in its slot by a "
                                           "finished request (shared prompts)")


class UsageInfo(BaseModel):
    prompt_tokens: int = Field(description="prompt bytes")
    completion_tokens: int = Field(description="generated bytes")
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails
    prompt_patches: int
    completion_patches: int


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class ChatLogprob(BaseModel):
    token: str = Field(description="the byte as text when it is a whole character, else 'bytes:\\xNN'")
    logprob: float
    bytes: list[int] | None = Field(description="the raw byte; null for EOS")


class ChatLogprobEntry(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatLogprobEntry] | None


class FunctionCall(BaseModel):
    name: str
    arguments: str = Field(description="the JSON text generated for the function's parameters")


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ResponsesRequest(SamplingFields):
    """OpenAI's Responses API (as vLLM serves it): a conversation given as input items, answered as output items.
    The sampling fields of a chat completion are vLLM's extensions here too."""

    input: str | list[dict[str, Any]] = Field(description="text (the user's message), or items: messages "
                                                          "({'role', 'content'}), function_call and "
                                                          "function_call_output items")
    instructions: str | None = Field(None, description="a system message before the input (not carried over by "
                                                       "previous_response_id)")
    max_output_tokens: int | None = Field(None, ge=0, description="bytes to generate; left out: what the context "
                                                                  "leaves after the prompt")
    previous_response_id: str | None = Field(None, description="continue the conversation of a stored response "
                                                               "(--enable-responses-api-store)")
    store: bool = Field(True, description="keep the response for GET /v1/responses/{id} and previous_response_id "
                                          "(with --enable-responses-api-store; else nothing is kept)")
    tools: list[dict[str, Any]] | None = Field(None, description="functions: {'type': 'function', 'name', "
                                                                 "'description', 'parameters'}")
    tool_choice: str | dict[str, Any] | None = Field(None, description="'none', 'auto' (the default with tools; "
                                                     "--enable-auto-tool-choice), 'required', or {'type': "
                                                     "'function', 'name': N}")
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = Field(None, description="{'format': {'type': 'text'}}, {'type': 'json_object'} "
                                                          "or {'type': 'json_schema', 'name', 'schema'}")
    include: list[str] | None = Field(None, description="'message.output_text.logprobs': the logprob of each "
                                                        "generated byte")
    top_logprobs: int | None = Field(None, ge=0, le=20, description="top-N alternatives per byte")
    background: bool = Field(False, description="answer at once (queued) and generate with no client waiting; GET "
                                                "the response later (with --enable-responses-api-store and store)")
    truncation: Literal["disabled", "auto"] | None = Field("disabled", description="auto: the conversation's "
                                                           "oldest items are left out until it fits")
    metadata: dict[str, str] | None = None
    chat_template_kwargs: dict[str, Any] | None = Field(None, description="more variables for the chat template "
                                                                          "(vLLM)")


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str = Field(description="the text generated; with tool calls, the text outside them ('auto') or empty")
    tool_calls: list[ToolCall] | None = Field(None, description="with tool_choice 'required' or a function's name; "
                                                                "with 'auto', the calls the model wrote, if any")


class ChatChoice(ChoiceEnd):
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class BltInfo(BaseModel):
    parameters: int
    patching_threshold: float
    entropy_layers: int
    encoder_layers: int
    global_layers: int
    decoder_layers: int
    dtype: str
    device: str


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "blt-serve"
    root: str
    max_model_len: int = Field(description="bytes of context, BOS included")
    blt: BltInfo | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class PatchesRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    text: str | None = None
    bytes: list[Byte] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.text is None) == (self.bytes is None):
            raise ValueError("give exactly one of text or bytes")
        return self


class TokenizeRequest(TemplateFields):
    """vLLM's /tokenize: a prompt, or a conversation the chat template renders (with its options)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = Field(True, description="accepted; BOS, which the engine puts before every prompt, "
                                                       "is never listed or counted (as in usage.prompt_tokens)")
    return_token_strs: bool = Field(False, description="each byte as text too (as logprobs name them)")

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt or messages")
        return self


class TokenizeResponse(BaseModel):
    count: int = Field(description="bytes")
    max_model_len: int = Field(description="bytes of context, BOS included")
    tokens: list[int] = Field(description="the prompt's bytes, as /v1/completions takes them in a list")
    token_strs: list[str] | None = None


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    tokens: list[Byte]


class DetokenizeResponse(BaseModel):
    prompt: str = Field(description="the bytes as UTF-8 text (invalid sequences as U+FFFD)")


class Patch(BaseModel):
    start: int
    length: int
    text: str


class PatchesResponse(BaseModel):
    object: Literal["patches"] = "patches"
    model: str
    num_bytes: int
    threshold: float = Field(description="entropy (nats) above which a byte begins a new patch")
    entropies: list[float] = Field(description="per byte: entropy (nats) of the prediction of that byte")
    patches: list[Patch]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
