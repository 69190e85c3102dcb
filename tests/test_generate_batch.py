"""generate_batch (blt_runtime/generate.py): many prompts through one engine give each prompt what it gets
alone, in the prompts' order, with more prompts than the engine holds at once; logprobs and prompt scores
come with the results."""

import pytest
from factory import PARITY_TEXT

from blt_runtime import PromptTooLong, SamplingParams, generate, generate_batch, load_model
from blt_runtime.reference import reference_generate


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return load_model(hf_checkpoint("1b")[1])


def test_a_batch_gives_each_prompt_what_it_gets_alone(model):
    prompts = [PARITY_TEXT[:n] for n in (0, 5, 40, 130, 7, 300, 64)] + ["héllo, wörld"]
    params = [SamplingParams(max_bytes=20 + 7 * i, temperature=0.0, ignore_eos=True) for i in range(len(prompts))]
    params[3] = SamplingParams(max_bytes=50, temperature=0.9, seed=11, top_k=20)  # seeded: the same draws alone
    params[5] = SamplingParams(max_bytes=60, temperature=0.0, stop=[b"e"], ignore_eos=True)
    # 2 slots and a waiting queue of 3: the rest of the prompts wait in generate_batch's own list
    got = generate_batch(model, prompts, params, max_batch_size=2, max_queue=3)
    assert len(got) == len(prompts)
    for prompt, sp, g in zip(prompts, params, got):
        alone = generate(model, prompt, **{f: getattr(sp, f) for f in ("max_bytes", "temperature", "seed", "top_k",
                                                                      "stop", "ignore_eos")})
        assert (g.bytes, g.finish_reason, g.stop_reason) == (alone.bytes, alone.finish_reason, alone.stop_reason)
        assert (g.prompt_patch_lengths, g.completion_patch_lengths) == (alone.prompt_patch_lengths,
                                                                        alone.completion_patch_lengths)
    # and the greedy ones are what full recompute gives
    assert got[2].bytes == bytes(reference_generate(model, prompts[2], params[2]).generated)


def test_logprobs_prompt_scores_and_one_params_for_all(model):
    sp = SamplingParams(max_bytes=12, temperature=0.0, ignore_eos=True, logprobs=2, prompt_logprobs=1)
    got = generate_batch(model, ["First prompt", b"Second", "Third one"], sp)
    for prompt, g in zip([b"First prompt", b"Second", b"Third one"], got):
        # (up to 3 more bytes finish a character)
        assert 12 <= len(g.bytes) <= 15 and len(g.logprobs) == len(g.bytes) and len(g.prompt_logprobs) == len(prompt)
        # greedy: the best byte (the raw distribution's top may be EOS, which ignore_eos leaves out)
        assert all(len(top) == 2 and chosen <= top[0][1] + 1e-6 for chosen, top in g.logprobs)
    free = generate_batch(model, ["Stop "], SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True))[0]
    stop = free.bytes[30:33]  # a stop string the greedy text holds: it ends there, its bytes and logprobs dropped
    stopped = generate_batch(model, ["Stop "], SamplingParams(max_bytes=60, temperature=0.0, ignore_eos=True,
                                                             stop=[stop], logprobs=0))[0]
    end = free.bytes.index(stop)
    assert (stopped.bytes, stopped.stop_reason, stopped.finish_reason) == (free.bytes[:end], stop, "stop")
    assert len(stopped.logprobs) == end


def test_what_generate_batch_refuses(model):
    with pytest.raises(ValueError, match="2 SamplingParams for 3 prompts"):
        generate_batch(model, ["a", "b", "c"], [SamplingParams(), SamplingParams()])
    with pytest.raises(PromptTooLong, match="prompt 1"):
        generate_batch(model, ["ok", "x" * 100], SamplingParams(max_bytes=10), max_model_len=64)
    assert generate_batch(model, []) == []
