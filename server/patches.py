"""POST /v1/patches and GET /v1/models: what the model makes of some bytes, and what the model is.

The entropy model's full forward never runs on the event loop. On a CPU it runs in a thread of its
own (one request at a time: AppState.patches_thread), alongside the engine's steps (the weights are
only read): between steps it would stall every stream, 0.3 s for 8 KB on this project's 2-core
machine. On CUDA it runs on the engine's worker thread between steps, where it takes milliseconds,
and where it cannot launch work while the worker captures a CUDA graph.
Entropy of byte k: the entropy model's uncertainty when predicting byte k from the bytes before
it (BOS first), in nats; byte k > 0 begins a patch when it exceeds the threshold (byte 0 always
does; BOS is a patch of its own and is not reported).
"""

from __future__ import annotations

import asyncio

from .errors import ApiError, utf8
from .schemas import PatchesRequest
from .state import AppState


async def patches(req: PatchesRequest, state: AppState) -> dict:
    state.check_model(req.model)
    state.check_admitting()
    data = utf8(req.text, "text") if req.text is not None else bytes(req.bytes)
    if len(data) + 1 > state.max_model_len:
        raise ApiError(400, f"{len(data)} bytes exceed this model's context of {state.max_model_len} bytes "
                            "(BOS included)", "text" if req.text is not None else "bytes", "context_length_exceeded")
    model = state.engine.model
    if model.device.type == "cpu":
        entropies, spans = await asyncio.get_running_loop().run_in_executor(state.patches_thread,
                                                                            model.byte_patches, data)
    else:
        entropies, spans = await state.worker.call(lambda: model.byte_patches(data))
    return {"object": "patches", "model": state.model_name, "num_bytes": len(data),
            "threshold": model.config.patching_threshold, "entropies": entropies,
            "patches": [{"start": s, "length": n, "text": data[s:s + n].decode("utf-8", "replace")}
                        for s, n in spans]}


def model_card(state: AppState, created: int, name: str) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "blt-serve",
            "root": state.settings.model_dir, "max_model_len": state.max_model_len, "blt": None}
    model = getattr(state.engine, "model", None)
    if model is not None:
        cfg = model.config
        card["blt"] = {"parameters": sum(p.numel() for p in model.parameters()),
                       "patching_threshold": cfg.patching_threshold,
                       "entropy_layers": cfg.patcher.num_layers, "encoder_layers": cfg.encoder.num_layers,
                       "global_layers": cfg.global_model.num_layers, "decoder_layers": cfg.decoder.num_layers,
                       "dtype": str(model.dtype).removeprefix("torch."), "device": str(model.device)}
    return card
