"""SPIN, self-play fine-tuning (Chen et al. 2024, arXiv:2401.01335), from SFT data only.

Iteration t = 0..N-1, with pi_0 = the starting (SFT) model:

1. generate one answer y' per prompt x with pi_t (``temperature``, ``top_p``, ``max_new_tokens``;
   seed ``seed + t``; ``temperature=0`` is greedy);
2. pair each prompt's human answer y (chosen) with y' (rejected); with ``keep_previous`` the
   previous iteration's pairs are added (the authors' code trains on iterations t and t-1);
3. train from pi_t with pi_t, frozen, as the reference, on the SPIN loss (the method table's
   ``spin`` entry, DPO's form with lam for beta)::

       loss = -log sigmoid(lam * ((logp(y) - ref_t(y)) - (logp(y') - ref_t(y'))))

   giving pi_{t+1}. Every iteration's first loss is ln 2.

The pairs are an ordinary preference data set (``prompt``/``chosen``/``rejected``, strings or
message lists), trained by the pairwise step, so every engine feature applies per iteration.
Generated answers are decoded to text and re-tokenized with the data pipeline, as the authors' code
does: the rejected side is scored on the canonical tokens of the sampled text. Empty answers (the
model emitted an end token at once) cannot be a completion and are left out of the pairs (counted).

Files::

    OUTPUT/iter-t/generations.jsonl  one line per prompt: index, prompt, real, generated, finished
    OUTPUT/iter-t/pairs.jsonl        the preference rows iteration t trains on
    OUTPUT/iter-t/...                the Trainer run (config.yaml, metrics, checkpoints, final/)

Both files are JSON lines (:mod:`dpokit.jsonl`: any generated text round-trips) with a checksum
beside them (``*.sha256.json``, :mod:`dpokit.cache`). A resumed run reuses an interrupted
iteration's generations (its checkpoint's data position refers to them) when they match their
checksum; damaged ones are reported in one line, removed and generated again. With several
processes the (length-sorted) generation batches are dealt out to them and gathered (the answers
do not depend on the number of processes); generation stops on every end token the model declares
(Llama-3's ``<|eot_id|>`` as well as EOS). vLLM is not used (:mod:`dpokit.generation` says what a
faster backend would have to meet). Layout, resume and ``OUTPUT/final``:
:mod:`dpokit.recipes.stages`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.utils import gather_object
from transformers import AutoModelForCausalLM

from dpokit import jsonl
from dpokit.cache import check_entry, read_verified, write_verified
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataConfig, DataError
from dpokit.data.formats import detect_format
from dpokit.data.loading import load_source
from dpokit.data.rows import dataset_column_kinds
from dpokit.data.sft import SFTExample, prepare_sft
from dpokit.generation import (
    batch_plan,
    end_token_ids,
    ended,
    generate_completions,
    strip_end,
)
from dpokit.losses import get_method
from dpokit.modeling import load_tokenizer, loading_kwargs, resolve_dtype
from dpokit.recipes.stages import check_stage_config, run_stages

logger = logging.getLogger("dpokit")

GENERATIONS_CACHE = "SPIN generations"
GENERATIONS_FILE = "generations.jsonl"
PAIRS_FILE = "pairs.jsonl"


@dataclass
class SFTPrompts:
    """The SFT rows in data order: normalized examples and their prompts' token ids.

    ``prompt_input_ids[i]`` are the tokens the pairs pipeline will build for ``examples[i]``'s
    prompt (BOS, chat template, max_prompt_length truncation), so y' is sampled from exactly the
    context it is later scored in.
    """

    examples: list[SFTExample]
    prompt_input_ids: list[list[int]]


def run_spin(config: TrainConfig):
    """Train ``config.model`` with SPIN on the SFT rows of ``config.data``; returns a TrainResult
    whose ``final_dir`` is ``OUTPUT/final`` (the last iteration's model).

    Each iteration trains the pairs with the method table's ``spin`` entry (its ``step`` is the
    pairwise one). Raises :class:`~dpokit.config.ConfigError` for ``reference`` or ``eval_data``
    (every iteration sets its own reference and holds out part of its own pairs), and
    ``RuntimeError`` when every generated answer is empty.
    """
    check_stage_config(config)
    if config.eval_data:
        raise ConfigError(
            "spin evaluates on held-out pairs of each iteration: use eval_fraction, not eval_data"
        )
    hyperparameters = config.method_args
    state = PartialState()
    tokenizer = load_tokenizer(config.model, config.chat_template, config.trust_remote_code)
    with state.main_process_first():  # one process tokenizes into the shared Arrow cache
        prompts = read_sft(config, tokenizer)
    names = [f"iter-{t}" for t in range(hyperparameters["iterations"])]

    def make_data(index: int, directory: Path, model: str) -> str:
        generations = directory / GENERATIONS_FILE
        if config.resume != "false" and state.is_main_process:
            check_entry(generations, GENERATIONS_CACHE)  # a damaged file is removed: regenerated
        state.wait_for_everyone()
        if not (config.resume != "false" and generations.exists()):  # each process: its share
            answers = generate_answers(config, model, tokenizer, prompts, config.seed + index)
            if state.is_main_process:
                write_verified(generations, generations_jsonl(prompts.examples, *answers).encode())
        if state.is_main_process:
            rows = pair_rows(generations)
            if hyperparameters["keep_previous"] and index > 0:
                rows += pair_rows(directory.parent / names[index - 1] / GENERATIONS_FILE)
            if not rows:
                raise RuntimeError(f"{generations}: every generated answer is empty; no pairs")
            write_verified(directory / PAIRS_FILE, jsonl.encode(rows))
        state.wait_for_everyone()
        return str(directory / PAIRS_FILE)

    return run_stages(config, names, make_data, spec=get_method(config.method))


def read_sft(config: TrainConfig, tokenizer) -> SFTPrompts:
    """Validate and tokenize the SFT rows (errors name the file and line) and normalize them.

    Raises :class:`~dpokit.data.DataError` for bad rows.
    """
    settings = DataConfig.from_train_config(config)
    prepared = prepare_sft(config.data, tokenizer, settings, config.data_split)
    source = load_source(config.data, settings, config.data_split)
    dataset = source.dataset.with_format(None)
    if len(prepared) != len(dataset):  # prepare_sft drops nothing: row i is prepared row i
        raise DataError(f"{len(dataset)} rows read, {len(prepared)} prepared", source.name)
    fmt = detect_format(dataset_column_kinds(dataset), settings, task="sft")
    examples = [fmt.normalize(row, settings) for row in dataset]
    return SFTPrompts(examples, [list(ids) for ids in prepared.dataset["prompt_input_ids"]])


def generate_answers(
    config: TrainConfig, model_path: str, tokenizer, prompts: SFTPrompts, seed: int
) -> tuple[list[str], list[bool]]:
    """(decoded answers, whether each stopped at an end token) of ``model_path``, one per prompt.

    The prompts are planned into length-sorted batches (:func:`dpokit.generation.batch_plan`);
    with several processes, batch k runs on process k mod P and the answers are gathered on every
    process. Each batch is seeded from the seed and its first prompt's index, and each process
    generates exactly the planned batches, so the answers are those of one process generating
    them all. An answer "stopped" on any end token the model declares
    (:func:`dpokit.generation.end_token_ids`), which is not part of its text.
    """
    hyperparameters = config.method_args
    state = PartialState()
    device = state.device
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=resolve_dtype(config.dtype), **loading_kwargs(config)
    )
    model.to(device)
    greedy = hyperparameters["temperature"] == 0
    bf16 = (
        device.type == "cuda"
        and config.mixed_precision in ("auto", "bf16")
        and torch.cuda.is_bf16_supported()
    )
    logger.info("generating %d answers with %s", len(prompts.examples), model_path)
    size = hyperparameters["generation_batch_size"]
    plan = batch_plan(prompts.prompt_input_ids, size)
    mine = [i for batch in plan[state.process_index :: state.num_processes] for i in batch]
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        completions = generate_completions(
            model,
            tokenizer,
            [prompts.prompt_input_ids[i] for i in mine],
            max_new_tokens=min(
                hyperparameters["max_new_tokens"],
                config.max_length or hyperparameters["max_new_tokens"],  # None: no bound
            ),
            temperature=hyperparameters["temperature"] if not greedy else 1.0,
            top_p=hyperparameters["top_p"],
            batch_size=size,
            seed=seed,
            do_sample=not greedy,
            sample_keys=mine,
            progress="SPIN generation (batches)"
            if config.progress and state.is_main_process
            else None,
        )
    logger.info(
        "process %d generated %d of %d answers",
        state.process_index,
        len(mine),
        len(prompts.prompt_input_ids),
    )
    pairs = list(zip(mine, completions, strict=True))
    gathered = gather_object(pairs) if state.num_processes > 1 else pairs
    ids = [tokens for _, tokens in sorted(gathered, key=lambda item: item[0])]
    ends = end_token_ids(model, tokenizer)
    finished = [ended(tokens, ends) for tokens in ids]
    if not all(finished):
        logger.info(
            "%d of %d answers hit max_new_tokens before an end token",
            finished.count(False),
            len(ids),
        )
    texts = [strip_end(tokens, ends) for tokens in ids]
    return tokenizer.batch_decode(texts, skip_special_tokens=True), finished


def generations_jsonl(examples: list[SFTExample], answers: list[str], finished: list[bool]) -> str:
    """The generations file's JSON lines: index, prompt, real (human) and generated answer, and
    whether the generated one stopped at an end token (False: cut by max_new_tokens)."""
    rows = zip(examples, answers, finished, strict=True)
    records = (
        {
            "index": index,
            "prompt": example.prompt,
            "real": example.completion,
            "generated": answer,
            "finished": done,
        }
        for index, (example, answer, done) in enumerate(rows)
    )
    return jsonl.dumps(records)


def pair_rows(generations: Path) -> list[dict]:
    """Preference rows (chosen = human answer, rejected = generated) from a generations file.

    Chat rows get the answer as one assistant turn. Empty answers are left out (logged).
    Raises ``RuntimeError`` when the file is missing or damaged (reported and removed by
    :func:`dpokit.cache.read_verified`): an earlier iteration's answers cannot be made again.
    """
    data = read_verified(generations, GENERATIONS_CACHE)
    if data is None:
        raise RuntimeError(
            f"{generations} is missing or damaged; start the run again with resume=false"
        )
    rows, empty = [], 0
    for record in jsonl.parse(data, str(generations)):
        answer = record["generated"]
        if not answer.strip():
            empty += 1
            continue
        chat = isinstance(record["real"], list)
        rejected = [{"role": "assistant", "content": answer}] if chat else answer
        rows.append({"prompt": record["prompt"], "chosen": record["real"], "rejected": rejected})
    if empty:
        logger.warning("%s: %d empty answer(s) left out of the pairs", generations, empty)
    return rows
