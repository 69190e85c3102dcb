"""A scripted engine: the Engine's interface, emitting chosen bytes one step at a time.

Lets the HTTP layer be tested byte by byte without a model: the script for a prompt is the bytes
it will generate; stops, max_bytes and the UTF-8 finish use the runtime's own Sequence.accept.
Prompt scores (prompt_logprobs) come with a request's first output, as the engine's do: byte b of
the prompt, id b, gets the log-probability -b/100.
"""

from __future__ import annotations

import threading
import time

from blt_runtime import PromptTooLong, QueueFull, SamplingParams, StepOutput, Usage
from blt_runtime.scheduler import Sequence
from blt_runtime.tokenizer import OFFSET, encode


class ScriptedEngine:
    model = None

    def __init__(self, scripts: dict[bytes, bytes], max_batch_size: int = 4, max_queue: int = 8,
                 max_model_len: int = 4096, step_delay: float = 0.005, default: bytes = b"x" * 10_000):
        self.scripts, self.default = scripts, default
        self.max_batch_size, self.max_queue, self.max_model_len = max_batch_size, max_queue, max_model_len
        self.step_delay = step_delay
        self.running: list[Sequence] = []
        self.waiting: list[Sequence] = []
        self.aborted: list[Sequence] = []
        self.last_admitted: list[str] = []
        self.last_preempted: list[str] = []  # never: running requests are not preempted here
        self.forced_bytes = 0  # nor does a guide force bytes
        self.admitted: list[str] = []  # every request admitted, in order
        self.prompt_of: dict[str, bytes] = {}  # request id -> its prompt
        self.steps = 0
        self.paused = threading.Event()  # set: running sequences do not advance (they stay "in flight")

    def add_request(self, request_id: str, prompt: bytes, params: SamplingParams | None = None,
                    priority: int = 0) -> None:
        params = params or SamplingParams()
        ids = encode(prompt)
        if len(ids) + params.max_bytes > self.max_model_len:
            raise PromptTooLong("too long for the scripted engine")
        free = self.max_batch_size - len(self.running)
        if len(self.waiting) >= self.max_queue + free:
            raise QueueFull(f"the waiting queue is full ({self.max_queue} requests)")
        seq = Sequence(request_id, ids, params, 0, priority=priority)
        self.prompt_of[request_id] = prompt
        seq.script = self.scripts.get(prompt, self.default)
        # as the engine's scheduler: before every waiting one of a higher priority value
        at = next((i for i, w in enumerate(self.waiting) if w.priority > priority), len(self.waiting))
        self.waiting.insert(at, seq)

    def abort(self, request_id: str) -> bool:
        for group in (self.running, self.waiting):
            for seq in group:
                if seq.request_id == request_id:
                    group.remove(seq)
                    seq.finish_reason = "abort"
                    self.aborted.append(seq)
                    return True
        return False

    def has_work(self) -> bool:
        return bool(self.running or self.waiting or self.aborted)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def capacity(self) -> int:
        return self.max_batch_size + self.max_queue

    def cache_bytes(self) -> dict[str, int]:
        """A model with no caches."""
        return {"local": 0, "global": 0}

    def fail_at(self, step: int) -> None:
        """The `step`-th call of step() from now raises, as a kernel that fails would; the others run."""
        real, calls = self.step, [0]

        def step_or_fail():
            calls[0] += 1
            if calls[0] == step:
                raise RuntimeError("a kernel failed")
            return real()

        self.step = step_or_fail

    def step(self) -> list[StepOutput]:
        time.sleep(self.step_delay)
        self.steps += 1
        outputs = [self._final(seq, b"") for seq in self.aborted]
        self.aborted.clear()
        self.last_admitted = []
        while self.waiting and len(self.running) < self.max_batch_size:
            seq = self.waiting.pop(0)
            self.last_admitted.append(seq.request_id)
            self.admitted.append(seq.request_id)
            if seq.params.max_bytes == 0:  # as the engine does: finished on admission
                seq.finish_reason = "length"
                outputs.append(self._scored(seq, self._final(seq, b"")))
            else:
                self.running.append(seq)
        if self.paused.is_set():
            return outputs
        for seq in list(self.running):
            n = len(seq.generated)
            if n >= len(seq.script):
                seq.finish_reason = "stop"  # the script ran out: like EOS
                self.running.remove(seq)
                out = self._final(seq, b"")
                outputs.append(self._scored(seq, out) if n == 0 else out)
                continue
            byte = seq.script[n]
            seq.accept(byte + OFFSET, self.max_model_len)
            lp = (-0.5, [(byte + OFFSET, -0.5), (2, -1.5)]) if seq.params.logprobs is not None else None
            if seq.finish_reason is not None:
                self.running.remove(seq)
                out = self._final(seq, b"" if seq.finish_reason == "error" else bytes([byte]), lp)
            else:
                out = StepOutput(seq.request_id, bytes([byte]), n % 4 == 0, lp, False)
            outputs.append(self._scored(seq, out) if n == 0 else out)
        return outputs

    @staticmethod
    def _scored(seq: Sequence, out: StepOutput) -> StepOutput:
        top = seq.params.prompt_logprobs
        if top is not None:
            out.prompt_logprobs = [(-b / 100, [(b, -b / 100), (2, -3.0)][:top]) for b in seq.ids[1:seq.prompt_len]]
        return out

    def _final(self, seq: Sequence, new: bytes, lp=None) -> StepOutput:
        usage = Usage(seq.prompt_len - 1, len(seq.generated), 1, (len(seq.generated) + 3) // 4,
                      (len(seq.generated) + 3) // 4)
        return StepOutput(seq.request_id, new, bool(new) and (len(seq.generated) - 1) % 4 == 0, lp, True,
                          seq.finish_reason, seq.stop_reason, usage, error=seq.error, error_code=seq.error_code)
