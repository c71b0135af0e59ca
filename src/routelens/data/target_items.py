"""Items of the expert-isolation study: a prompt and the target the model should produce.

Record: {"id", "domain", "prompt", "target"} in JSONL or Parquet. The prompt is tokenised
with the tokenizer's special tokens and the target without them, separately, and the two
are concatenated; an item is scored by the log-probabilities of its target tokens given
everything before them. Or token ids: {"id", "domain", "prompt_ids", "target_ids"}.

For the embedded model, `arithmetic_items` gives the four arithmetic domains: the
question is the prompt and the worked solution (steps and final answer) is the target.
These items come from their own seed, reserved away from training (see
`routelens.data.arithmetic.heldout_questions`).
"""

from __future__ import annotations

from dataclasses import dataclass

from routelens.data.trajectories import check_context, parse_unique_records, tokenize_text
from routelens.errors import RouteLensError


@dataclass
class TargetItem:
    """An isolation item: a prompt and a target whose log-probability is scored.

    Examples:
        >>> from routelens import TargetItem
        >>> item = TargetItem("q1", "math", prompt_ids=[1, 5, 6], target_ids=[7, 8])
        >>> item.input_ids, list(item.target_positions)
        ([1, 5, 6, 7, 8], [2, 3])
    """

    id: str
    domain: str
    prompt_ids: list[int]
    target_ids: list[int]

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.target_ids

    @property
    def target_positions(self) -> range:
        """Positions whose next token is a target token (position t predicts token t + 1)."""
        return range(len(self.prompt_ids) - 1, len(self.input_ids) - 1)


def _ids(record: dict, field: str, where: str, vocab_size: int | None) -> list[int]:
    ids = record[field]
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RouteLensError(f"{where}: '{field}' must be a non-empty list of integers")
    if vocab_size is not None and any(not 0 <= t < vocab_size for t in ids):
        raise RouteLensError(f"{where}: '{field}' ids must lie in 0..{vocab_size - 1} (the model's vocabulary)")
    return list(ids)


def _parse(record: dict, where: str, tokenizer, vocab_size: int | None) -> TargetItem:
    for field in ("id", "domain"):
        if record.get(field) is None or str(record[field]) == "":
            raise RouteLensError(f"{where}: missing field {field!r}; an item needs "
                                 "{'id', 'domain', 'prompt', 'target'}")
    item_id, domain = str(record["id"]), str(record["domain"])
    if record.get("prompt_ids") is not None or record.get("target_ids") is not None:
        if record.get("prompt_ids") is None or record.get("target_ids") is None:
            raise RouteLensError(f"{where}: a token-id item needs both 'prompt_ids' and 'target_ids'")
        return TargetItem(item_id, domain, _ids(record, "prompt_ids", where, vocab_size),
                          _ids(record, "target_ids", where, vocab_size))
    missing = [f for f in ("prompt", "target") if not isinstance(record.get(f), str)]
    if missing:
        raise RouteLensError(f"{where}: missing field(s) {', '.join(repr(m) for m in missing)}; an item needs "
                             "{'id', 'domain', 'prompt', 'target'} (text) or {'id', 'domain', 'prompt_ids', 'target_ids'}")
    if tokenizer is None:
        raise RouteLensError(f"{where}: text items need the model's tokenizer, and this model has none; "
                             "give token ids ('prompt_ids', 'target_ids')")
    prompt = tokenize_text(tokenizer, record["prompt"], True, where, "prompt")
    target = tokenize_text(tokenizer, record["target"], False, where, "target")
    if not prompt:
        raise RouteLensError(f"{where}: the prompt tokenises to nothing; the first target token needs a prefix")
    if not target:
        raise RouteLensError(f"{where}: the target tokenises to nothing; there is no target token to score")
    return TargetItem(item_id, domain, prompt, target)


def load_items(path: str, tokenizer=None, vocab_size: int | None = None,
               domains: list[str] | None = None, per_domain: int | None = None,
               max_length: int | None = None) -> list[TargetItem]:
    """Read, validate and tokenise every item of `path` (file order kept); keep `domains`
    (all when None) and the first `per_domain` items of each; each must fit `max_length`."""
    items = parse_unique_records(path, "item", lambda record, where: _parse(record, where, tokenizer, vocab_size))
    check_context(((i.id, len(i.input_ids)) for i in items), max_length, path, "item")
    return select(items, domains, per_domain, source=path)


def select(items: list[TargetItem], domains: list[str] | None, per_domain: int | None,
           source: str) -> list[TargetItem]:
    present = list(dict.fromkeys(item.domain for item in items))
    if domains:
        unknown = [d for d in domains if d not in present]
        if unknown:
            raise RouteLensError(f"domain(s) {', '.join(unknown)} not in {source}; its domains: {', '.join(present)}")
        items = [item for item in items if item.domain in domains]
    if per_domain is not None:
        counts: dict[str, int] = {}
        kept = []
        for item in items:
            counts[item.domain] = counts.get(item.domain, 0) + 1
            if counts[item.domain] <= per_domain:
                kept.append(item)
        items = kept
    return items


def arithmetic_items(tokenizer, per_domain: int = 100, domains: list[str] | None = None) -> list[TargetItem]:
    """Items of the four arithmetic domains (prompt: question; target: worked solution)."""
    from routelens.data.arithmetic import DOMAINS, isolation_problems

    problems = isolation_problems(per_domain)
    items = [TargetItem(p.id, p.domain, list(tokenizer(p.question)["input_ids"]),
                        list(tokenizer(p.solution, add_special_tokens=False)["input_ids"])) for p in problems]
    unknown = [d for d in (domains or []) if d not in DOMAINS]
    if unknown:
        raise RouteLensError(f"domain(s) {', '.join(unknown)} unknown to the arithmetic task; its domains: "
                             f"{', '.join(DOMAINS)}")
    return select(items, domains, per_domain, source="the arithmetic task")
