"""Settings: a flag beats its BLT_* env var, which beats the default; bad values stop with a message."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import httpx
import pytest
from scripted import ScriptedEngine
from serverkit import metric_value, metrics_text, wait_until

from server.settings import KERNELS, SHIPPED_MODEL, Settings, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_defaults_serve_the_shipped_model():
    s = load_settings([], environ={})
    assert s.model_dir == str(SHIPPED_MODEL) and s.model_name == "blt-shakespeare"
    assert (s.host, s.port, s.max_body_bytes, s.keepalive_interval) == ("127.0.0.1", 8000, 1 << 20, 15.0)
    assert s.api_key == () and s.allowed_origins == () and s.max_model_len is None


def test_flags_beat_env_and_env_beats_defaults():
    env = {"BLT_PORT": "9000", "BLT_API_KEY": "a,b", "BLT_MAX_QUEUE": "7", "BLT_METRICS_WITHOUT_KEY": "true",
           "BLT_MAX_MODEL_LEN": "1024"}
    s = load_settings(["--port", "9100", "--api-key", "c", "--api-key", "d,e", "/models/x"], environ=env)
    assert s.port == 9100 and s.api_key == ("c", "d", "e") and s.max_queue == 7 and s.metrics_without_key
    assert s.model_dir == "/models/x" and s.model_name == "x" and s.max_model_len == 1024
    assert not s.enforce_eager
    assert load_settings(["--enforce-eager"], environ={}).enforce_eager
    assert load_settings([], environ={"BLT_ENFORCE_EAGER": "1"}).enforce_eager


@pytest.mark.parametrize("argv", [["--port", "eighty"], ["--max-batch-size", "0"], ["--log-level", "loud"],
                                  ["--max-queue", "-1"], ["--kept-prefixes", "-1"], ["--kernels", "sdpa"],
                                  ["--jump-forward", "-2"], ["--prefill-chunk", "0"], ["--lookahead-rows", "-1"]])
def test_bad_values_exit_with_a_message(argv, capsys):
    with pytest.raises(SystemExit) as e:
        load_settings(argv, environ={})
    assert e.value.code == 2 and "blt-serve: error:" in capsys.readouterr().err


def test_kernel_choices_are_the_runtimes():
    """The server checks --kernels and --block-size without importing torch; its choices are the runtime's."""
    from blt_runtime.kernels import CHOICES
    from blt_runtime.paged_cache import PAGE
    from server.settings import PAGE as SETTINGS_PAGE

    assert SETTINGS_PAGE == PAGE

    assert KERNELS == CHOICES
    assert load_settings(["--kernels", "torch"], environ={}).kernels == "torch"
    assert load_settings([], environ={"BLT_KERNELS": "triton"}).kernels == "triton"


def test_uvicorn_runs_asyncio_loop_even_with_uvloop_installed():
    """uvicorn would pick uvloop where it is installed; blt-serve keeps asyncio's loop, which lets go
    of the GIL at every socket write, so the engine's thread gets it back promptly after each step
    (the measurement is in bench/RESULTS.md)."""
    from server.__main__ import uvicorn_config

    config = uvicorn_config(object(), load_settings(["--port", "8123", "--host", "0.0.0.0"], environ={}))
    assert (config.loop, config.host, config.port, config.lifespan) == ("asyncio", "0.0.0.0", 8123, "on")


def test_the_readme_lists_every_flag():
    table = [line for line in README.read_text().splitlines() if line.startswith("| `--")]
    for f in fields(Settings):
        if f.name != "model_dir":  # the positional argument
            flag = "`--" + f.name.replace("_", "-") + "`"
            assert any(flag in line.split(" | ")[0] for line in table), flag


def test_start_up_logs_what_the_caches_take_and_warns_where_a_full_context_would_not_fit(tiny, monkeypatch, caplog):
    from server.app import build_engine, log_caches

    caplog.set_level("INFO", logger="blt.server")
    engine = build_engine(load_settings([str(tiny), "--max-model-len", "4096"]))
    per_patch = engine.runner.global_bytes_per_patch()
    assert f"{1000 * per_patch / 2**20:.1f} MiB per 1,000 patches of a sequence" in caplog.text
    assert "lower --max-model-len" not in caplog.text  # on the CPU: no device memory to compare with
    monkeypatch.setattr("blt_runtime.device.free_memory", lambda device: 3 * 1024 * per_patch)
    log_caches(engine)  # 4096 bytes in patches of 4: 1,024 patches; room for 3 such sequences of the 16
    assert "holds 3 sequences of the full context at once" in caplog.text and "lower" not in caplog.text
    monkeypatch.setattr("blt_runtime.device.free_memory", lambda device: 1024 * per_patch - 1)
    log_caches(engine)  # one byte less than one such sequence takes
    assert "lower --max-model-len" in caplog.text


def test_vllms_names_for_the_same_settings():
    settings = load_settings(["--model", "some/dir", "--max-num-seqs", "48"], environ={})
    assert settings.model_dir == "some/dir" and settings.max_batch_size == 48
    assert load_settings(["some/dir", "--model", "some/dir"], environ={}).model_dir == "some/dir"
    with pytest.raises(SystemExit):
        load_settings(["one/dir", "--model", "other/dir"], environ={})
    assert load_settings(["--no-enable-prefix-caching"], environ={}).no_prompt_sharing
    assert not load_settings(["--enable-prefix-caching"], environ={"BLT_NO_PROMPT_SHARING": "1"}).no_prompt_sharing
    assert not load_settings([], environ={}).no_prompt_sharing
    assert load_settings(["--seed", "7"], environ={}).seed == 7 and load_settings([], environ={}).seed is None
    assert load_settings(["--max-num-batched-tokens", "2048"], environ={}).prefill_chunk == 2048


def test_a_vllm_command_line_runs_or_says_why_not(capsys):
    line = ["some/dir", "--trust-remote-code", "--enable-chunked-prefill", "--tensor-parallel-size", "1", "-pp", "1",
            "--distributed-executor-backend", "mp", "--disable-custom-all-reduce", "--block-size", "16",
            "--swap-space", "4", "--kv-cache-dtype", "auto", "--load-format", "safetensors"]
    assert load_settings(line, environ={}) == load_settings(["some/dir"], environ={})
    for flags, words in ((["-tp", "2"], "--tensor-parallel-size 2: blt-serve runs a model on one device"),
                         (["--data-parallel-size", "4"], "--data-parallel-size 4"),
                         (["--block-size", "32"], "--block-size 32: the global model's cache is in pages of 16"),
                         (["--kv-cache-dtype", "fp8"], "--kv-cache-dtype fp8: the caches are kept in the model's"),
                         (["-q", "awq"], "--quantization awq: blt-serve serves the weights as loaded"),
                         (["--load-format", "pt"], "--load-format pt: a model directory's weights are read from"),
                         (["--gpu-memory-utilization", "1.5"], "a fraction in (0, 1]"),
                         (["--kv-cache-memory-bytes", "lots"], "'lots' is not a valid number of bytes")):
        with pytest.raises(SystemExit):
            load_settings(flags, environ={})
        assert words in capsys.readouterr().err
    settings = load_settings(["--gpu-memory-utilization", "0.9", "--kv-cache-memory-bytes", "4GiB"], environ={})
    assert settings.gpu_memory_utilization == 0.9 and settings.kv_cache_memory_bytes == 4 * 2**30
    for raw, value in (("1073741824", 2**30), ("512MiB", 512 * 2**20), ("512MB", 512 * 10**6), ("2G", 2 * 10**9),
                       ("1e9", 10**9), ("300k", 300_000)):
        assert load_settings([], environ={"BLT_KV_CACHE_MEMORY_BYTES": raw}).kv_cache_memory_bytes == value, raw


def test_the_global_cache_takes_the_bytes_it_is_given_and_no_fewer_than_a_full_context(tiny, caplog):
    from blt_runtime.errors import ConfigError
    from server.app import build_engine

    caplog.set_level("INFO", logger="blt.server")
    engine = build_engine(load_settings([str(tiny), "--max-model-len", "1000", "--kv-cache-memory-bytes", "4MiB",
                                         "--gpu-memory-utilization", "0.5"], environ={}))
    pool = engine.runner.global_kv
    assert pool.fixed and engine.cache_bytes()["global"] == 4 * 2**20 // pool.page_bytes * pool.page_bytes
    assert "fixed" in caplog.text and "--kv-cache-memory-bytes gives the global model's cache its size" in caplog.text
    assert f"{(pool.num_pages - 1) * pool.page} patches for all sequences together" in caplog.text
    per_page = pool.page_bytes
    too_few = per_page * -(-1004 // pool.page)  # a page short of 1,004 patches, with the null page
    with pytest.raises(ConfigError, match=f"--kv-cache-memory-bytes {too_few}: .*fewer than one sequence of "
                                          "max_model_len 1,000 bytes may take .*or a max_model_len of 988 or less"):
        build_engine(load_settings([str(tiny), "--max-model-len", "1000", "--kv-cache-memory-bytes", str(too_few)],
                                   environ={}))


def test_a_share_of_the_gpu_is_ignored_on_a_cpu_with_a_warning(tiny, caplog):
    from server.app import build_engine

    caplog.set_level("INFO", logger="blt.server")
    engine = build_engine(load_settings([str(tiny), "--gpu-memory-utilization", "0.9"], environ={}))
    assert not engine.runner.global_kv.fixed
    assert "--gpu-memory-utilization 0.9: the model is not on a GPU, ignored" in caplog.text


def test_several_served_names():
    settings = load_settings(["--served-model-name", "blt-1b", "blt"], environ={})
    assert settings.model_name == "blt-1b" and settings.model_names == ("blt-1b", "blt")
    assert load_settings([], environ={"BLT_SERVED_MODEL_NAME": "a,b"}).model_names == ("a", "b")
    assert load_settings(["some/dir"], environ={}).model_names == ("dir",)


@pytest.mark.parametrize("flags", [[], ["--disable-log-requests"], ["--disable-log-stats"]])
def test_request_and_throughput_lines_can_be_turned_off(serve, caplog, flags):
    """vLLM's --disable-log-requests and --disable-log-stats: no line per finished request, no throughput
    summaries; the metrics count the request either way."""
    settings = load_settings(["--log-interval", "0", *flags], environ={})
    caplog.set_level("INFO", logger="blt.server")
    url, _ = serve(ScriptedEngine({}, default=b"ok"), log_interval=0.0,
                   disable_log_requests=settings.disable_log_requests, disable_log_stats=settings.disable_log_stats)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 5}, timeout=30)
    assert r.status_code == 200
    wait_until(lambda: metric_value(metrics_text(url), "blt_request_success_total", finish_reason="stop") == 1,
               what="the request counted")
    assert (" bytes in, " in caplog.text) == ("--disable-log-requests" not in flags)
    assert ("throughput:" in caplog.text) == ("--disable-log-stats" not in flags)


@pytest.mark.parametrize("disabled", [False, True])
def test_the_api_docs_can_be_turned_off(serve, disabled):
    """vLLM's --disable-fastapi-docs: /docs, /redoc and /openapi.json answer 404; the API itself does not change."""
    settings = load_settings(["--disable-fastapi-docs"] if disabled else [], environ={})
    url, _ = serve(ScriptedEngine({}, default=b"ok"), disable_fastapi_docs=settings.disable_fastapi_docs)
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(f"{url}{path}", timeout=30).status_code == (404 if disabled else 200), path
    assert httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2}, timeout=30).status_code == 200


def test_a_share_of_the_gpu_sizes_the_pool_at_start_up(tiny, monkeypatch, caplog):
    """--gpu-memory-utilization where the device's memory figures are those of a stand-in GPU of 64 MiB, 60 of
    them free before the model, and once the engine's warm-up and profile ran, 8 MiB fewer and its pool of
    pages: the new pool gets what is left of half of 64 MiB, 24 MiB; a share that was not free at start-up is
    refused with the flag named."""
    from blt_runtime import pool_size
    from blt_runtime.errors import ConfigError
    from server.app import build_engine

    profiled, real = [], pool_size.profile_chunk
    monkeypatch.setattr(pool_size, "profile_chunk", lambda engine: (profiled.append(engine), real(engine)))

    def memory_info(device):
        taken = 8 * 2**20 + profiled[-1].runner.global_kv.pool.nbytes if profiled else 0
        return 60 * 2**20 - taken, 64 * 2**20

    monkeypatch.setattr("blt_runtime.device.memory_info", memory_info)
    caplog.set_level("INFO", logger="blt.server")
    engine = build_engine(load_settings([str(tiny), "--max-model-len", "1000", "--gpu-memory-utilization", "0.5"],
                                        environ={}))
    pool = engine.runner.global_kv
    assert profiled == [engine] and pool.fixed
    assert 24 * 2**20 - pool.page_bytes < engine.cache_bytes()["global"] <= 24 * 2**20
    assert "for the global model's pages, fixed" in caplog.text and not engine.has_work()
    profiled.clear()
    with pytest.raises(ConfigError, match=r"--gpu-memory-utilization 0.99: the device had 0.06 GiB free at "
                                          r"start-up, less than gpu_memory_utilization 0.99"):
        build_engine(load_settings([str(tiny), "--gpu-memory-utilization", "0.99"], environ={}))
