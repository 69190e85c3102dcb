"""Generation speed: the incremental engine against full recompute, measured in one run.

    python bench/generate.py [--model DIR] [--device cpu|cuda] [--dtype float32|bfloat16]

Prints a table, then one JSON line with: reference_ms_per_byte, engine_ms_per_byte and speedup at
each context length; aggregate_bytes_per_s at each concurrency; global_steps_per_byte;
bytes_per_patch; peak_rss_mb. The reference is greedy generation by full recompute (the whole
model over the whole text for every byte), as Meta's code and transformers do without a cache.
Contexts and concurrencies are each measured in `--repeats` interleaved rounds; medians reported.
Needs only torch (no web stack), so it runs on a bare GPU machine too.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from blt_runtime import load_model  # noqa: E402
from blt_runtime.engine import Engine  # noqa: E402
from blt_runtime.reference import reference_generate  # noqa: E402
from blt_runtime.sampling import SamplingParams  # noqa: E402

DEFAULT_MODEL = ROOT / "weights" / "blt-shakespeare"
TEXT_CANDIDATES = [ROOT.parent / "shared" / "data" / "tinyshakespeare.txt", ROOT / "bench" / "prompt.txt"]


def prompt_text(n_bytes: int) -> bytes:
    """n_bytes of English text, cut at a character boundary (held-out end of the corpus if present)."""
    for path in TEXT_CANDIDATES:
        if path.is_file():
            data = path.read_bytes()
            text = data[-n_bytes - 1000:-1000] if len(data) > n_bytes + 1000 else (data * (n_bytes // len(data) + 1))
            return text[:n_bytes].decode("utf-8", errors="ignore").encode()[:n_bytes]
    raise SystemExit("no prompt text found: give bench/prompt.txt")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def reference_ms_per_byte(model, context: int, n_bytes: int, device: str) -> float:
    params = SamplingParams(max_bytes=1, temperature=0.0, ignore_eos=True)
    prompt = prompt_text(context)
    reference_generate(model, prompt, params)  # warm-up
    sync(device)
    start = time.perf_counter()
    for i in range(n_bytes):  # each byte recomputes everything over the whole prefix
        reference_generate(model, prompt[: context - n_bytes + i], params)
    sync(device)
    return (time.perf_counter() - start) * 1000 / n_bytes


def engine_run(model, prompts: list[bytes], n_bytes: int, device: str, max_len: int,
               static: bool | None = None) -> dict:
    """Prefill all prompts, then time the decode steps alone. -> bytes/s, ms/step and patch figures.
    `static`: the engine's decode steps at static shapes (None: the device's default)."""
    engine = Engine(model, max_batch_size=len(prompts), max_model_len=max_len, static=static)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_bytes=n_bytes, temperature=0.0, ignore_eos=True))
    seqs = list(engine.sequences.values())
    while any(s.processed < s.prompt_len for s in seqs):  # prefill (and the first bytes)
        engine.step()
    made_before = sum(len(s.generated) for s in seqs)
    patches_before = sum(s.num_patches for s in seqs)
    sync(device)
    start, steps = time.perf_counter(), 0
    while engine.has_work():
        engine.step()
        steps += 1
    sync(device)
    elapsed = time.perf_counter() - start
    made = sum(len(s.generated) for s in seqs) - made_before
    return {"bytes_per_s": made / elapsed, "ms_per_step": elapsed * 1000 / max(steps, 1),
            "global_steps": sum(s.num_patches for s in seqs) - patches_before, "bytes": made}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--contexts", default="256,1024,4096")
    p.add_argument("--concurrency", default="1,4,16,64")
    p.add_argument("--engine-bytes", type=int, default=128)
    p.add_argument("--reference-bytes", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds over contexts and concurrencies; medians")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--compare-static", action="store_true",
                   help="also time the other decode-step form (static shapes on CPU, dynamic on CUDA)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    contexts = [int(c) for c in args.contexts.split(",")]
    max_len = max(contexts) + args.engine_bytes + 8
    result: dict = {"model": str(args.model), "device": args.device, "dtype": args.dtype,
                    "threads": torch.get_num_threads(), "reference_ms_per_byte": {}, "engine_ms_per_byte": {},
                    "speedup": {}, "aggregate_bytes_per_s": {}}
    engine_run(model, [prompt_text(64)], 16, args.device, max_len)  # warm-up
    total_bytes = total_global = 0
    samples: dict[int, dict[str, list[float]]] = {c: {"ref": [], "eng": []} for c in contexts}
    for _ in range(args.repeats):  # rounds interleave the contexts, so drifts in machine speed hit all alike
        for c in contexts:
            samples[c]["ref"].append(reference_ms_per_byte(model, c, args.reference_bytes, args.device))
            run = engine_run(model, [prompt_text(c)], args.engine_bytes, args.device, max_len)
            samples[c]["eng"].append(1000 / run["bytes_per_s"])
            if args.compare_static:  # the other decode-step form, in the same rounds
                other = engine_run(model, [prompt_text(c)], args.engine_bytes, args.device, max_len,
                                   static=model.device.type != "cuda")
                samples[c].setdefault("other", []).append(1000 / other["bytes_per_s"])
            total_bytes, total_global = total_bytes + run["bytes"], total_global + run["global_steps"]
    for c in contexts:
        ref, eng = statistics.median(samples[c]["ref"]), statistics.median(samples[c]["eng"])
        result["reference_ms_per_byte"][c], result["engine_ms_per_byte"][c] = round(ref, 3), round(eng, 3)
        result["speedup"][c] = round(ref / eng, 1)
        if args.compare_static:
            other = statistics.median(samples[c]["other"])
            result.setdefault("other_step_form_ms_per_byte", {})[c] = round(other, 3)
            form = "dynamic" if model.device.type == "cuda" else "static"
            print(f"context {c:>5}: engine with {form} decode steps {other:6.2f} ms/byte", flush=True)
        print(f"context {c:>5}: full recompute {ref:8.2f} ms/byte, engine {eng:6.2f} ms/byte, {ref / eng:6.1f}x "
              f"(medians of {args.repeats}; engine runs {', '.join(f'{x:.2f}' for x in samples[c]['eng'])})",
              flush=True)
    counts = [int(x) for x in args.concurrency.split(",")]
    rates: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(args.repeats):  # interleaved rounds here too: the ratios compare like with like
        for n in counts:
            prompts = [prompt_text(128 + 17 * i)[17 * i:] for i in range(n)]
            rates[n].append(engine_run(model, prompts, args.engine_bytes, args.device, max_len)["bytes_per_s"])
    for n in counts:
        rate = statistics.median(rates[n])
        result["aggregate_bytes_per_s"][n] = round(rate, 1)
        print(f"{n:>3} sequences: {rate:9.1f} bytes/s aggregate (median of {args.repeats}: "
              f"{', '.join(f'{x:.1f}' for x in rates[n])})", flush=True)
    result["global_steps_per_byte"] = round(total_global / total_bytes, 4)
    result["bytes_per_patch"] = round(total_bytes / total_global, 3)
    result["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
