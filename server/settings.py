"""Server settings: one frozen dataclass, read from command-line flags and `BLT_<FLAG>` env vars.

A flag given on the command line wins over its env var, which wins over the default. Knows
nothing about FastAPI or torch.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

SHIPPED_MODEL = Path(__file__).resolve().parent.parent / "weights" / "blt-shakespeare"
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
KERNELS = ("auto", "torch", "triton", "triton-gemv")  # blt_runtime.kernels.CHOICES (this module imports no torch)
# tool_parser.PARSERS (this module imports no FastAPI)
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "llama4_json", "pythonic")
PAGE = 16  # patches a page of the global model's cache holds (blt_runtime.paged_cache.PAGE; no torch here)


@dataclass(frozen=True)
class Settings:
    model_dir: str = str(SHIPPED_MODEL)
    served_model_name: str | None = None  # default: the model directory's name; "a,b": a, which b names too
    revision: str | None = None  # of a Hub model id: a branch, tag or commit; default: main
    download_dir: str | None = None  # where a Hub model is fetched to and looked for; default: the Hub's cache
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "auto"  # auto: cuda if available, else cpu
    dtype: str = "auto"  # auto: bfloat16 on cuda, float32 on cpu
    max_batch_size: int = 16
    max_queue: int = 256
    max_model_len: int | None = None  # bytes, BOS included; default: the model's max_seq_len
    prefill_chunk: int | None = None  # default: 2048 on CUDA, 512 on a CPU (blt_runtime/engine.py)
    threads: int | None = None  # CPU intra-op threads; default: all cores but one
    enforce_eager: bool = False  # no CUDA graphs (static steps run eagerly)
    compile: bool = False  # element-wise stretches of each step compiled (torch.compile)
    kernels: str = "auto"  # auto, torch, triton or triton-gemv (blt_runtime/kernels.py)
    no_overlap: bool = False  # queue each engine step only after the last one's outputs are handled
    lookahead_rows: int | None = None  # decode steps of up to this many rows decode ahead; default 1 on CUDA, 0 on CPU
    no_prompt_sharing: bool = False  # prefill every prompt, even a prefix whose state a slot holds
    kept_prefixes: int = 4  # slots of their own for the states of prefixes kept for later prompts
    kv_cache_memory_bytes: int | None = None  # the global model's pool of pages, fixed; default: grows as needed
    gpu_memory_utilization: float | None = None  # on CUDA, the pool takes what this share of the GPU leaves
    jump_forward: int | None = None  # bytes a guide forces, at least, prefilled as a chunk; default 2 on CPU, 0 on CUDA
    scheduling_policy: str = "fcfs"  # fcfs, or priority: the waiting queue ordered by the requests' priority
    seed: int | None = None  # of the generator that seeds requests sent without a seed; default: random
    chat_template: str | None = None  # a file, or the template itself; default: the model directory's, if any
    enable_auto_tool_choice: bool = False  # tool_choice "auto": calls read out of the text by tool_call_parser
    tool_call_parser: str | None = None  # hermes, llama3_json (llama4_json), pythonic
    enable_responses_api_store: bool = False  # keep finished /v1/responses answers in memory
    generation_config: str = "auto"  # auto: the model directory's generation_config.json; none; or a directory
    override_generation_config: str | None = None  # a JSON object of generation-config keys over those
    api_key: tuple[str, ...] = ()
    ssl_keyfile: str | None = None  # with ssl_certfile: serve HTTPS
    ssl_certfile: str | None = None
    root_path: str = ""  # the path prefix a proxy serves the app under
    disable_fastapi_docs: bool = False  # no /docs, /redoc or /openapi.json
    metrics_without_key: bool = False
    allowed_origins: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20
    shutdown_timeout: float = 30.0
    keepalive_interval: float = 15.0
    log_level: str = "info"
    log_interval: float = 5.0  # seconds between throughput summaries while busy
    disable_log_requests: bool = False  # no line per finished request
    disable_log_stats: bool = False  # no throughput summaries

    @property
    def model_name(self) -> str:
        """The name the server's answers and metrics use: the first served name."""
        return self.model_names[0]

    @property
    def model_names(self) -> tuple[str, ...]:
        """Every name clients may send (vLLM's --served-model-name takes several)."""
        return _split(self.served_model_name or "") or (Path(self.model_dir).resolve().name,)


def _split(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


HELP = {
    "model_dir": "model directory (config.json + safetensors), or a Hugging Face Hub model id (org/name: fetched, "
                 "or taken from the Hub's cache, with huggingface_hub); default: the shipped model",
    "served_model_name": "the model id clients send and see; default: the directory's name. Several (space- or "
                         "comma-separated): clients may send any, and answers use the first",
    "revision": "with a Hub model id: the branch, tag or commit to serve (default: main)",
    "download_dir": "with a Hub model id: the cache directory it is fetched to and looked for in (vLLM's; default: "
                    "the Hugging Face Hub's, HF_HUB_CACHE)",
    "device": "auto, cpu, cuda or cuda:N", "dtype": "auto, float32 (float), bfloat16 or float16 (half)",
    "max_batch_size": "sequences that advance together (cache slots)",
    "max_queue": "requests that may wait for a slot; beyond it, 429",
    "max_model_len": "bytes of context per sequence (prompt + completion + BOS)",
    "prefill_chunk": "prompt bytes prefilled per engine step (default: 2048 on CUDA, 512 on a CPU)",
    "threads": "CPU threads for the model (default: all cores but one, left to HTTP)",
    "enforce_eager": "on CUDA, run decode steps eagerly instead of replaying CUDA graphs",
    "compile": "compile the element-wise stretches of each step into one kernel each (torch.compile; "
               "fewer kernel launches on a GPU, slower start-up; not faster on a CPU)",
    "kernels": "whose kernels decode steps run: triton (the project's Triton kernels for attention over "
               "the caches, RoPE, norms and SwiGLU), triton-gemv (those, with each norm and SwiGLU's gate "
               "inside the projection's kernel), torch (PyTorch's), or auto (triton on CUDA when they "
               "pass a start-up check)",
    "no_overlap": "on CUDA, queue each engine step only once the last step's outputs are handled (by "
                  "default the next step is queued first, so that the device computes while the host "
                  "handles outputs)",
    "lookahead_rows": "on CUDA, decode steps of up to this many sequences also run each sampled byte through the "
                      "encoder and decoder beside the entropy model's look-ahead, so that the next step only "
                      "samples where no patch closes (default 1; 0: never; outputs do not change)",
    "no_prompt_sharing": "prefill every request's prompt itself (by default a prompt that shares a prefix "
                         "with one still being prefilled, as the n choices of a completion do, with a finished "
                         "request's prompt and completion, or with a prefix kept from earlier prompts, takes "
                         "a copy of the state at the prefix's end instead of computing it again)",
    "kept_prefixes": "cache slots of their own, beyond --max-batch-size, that hold the state after a prefix "
                     "that prompts shared but did not end with (a system prompt before new conversations), for "
                     "later prompts that begin with it (0: none)",
    "kv_cache_memory_bytes": "give the global model's cache (its pool of pages) this many bytes at start-up, "
                             "never more (vLLM's; 4GiB, 512MiB, 2G or a number; at least one sequence of "
                             "--max-model-len at a patch a byte, which start-up checks). Default: the pool grows "
                             "as sequences need it, until the device refuses or has 5 percent left. Either way a "
                             "sequence that finds no pages waits its turn",
    "gpu_memory_utilization": "on CUDA, the share of the GPU's memory (0 to 1) this server takes: the pool of "
                              "pages gets what the model, its caches and a step's activations leave of it, measured "
                              "at start-up (vLLM's; --kv-cache-memory-bytes wins where both are given; ignored on a "
                              "CPU, with a warning)",
    "jump_forward": "where a guided request's guide (a regex, JSON schema, choice, tool call) forces this many "
                    "bytes or more, one byte allowed at each, prefill them as one chunk instead of sampling them a "
                    "step each; outputs do not change (0: never; default: 2 on a CPU, 0 on CUDA)",
    "seed": "seed of the generator that gives requests sent without a seed theirs (vLLM's --seed): the same "
            "requests in the same order then give the same text after a restart (default: a random seed)",
    "chat_template": "the Jinja template that turns a chat completion's messages into the prompt: a file, or the "
                     "template itself (default: the model directory's chat_template.jinja, or the chat_template "
                     "of its tokenizer_config.json; without one, chat completions are refused)",
    "enable_auto_tool_choice": "serve tool_choice 'auto' (the default of a chat completion with tools): the model "
                               "writes text, tool calls or both, unguided, and --tool-call-parser reads the calls out "
                               "of the text (vLLM's; without it, 'auto' is a 400)",
    "tool_call_parser": "the format of the model's tool calls, for --enable-auto-tool-choice: hermes (each call a JSON "
                        "object {\"name\": ..., \"arguments\": ...} between <tool_call> and </tool_call>, as "
                        "Hermes and Qwen chat templates ask for), or llama3_json (llama4_json: the same; a text that "
                        "begins with { or <|python_tag|> is calls, such objects separated by ';', as Llama 3's JSON "
                        "tool template asks for), or pythonic (a text that begins with [ is a Python list of calls, "
                        "[f(a=1), g(b='x')], as Llama 3.2's and 4's pythonic templates ask for)",
    "enable_responses_api_store": "keep finished /v1/responses answers in memory (64 MiB of them at most, the "
                                  "oldest forgotten first) for GET /v1/responses/{id} (and its input_items), "
                                  "previous_response_id and background responses (vLLM's "
                                  "VLLM_ENABLE_RESPONSES_API_STORE); without it a "
                                  "request's store is false",
    "generation_config": "auto: the sampling defaults of the model directory's generation_config.json (temperature, "
                         "top_p, top_k, min_p, repetition_penalty, max_new_tokens) for requests that leave those "
                         "fields out, as vLLM does; none: the API's defaults; or a directory with that file",
    "override_generation_config": "a JSON object of the same keys (e.g. '{\"temperature\": 0.5}') set over what "
                                  "--generation-config gives (vLLM's)",
    "scheduling_policy": "fcfs: requests leave the waiting queue in the order they came (a request's priority "
                         "must be 0); priority: lower priority values first, equal ones in order, and a running "
                         "request of a higher value gives its slot up to one that finds none free, and goes on "
                         "later (vLLM's)",
    "ssl_keyfile": "serve HTTPS with this private key (PEM; with --ssl-certfile)",
    "ssl_certfile": "serve HTTPS with this certificate (PEM; with --ssl-keyfile)",
    "root_path": "the path prefix a reverse proxy serves the app under (ASGI root_path: the OpenAPI docs' links)",
    "disable_fastapi_docs": "serve no API docs: /docs, /redoc and /openapi.json answer 404 (vLLM's)",
    "api_key": "require 'Authorization: Bearer KEY' (repeat or comma-separate for several)",
    "metrics_without_key": "leave /metrics open when API keys are set",
    "allowed_origins": "turn CORS on for these origins (comma-separated, or *)",
    "max_body_bytes": "largest request body accepted (413 beyond)",
    "shutdown_timeout": "seconds running requests may finish after SIGTERM",
    "keepalive_interval": "seconds between ': keep-alive' comments on a waiting stream",
    "log_level": "|".join(LOG_LEVELS), "log_interval": "seconds between throughput summaries",
    "disable_log_requests": "log no line per finished request (vLLM's; its id, bytes in and out, patches, time to "
                            "first byte, bytes/s, finish reason); metrics count them still",
    "disable_log_stats": "log no throughput summaries while busy (vLLM's); metrics count still",
}


# vLLM's names for the same settings (its --max-num-batched-tokens is a step's budget of prompt and generated
# tokens; here a step's prompt bytes, each running request's one byte besides)
ALIASES = {"max_batch_size": ["--max-num-seqs"], "prefill_chunk": ["--max-num-batched-tokens"]}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="blt-serve", description="Serve a BLT model over an OpenAI-compatible HTTP API.",
                                epilog="Every flag but vLLM's group can also be set as an env var BLT_<FLAG>, e.g. "
                                       "BLT_PORT=8080.")
    for f in fields(Settings):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "model_dir":
            p.add_argument("model_dir", nargs="?", default=None, help=HELP[f.name])
            p.add_argument("--model", dest="model_flag", default=None, help="the same as MODEL_DIR (vLLM's)")
        elif f.type == "bool":
            p.add_argument(flag, action="store_true", default=None, help=HELP[f.name])
        elif f.name in ("api_key", "allowed_origins"):
            p.add_argument(flag, action="append", default=None, help=HELP[f.name])
        elif f.name == "served_model_name":  # vLLM's: --served-model-name NAME [ALIAS ...]
            p.add_argument(flag, nargs="+", default=None, help=HELP[f.name])
        else:
            p.add_argument(flag, *ALIASES.get(f.name, []), default=None, help=HELP.get(f.name))
    # vLLM's names for prompt sharing (its prefix caching, also on by default)
    p.add_argument("--no-enable-prefix-caching", dest="no_prompt_sharing", action="store_true", default=None,
                   help="the same as --no-prompt-sharing (vLLM's)")
    p.add_argument("--enable-prefix-caching", dest="no_prompt_sharing", action="store_false", default=None,
                   help="share prompts' prefixes: the default (vLLM's)")
    vllm_flags(p)
    return p


PARALLEL = ("tensor", "pipeline", "data")


def vllm_flags(p: argparse.ArgumentParser) -> None:
    """vLLM's flags that a command line written for `vllm serve` often carries and that mean nothing else here:
    taken where what they ask holds anyway, refused (load_settings) where it cannot."""
    g = p.add_argument_group("vLLM's flags", "taken so that a `vllm serve` command line runs, where what they ask "
                                             "holds here; refused with the reason where it cannot")
    g.add_argument("--trust-remote-code", action="store_true", help="taken: BLT's code is this server's own, and "
                                                                    "nothing in a model directory is run")
    g.add_argument("--enable-chunked-prefill", action="store_true", help="taken: prompts are always prefilled in "
                                                                         "chunks (--prefill-chunk)")
    for kind in PARALLEL:
        g.add_argument(f"--{kind}-parallel-size", f"-{kind[0]}p", type=int, default=1, metavar="N",
                       help="1 only: blt-serve runs a model on one device (scale out with replicas)")
    g.add_argument("--distributed-executor-backend", metavar="NAME", help="taken: one process runs the model")
    g.add_argument("--disable-custom-all-reduce", action="store_true", help="taken: one device, nothing to reduce")
    g.add_argument("--block-size", type=int, default=None, metavar="N",
                   help=f"{PAGE} only: the global model's cache is in pages of {PAGE} patches")
    g.add_argument("--swap-space", type=float, default=None, metavar="GIB",
                   help="taken: nothing is swapped to the host; a sequence preempted for pages is recomputed when "
                        "it goes on (as in vLLM's V1 engine)")
    g.add_argument("--kv-cache-dtype", default=None, metavar="DTYPE",
                   help="auto only: the caches are in the model's --dtype")
    g.add_argument("--quantization", "-q", default=None, metavar="METHOD",
                   help="refused: the weights are served as loaded, in --dtype")
    g.add_argument("--load-format", default=None, metavar="FORMAT",
                   help="auto or safetensors only: a model directory's weights are safetensors")


UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


def byte_size(raw: str) -> int:
    """A number of bytes: 1073741824, 1e9, 4GiB, 4Gi, 4G (10**9), 512MB, 300k; ValueError otherwise."""
    text = raw.strip().lower().replace("_", "")
    number = text.rstrip("kmgtib")
    unit = text[len(number):].removesuffix("b")
    if unit not in UNITS or not number:
        raise ValueError(raw)
    value = float(number) * UNITS[unit]
    if value != int(value) or value < 1:
        raise ValueError(raw)
    return int(value)


def _convert(f, raw):
    if f.name in ("api_key", "allowed_origins"):
        items = raw if isinstance(raw, list) else [raw]
        return tuple(v for item in items for v in _split(item))
    if f.name == "served_model_name" and isinstance(raw, list):
        return ",".join(raw)
    if f.type == "bool":
        return raw if isinstance(raw, bool) else raw.strip().lower() in ("1", "true", "yes", "on")
    if raw in ("", "none", "None") and "None" in f.type:
        return None
    if f.name == "kv_cache_memory_bytes":
        return byte_size(raw)
    if f.type.startswith("int"):
        return int(raw)
    if f.type.startswith("float"):
        return float(raw)
    return raw


def load_settings(argv: list[str] | None = None, environ=None) -> Settings:
    """Flags, then `BLT_*` env vars, then defaults. A bad value exits with argparse's message."""
    p = parser()
    args = vars(p.parse_args(argv))
    flag = args.pop("model_flag")
    if flag is not None:
        if args["model_dir"] is not None and args["model_dir"] != flag:
            p.error(f"the model is given twice: {args['model_dir']} and --model {flag}")
        args["model_dir"] = flag
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(Settings):
        raw = args.get(f.name)
        if raw is None:
            raw = environ.get("BLT_" + f.name.upper())
        if raw is None:
            continue
        try:
            values[f.name] = _convert(f, raw)
        except ValueError:
            what = "number of bytes (4GiB, 512MB, 1e9)" if f.name == "kv_cache_memory_bytes" else f.type
            p.error(f"--{f.name.replace('_', '-')}: {raw!r} is not a valid {what}")
    settings = Settings(**values)
    for kind in PARALLEL:
        if args[f"{kind}_parallel_size"] != 1:
            p.error(f"--{kind}-parallel-size {args[f'{kind}_parallel_size']}: blt-serve runs a model on one device; "
                    "serve more with more replicas (README: Scaling out)")
    if args["block_size"] not in (None, PAGE):
        p.error(f"--block-size {args['block_size']}: the global model's cache is in pages of {PAGE} patches; leave "
                f"it out (or give {PAGE})")
    if args["kv_cache_dtype"] not in (None, "auto"):
        p.error(f"--kv-cache-dtype {args['kv_cache_dtype']}: the caches are kept in the model's --dtype (no 8-bit "
                "caches, which would change outputs); leave it out")
    if args["quantization"] is not None:
        p.error(f"--quantization {args['quantization']}: blt-serve serves the weights as loaded, in --dtype; leave "
                "it out")
    if args["load_format"] not in (None, "auto", "safetensors"):
        p.error(f"--load-format {args['load_format']}: a model directory's weights are read from safetensors "
                "(blt-convert converts Meta's checkpoints); leave it out")
    if settings.gpu_memory_utilization is not None and not 0 < settings.gpu_memory_utilization <= 1:
        p.error("--gpu-memory-utilization must be a fraction in (0, 1]")
    if settings.log_level not in LOG_LEVELS:
        p.error(f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    if settings.kernels not in KERNELS:
        p.error(f"--kernels must be one of {', '.join(KERNELS)}")
    if settings.scheduling_policy not in ("fcfs", "priority"):
        p.error("--scheduling-policy must be fcfs or priority")
    if settings.tool_call_parser is not None and settings.tool_call_parser not in TOOL_CALL_PARSERS:
        p.error(f"--tool-call-parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
    if settings.enable_auto_tool_choice and settings.tool_call_parser is None:
        p.error(f"--enable-auto-tool-choice needs --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)})")
    if (settings.ssl_keyfile is None) != (settings.ssl_certfile is None):
        p.error("--ssl-keyfile and --ssl-certfile go together")
    for name in ("ssl_keyfile", "ssl_certfile"):
        path = getattr(settings, name)
        if path is not None and not os.path.isfile(path):
            p.error(f"--{name.replace('_', '-')} {path}: no such file")
    for name in ("max_batch_size", "max_body_bytes", "prefill_chunk"):
        if (value := getattr(settings, name)) is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    for name in ("max_queue", "kept_prefixes", "jump_forward", "lookahead_rows"):
        if (getattr(settings, name) or 0) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0")
    return settings
