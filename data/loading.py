"""Dataset loading: the hub when reachable, else the sample shipped in data/; rows normalised.

Every dataset form (open-ended verifiable questions, SFT triples, multiple choice) becomes the same
row dict, so rollout, rewards and SFT never look at source-specific column names:

    {"id": str, "question": str, "answer": str, "reference": str, "cot": str,
     "options": dict[str, str] | None, "kind": "open" | "mcq" | "sft"}

Bad rows are skipped and counted by reason rather than raised, because one malformed row among
40k should not end a run; only an empty result is an error.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import ssl
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import datasets
import numpy as np
from jinja2.exceptions import TemplateError

from conf.schema import DataConfig

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 2.0


class DataUnavailable(RuntimeError):
    """The hub dataset could not be loaded; the message says how to use the shipped sample instead."""


def _hub_reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the hub endpoint answers a TLS handshake, decided within `timeout` seconds in total.

    The datasets library retries for ~30 s before giving up offline, so a cheap probe decides first.
    A bare TCP connect is not enough: sandboxes with a transparent egress proxy accept every connect,
    while a verified TLS handshake for the hub's hostname only completes with the real server. The
    probe runs in a daemon thread because a hanging DNS lookup ignores socket timeouts.
    """
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # only the proxy can tell; a failed download still falls back to the sample
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    ok: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout) as sock:
                if url.scheme != "http":
                    ssl.create_default_context().wrap_socket(sock, server_hostname=host).close()
            ok.append(True)
        except (OSError, ValueError):  # ssl.SSLError is an OSError
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def resolve_source(cfg: DataConfig) -> str:
    """The source `load_examples` will try first: "hub" or "local" (resolves source=auto)."""
    if cfg.source != "auto":
        return cfg.source
    offline = any(
        os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )  # the values huggingface_hub accepts
    return "hub" if cfg.hub_id and not offline and _hub_reachable() else "local"


def _read_local(path: Path) -> tuple[list[dict[str, Any] | None], Counter]:
    """Rows of a JSON-lines file, read with the datasets library like the hub data.

    Unparseable lines come back as None (already counted as "bad_json") so that ids stay row indices.
    """
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist (data.local_path is relative to the project root)")
    try:
        return list(datasets.load_dataset("json", data_files=str(path), split="train")), Counter()
    except Exception as e:
        # The json builder rejects the whole file for one malformed line; read line by line instead
        # so that the bad lines are counted like any other bad row.
        log.warning("datasets could not parse %s (%s); reading it line by line", path, type(e).__name__)
    rows: list[dict[str, Any] | None] = []
    skipped: Counter = Counter()
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            skipped["bad_json"] += 1
            rows.append(None)
            continue
        rows.append(obj if isinstance(obj, dict) else {})  # a non-object counts as missing fields
    return rows, skipped


def _read_hub(cfg: DataConfig) -> list[dict[str, Any]]:
    try:
        ds = datasets.load_dataset(cfg.hub_id, cfg.hub_config, split=cfg.hub_split)
    except Exception as e:
        first = (str(e).splitlines() or [""])[0][:300]
        raise DataUnavailable(
            f"could not load {cfg.hub_id!r} (config {cfg.hub_config!r}, split {cfg.hub_split!r}) from the "
            f"Hugging Face hub: it is unreachable or the dataset is unavailable ({type(e).__name__}: {first}). "
            f"Use data.source=local to train on the shipped sample {cfg.local_path}."
        ) from None
    return list(ds)


def _text(row: dict[str, Any], key: str | None, required: bool) -> tuple[str, str | None]:
    """(stripped text, skip reason or None). Optional fields that are absent or null become ""."""
    value = row.get(key) if key is not None else None
    if value is None:
        return "", ("missing_field" if required else None)
    if not isinstance(value, str):
        return "", ("bad_type" if required else None)
    if required and not value.strip():
        return "", "empty_text"
    return value.strip(), None


def _options(value: Any) -> dict[str, str] | None:
    """Options as {letter: text}, or None when malformed.

    Null entries are dropped: Arrow stores 4- and 5-option rows in one struct, filling the gaps with None.
    """
    if not isinstance(value, dict):
        return None
    opts = {str(k).strip(): v for k, v in value.items() if v is not None}
    if not opts or any(not isinstance(v, str) or not v.strip() for v in opts.values()):
        return None
    return {k: v.strip() for k, v in sorted(opts.items())}


def normalise_row(raw: dict[str, Any], index: int, cfg: DataConfig) -> tuple[dict[str, Any] | None, str | None]:
    """One source row -> (normalised row, None), or (None, skip reason)."""
    sft = cfg.kind == "sft"
    question, bad = _text(raw, cfg.question_field, True)
    if bad:
        return None, bad
    # an SFT row needs its chain of thought and response; elsewhere they are optional extras
    cot, bad = _text(raw, cfg.cot_field, sft)
    if bad:
        return None, bad
    reference, bad = _text(raw, cfg.reference_field, sft)
    if bad:
        return None, bad
    answer, bad = (reference, None) if sft else _text(raw, cfg.answer_field, True)
    if bad:
        return None, bad
    options = None
    if cfg.kind == "mcq":
        raw_options = raw.get(cfg.options_field) if cfg.options_field is not None else None
        options = _options(raw_options)
        if options is None:
            return None, "missing_field" if raw_options is None else "bad_options"
        answer = answer.upper()
        if answer not in options:
            return None, "bad_answer_letter"
        # the model sees the options; option texts from exam scrapes carry stray line breaks
        lines = "\n".join(f"{k}. {' '.join(v.split())}" for k, v in options.items())
        question = f"{question}\n\n{lines}"
        reference = reference or options[answer]
    row = {
        "id": str(index),
        "question": question,
        "answer": answer,
        "reference": reference,
        "cot": cot,
        "options": options,
        "kind": cfg.kind,
    }
    return row, None


def load_examples(cfg: DataConfig, root: Path) -> tuple[list[dict], list[dict], dict[str, int]]:
    """Load, validate and split the data: (train_rows, eval_rows, skipped_counts by reason).

    The split is a permutation seeded by `cfg.split_seed` of the valid rows: the first
    `cfg.eval_size` are held out (at least one row is always left for training), then
    `cfg.max_rows` caps the training rows. Raises ValueError when no valid row remains.
    """
    if cfg.kind == "sft" and (cfg.cot_field is None or cfg.reference_field is None):
        raise ValueError("data.kind=sft needs data.cot_field and data.reference_field")
    if cfg.kind == "mcq" and cfg.options_field is None:
        raise ValueError("data.kind=mcq needs data.options_field")
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise ValueError(f"data.max_rows={cfg.max_rows} must be at least 1 (or null for no cap)")
    if cfg.source == "hub" and not cfg.hub_id:
        raise ValueError("data.source=hub needs data.hub_id")

    source = resolve_source(cfg)
    skipped: Counter = Counter()
    raw_rows: Sequence[dict[str, Any] | None] | None = None
    if source == "hub":
        try:
            raw_rows = _read_hub(cfg)
            where = f"hub dataset {cfg.hub_id} ({cfg.hub_config or 'default'}/{cfg.hub_split})"
        except DataUnavailable as e:
            if cfg.source == "hub":
                raise
            # auto: the probe passed but the download did not; the sample keeps the run going
            log.warning("%s; falling back to the local sample", e)
    if raw_rows is None:
        path = Path(root) / cfg.local_path
        raw_rows, skipped = _read_local(path)
        where = f"local file {path}"
    log.info("data %s: reading %d rows from %s", cfg.name, len(raw_rows), where)

    valid = []
    for i, raw in enumerate(raw_rows):
        if raw is None:  # an unparseable line, counted by the reader
            continue
        row, reason = normalise_row(raw, i, cfg)
        if row is None:
            skipped[reason] += 1
        else:
            valid.append(row)
    if not valid:
        raise ValueError(
            f"no valid rows for data={cfg.name} (kind={cfg.kind}) in {where}; "
            f"skipped: {dict(skipped) or 'none, the source is empty'}"
        )
    if skipped:
        log.warning("data %s: skipped %s", cfg.name, dict(skipped))

    order = list(range(len(valid)))
    random.Random(cfg.split_seed).shuffle(order)
    n_eval = min(cfg.eval_size, len(valid) - 1)
    eval_rows = [valid[i] for i in order[:n_eval]]
    train_rows = [valid[i] for i in order[n_eval:]]
    if cfg.max_rows is not None:
        train_rows = train_rows[: cfg.max_rows]
    log.info("data %s: %d train / %d eval rows", cfg.name, len(train_rows), len(eval_rows))
    return train_rows, eval_rows, dict(skipped)


def render_prompt(
    tokenizer: Any,
    question: str,
    system_prompt: str,
    prefill: str = "",
    demonstrations: Sequence[Mapping[str, str]] = (),
) -> str:
    """The prompt text the model continues, from its own chat template (no system turn if empty; each of
    `demonstrations` as a user turn and an assistant turn before the question), then `prefill` (data.prefill)
    unless the template's generation prompt already ends with it."""
    return with_prefill_text(_chat_prompt(tokenizer, question, system_prompt, demonstrations), prefill)


def with_prefill_text(prompt: str, prefill: str) -> str:
    """`prompt` + `prefill`; once only: R1-Distill's template already ends its generation prompt with
    `<think>\\n`, so data.prefill="<think>\\n" leaves it as it is (whitespace aside)."""
    if not prefill or prompt.rstrip().endswith(prefill.strip()):
        return prompt
    return prompt + prefill


def _chat_prompt(
    tokenizer: Any, question: str, system_prompt: str, demonstrations: Sequence[Mapping[str, str]] = ()
) -> str:
    turns = [
        message
        for demo in demonstrations
        for message in ({"role": "user", "content": demo["question"]}, {"role": "assistant", "content": demo["answer"]})
    ]
    messages = [*turns, {"role": "user", "content": question}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": system_prompt})
    if getattr(tokenizer, "chat_template", None):
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError:
            # some templates refuse a system turn; the instruction then goes first in the first user turn
            if not system_prompt:
                raise
            first, *rest = messages[1:]
            merged = [{"role": "user", "content": f"{system_prompt}\n\n{first['content']}"}, *rest]
            return tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)
    head = f"System: {system_prompt}\n\n" if system_prompt else ""
    shown = "".join(f"User: {d['question']}\n\nAssistant: {d['answer']}\n\n" for d in demonstrations)
    return f"{head}{shown}User: {question}\n\nAssistant:"


def attach_prompts(rows: list[dict], tokenizer: Any, cfg: DataConfig) -> tuple[list[dict], dict[str, int]]:
    """Copies of `rows` with a rendered "prompt"; rows over cfg.max_prompt_tokens are skipped and counted.

    Tokens are counted with add_special_tokens=False because the chat template already writes them.
    Raises ValueError if rows were given but none fits.
    """
    if not rows:
        return [], {}
    prompts = [
        render_prompt(tokenizer, r["question"], cfg.system_prompt, cfg.prefill, cfg.demonstrations) for r in rows
    ]
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]]
    kept = [{**r, "prompt": p} for r, p, n in zip(rows, prompts, lengths) if n <= cfg.max_prompt_tokens]
    skipped = {"prompt_too_long": len(rows) - len(kept)} if len(kept) < len(rows) else {}
    if not kept:
        raise ValueError(
            f"all {len(rows)} prompts of data={cfg.name} exceed data.max_prompt_tokens="
            f"{cfg.max_prompt_tokens} (longest: {max(lengths)} tokens); raise the limit"
        )
    if skipped:
        log.warning(
            "data %s: skipped %d prompts longer than %d tokens",
            cfg.name,
            skipped["prompt_too_long"],
            cfg.max_prompt_tokens,
        )
    return kept, skipped


def prompt_seed(seed: int, epoch: int, position: int) -> int:
    """The sampling seed of the prompt drawn at (epoch, position) of a run seeded `seed`."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1, np.uint64)[0] >> 1)


@dataclass
class Batch:
    """The rows of one step (this rank's share of them), and with prompt-seeded sampling one sampling
    seed per row, from its place in the data order: samples then do not depend on how rows are batched."""

    rows: list
    seeds: list[int] | None = None
    # the next batch from the same sampler, for a step that needs more rows than it was given (dynamic
    # sampling): drawing from it advances the sampler's checkpointed position, so a resume stays exact
    refill: Callable[[], Batch] | None = field(default=None, compare=False, repr=False)


class PromptSampler:
    """Endless batches of rows in a seeded order, reshuffled each epoch (seed + epoch).

    A batch that reaches the end of an epoch continues into the next one. The state is just
    (epoch, position), so a run resumed from a checkpoint draws exactly the batches it would have.
    """

    def __init__(self, rows: list[Any], batch_size: int, seed: int) -> None:
        # rows: data rows (dicts), or a stage's own examples (stages.sft.SFTExample)
        if not rows:
            raise ValueError("PromptSampler needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be at least 1")
        self.rows, self.batch_size, self.seed = rows, batch_size, seed
        self.epoch, self.position = 0, 0
        self._order = self._epoch_order(0)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed + epoch).shuffle(order)
        return order

    def next_batch(self) -> list[dict]:
        batch = []
        for epoch, position in self.upcoming():
            if epoch != self.epoch:  # the batch runs into the next epoch: a new order
                self.epoch, self._order = epoch, self._epoch_order(epoch)
            batch.append(self.rows[self._order[position]])
            self.position = position + 1
        return batch

    def draw(self, seeded: bool = False) -> Batch:
        """The next batch; `seeded`: with each row's sampling seed (`prompt_seed`)."""
        seeds = [prompt_seed(self.seed, e, p) for e, p in self.upcoming()] if seeded else None
        return Batch(self.next_batch(), seeds, refill=lambda: self.draw(seeded))

    def upcoming(self) -> list[tuple[int, int]]:
        """The (epoch, position) each row of the next batch is drawn at."""
        epoch, position, out = self.epoch, self.position, []
        for _ in range(self.batch_size):
            if position == len(self.rows):
                epoch, position = epoch + 1, 0
            out.append((epoch, position))
            position += 1
        return out

    def state_dict(self) -> dict[str, int]:
        # seed and row count are stored only to refuse a resume onto different data
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "num_rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_rows", len(self.rows)) != len(self.rows) or state.get("seed", self.seed) != self.seed:
            raise ValueError(
                f"sampler state is for {state.get('num_rows')} rows with seed {state.get('seed')}, "
                f"not {len(self.rows)} rows with seed {self.seed}: the data changed since the checkpoint"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._epoch_order(self.epoch)
