"""The engine thread: owns the model and runs continuous batching.

HTTP handlers `submit` a `GenerationRequest` into a bounded queue and receive `Update`s through the
request's `emit` callback. Between two decode steps the engine admits queued requests (prefilled as
one group and merged into the running batch), drops rows whose client went away, and removes rows
the moment they finish. Nothing but this thread touches the model.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import logging
import queue
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from loraflow.core.fusion_spec import FusionSpec
from loraflow.serve.batching import DecodeBatch, PartialPrefill
from loraflow.serve.config import ServeConfig
from loraflow.serve.detokenize import IncrementalDetokenizer
from loraflow.serve.metrics import Metrics

logger = logging.getLogger(__name__)
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


class Overloaded(Exception):
    """The queue is full; the handler answers 429."""


class ShuttingDown(Overloaded):
    """The engine is stopping and takes no new requests; the handler answers 503."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes. temperature 0 is greedy; `seed` makes sampling reproducible.

    max_tokens 0 only scores the prompt (with `GenerationRequest.prompt_logprobs`). The penalties are
    OpenAI's: logit -= frequency_penalty * count + presence_penalty * (count > 0), counting the tokens
    this request generated so far; they change which token is chosen, never the reported log-probs.
    """

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability under the request's fusion (log-softmax of the raw logits, fp32),
    with the `top` most likely tokens at that position as (token, log-probability), best first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class RequestError(Exception):
    """A request's own failure (not the server's), with a message that may be sent to its client."""


def client_error(e: BaseException) -> str:
    """What a client is told about `e`: a RequestError's message; for anything else no exception text (it may
    hold paths or internals), only that the server's log has it."""
    if isinstance(e, RequestError):
        return str(e)
    return "internal error while generating; the server's log has the details"


@dataclass
class Update:
    """What the engine tells a handler: new text, and on the last update why the request finished.

    finish_reason: None while running, "stop" (end of sequence or a stop string), "length"
    (max_tokens or the model length), "cancelled" or "error" (then `error` says what).
    """

    text: str
    completion_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[TokenLogprob] | None = None  # the tokens generated since the last update (when asked)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # first update only; the first token has none


@dataclass
class GenerationRequest:
    """One request as the engine sees it; `emit` must be thread-safe and must not block."""

    prompt_ids: list[int]
    fusion: FusionSpec
    params: SamplingParams
    emit: Callable[[Update], None]
    id: str = ""
    logprobs: int | None = None  # report each generated token's log-prob with this many top alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)

    def cancel(self) -> None:
        """Ask the engine to drop this request (its client went away); its slot frees at the next step."""
        self.cancelled.set()


class _Row:
    """A request in the running batch: its generated tokens and text, what was already sent, its sampler."""

    def __init__(self, request: GenerationRequest, seed: int, device: torch.device, detokenizer) -> None:
        self.request = request
        self.tokens: list[int] = []
        self.detok = detokenizer
        self.sent = 0  # characters of the decoded text already emitted
        self.next_token: int | None = None
        self.logprobs: list[TokenLogprob] = []  # not yet emitted
        self.prompt_logprobs: list[TokenLogprob | None] | None = None  # until the first emit
        self.generator = None
        if request.params.temperature > 0:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(seed)


class Engine:
    """Continuous batching over one model, one thread.

    Args:
        model: a LoraFlowModel (or any causal LM that `DecodeBatch` can drive).
        tokenizer: decodes the output; the engine keeps its own copy (fast tokenizers are not
            safe to share across threads).
        max_batch_size: rows decoding together.
        max_queue: requests waiting for a row; `submit` raises Overloaded beyond it.
        max_model_len: prompt plus output tokens per row.
        prefill_chunk: a longer prompt is prefilled this many tokens per step, the running rows decoding a
            token between its chunks (a long prompt does not stall them), as vLLM's chunked prefill does.
        seed: seeds the per-request samplers of requests that bring no seed.
        metrics: where counts go (a fresh `Metrics` if None).
    """

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 max_model_len: int = 2048, prefill_chunk: int = ServeConfig.prefill_chunk, seed: int = 0,
                 metrics: Metrics | None = None) -> None:
        if prefill_chunk < 2:
            raise ValueError(f"prefill_chunk must be >= 2, got {prefill_chunk}")
        self.model = model
        self.prefill_chunk = prefill_chunk
        self.tokenizer = copy.deepcopy(tokenizer)
        self.max_batch_size = max_batch_size
        self.max_model_len = max_model_len
        self.metrics = metrics or Metrics()
        self.metrics.queue_length.set_function(self.queue_length)
        self._queue: queue.Queue[GenerationRequest] = queue.Queue(maxsize=max_queue)
        self._seeds = random.Random(seed)
        self._seed_lock = threading.Lock()
        self._batch = DecodeBatch(model)
        self._rows: list[_Row] = []
        self._partials: list[tuple[_Row, PartialPrefill]] = []  # long prompts being prefilled, first first
        self._eos = _eos_ids(model, tokenizer)
        probe = IncrementalDetokenizer(self.tokenizer)  # what the tokenizer needs, found once, not per request
        self._detok = {"cleanup": probe.cleanup, "byte_ids": probe.byte_ids}
        self._device = next(model.parameters()).device
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- handler side
    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; raises Overloaded when the queue is full, ShuttingDown once stopping."""
        if self._stop.is_set():
            raise ShuttingDown("the server is shutting down")
        if request.params.seed is None and request.params.temperature > 0:
            with self._seed_lock:
                seed = self._seeds.randrange(2**63)
            request.params = dataclasses.replace(request.params, seed=seed)
        try:
            self._queue.put_nowait(request)
        except queue.Full:
            raise Overloaded(f"the server is busy: {self._queue.maxsize} requests are already waiting") from None

    @property
    def max_queue(self) -> int:
        """Requests that may wait for a row."""
        return self._queue.maxsize

    def queue_length(self) -> int:
        return self._queue.qsize()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self.running:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="loraflow-engine", daemon=True)
        self._thread.start()

    def request_stop(self) -> None:
        """Ask the loop to end (safe from a signal handler); it ends every open request as cancelled."""
        self._stop.set()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step and join it; every open request ends as cancelled."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the engine thread did not stop within %s s", timeout)
                return
            self._thread = None
        self._finish_all("cancelled", None)  # requests queued after the loop ended

    def _loop(self) -> None:
        busy = False
        while not self._stop.is_set():
            try:
                worked = self.step(wait=0.05)
            except Exception as e:  # a failed decode step: fail its rows, keep serving the others
                logger.exception("decode step failed")
                self._fail_rows(client_error(e))
                worked = True
            if busy and not worked:
                release_free_memory()  # idle again: the caches of the finished requests go back to the system
            busy = worked
        self._finish_all("cancelled", None)

    # ----------------------------------------------------------------- one scheduling step
    @torch.inference_mode()
    def step(self, wait: float = 0.0) -> bool:
        """Admit waiting requests, run one decode step for the batch; False when there was nothing to do.

        Args:
            wait: seconds to block for a request when the batch is empty (0: return at once).
        """
        self._drop_cancelled()
        admitted = self._admit(wait if not (self._rows or self._partials) else 0.0)
        long = [r for r in admitted if len(r.request.prompt_ids) > self.prefill_chunk]
        plain = [r for r in admitted if r not in long and r.request.prompt_logprobs is None]
        if plain:
            self._prefill(plain)
        for row in admitted:  # every position's log-probabilities: only for the rows that asked, one at a time
            if row not in long and row.request.prompt_logprobs is not None:
                self._prefill([row])
        self._partials += [(row, PartialPrefill(row.request.prompt_ids, row.request.fusion)) for row in long]
        if self._partials:
            self._prefill_chunk()  # one chunk of one long prompt per step; the running rows decode below
        if not self._rows:
            return bool(admitted) or bool(self._partials)
        logits = self._batch.decode([row.next_token for row in self._rows])
        self.metrics.decode_batch_size.observe(len(self._rows))
        self._consume(logits, self._rows)
        return True

    def _admit(self, wait: float) -> list[_Row]:
        rows = []
        while len(self._rows) + len(self._partials) + len(rows) < self.max_batch_size:
            try:
                request = self._queue.get(timeout=wait) if wait > 0 and not rows else self._queue.get_nowait()
            except queue.Empty:
                break
            if request.cancelled.is_set():
                self._emit(request, Update("", 0, "cancelled"))
                continue
            detokenizer = IncrementalDetokenizer(self.tokenizer, **self._detok)
            rows.append(_Row(request, request.params.seed or 0, self._device, detokenizer))
        return rows

    def _prefill(self, rows: list[_Row]) -> None:
        scored = [r.request.prompt_logprobs is not None for r in rows]
        try:
            prompts = [r.request.prompt_ids for r in rows]
            out = self._batch.prefill(prompts, [r.request.fusion for r in rows], every_position=any(scored))
            logits, every = out if any(scored) else (out, None)
            for i, row in enumerate(rows):
                if scored[i]:
                    row.prompt_logprobs = _prompt_logprobs(every[i], prompts[i], row.request.prompt_logprobs)
            del every
        except Exception as e:  # the running batch is untouched: only the newcomers fail
            logger.exception("prefill failed")
            for row in rows:
                self._emit(row.request, Update("", 0, "error", client_error(e)))
            return
        self._rows.extend(rows)
        self.metrics.prompt_tokens.inc(sum(len(r.request.prompt_ids) for r in rows))
        self._consume(logits, rows, offset=len(self._rows) - len(rows))

    def _prefill_chunk(self) -> None:
        """The next chunk of the first long prompt; once it is complete, its row joins the running batch."""
        row, part = self._partials[0]
        scored = row.request.prompt_logprobs is not None
        try:
            start = part.done
            out = self._batch.prefill_chunk(part, self.prefill_chunk, every_position=scored)
            logits, every = out if scored else (out, None)
            if scored:
                if start == 0:
                    row.prompt_logprobs = [None]
                row.prompt_logprobs += _next_token_logprobs(every[0], part.prompt, start, row.request.prompt_logprobs)
            del every
        except Exception as e:  # the running batch is untouched: only this row fails
            logger.exception("chunked prefill failed")
            self._partials.pop(0)
            self._emit(row.request, Update("", 0, "error", client_error(e)))
            return
        if logits is None:
            return
        self._partials.pop(0)
        self._rows.append(row)
        self.metrics.prompt_tokens.inc(len(part.prompt))
        self._consume(logits, [row], offset=len(self._rows) - 1)

    def _consume(self, logits: torch.Tensor, rows: Sequence[_Row], offset: int = 0) -> None:
        """Sample one token per row, emit text, drop the rows that finished.

        Each row is handled alone: a row whose logits are not finite, or whose sampling or stop
        handling raises, ends with an error while the others go on exactly as they would without it.
        """
        finite = torch.isfinite(logits).all(dim=-1).tolist()
        # counted before any row's text is emitted: a client that reads /metrics after its response must
        # find its tokens there
        self.metrics.generation_tokens.inc(sum(r.request.params.max_tokens > 0 for r in rows))
        finished = set()
        for i, row in enumerate(rows):
            try:
                if not finite[i]:
                    raise RequestError("the model's logits for this request are not finite (inf or nan)")
                if row.request.params.max_tokens == 0:  # the prompt alone was asked for
                    self._send(row, Update("", 0, "length"))
                    done = True
                else:
                    token = sample_row(logits[i], row.request.params, row.generator, row.tokens)
                    if row.request.logprobs is not None:
                        row.logprobs.append(_logprob(logits[i], token, row.request.logprobs))
                    done = self._advance(row, token)
            except Exception as e:
                if isinstance(e, RequestError):
                    logger.warning("request %s failed: %s", row.request.id, e)
                else:
                    logger.exception("request %s failed", row.request.id)
                self._emit(row.request, Update("", len(row.tokens), "error", client_error(e)))
                done = True
            if done:
                finished.add(offset + i)
        if finished:
            self._batch.keep([i for i in range(len(self._rows)) if i not in finished])
            self._rows = [r for i, r in enumerate(self._rows) if i not in finished]
        self.metrics.batch_size.set(len(self._rows))

    def _advance(self, row: _Row, token: int) -> bool:
        """Record one token; emit the text that is safe to send; True when the row is done."""
        params = row.request.params
        row.tokens.append(token)
        reason = None
        if token in self._eos and not params.ignore_eos:
            reason = "stop"  # the end-of-sequence token is no text
        else:
            row.detok.add(token)
            if len(row.tokens) >= params.max_tokens or len(row.request.prompt_ids) + len(row.tokens) >= self.max_model_len:
                reason = "length"
        if reason:  # a character cut by the end of generation is no text (as generate_texts)
            row.detok.finish()
        text = row.detok.text
        cut = _find_stop(text, params.stop, row.sent)
        if cut is not None:
            text, reason = text[:cut], "stop"
        safe = len(text) if reason else min(_safe_length(text, params.stop), row.detok.stable)
        delta = text[row.sent:safe] if safe > row.sent else ""
        row.sent = max(row.sent, safe)
        row.next_token = token
        if delta or reason:
            self._send(row, Update(delta, len(row.tokens), reason))
        return reason is not None

    def _send(self, row: _Row, update: Update) -> None:
        """Emit `update` with the log-probs the row gathered since its last one."""
        if row.request.logprobs is not None:
            update.logprobs, row.logprobs = row.logprobs, []
        if row.prompt_logprobs is not None:
            update.prompt_logprobs, row.prompt_logprobs = row.prompt_logprobs, None
        self._emit(row.request, update)

    def _drop_cancelled(self) -> None:
        for row, part in [p for p in self._partials if p[0].request.cancelled.is_set()]:
            self._partials.remove((row, part))
            self._emit(row.request, Update("", 0, "cancelled"))
        gone = [i for i, r in enumerate(self._rows) if r.request.cancelled.is_set()]
        if not gone:
            return
        for i in gone:
            self._emit(self._rows[i].request, Update("", len(self._rows[i].tokens), "cancelled"))
        self._batch.keep([i for i in range(len(self._rows)) if i not in gone])
        self._rows = [r for i, r in enumerate(self._rows) if i not in gone]
        self.metrics.batch_size.set(len(self._rows))

    def _fail_rows(self, error: str) -> None:
        """End every running row with `error` and start from an empty batch."""
        for row in self._rows:
            self._emit(row.request, Update("", len(row.tokens), "error", error))
        self._rows = []
        self._batch = DecodeBatch(self.model)
        self.metrics.batch_size.set(0)

    def _finish_all(self, reason: str, error: str | None) -> None:
        """End every running and queued request (at shutdown)."""
        for row in self._rows + [row for row, _ in self._partials]:
            self._emit(row.request, Update("", len(row.tokens), reason, error))
        self._rows, self._partials = [], []
        self._batch = DecodeBatch(self.model)
        while True:
            try:
                request = self._queue.get_nowait()
            except queue.Empty:
                break
            self._emit(request, Update("", 0, reason, error))
        self.metrics.batch_size.set(0)

    @staticmethod
    def _emit(request: GenerationRequest, update: Update) -> None:
        try:
            request.emit(update)
        except RuntimeError:  # the handler's event loop is gone: nobody is listening any more
            request.cancel()


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence) -> list[int]:
    """One token per row of (B, vocab) logits, each row sampled alone (see `sample_row`)."""
    return [sample_row(logits[i], p, g) for i, (p, g) in enumerate(zip(params, generators))]


def sample_row(logits: torch.Tensor, params: SamplingParams, generator, generated: Sequence[int] = ()) -> int:
    """One token from one row's (vocab,) logits: argmax where temperature is 0, else top-p sampling
    with the row's own generator, so a row's token never depends on the other rows of the batch.
    The penalties count `generated`, the tokens the row produced so far."""
    if generated and (params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.as_tensor(list(generated), device=logits.device), minlength=logits.shape[-1])
        counts = counts[: logits.shape[-1]].to(logits.dtype)
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    if params.temperature == 0 or generator is None:
        return int(logits.argmax().item())
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if not bool(torch.isfinite(probs).all()):  # torch.multinomial does not always refuse them
        raise RequestError("the sampling probabilities are not finite (inf or nan)")
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        outside = sorted_p.cumsum(0) - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        sorted_p[outside] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def _logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """`token`'s log-probability under (vocab,) logits, with the `top` best alternatives."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return TokenLogprob(token, float(logprobs[token]), _top(logprobs, top))


def _top(logprobs: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    values, ids = logprobs.topk(min(k, logprobs.shape[-1]))
    return tuple(zip(ids.tolist(), values.tolist()))


def release_free_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc's malloc_trim; elsewhere nothing): the KV
    caches of long requests are large, and glibc keeps what they freed, so the process would stay at its
    peak resident size after them."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim from the process's own symbols, looked up once; None elsewhere."""
    import ctypes

    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def _next_token_logprobs(logits: torch.Tensor, prompt: Sequence[int], start: int, top: int) -> list[TokenLogprob]:
    """The log-probabilities of prompt[start + 1 : start + n + 1] from the (n, vocab) logits of positions
    start .. start + n - 1 (one chunk of a chunked prefill)."""
    targets = list(prompt[start + 1:start + 1 + logits.shape[0]])
    logprobs = torch.log_softmax(logits[:len(targets)].float(), dim=-1)
    index = torch.as_tensor(targets, dtype=torch.long, device=logprobs.device).view(-1, 1)
    chosen = logprobs.gather(1, index).view(-1).tolist()
    return [TokenLogprob(int(t), lp, _top(logprobs[i], top)) for i, (t, lp) in enumerate(zip(targets, chosen))]


def _prompt_logprobs(logits: torch.Tensor, prompt: Sequence[int], top: int) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it; (T, vocab) logits are the
    prompt's positions (right-aligned: the last len(prompt) rows); the first token has none."""
    return [None, *_next_token_logprobs(logits[logits.shape[0] - len(prompt):], prompt, 0, top)]


def _find_stop(text: str, stops: Sequence[str], sent: int) -> int | None:
    """Where the earliest stop string starts in `text` (searching only what may contain a new one)."""
    hits = []
    for s in stops:
        at = text.find(s, max(0, sent - len(s) + 1))
        if at >= 0:
            hits.append(at)
    return min(hits) if hits else None


def _safe_length(text: str, stops: Sequence[str]) -> int:
    """How much of `text` can be sent: hold back an unfinished UTF-8 character and any tail that may
    still grow into a stop string. Linear in the stop strings' lengths (`_partial_stop`)."""
    end = len(text)
    while end > 0 and text[end - 1] == "\ufffd":
        end -= 1
    hold = max((_partial_stop(text, end, s) for s in stops), default=0)
    return end - hold


def _partial_stop(text: str, end: int, stop: str) -> int:
    """The length of the longest proper prefix of `stop` that `text[:end]` ends with: Knuth-Morris-Pratt's
    matcher run over the last len(stop) - 1 characters, O(len(stop)) (trying each prefix would be quadratic)."""
    if len(stop) < 2 or end == 0 or text[end - 1] not in stop:
        return 0
    start = text.find(stop[0], max(0, end - len(stop) + 1), end)
    if start < 0:
        return 0
    fail = _borders(stop)
    q = 0
    for ch in text[start:end]:
        while q and (q == len(stop) or stop[q] != ch):
            q = fail[q - 1]
        if stop[q] == ch:
            q += 1
    return q if q < len(stop) else fail[-1]


@functools.lru_cache(maxsize=256)
def _borders(stop: str) -> tuple[int, ...]:
    """KMP's failure function: [i] is the length of the longest proper border of stop[:i + 1]."""
    fail = [0] * len(stop)
    k = 0
    for i in range(1, len(stop)):
        while k and stop[i] != stop[k]:
            k = fail[k - 1]
        if stop[i] == stop[k]:
            k += 1
        fail[i] = k
    return tuple(fail)


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(tokenizer, "eos_token_id", None),
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(getattr(getattr(model, "model", None), "generation_config", None), "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(t) for t in source)
    return ids
