"""The one thread that owns the engine, and its bridge to asyncio.

HTTP handlers never touch the engine or torch: they put requests, aborts and calls into an inbox;
the worker thread takes them between engine steps, runs `engine.step()` while there is work, and
hands each request's outputs to its asyncio queue on the event loop (one `call_soon_threadsafe`
per step). Per-request timing and the engine-side metrics are kept here too, and one log line is
written per finished sequence, plus a throughput summary every few seconds while busy.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from blt_runtime import SamplingParams, StepOutput

from .metrics import Metrics

log = logging.getLogger("blt.server")


@dataclass(frozen=True)
class Failure:
    """Put in a request's queue instead of a StepOutput when the engine failed or shut it down."""

    request_id: str
    message: str
    status: int = 500
    code: str = "internal_error"


@dataclass
class Tracked:
    queue: asyncio.Queue
    arrival: float
    prompt_bytes: int
    admitted: float | None = None  # when it first took a cache slot
    first_byte: float | None = None
    last_byte: float | None = None
    open_patch: int | None = None  # bytes of the completion's newest patch so far
    abort_reason: str | None = None  # why the server (not the client) aborted it


@dataclass
class Summary:
    generated: int = 0
    prompt: int = 0
    since: float = field(default_factory=time.monotonic)


class EngineWorker:
    def __init__(self, engine, metrics: Metrics, log_interval: float = 5.0, log_requests: bool = True,
                 log_stats: bool = True):
        """`log_requests`: a line per finished request; `log_stats`: a throughput line every `log_interval`
        seconds while busy."""
        self.engine, self.metrics, self.log_interval = engine, metrics, log_interval
        self.log_requests, self.log_stats = log_requests, log_stats
        self._inbox: queue.Queue = queue.Queue()
        self._tracked: dict[str, Tracked] = {}  # worker thread only
        self.open: set[str] = set()  # event-loop side: sequences whose last output is not delivered yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._summary = Summary()
        self._forced = 0  # engine.forced_bytes when the last step was counted

    # ------------------------------------------------------------------ event-loop side
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="blt-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._inbox.put(("wake",))
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    async def submit(self, requests: list[tuple[str, bytes, SamplingParams]], out: asyncio.Queue,
                     priority: int = 0) -> None:
        """Add sequences that share one output queue (and a priority: Engine.add_request); all are added or
        none (the engine's error for the first refused one is raised: QueueFull, PromptTooLong or ValueError)."""
        done = self._loop.create_future()
        self._inbox.put(("add", requests, out, time.monotonic(), done, priority))
        await done  # the ids are in self.open before any of their outputs can be delivered

    def abort(self, request_ids, reason: str | None = None) -> None:
        """Abort sequences (thread-safe, cheap); each still gets its final output."""
        self._inbox.put(("abort", list(request_ids), reason))

    async def call(self, fn):
        """Run `fn()` on the worker thread between engine steps; return its result."""
        done = self._loop.create_future()
        self._inbox.put(("call", fn, done))
        return await done

    async def drain(self, timeout: float) -> bool:
        """Wait until every open sequence has finished; True if they did within `timeout`."""
        deadline = time.monotonic() + timeout
        while self.open and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self.open

    def _resolve(self, future: asyncio.Future, result=None, error: BaseException | None = None) -> None:
        def settle():
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        self._loop.call_soon_threadsafe(settle)

    def _deliver(self, batch: list[tuple[asyncio.Queue, StepOutput | Failure]]) -> None:
        for out_queue, item in batch:
            out_queue.put_nowait(item)
            if isinstance(item, Failure) or item.finished:
                self.open.discard(item.request_id)

    # ------------------------------------------------------------------ worker thread
    def _run(self) -> None:
        while not self._stopping:
            try:
                self._take_inbox(block=not self.engine.has_work())
                if self.engine.has_work():
                    self._step()
                self._maybe_log_summary()
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure
                log.exception("engine worker failed; failing every request in flight")
                self._fail_all("internal error in the engine")

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, item) -> None:
        kind = item[0]
        if kind == "add":
            self._add(*item[1:])
        elif kind == "abort":
            _, ids, reason = item
            for rid in ids:
                tracked = self._tracked.get(rid)
                if tracked is not None and self.engine.abort(rid):
                    tracked.abort_reason = tracked.abort_reason or reason
        elif kind == "call":
            _, fn, done = item
            try:
                self._resolve(done, fn())
            except Exception as e:  # noqa: BLE001 - handed to the caller
                self._resolve(done, error=e)

    def _add(self, requests, out: asyncio.Queue, arrival: float, done: asyncio.Future, priority: int) -> None:
        added = []
        try:
            for rid, prompt, params in requests:
                self.engine.add_request(rid, prompt, params, priority)
                added.append(rid)
                self._tracked[rid] = Tracked(out, arrival, len(prompt))
        except Exception as e:  # noqa: BLE001 - QueueFull, PromptTooLong, ValueError go to the handler
            for rid in added:
                self._tracked.pop(rid, None)
                self.engine.abort(rid)
            self._resolve(done, error=e)
            return

        def accepted():  # on the loop, ahead of the deliveries of any later step
            self.open.update(added)
            if not done.done():
                done.set_result(None)
        self._loop.call_soon_threadsafe(accepted)

    def _step(self) -> None:
        m, engine = self.metrics, self.engine
        batch = engine.num_running
        outputs = engine.step()
        now = time.monotonic()
        for rid in engine.last_admitted:
            tracked = self._tracked.get(rid)
            if tracked is not None:
                tracked.admitted = now
                m.of(m.queue_time).observe(now - tracked.arrival)
        if engine.last_preempted:
            m.of(m.preemptions).inc(len(engine.last_preempted))
            for_pages = getattr(engine, "last_preempted_for_pages", [])
            urgent = [rid for rid in engine.last_preempted if rid not in for_pages]
            if urgent:
                log.info("preempted for more urgent requests: %s", ", ".join(urgent))
            if for_pages:
                log.warning("preempted where the global model's cache ran out of device memory (%.1f GiB of "
                            "pages): %s; they go on when a sequence leaves. Fewer slots or a shorter "
                            "--max-model-len preempt less", engine.cache_bytes()["global"] / 2**30,
                            ", ".join(for_pages))
        if batch:
            m.of(m.batch_size).observe(batch)
        deliveries, generated = [], 0
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:  # refused as part of a group, or already failed
                continue
            if out.new_bytes:
                generated += len(out.new_bytes)
                self._observe_byte(tracked, out, now)
            if out.finished:
                self._tracked.pop(out.request_id)
                self._observe_finish(tracked, out, now)
                if tracked.abort_reason == "shutdown":
                    m.of(m.failed, reason="shutdown").inc()
                    out = Failure(out.request_id, "the server is shutting down; the request was stopped", 503,
                                  "shutting_down")
                elif out.finish_reason == "error":  # the engine could not go on with it (out of memory, NaN)
                    log.warning("request %s failed: %s", out.request_id, out.error)
                    code = out.error_code or "engine_error"
                    m.of(m.failed, reason=code).inc()
                    out = Failure(out.request_id, out.error or "the engine stopped the request", 500, code)
            deliveries.append((tracked.queue, out))
        forced, self._forced = engine.forced_bytes - self._forced, engine.forced_bytes
        if forced:
            m.of(m.forced_bytes).inc(forced)
        if generated:  # one increment per step, not per byte
            m.of(m.generation_bytes).inc(generated)
            self._summary.generated += generated
        m.of(m.running).set(engine.num_running)
        m.of(m.waiting).set(engine.num_waiting)
        m.of(m.cache_usage).set(engine.num_running / engine.max_batch_size)
        if deliveries:
            self._loop.call_soon_threadsafe(self._deliver, deliveries)

    def _observe_byte(self, t: Tracked, out: StepOutput, now: float) -> None:
        m = self.metrics
        if t.first_byte is None:
            t.first_byte = now
            m.of(m.ttfb).observe(now - t.arrival)
        else:
            m.of(m.inter_byte).observe(now - t.last_byte)
        t.last_byte = now
        if out.patch_start and t.open_patch:
            m.of(m.patch_length).observe(t.open_patch)
        t.open_patch = 1 if out.patch_start or t.open_patch is None else t.open_patch + 1

    def _observe_finish(self, t: Tracked, out: StepOutput, now: float) -> None:
        m, u = self.metrics, out.usage
        m.of(m.e2e).observe(now - t.arrival)
        if t.admitted is not None and t.first_byte is not None:  # vLLM's phases of a request that generated
            m.of(m.prefill_time).observe(t.first_byte - t.admitted)
            m.of(m.decode_time).observe(t.last_byte - t.first_byte)
            m.of(m.inference_time).observe(t.last_byte - t.admitted)
        if out.finish_reason in ("stop", "length"):
            m.of(m.success, finish_reason=out.finish_reason).inc()
        if u is None:
            return
        m.of(m.prompt_bytes).inc(u.prompt_bytes)
        m.of(m.prompt_bytes_shared).inc(u.shared_prompt_bytes)
        m.of(m.patches, phase="prompt").inc(u.prompt_patches)
        m.of(m.patches, phase="generation").inc(u.completion_patches)
        m.of(m.global_steps).inc(u.global_steps)
        m.of(m.request_prompt_bytes).observe(u.prompt_bytes)
        m.of(m.request_generation_bytes).observe(u.generated_bytes)
        self._summary.prompt += u.prompt_bytes
        ttfb = (t.first_byte - t.arrival) if t.first_byte else float("nan")
        span = (t.last_byte - t.first_byte) if t.first_byte and t.last_byte else 0.0
        rate = (u.generated_bytes - 1) / span if span > 0 else float("nan")
        if self.log_requests:
            log.info("request %s: %d bytes in, %d out, %d+%d patches, ttfb %.3f s, %.1f bytes/s, finish %s",
                     out.request_id, u.prompt_bytes, u.generated_bytes, u.prompt_patches, u.completion_patches, ttfb,
                     rate, out.finish_reason if t.abort_reason is None else t.abort_reason)

    def _maybe_log_summary(self) -> None:
        s, now = self._summary, time.monotonic()
        if now - s.since < self.log_interval:
            return
        if (s.generated or s.prompt) and self.log_stats:
            dt = now - s.since
            log.info("throughput: %.1f generated bytes/s, %.1f prompt bytes/s, %d running, %d waiting",
                     s.generated / dt, s.prompt / dt, self.engine.num_running, self.engine.num_waiting)
        self._summary = Summary()

    def _fail_all(self, message: str) -> None:
        deliveries = []
        for rid, tracked in list(self._tracked.items()):
            try:
                self.engine.abort(rid)
            except Exception:  # noqa: BLE001 - best effort while failing
                log.exception("could not abort %s", rid)
            deliveries.append((tracked.queue, Failure(rid, message)))
            self.metrics.of(self.metrics.failed, reason="engine_error").inc()
        self._tracked.clear()
        try:
            while self.engine.has_work():  # collect the aborts' final outputs, delivered already as failures
                self.engine.step()
        except Exception:  # noqa: BLE001
            log.exception("engine could not settle after a failure")
        if deliveries:
            self._loop.call_soon_threadsafe(self._deliver, deliveries)
