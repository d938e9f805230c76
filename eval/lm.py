"""lm-eval model ``parcae``: scores requests exactly as the official CORE evaluator, with batching.

Requests are grouped per document. For CORE documents (tagged ``_type`` by the task loader) each option is tokenized
as one full BOS-prefixed prompt; the scored span is where options differ (multiple choice: after the common token
prefix; schema: the common token suffix; language modelling: after the prompt without continuation); prompts longer
than the model's context are cropped from the left. The returned log-likelihood is minus the mean loss over that span
and ``is_greedy`` is the greedy exact match, so lm-eval's argmax reproduces the official choice. Other (stock) tasks
get ordinary summed log-likelihoods. Rows from all documents are batched (``row_scoring``: a document's shared
prefix runs once through the KV cache); on a GPU a batch holds as many padded tokens as half its free memory takes
(``memory_token_budget``) and the weights default to bfloat16. For a depth sweep (``sweep_depths``) every depth is scored in the first call
from one pass per batch and remembered, so later calls at the other depths cost no forward.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from modeling_parcae.bundled import model_path_or_name
from modeling_parcae.eval.modelio import is_looped, load_model_and_tokenizer
from modeling_parcae.eval.modelio import max_length as model_max_length
from modeling_parcae.eval.procedure import encode_with_bos
from modeling_parcae.eval.row_scoring import Row, RowScore, memory_token_budget, score_documents
from modeling_parcae.eval.specs import LM as LM_TYPE
from modeling_parcae.eval.specs import MC, SCHEMA
from modeling_parcae.scoring import pad_id_of


def core_prompt_strings(task_type: str, requests: list[tuple[str, str]]) -> list[str]:
    """Strings tokenized for one CORE document's requests (context, continuation): the full option prompts, or for
    language modelling [prompt without, prompt with] continuation, stripped as the official evaluator does."""
    if task_type == LM_TYPE:
        (context, continuation), = requests
        return [context.strip(), (context + continuation).strip()]
    return [context + continuation for context, continuation in requests]


def _common(rows: list[list[int]], reverse: bool) -> int:
    """Length of the token prefix (or suffix) all rows share. ``os.path.commonprefix`` takes lists: it compares only
    the lexicographically smallest and largest rows, whose common prefix is everyone's."""
    return len(os.path.commonprefix([r[::-1] for r in rows] if reverse else rows))


def _core_rows(task_type: str, rows: list[list[int]]) -> list[Row]:
    if task_type == MC:
        prefix = _common(rows, reverse=False)
        return [Row(r, prefix, len(r)) for r in rows]
    if task_type == SCHEMA:
        suffix = _common(rows, reverse=True)
        return [Row(r, len(r) - suffix, len(r)) for r in rows]
    without, with_ = rows
    if with_[: len(without)] != without or len(without) >= len(with_):
        raise ValueError("language-modelling prompt without continuation is not a token prefix of the full prompt")
    return [Row(with_, len(without), len(with_))]


def _document_texts(task_type: str | None, args: tuple[tuple[str, str], ...]) -> list[str]:
    """What one document's requests tokenize: the CORE prompt strings, or (context, context + continuation)."""
    if task_type:
        return core_prompt_strings(task_type, list(args))
    (context, continuation), = args
    return [context, context + continuation]


@contextmanager
def _parallel_tokenization() -> Iterator[None]:
    """Every prompt of a run is tokenized in one batch: let the Rust tokenizer spread it over all cores (it reads
    ``TOKENIZERS_PARALLELISM`` at each call). With a small-vocabulary tokenizer this batch is the largest CPU cost of a
    GPU run. Afterwards the variable is back to its value, or "false" where it had none: a process forked later must not
    wait on the parent's thread pool (a fork does not copy it), and with the variable set tokenizers prints no fork
    warning."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    try:
        yield
    finally:
        os.environ["TOKENIZERS_PARALLELISM"] = previous or "false"


def _row_key(row: Row) -> tuple:
    return tuple(row.tokens), row.start, row.end


CPU_BATCH_SIZE = 16  # rows per forward on CPU, where larger batches stopped paying off


def _optional_int(value: int | str | None) -> int | None:
    """lm-eval passes model arguments as strings; "auto", "" and "None" mean unset."""
    return int(value) if str(value).isdigit() else None


@register_model("parcae")
class ParcaeLM(LM):
    """``pretrained``: path, Hub id or a loaded model; ``num_loops``: test-time depth (looped models only).

    Batches: at most ``batch_size`` rows (default: 16 on CPU, unbounded on a GPU) and ``max_batch_tokens`` padded
    tokens (default: none on CPU; on a GPU what half its free memory holds, see ``memory_token_budget``).
    ``dtype`` applies when ``pretrained`` is loaded here: default bfloat16 on a GPU, float32 elsewhere."""

    def __init__(self, pretrained, tokenizer=None, num_loops: int | str | None = None,
                 batch_size: int | str | None = None, device: str | None = "cpu", dtype: str | None = None,
                 max_length: int | str | None = None, max_batch_tokens: int | str | None = None, **_kwargs):
        super().__init__()
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm-eval's CLI may pass its own default device
        if isinstance(pretrained, str):
            dtype = dtype or ("bfloat16" if str(device).startswith("cuda") else "float32")
            # `--model_args pretrained=demo` means the bundled demo, as `parcae eval --model demo` does
            pretrained, loaded_tokenizer = load_model_and_tokenizer(model_path_or_name(pretrained), device=device,
                                                                    dtype=dtype)
            tokenizer = tokenizer or loaded_tokenizer
        if tokenizer is None:
            raise ValueError("a tokenizer is required when passing a model object")
        self.model = pretrained.eval()
        self.tokenizer = tokenizer
        self.num_loops = int(num_loops) if num_loops not in (None, "", "None") else None
        on_gpu = next(self.model.parameters()).device.type == "cuda"
        self.batch_size = _optional_int(batch_size) or (None if on_gpu else CPU_BATCH_SIZE)
        self.max_batch_tokens = _optional_int(max_batch_tokens)
        self.max_length = int(max_length) if max_length else model_max_length(self.model)
        # depth sweep: every depth of ``sweep_depths`` is scored from one pass and remembered per row
        self.sweep_depths: list[int] | None = None
        self._remembered: dict[tuple, dict[int | None, RowScore]] = {}
        self._planned: dict[tuple, list[Row]] = {}  # rows per document's requests (see ``_plan_rows``)
        # the cache a shared few-shot prefix is stored in (None: the model's own exact cache)
        self.prefix_cache: Callable[[], object] | None = None

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "parcae").replace("/", "__")

    # -- request planning -------------------------------------------------------------------------------------------
    def _plan(self, requests) -> list[tuple[str | None, list[int], list[Row]]]:
        """Per document: (CORE type or None, request indices, rows to score)."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, req in enumerate(requests):
            doc = req.doc if isinstance(req.doc, dict) else {}
            task_type = doc.get("_type") if isinstance(doc.get("_type"), str) else None
            key = (req.task_name, req.doc_id, task_type) if task_type else ("", i, None)
            groups[key].append(i)
        documents = [(task_type, idxs, tuple(requests[i].args for i in idxs))
                     for (_, _, task_type), idxs in groups.items()]
        self._plan_rows({(task_type, args) for task_type, _, args in documents})
        return [(task_type, idxs, self._planned[(task_type, args)]) for task_type, idxs, args in documents]

    def _plan_rows(self, documents: set[tuple[str | None, tuple]]) -> None:
        """Rows of every (CORE type or None, request args) document into ``self._planned``, with all prompts tokenized
        in one batch. Kept for the whole depth sweep (every depth's lm-eval run renders the same prompts; tokenizing
        and splitting them again would cost more than reading the remembered scores), else until ``_score`` ends."""
        todo = [doc for doc in documents if doc not in self._planned]
        if not todo:
            return
        texts = [_document_texts(task_type, args) for task_type, args in todo]
        with _parallel_tokenization():
            encoded = iter(encode_with_bos(self.tokenizer, [text for group in texts for text in group]))
        for (task_type, args), group in zip(todo, texts):
            rows = [next(encoded) for _ in group]
            if task_type:
                self._planned[(task_type, args)] = _core_rows(task_type, rows)
            else:
                context, whole = rows
                self._planned[(task_type, args)] = [Row(whole, len(context), len(whole))]

    def _score(self, documents: list[list[Row]], desc: str, disable_tqdm: bool) -> list[list[RowScore]]:
        """(summed loss, scored tokens, greedy match) per row at ``num_loops``, after the official left-crop (a span
        cropped down to the first token, which the official code cannot score, starts at position 1)."""
        cropped = []
        for rows in documents:
            cropped.append([])
            for row in rows:
                n = max(0, len(row.tokens) - self.max_length)
                cropped[-1].append(Row(row.tokens[n:], max(row.start - n, 1), row.end - n))
        depth = self.num_loops
        sweep = self.sweep_depths if self.sweep_depths and depth in self.sweep_depths and is_looped(self.model) else None
        todo = [rows for rows in cropped if any(depth not in self._remembered.get(_row_key(r), {}) for r in rows)]
        if todo:
            depths = list(sweep) if sweep else [depth]
            scored = score_documents(self.model, todo, pad_id_of(self.tokenizer), depths, self.batch_size,
                                     self.max_length, desc=desc, disable_tqdm=disable_tqdm,
                                     prefix_cache=self.prefix_cache, max_batch_tokens=self._token_budget(depths))
            for rows, scores in zip(todo, scored):
                for row, by_depth in zip(rows, scores):
                    self._remembered.setdefault(_row_key(row), {}).update(by_depth)
        out = [[self._remembered[_row_key(r)][depth] for r in rows] for rows in cropped]
        if not sweep:
            self._remembered.clear()  # one depth at a time: nothing will be asked again
            self._planned.clear()
        return out

    def _token_budget(self, depths: list[int | None]) -> int | None:
        """Padded tokens per batch: the one given, else on a GPU what its free memory holds now, else no bound."""
        if self.max_batch_tokens or next(self.model.parameters()).device.type != "cuda":
            return self.max_batch_tokens
        return memory_token_budget(self.model, depths)

    # -- lm-eval API -------------------------------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        plan = self._plan(requests)
        scored = self._score([rows for _, _, rows in plan], "parcae loglikelihood", disable_tqdm)
        results: list[tuple[float, bool]] = [None] * len(requests)  # type: ignore[list-item]
        for (task_type, idxs, _), row_scores in zip(plan, scored):
            for i, (loss, n, greedy) in zip(idxs, row_scores):
                results[i] = (-loss / n if task_type else -loss, greedy)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Summed log-likelihood of each whole text (BOS-prefixed), in non-overlapping context-sized windows."""
        rows, owners = [], []
        step = self.max_length - 1
        for i, req in enumerate(requests):
            tokens = encode_with_bos(self.tokenizer, [req.args[0]])[0]
            for s in range(0, len(tokens) - 1, step):
                window = tokens[s: s + self.max_length]
                rows.append(Row(window, 1, len(window)))
                owners.append(i)
        totals = [0.0] * len(requests)
        scored = self._score([[row] for row in rows], "parcae rolling", disable_tqdm)
        for owner, ((loss, _, _),) in zip(owners, scored):
            totals[owner] -= loss
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("the parcae lm-eval model scores log-likelihood tasks only (CORE needs no "
                                  "generation); use --model hf with trust_remote_code=True for generative tasks")
