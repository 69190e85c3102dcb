"""Train a small BLT on any UTF-8 text file with the runtime's own model code.

Two phases: the entropy model (a small byte LM), then the BLT with patches cut by that frozen
entropy model, its threshold set so that held-out text averages about --bytes-per-patch bytes per
patch. The last 10% of the file is held out. Progress lines show step, loss, bytes/s and time left;
a checkpoint is kept in --work-dir so that an interrupted run resumes where it stopped. The result
is a native checkpoint (config.json + model.safetensors) that transformers' BltForCausalLM loads too.

    python scripts/train.py --data ../shared/data/tinyshakespeare.txt --out weights/blt-shakespeare
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blt_runtime import BltConfig, BltModel, StackConfig, save_model  # noqa: E402
from blt_runtime.config import ffn_hidden_size  # noqa: E402
from blt_runtime.model.entropy import entropy_nats  # noqa: E402
from blt_runtime.patcher import patch_starts  # noqa: E402
from blt_runtime.tokenizer import BOS_ID, OFFSET  # noqa: E402


def stack(d: int, layers: int, heads: int, theta: float) -> StackConfig:
    return StackConfig(hidden_size=d, num_layers=layers, num_heads=heads, num_kv_heads=heads,
                       intermediate_size=ffn_hidden_size(d), rope_theta=theta)


def model_config(args) -> BltConfig:
    """The shipped model's shapes: the released structure (k=2, 1-layer encoder, decoder
    cross-attention on every layer, six hash n-gram tables) at laptop size."""
    return BltConfig(
        patcher=stack(args.d_patcher, args.patcher_layers, 4, 10000.0),
        encoder=stack(args.d_local, 1, 4, 500000.0),
        global_model=stack(2 * args.d_local, args.global_layers, 8, 500000.0),
        decoder=stack(args.d_local, args.decoder_layers, 4, 500000.0),
        cross_attn_k=2, hash_vocab=args.hash_vocab, max_seq_len=8192,
    )


def init_weights(module: torch.nn.Module, depth: int) -> None:
    """Truncated-normal init with std 1/sqrt(fan_in) (as Meta's BLT); residual outputs scaled by depth."""
    for name, p in module.named_parameters():
        if p.dim() == 1:
            torch.nn.init.ones_(p)
            continue
        std = p.shape[1] ** -0.5  # fan-in for a Linear (out, in); the width for an Embedding (n, d)
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            std /= math.sqrt(2 * depth)
        torch.nn.init.trunc_normal_(p, std=std, a=-3 * std, b=3 * std)


# ---------------------------------------------------------------------- data
@dataclass
class Corpus:
    train: torch.Tensor  # byte ids (byte + 4), int64
    held_out: torch.Tensor

    @classmethod
    def load(cls, path: Path) -> Corpus:
        data = path.read_bytes()
        data.decode("utf-8")  # refuse a file that is not UTF-8
        ids = torch.frombuffer(bytearray(data), dtype=torch.uint8).long() + OFFSET
        cut = int(len(ids) * 0.9)
        return cls(train=ids[:cut], held_out=ids[cut:])

    def batch(self, gen: torch.Generator, batch: int, length: int) -> torch.Tensor:
        """(batch, length) random crops, each led by BOS as every served prompt is."""
        starts = torch.randint(0, len(self.train) - length, (batch,), generator=gen)
        rows = torch.stack([self.train[s:s + length - 1] for s in starts.tolist()])
        return torch.cat([torch.full((batch, 1), BOS_ID), rows], dim=1)


def held_out_chunks(ids: torch.Tensor, length: int) -> list[torch.Tensor]:
    """The whole held-out text as consecutive (1, length) chunks, each led by BOS."""
    step = length - 1
    return [torch.cat([torch.tensor([BOS_ID]), ids[i:i + step]])[None] for i in range(0, len(ids), step)]


# ---------------------------------------------------------------------- loop
def lr_at(step: int, total: int, peak: float, warmup: int = 100) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_for(params: list[tuple[str, torch.nn.Parameter]], lr: float) -> torch.optim.AdamW:
    decay = [p for n, p in params if p.dim() == 2 and "embed" not in n]
    other = [p for n, p in params if not (p.dim() == 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}],
                             lr=lr, betas=(0.9, 0.95))


def train_phase(name: str, model: torch.nn.Module, loss_fn, params, corpus: Corpus, args, steps: int,
                work: Path) -> None:
    """Train `params` for `steps` steps, resuming from work/<name>.pt if present."""
    opt = optimizer_for(params, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    step, ckpt = 0, work / f"{name}.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optim"])
        gen.set_state(state["rng"])
        step = state["step"]
        print(f"[{name}] resumed at step {step}", flush=True)
    t0, bytes_seen = time.time(), 0
    while step < steps:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, args.lr)
        ids = corpus.batch(gen, args.batch, args.seq_len)
        loss = loss_fn(ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
        opt.step()
        step += 1
        bytes_seen += ids.numel()
        if step % args.log_every == 0 or step == steps:
            rate = bytes_seen / (time.time() - t0)
            left = (steps - step) * ids.numel() / rate
            print(f"[{name}] step {step}/{steps} loss {loss.item():.4f} ({loss.item() / math.log(2):.3f} bpb) "
                  f"{rate:,.0f} bytes/s, {left / 60:.1f} min left", flush=True)
        if step % args.save_every == 0 or step == steps:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "rng": gen.get_state(),
                        "step": step}, ckpt)


def next_byte_loss(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@torch.no_grad()
def held_out_stats(model: BltModel, corpus: Corpus, length: int) -> dict[str, float]:
    """Bits per byte of the entropy model and of the BLT, and bytes per patch, on the held-out 10%."""
    nats_patcher = nats_blt = 0.0
    n_bytes = n_patches = 0
    for ids in held_out_chunks(corpus.held_out, length):
        out = model(ids)
        n = ids.shape[1] - 1
        nats_blt += next_byte_loss(out.logits, ids).item() * n
        nats_patcher += next_byte_loss(model.patcher(ids), ids).item() * n
        n_bytes += n
        n_patches += int((out.layout.lengths[0] > 0).sum()) - 1  # not BOS's own patch
    return {"held_out_bytes": n_bytes, "entropy_model_bpb": nats_patcher / n_bytes / math.log(2),
            "blt_bpb": nats_blt / n_bytes / math.log(2), "bytes_per_patch": n_bytes / n_patches}


@torch.no_grad()
def choose_threshold(model: BltModel, corpus: Corpus, length: int, bytes_per_patch: float) -> float:
    """The entropy quantile at which about one byte in `bytes_per_patch` starts a patch."""
    ents = [entropy_nats(model.patcher(ids))[0, 1:-1] for ids in held_out_chunks(corpus.held_out, length)]
    return float(torch.quantile(torch.cat(ents)[:1_000_000], 1 - 1 / bytes_per_patch))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work-dir", type=Path, default=Path("runs/train"))
    p.add_argument("--entropy-steps", type=int, default=400)
    p.add_argument("--blt-steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--d-patcher", type=int, default=128)
    p.add_argument("--patcher-layers", type=int, default=2)
    p.add_argument("--d-local", type=int, default=128)
    p.add_argument("--global-layers", type=int, default=4)
    p.add_argument("--decoder-layers", type=int, default=3)
    p.add_argument("--hash-vocab", type=int, default=4096)
    p.add_argument("--bytes-per-patch", type=float, default=4.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=int, default=250)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()
    corpus = Corpus.load(args.data)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    cfg = model_config(args)
    model = BltModel(cfg)
    for name, child in model.named_children():
        depth = cfg.patcher.num_layers if name == "patcher" else cfg.global_model.num_layers + cfg.decoder.num_layers
        init_weights(child, depth)

    patcher_params = list(model.patcher.named_parameters())
    train_phase("entropy", model, lambda ids: next_byte_loss(model.patcher(ids), ids), patcher_params,
                corpus, args, args.entropy_steps, args.work_dir)
    model.patcher.requires_grad_(False)
    threshold = choose_threshold(model, corpus, args.seq_len, args.bytes_per_patch)
    model.config = cfg = dataclasses.replace(cfg, patching_threshold=threshold)
    print(f"threshold {threshold:.6f} for ~{args.bytes_per_patch} bytes per patch", flush=True)

    def blt_loss(ids: torch.Tensor) -> torch.Tensor:
        starts = patch_starts(model.entropies(ids), threshold)
        return next_byte_loss(model(ids, starts).logits, ids)

    blt_params = [(n, q) for n, q in model.named_parameters() if not n.startswith("patcher.")]
    train_phase("blt", model, blt_loss, blt_params, corpus, args, args.blt_steps, args.work_dir)
    model.eval()
    save_model(model, args.out)
    stats = held_out_stats(model, corpus, 1024)
    stats.update(threshold=threshold, wall_minutes=(time.time() - started) / 60,
                 parameters={name: sum(q.numel() for q in mod.parameters()) for name, mod in model.named_children()})
    (args.out / "training.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "stats": stats}, indent=2) + "\n")
    print(json.dumps(stats), flush=True)


if __name__ == "__main__":
    main()
