"""Synthetic long-context probes that need no download: passkey, needle, associative recall (kv), copy.

Every example is built in token space, so its needle sits exactly where the example says:

    prompt = instruction + haystack[:before] + needle + haystack[before:] + question
    len(prompt) + len(answer) == length
    before == round(depth * (haystack tokens)), needle_start == len(instruction) + before

The model is asked for the answer greedily; an example counts as correct when its first
len(answer) generated tokens are exactly the answer tokens.
"""

from __future__ import annotations

import random
import string
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

TASKS = ("passkey", "needle", "kv", "copy")


@dataclass
class ProbeExample:
    task: str
    length: int  # prompt + answer tokens
    depth: float  # where the needle sits in the haystack: 0 first, 1 last
    sample: int
    tokens: list[int]  # the prompt
    answer: list[int]
    needle: list[int]
    needle_start: int  # index in tokens of the needle's first token
    haystack_start: int  # the haystack (needle included) follows the instruction
    haystack_tokens: int  # filler tokens around the needle

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("tokens",)}


# ---- haystacks: each returns exactly n tokens ------------------------------------------------------
PASSKEY_FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NOUNS = ["river", "garden", "window", "teacher", "forest", "engine", "letter", "island", "mountain", "village",
         "painter", "bridge", "market", "soldier", "kitchen", "library", "harbor", "candle", "meadow", "tower"]
ADJECTIVES = ["quiet", "old", "bright", "narrow", "gentle", "heavy", "distant", "small", "golden", "silent"]
VERBS = ["watches", "follows", "remembers", "crosses", "paints", "visits", "carries", "finds", "builds", "passes"]
# needle keys: never words of the haystack
NEEDLE_KEYS = ["Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quito", "Dakar", "Tbilisi", "Perth", "Montreal",
               "Cairo", "Bergen", "Kyoto", "Accra", "Riga", "Havana"]


def _fill(units: Callable[[], str], encode, n: int) -> list[int]:
    out: list[int] = []
    while len(out) < n:
        out += encode(units())
    return out[:n]


def _random_word(rng: random.Random, lo=3, hi=7) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _sentence(rng: random.Random) -> str:
    a, b = rng.sample(ADJECTIVES, 2)
    n1, n2 = rng.sample(NOUNS, 2)
    return f"The {a} {n1} {rng.choice(VERBS)} the {b} {n2}. "


# ---- the tasks -------------------------------------------------------------------------------------
def _passkey(rng, encode):
    key = str(rng.randint(10000, 99999))
    answer = encode(" " + key)
    needle = encode(" The pass key is") + answer + encode(". Remember it. The pass key is") + answer + encode(". ")
    return dict(
        instruction=encode("There is important information hidden in a lot of irrelevant text. "
                           "Find it and memorize it.\n"),
        needle=needle, question=encode("\nWhat is the pass key? The pass key is"), answer=answer,
        haystack=lambda n: _fill(lambda: PASSKEY_FILLER, encode, n),
    )


def _needle(rng, encode):
    key = rng.choice(NEEDLE_KEYS)
    answer = encode(" " + str(rng.randint(1000000, 9999999)))
    phrase = f" The special magic number for {key} is"
    return dict(
        instruction=encode("A special magic number is hidden in the text below. Remember it.\n"),
        needle=encode(phrase) + answer + encode(". "),
        question=encode(f"\nWhat is the special magic number for {key}?{phrase}"), answer=answer,
        haystack=lambda n: _fill(lambda: _sentence(rng), encode, n),
    )


def _kv(rng, encode):
    key = _random_word(rng, 5, 5)
    used = {key}

    def pair():
        k = _random_word(rng, 5, 5)
        while k in used:
            k = _random_word(rng, 5, 5)
        used.add(k)
        return f"\n{k}: {rng.randint(1000, 9999)}"

    answer = encode(" " + str(rng.randint(1000, 9999)))
    return dict(
        instruction=encode("Here are key-value pairs. Remember the value of each key.\n"),
        needle=encode(f"\n{key}:") + answer, question=encode(f"\n{key}:"), answer=answer,
        haystack=lambda n: _fill(pair, encode, n),
    )


COPY_CUE, COPY_ANSWER = 8, 16  # tokens


def _copy(rng, encode):
    span: list[int] = []
    while len(span) < COPY_CUE + COPY_ANSWER:
        span += encode(" " + _random_word(rng))
    span = span[: COPY_CUE + COPY_ANSWER]
    return dict(
        instruction=encode("Below is a list of random words. Continue the passage that begins with the words "
                           "at the end, as it appears in the list.\n"),
        needle=span, question=encode("\n\nContinue:") + span[:COPY_CUE], answer=span[COPY_CUE:],
        unique=span[:COPY_CUE],
        haystack=lambda n: _fill(lambda: " " + _random_word(rng), encode, n),
    )


BUILDERS = {"passkey": _passkey, "needle": _needle, "kv": _kv, "copy": _copy}


def _occurrences(tokens: Sequence[int], pattern: Sequence[int]) -> int:
    m = len(pattern)
    return sum(1 for i in range(len(tokens) - m + 1) if tokens[i:i + m] == list(pattern))


def make_example(task: str, length: int, depth: float, encode, seed: int = 0, sample: int = 0) -> ProbeExample:
    """One probe of exactly `length` tokens (prompt + answer) with its needle at `depth` of the haystack."""
    if task not in BUILDERS:
        raise ValueError(f"probe task {task!r} is unknown; choose from {', '.join(TASKS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"probe depth {depth}: must be in [0, 1]")
    for attempt in range(20):
        rng = random.Random(f"{seed}/{task}/{length}/{depth}/{sample}/{attempt}")
        parts = BUILDERS[task](rng, encode)
        fixed = len(parts["instruction"]) + len(parts["needle"]) + len(parts["question"]) + len(parts["answer"])
        budget = length - fixed
        if budget < 0:
            raise ValueError(f"probe {task}: length {length} is too short; its instruction, needle, question and "
                             f"answer alone take {fixed} tokens")
        haystack = parts["haystack"](budget)
        before = round(depth * budget)
        tokens = parts["instruction"] + haystack[:before] + parts["needle"] + haystack[before:] + parts["question"]
        # the cue must be unambiguous: it occurs once before the question
        context = tokens[: len(tokens) - len(parts["question"])]
        if _occurrences(context, parts.get("unique", parts["needle"])) == 1:
            start = len(parts["instruction"])
            return ProbeExample(task, length, depth, sample, tokens, parts["answer"], parts["needle"],
                                start + before, start, budget)
    raise RuntimeError(f"probe {task}: could not build an example whose needle occurs once (length {length})")


def make_suite(tasks: Sequence[str], lengths: Sequence[int], depths: Sequence[float], samples: int, encode,
               seed: int = 0) -> list[ProbeExample]:
    return [make_example(t, n, d, encode, seed, s) for t in tasks for n in lengths for d in depths
            for s in range(samples)]


# ---- scoring --------------------------------------------------------------------------------------
def is_correct(example: ProbeExample, generated: Sequence[int]) -> bool:
    return list(generated[: len(example.answer)]) == example.answer


def run_suite(examples: list[ProbeExample], generate_fn, batch_size: int = 8) -> list[list[int]]:
    """generate_fn(prompts, max_new_tokens) -> new tokens per prompt; a batch shares prompt and answer lengths."""
    outputs: list[list[int] | None] = [None] * len(examples)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, ex in enumerate(examples):
        groups.setdefault((len(ex.tokens), len(ex.answer)), []).append(i)
    for indices in groups.values():
        for s in range(0, len(indices), batch_size):
            chunk = indices[s:s + batch_size]
            new_tokens = len(examples[chunk[0]].answer)
            for i, out in zip(chunk, generate_fn([examples[i].tokens for i in chunk], new_tokens)):
                outputs[i] = list(out)
    return outputs


def accuracy_table(examples: list[ProbeExample], generations: list[list[int]]) -> dict:
    """{task: {length: {depth: {"correct": c, "total": t, "accuracy": c / t}}}} (lengths, depths as strings)."""
    table: dict = {}
    for ex, gen in zip(examples, generations):
        cell = table.setdefault(ex.task, {}).setdefault(str(ex.length), {}).setdefault(
            str(ex.depth), {"correct": 0, "total": 0})
        cell["correct"] += int(is_correct(ex, gen))
        cell["total"] += 1
    for task in table.values():
        for row in task.values():
            for cell in row.values():
                cell["accuracy"] = cell["correct"] / cell["total"]
    return table


def table_markdown(table: dict) -> str:
    """One markdown table per task: a row per depth, a column per length, accuracy in percent."""
    out = []
    for task, by_length in table.items():
        lengths = list(by_length)
        depths = sorted({d for row in by_length.values() for d in row}, key=float)
        out.append(f"### {task}\n")
        out.append("| depth \\ length | " + " | ".join(lengths) + " | mean |")
        out.append("| --- " * (len(lengths) + 2) + "|")
        for d in depths:
            cells = [by_length[n].get(d) for n in lengths]
            accs = [c["accuracy"] for c in cells if c]
            text = [f"{100 * c['accuracy']:.0f}%" if c else "-" for c in cells]
            out.append(f"| {d} | " + " | ".join(text) + f" | {100 * sum(accs) / len(accs):.0f}% |")
        out.append("")
    return "\n".join(out)


def heatmap_png(table: dict, path, dpi: int = 100) -> None:
    """One heat map per task (depth down, length across, accuracy in the cells), side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table)
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 4), dpi=dpi, squeeze=False,
                             layout="constrained")
    image = None
    for ax, task in zip(axes[0], tasks):
        lengths = list(table[task])
        depths = sorted({d for row in table[task].values() for d in row}, key=float)
        grid = [[table[task][n][d]["accuracy"] if d in table[task][n] else float("nan") for n in lengths]
                for d in depths]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        for r, row in enumerate(grid):
            for c, value in enumerate(row):
                ax.text(c, r, f"{100 * value:.0f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), lengths)
        ax.set_yticks(range(len(depths)), depths)
        ax.set_xlabel("length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(task)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
