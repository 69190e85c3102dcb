"""POST /tokenize and /detokenize, as vLLM serves them: a prompt's "tokens" are its bytes.

For clients that count a prompt before they send it (a context budget) or that send token lists:
`tokens` are byte values, what /v1/completions takes as a prompt given as a list of ints. BOS,
which the engine puts before every prompt, is neither listed nor counted, as in usage.prompt_tokens;
`max_model_len` includes it. A conversation (`messages`) is rendered by the chat template first
(chat.py). The patches the model cuts a text into are /v1/patches' (patches.py).
"""

from __future__ import annotations

from .chat import conversation_prompt
from .choices import byte_name
from .errors import utf8
from .schemas import DetokenizeRequest, TokenizeRequest
from .state import AppState


def tokenize(req: TokenizeRequest, state: AppState) -> dict:
    state.check_model(req.model)
    data = utf8(req.prompt, "prompt") if req.prompt is not None else conversation_prompt(req, state)
    tokens = list(data)
    return {"count": len(tokens), "max_model_len": state.max_model_len, "tokens": tokens,
            "token_strs": [byte_name(b) for b in tokens] if req.return_token_strs else None}


def detokenize(req: DetokenizeRequest, state: AppState) -> dict:
    state.check_model(req.model)
    return {"prompt": bytes(req.tokens).decode("utf-8", "replace")}
