"""The incremental engine equals full recompute, byte for byte, and batching changes nothing.

Random tiny models in fp32 (spec section 8: scaled heads, threshold from a gap in the entropies).
Generations run past the 512-byte window from prompts of 1, 100 and 700 bytes.
"""

import copy

import pytest
import torch
from enginekit import replay_full_recompute, run_engine
from factory import PARITY_TEXT

from blt_runtime import load_model
from blt_runtime.attention import band_attention
from blt_runtime.engine import Engine
from blt_runtime.generate import generate
from blt_runtime.paged_cache import PAGE
from blt_runtime.reference import reference_generate, reference_patch_lengths
from blt_runtime.sampling import SamplingParams, ranked
from blt_runtime.scheduler import PromptTooLong, QueueFull, Sequence
from blt_runtime.tokenizer import EOS_ID, OFFSET, encode


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    return {s: load_model(hf_checkpoint(s)[1]) for s in ("1b", "7b", "first_layer", "mixed_heads")}


@pytest.mark.parametrize("structure, prompt_len", [("1b", 1), ("1b", 100), ("1b", 700), ("7b", 1), ("7b", 700)])
def test_greedy_equals_full_recompute(models, structure, prompt_len):
    model = models[structure]
    prompt = PARITY_TEXT[:prompt_len - 1]  # BOS + prompt_len - 1 bytes = prompt_len positions
    engine = Engine(model)
    engine.add_request("g", prompt, SamplingParams(max_bytes=600, temperature=0.0, ignore_eos=True, logprobs=1))
    seq = engine.sequences["g"]
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    generated = b"".join(o.new_bytes for o in outputs)
    assert len(generated) >= 600 and len(seq.ids) > 600  # past the 512 window
    ids = replay_full_recompute(model, prompt, seq.params, seq.seed, generated,
                                engine_logprobs=[o.logprobs for o in outputs])
    prompt_lengths, completion_lengths = seq.patch_lengths()
    lengths = prompt_lengths + completion_lengths
    assert lengths == reference_patch_lengths(model, ids)
    # many patches (global steps), not one per byte; greedy text may repeat, and repeats make long patches
    # (seed 89's model: 601 positions in 34)
    assert len(lengths) >= 20 and len(ids) / len(lengths) > 1.5, "generated text should be cut into realistic patches"
    # One global step per completed patch. The last byte is never run through the encoder (nothing
    # follows it), so the patch holding it is the one patch without a global step.
    assert seq.num_patches == outputs[-1].usage.global_steps == len(lengths) - 1


@pytest.mark.parametrize("structure", ["1b", "first_layer", "mixed_heads"])
def test_greedy_equals_literal_full_recompute(models, structure):
    """The byte-by-byte full-recompute generator itself, across the 512 window."""
    model = models[structure]
    params = SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True)
    prompt = PARITY_TEXT[:490]
    got = generate(model, prompt, max_bytes=40, ignore_eos=True)
    want = reference_generate(model, prompt, params)
    assert got.bytes == bytes(want.generated) and len(want.ids) > 512


def test_chunked_prefill_equals_whole_prefill(models):
    model = models["first_layer"]
    params = SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True)
    prompt = PARITY_TEXT[:700]
    whole = run_engine(Engine(model, prefill_chunk=4096), {"a": (prompt, params)})["a"]
    chunked = run_engine(Engine(model, prefill_chunk=37), {"a": (prompt, params)})["a"]
    assert whole[0] == chunked[0]
    replay_full_recompute(model, prompt, params, 0, whole[0])
    assert whole[1].usage == chunked[1].usage


@pytest.mark.parametrize("at_once", [True, False])
@pytest.mark.parametrize("prompt_bytes, chunks", [(1, 1), (64, 1), (65, 2), (128, 2), (129, 3)])
def test_prefill_chunks_count_prompt_bytes(models, prompt_bytes, chunks, at_once):
    """prefill_chunk counts prompt bytes (BOS rides with the first chunk); the first byte is sampled in the
    step of the last chunk (first_byte_at_once, a CPU's default) or in the step after (CUDA's)."""
    engine = Engine(models["first_layer"], prefill_chunk=64, first_byte_at_once=at_once)
    engine.add_request("a", PARITY_TEXT[:prompt_bytes], SamplingParams(max_bytes=3, temperature=0.0, ignore_eos=True))
    steps = 0
    while not engine.sequences["a"].generated:
        engine.step()
        steps += 1
    assert steps == chunks + (not at_once)


def test_default_prefill_chunk_depends_on_the_device(models):
    """512 prompt bytes a step on a CPU, 2,048 on CUDA (measured there: bench/RESULTS.md, "GPU"); the one
    asked for, on either."""
    from blt_runtime import engine as engine_module

    assert Engine(models["first_layer"]).scheduler.prefill_chunk == engine_module.PREFILL_CHUNK_CPU == 512
    assert Engine(models["first_layer"], prefill_chunk=100).scheduler.prefill_chunk == 100
    assert engine_module.PREFILL_CHUNK_CUDA == 2048


def test_batched_equals_alone(models):
    """The same request gives the same bytes alone and among 7 others joining at different steps."""
    model = models["1b"]
    params = SamplingParams(max_bytes=120, temperature=0.0, ignore_eos=True)
    target = {"target": (PARITY_TEXT[:50], params)}
    alone = run_engine(Engine(model, max_batch_size=8), target)["target"]
    others = {f"o{i}": (PARITY_TEXT[i * 37:i * 37 + 13 * i + 1], SamplingParams(max_bytes=40 + 15 * i, temperature=0.0))
              for i in range(7)}
    joins = {f"o{i}": (i * 5) % 23 for i in range(7)} | {"target": 3}
    batched = run_engine(Engine(model, max_batch_size=8, prefill_chunk=64), {**target, **others}, joins)
    assert batched["target"][0] == alone[0]
    assert batched["target"][1].usage == alone[1].usage
    for rid, (prompt, p) in others.items():
        replay_full_recompute(model, prompt, p, 0, batched[rid][0], batched[rid][1].finish_reason == "stop"
                              and batched[rid][1].stop_reason is None)


def test_seeded_sampling_reproducible_alone_and_batched(models):
    model = models["7b"]
    params = SamplingParams(max_bytes=80, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    alone = run_engine(Engine(model), {"s": (b"Seeded ", params)})["s"][0]
    again = run_engine(Engine(model), {"s": (b"Seeded ", params)})["s"][0]
    crowd = {f"c{i}": (PARITY_TEXT[:i * 20], SamplingParams(max_bytes=50, temperature=1.0)) for i in range(5)}
    batched = run_engine(Engine(model), {"s": (b"Seeded ", params), **crowd}, {"s": 2})["s"][0]
    assert alone == again == batched
    replay_full_recompute(model, b"Seeded ", params, params.seed, alone)
    other_seed = run_engine(Engine(model), {"s": (b"Seeded ", SamplingParams(**{**params.__dict__, "seed": 99}))})
    assert other_seed["s"][0] != alone


def test_an_engines_seed_seeds_the_requests_sent_without_one(models):
    """Engine(seed=) (blt-serve --seed): unseeded requests added in the same order draw the same bytes in two
    engines of one seed, and other bytes under another seed."""
    unseeded = {f"u{i}": (PARITY_TEXT[i * 30:i * 30 + 40], SamplingParams(max_bytes=40, temperature=1.0,
                                                                         ignore_eos=True)) for i in range(3)}

    def texts(seed):
        return {rid: out for rid, (out, _) in run_engine(Engine(models["1b"], seed=seed), unseeded).items()}
    assert texts(5) == texts(5) != texts(6)


def test_abort_frees_slot(models):
    engine = Engine(models["1b"], max_batch_size=2)
    engine.add_request("a", b"abc", SamplingParams(max_bytes=500, temperature=0.0, ignore_eos=True))
    engine.add_request("b", b"def", SamplingParams(max_bytes=500, temperature=0.0, ignore_eos=True))
    engine.add_request("c", b"ghi", SamplingParams(max_bytes=5, temperature=0.0))
    for _ in range(3):
        engine.step()
    assert engine.slots.num_free == 0 and engine.num_waiting == 1
    assert engine.abort("a") and not engine.abort("a") and not engine.abort("unknown")
    assert engine.slots.num_free == 1
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished and aborted[0].finish_reason == "abort"
    assert engine.num_running == 2  # "c" took the freed slot
    engine.abort("b")
    while engine.has_work():
        engine.step()
    assert engine.slots.num_free == 2 and not engine.sequences


def test_empty_prompt_and_zero_bytes(models):
    model = models["1b"]
    empty = generate(model, b"", max_bytes=20, ignore_eos=True)
    assert len(empty.bytes) >= 20 and empty.prompt_patch_lengths[0] == 1
    zero = run_engine(Engine(model), {"z": (b"hello", SamplingParams(max_bytes=0))})["z"]
    assert zero[0] == b"" and zero[1].finish_reason == "length" and zero[1].usage.generated_bytes == 0
    # its prompt is prefilled, so it reports the patches the full forward cuts, and its state is left for a
    # prompt that begins with it (a client warming a prefix up)
    prompt, engine = PARITY_TEXT[:300], Engine(model)
    zero = run_engine(engine, {"z": (prompt, SamplingParams(max_bytes=0))})["z"][1].usage
    assert zero.prompt_patches == len(reference_patch_lengths(model, encode(prompt))) > 30
    assert zero.completion_patches == 0
    after = run_engine(engine, {"next": (prompt + b" and more", SamplingParams(max_bytes=4))})["next"][1].usage
    assert after.shared_prompt_bytes == len(prompt)


def test_prompt_longer_than_context_is_refused(models):
    engine = Engine(models["1b"], max_model_len=256)
    with pytest.raises(PromptTooLong, match="256"):
        engine.add_request("long", b"x" * 300, SamplingParams(max_bytes=1))
    with pytest.raises(PromptTooLong):
        engine.add_request("sum", b"x" * 200, SamplingParams(max_bytes=100))
    engine.add_request("fits", b"x" * 200, SamplingParams(max_bytes=55))


def test_queue_bound(models):
    """One slot plus two waiting: a burst of three is taken before any step, the fourth refused;
    once the first is admitted into the slot, the queue holds two again."""
    engine = Engine(models["1b"], max_batch_size=1, max_queue=2)
    for i in range(3):
        engine.add_request(str(i), b"q", SamplingParams(max_bytes=5))
    with pytest.raises(QueueFull):
        engine.add_request("3", b"q", SamplingParams(max_bytes=5))
    engine.step()
    assert engine.last_admitted == ["0"] and engine.num_waiting == 2
    with pytest.raises(QueueFull):
        engine.add_request("3", b"q", SamplingParams(max_bytes=5))


def test_stops(models):
    model = models["1b"]
    free = generate(model, b"Stop test ", max_bytes=60, ignore_eos=True).bytes
    stop = free[20:23]
    cut = free.index(stop)
    stopped = generate(model, b"Stop test ", max_bytes=60, ignore_eos=True, stop=[stop, b"\xff\xfe never"])
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop and stopped.bytes == free[:cut]
    longer = generate(model, b"Stop test ", max_bytes=10, ignore_eos=True, stop=[free[:30]])
    assert longer.finish_reason == "length" and longer.bytes.startswith(free[:10])


def test_max_bytes_finishes_a_character(models):
    """If the limit falls inside a multi-byte character, up to 3 more bytes complete it."""
    seq = Sequence("u", [1], SamplingParams(max_bytes=2), seed=0)
    for b in "a😀".encode():
        seq.accept(b + 4, 1000)
        if seq.finish_reason:
            break
    assert bytes(seq.generated) == "a😀".encode() and seq.finish_reason == "length"
    broken = Sequence("v", [1], SamplingParams(max_bytes=1), seed=0)
    for b in b"\xf0\x9f\x98\x98\x98":
        broken.accept(b + 4, 1000)
        if broken.finish_reason:
            break
    assert len(broken.generated) == 4


def test_eos_ends_generation(models):
    """Without ignore_eos, a sampled EOS finishes with reason "stop" and adds no byte."""
    model = copy.deepcopy(models["1b"])
    # A random model may all but never emit EOS: make it as likely as the byte this one emits most.
    plain = run_engine(Engine(model), {"p": (b"", SamplingParams(max_bytes=200, temperature=1.0, seed=0,
                                                                   ignore_eos=True))})["p"][0]
    with torch.no_grad():
        model.lm_head.weight[EOS_ID].copy_(model.lm_head.weight[OFFSET + max(set(plain), key=plain.count)])
    for seed in range(20):
        params = SamplingParams(max_bytes=400, temperature=1.0, seed=seed)
        got, final = run_engine(Engine(model), {"e": (b"", params)})["e"]
        if final.finish_reason == "stop":
            break
    assert final.finish_reason == "stop" and final.stop_reason is None and len(got) < 400
    replay_full_recompute(model, b"", params, seed, got, ended_by_eos=True)


@pytest.mark.parametrize("static", [False, True])
def test_min_bytes_holds_back_eos_and_stops(models, static):
    """min_bytes (vLLM's min_tokens): EOS is masked and stop strings are not matched before that many
    bytes; after, both end a generation as usual; as full recompute with the same rule does."""
    model = copy.deepcopy(models["1b"])
    prompt = PARITY_TEXT[:40]
    plain = generate(model, prompt, max_bytes=150, ignore_eos=True).bytes
    with torch.no_grad():  # EOS ties with the commonest byte, and wins the tie (a lower id): greedy stops early
        model.lm_head.weight[EOS_ID].copy_(model.lm_head.weight[OFFSET + max(set(plain), key=plain.count)])
    early, final = run_engine(Engine(model, static=static), {"e": (prompt, SamplingParams(max_bytes=150,
                                                                                        temperature=0.0))})["e"]
    assert final.finish_reason == "stop" and final.stop_reason is None and len(early) < 100
    least = len(early) + 10
    kinds = [SamplingParams(max_bytes=150, temperature=0.0, min_bytes=least),
             SamplingParams(max_bytes=150, temperature=0.0, min_bytes=least, stop=[plain[2:4], plain[least:least + 2]],
                            ignore_eos=True),
             SamplingParams(max_bytes=150, temperature=1.0, min_bytes=least, seed=3)]
    got = run_engine(Engine(model, static=static), {str(i): (prompt, p) for i, p in enumerate(kinds)})
    for i, p in enumerate(kinds):
        want = reference_generate(model, prompt, p)
        out, final = got[str(i)]
        assert len(out) >= least and out == bytes(want.generated), i
        assert (final.finish_reason, final.stop_reason) == (want.finish_reason, want.stop_reason), i
    assert got["0"][1].finish_reason == "stop" and got["0"][0] == plain[:len(got["0"][0])]
    assert got["1"][1].stop_reason == plain[least:least + 2]  # not the earlier one
    with pytest.raises(ValueError, match="min_bytes"):
        SamplingParams(max_bytes=5, min_bytes=6)


def test_logprobs(models):
    engine = Engine(models["1b"])
    out = run_engine(engine, {"l": (b"log", SamplingParams(max_bytes=5, temperature=0.0, logprobs=3))})
    engine.add_request("l2", b"log", SamplingParams(max_bytes=3, temperature=0.0, logprobs=3))
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    for o in outputs:
        chosen, top = o.logprobs
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        assert top[0][0] == o.new_bytes[0] + 4 and abs(top[0][1] - chosen) < 1e-6  # greedy picks the top byte
    assert 5 <= out["l"][1].usage.generated_bytes <= 8  # up to 3 more to finish a character


def test_ranked_lists_ties_as_greedy_chooses():
    """Equal values in id order, the same whatever n: the first listed is argmax's pick."""
    logp = torch.full((2, 260), -9.0)
    logp[0, [200, 10, 57]] = -0.5
    logp[1, [259, 4]] = -1.0
    values, ids = ranked(logp, 3)
    assert ids.tolist() == [[10, 57, 200], [4, 259, 0]] and values[1, :2].tolist() == [-1.0, -1.0]
    assert ranked(logp, 1)[1][:, 0].tolist() == logp.argmax(dim=-1).tolist() == [10, 4]


@pytest.mark.parametrize("static", [False, True])
def test_logprobs_list_the_greedy_byte_first_at_a_tie(models, static):
    """A byte whose logit always equals another's (two equal rows of the output head): greedy takes the
    lower id, and logprobs, at any n, list it before the other; so does echo's scoring of the same
    text. (They rank the raw distribution, where a special id may come first: greedy never picks one.)"""
    model = copy.deepcopy(models["1b"])
    plain = run_engine(Engine(model), {"p": (b"tie", SamplingParams(max_bytes=60, temperature=0.0,
                                                                      ignore_eos=True))})["p"][0]
    # a higher byte it never emitted: equal to `common`, it loses every tie, so greedy's bytes stay the same.
    # Its row is a multiple of 64 rows after the other's, and both are in the head's first 256 rows: a product's
    # columns of the same place in the kernels' blocks are summed alike, and a block's tail may be summed
    # otherwise (the last of 260 rows, a rounding above its twin, won the ties on an AVX-512 CPU)
    def twin_of(byte: int) -> int | None:
        return max((b for b in range(byte + 64, 256 - OFFSET, 64) if b not in plain), default=None)

    common = max((b for b in set(plain) if twin_of(b) is not None), key=plain.count)
    twin = OFFSET + twin_of(common)
    with torch.no_grad():
        model.lm_head.weight[twin].copy_(model.lm_head.weight[OFFSET + common])
    engine = Engine(model, static=static)
    for n in (1, 3):
        got, _ = run_engine(engine, {f"t{n}": (b"tie", SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True,
                                                                      logprobs=n))})[f"t{n}"]
        assert got == plain
    outputs = []
    engine.add_request("o", b"tie", SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True, logprobs=6))
    while engine.has_work():
        outputs += engine.step()
    tied = [o for o in outputs if o.new_bytes and o.new_bytes[0] == common]
    assert tied
    for o in tied:
        listed = [(i, lp) for i, lp in o.logprobs[1] if i >= OFFSET][:2]  # the bytes among them
        assert [i for i, _ in listed] == [OFFSET + common, twin] and listed[0][1] == listed[1][1]
    scored = model.prompt_logprobs(b"tie" + plain, 6)[3:]
    assert [next(i for i, _ in top if i >= OFFSET) for _, top in scored] == [OFFSET + b for b in plain]


@pytest.mark.parametrize("static", [False, True])
def test_logit_bias_equals_full_recompute(models, static):
    """A logit bias moves greedy and sampled choices as full recompute with the same bias does (the
    byte greedy emits most banned, two others favoured), alone and batched with requests without one,
    and before them in the same slot (whose row is cleared, or a penalty would read it); logprobs stay
    those of the model's own distribution."""
    model = models["1b"]
    prompt = PARITY_TEXT[:50]
    plain = generate(model, prompt, max_bytes=120, ignore_eos=True).bytes
    banned = max(set(plain), key=plain.count)
    favoured = [b for b in b" xA" if b != banned][:2]
    bias = {banned: -100.0, favoured[0]: 3.0, favoured[1]: 1.5}
    kinds = {"greedy": SamplingParams(max_bytes=120, temperature=0.0, ignore_eos=True, logit_bias=bias, logprobs=1),
             "sampled": SamplingParams(max_bytes=120, temperature=0.9, seed=5, ignore_eos=True, logit_bias=bias),
             "plain": SamplingParams(max_bytes=120, temperature=0.0, ignore_eos=True),
             "penalised": SamplingParams(max_bytes=120, temperature=0.0, ignore_eos=True, frequency_penalty=0.5)}
    one_slot = Engine(model, max_batch_size=1, static=static)
    alone = {k: run_engine(one_slot, {k: (prompt, p)})[k][0] for k, p in kinds.items()}  # in that order
    engine = Engine(model, static=static)
    batched = run_engine(engine, {k: (prompt, p) for k, p in kinds.items()}, {"sampled": 2, "plain": 1, "penalised": 3})
    engine.add_request("lp", prompt, kinds["greedy"])
    outputs = []
    while engine.has_work():
        outputs += engine.step()
    for k, p in kinds.items():
        assert batched[k][0] == alone[k]
        replay_full_recompute(model, prompt, p, p.seed or 0, alone[k],
                              engine_logprobs=[o.logprobs for o in outputs] if k == "greedy" else None)
    assert alone["plain"] == plain and banned not in alone["greedy"] + alone["sampled"]


def test_logit_bias_is_checked():
    assert SamplingParams(logit_bias={"7": 1, 3: -2.5}).logit_bias == ((3, -2.5), (7, 1.0))
    for bad in ({256: 1.0}, {-1: 1.0}, {3: 101.0}, {3: float("nan")}, {"x": 1.0}, [(3, 1.0), (3, 2.0)]):
        with pytest.raises(ValueError, match="logit_bias"):
            SamplingParams(logit_bias=bad)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(max_bytes=-1),
                                 dict(repetition_penalty=0), dict(repetition_penalty=5e-324), dict(logprobs=21),
                                 dict(stop=[""])])
def test_bad_sampling_params(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**bad)


def test_penalties_change_the_distribution(models):
    model = models["1b"]
    plain = generate(model, b"aaaa", max_bytes=40, ignore_eos=True).bytes
    penalised = generate(model, b"aaaa", max_bytes=40, ignore_eos=True, repetition_penalty=3.0,
                         frequency_penalty=2.0, presence_penalty=2.0)
    want = reference_generate(model, b"aaaa", SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True,
                                                            repetition_penalty=3.0, frequency_penalty=2.0,
                                                            presence_penalty=2.0))
    assert penalised.bytes == bytes(want.generated) != plain
    assert torch.tensor(list(penalised.bytes)).unique().numel() > torch.tensor(list(plain)).unique().numel()


def test_cpu_layout_keeps_every_weight(hf_checkpoint, tmp_path):
    """The engine fuses projections and stores wide weights as (in, out) on the CPU: every parameter
    keeps its values and shape, and save_model still writes the checkpoint that was loaded."""
    from blt_runtime.weights import save_model

    _, directory = hf_checkpoint("7b")
    model = load_model(directory)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Engine(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert after["lm_head.weight"].stride() == (1, after["lm_head.weight"].shape[0])  # stored (in, out)
    assert after["local_decoder.layers.0.mlp.down_proj.weight"].is_contiguous()  # narrow: left as it was
    save_model(model, tmp_path / "again")
    again = load_model(tmp_path / "again").state_dict()
    assert all(torch.equal(before[k], again[k]) for k in before)


def test_cache_bytes_say_what_the_caches_take(models):
    """Engine.cache_bytes: the local models' part stays as it was; the global model's pool of pages grows with
    the patches of all sequences together (not every slot times the longest), `global_bytes_per_patch` one
    sequence's patch, and stays."""
    model = copy.deepcopy(models["1b"])
    object.__setattr__(model.config, "patching_threshold", -1.0)  # every byte a patch
    engine = Engine(model, max_batch_size=2)
    before, per_patch = engine.cache_bytes(), engine.runner.global_bytes_per_patch()
    rows, cfg = 2 + 4 + 1, model.config.global_model  # slots, kept prefixes, scratch
    assert per_patch == 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * model.dtype.itemsize
    assert before["global"] == (1 + rows * 64 // PAGE) * PAGE * per_patch and before["local"] > 0
    requests = {"long": (PARITY_TEXT * 2, SamplingParams(max_bytes=4, temperature=0.0)),
                "short": (PARITY_TEXT[200:300], SamplingParams(max_bytes=4, temperature=0.0))}
    results = run_engine(engine, requests)
    after = engine.cache_bytes()
    assert after["local"] == before["local"]
    patches = {rid: final.usage.prompt_patches + final.usage.completion_patches for rid, (_, final) in results.items()}
    capacity, rest = divmod(after["global"], per_patch)
    assert rest == 0 and patches["long"] > 2000
    # grown to hold both at once, at most doubling, and less than two rows of the longest would take
    assert sum(patches.values()) <= capacity < 2 * (sum(patches.values()) + 2 * PAGE)
    assert capacity < 2 * patches["long"]
    # what each finished request ran through the models stays, for a later prompt that begins with it
    held = sum(-(-final.usage.global_steps // PAGE) for _, final in results.values())
    assert engine.runner.global_kv.pages_held() == held


def test_a_chunk_of_more_than_twice_the_window_is_attended_a_window_at_a_time(models, monkeypatch):
    """A prompt prefilled in two chunks of 1,151 and 1,150 positions (the local models' window is 512), the
    second after a full ring, goes through attention.band_attention, and its bytes are those of small
    chunks and of full recompute."""
    import blt_runtime.runner as runner

    calls = []
    monkeypatch.setattr(runner, "band_attention", lambda *a: calls.append(1) or band_attention(*a))
    model, prompt = models["1b"], (PARITY_TEXT * 2)[:2300]
    params = SamplingParams(max_bytes=40, temperature=0.0, ignore_eos=True)
    whole = run_engine(Engine(model, prefill_chunk=1150), {"a": (prompt, params)})["a"]
    assert calls  # the entropy model's, the encoder's and the decoder's layers
    chunked = run_engine(Engine(model, prefill_chunk=128), {"a": (prompt, params)})["a"]
    assert whole[0] == chunked[0] and whole[1].usage == chunked[1].usage
    replay_full_recompute(model, prompt, params, 0, whole[0])


@pytest.mark.parametrize("static", [False, True])
def test_first_bytes_at_once_change_no_output(models, static):
    """first_byte_at_once (a CPU's default) samples a prompt's first byte in the step that finishes its
    prefill: every request's bytes, logprobs, prompt scores and usage are what they are a step later
    (CUDA's way), for greedy and seeded requests, the n choices of a prompt (followers that fork at its
    end), a prompt that is scored only (max_bytes 0) and requests that join while others run; and the
    first bytes come a step sooner."""
    model = models["1b"]
    greedy = dict(temperature=0.0, ignore_eos=True)
    requests = {"g": (PARITY_TEXT[:300], SamplingParams(max_bytes=30, logprobs=2, **greedy)),
                "s": (PARITY_TEXT[100:180], SamplingParams(max_bytes=30, temperature=0.9, seed=4)),
                "n0": (PARITY_TEXT[400:520], SamplingParams(max_bytes=20, temperature=0.8, seed=1)),
                "n1": (PARITY_TEXT[400:520], SamplingParams(max_bytes=20, temperature=0.8, seed=2)),
                "scored": (PARITY_TEXT[600:700], SamplingParams(max_bytes=0, prompt_logprobs=1, **greedy)),
                "late": (PARITY_TEXT[50:90], SamplingParams(max_bytes=10, prompt_logprobs=1, **greedy))}
    runs, firsts = {}, {}
    for at_once in (True, False):
        engine = Engine(model, max_batch_size=6, prefill_chunk=128, static=static, first_byte_at_once=at_once)
        out, first, step = {rid: [] for rid in requests}, {}, 0
        while engine.has_work() or step < 5:
            for rid, (prompt, params) in requests.items():
                if step == (4 if rid == "late" else 0):
                    engine.add_request(rid, prompt, params)
            for o in engine.step():
                out[o.request_id].append((o.new_bytes, o.logprobs, o.prompt_logprobs, o.finished,
                                          o.finish_reason, o.usage))
                if o.new_bytes:
                    first.setdefault(o.request_id, step)
            step += 1
        runs[at_once], firsts[at_once] = out, first
    assert runs[True] == runs[False]
    assert runs[True]["n1"][-1][5].shared_prompt_bytes == 120  # it forked from n0 at its prompt's end
    assert all(firsts[True][rid] == firsts[False][rid] - 1 for rid in ("g", "s", "n0", "n1", "late"))


def test_priority_orders_the_waiting_queue(models):
    """Lower priority values leave the waiting queue first, equal ones in the order they came; a running request
    more urgent than all of them is not stopped for them (test_preemption.py: one less urgent is)."""
    engine = Engine(models["1b"], max_batch_size=1, share_prompts=False)
    params = SamplingParams(max_bytes=3, temperature=0.0, ignore_eos=True)
    engine.add_request("first", b"a", params, priority=-2)
    engine.step()
    for name, priority in (("late", 5), ("later", 5), ("urgent", -2), ("normal", 0)):
        engine.add_request(name, name.encode(), params, priority=priority)
    admitted, finished = [], []
    while engine.has_work():
        finished += [o.request_id for o in engine.step() if o.finished]
        admitted += engine.last_admitted
    assert admitted == ["urgent", "normal", "late", "later"]
    assert finished == ["first", "urgent", "normal", "late", "later"]
