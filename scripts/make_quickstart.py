"""Build the quickstart assets: a tiny pretrained Llama, its tokenizer, and instruction data.

    python scripts/make_quickstart.py            # writes jaxft/assets/quickstart/

`python -m jaxft.train --config configs/quickstart.py` has to work with nothing
downloaded, on a laptop CPU, in a few minutes. So the repo ships its own base
model and data set, and this script is how they were made. Everything comes from
templates over a small invented world (countries with capitals, languages, flag
colours, national animals and exports; sums in words; word lists; made-up units),
so no third-party text is involved and the assets carry the project's licence.

What it writes under `jaxft/assets/quickstart/`:

- `model/`: a Hugging Face `LlamaForCausalLM` (3 layers, hidden 128, 4 query heads
  sharing 2 key/value heads, tied embeddings; under 3 MB of float32) with its
  tokenizer, a byte-level BPE trained here on the generated text.
- `train.jsonl`, `eval.jsonl`: `{"prompt", "completion"}` rows in an Alpaca-style
  format, eval prompts disjoint from train prompts.

The model is a *base* model: it is pretrained here (about four minutes on two CPU
cores) on plain declarative text about the world ("The capital of Norvania is
Elbrecht."), plus exercise sheets that list questions without answers, so that it
knows the words questions use. It has never seen a question answered, nor the
instruction format. It knows the facts but not how to answer; LoRA on the
instruction data teaches that, which makes the quickstart a small but honest
instruction-tuning run whose eval loss falls a lot.

Reproducibility: every random choice comes from seeded generators, torch runs with
deterministic algorithms and a fixed thread count, so a re-run on the same machine
writes byte-identical files. Other CPUs or library versions may change the last bits
of the weights (the data and tokenizer do not depend on them).
"""

import argparse
import hashlib
import json
import math
import random
import shutil
import time
from pathlib import Path

SEED = 0
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "jaxft" / "assets" / "quickstart"

# The instruction format. The trainer tokenizes prompt + completion, appends EOS and
# puts loss on the completion only.
PROMPT_TEMPLATE = "### Instruction:\n{question}\n\n### Response:\n"

N_COUNTRIES = 30
N_EVAL = 250
VOCAB_SIZE = 1024
MAX_ROW_TOKENS = 128  # every row, with BOS and EOS, must fit the quickstart's seq_len

MODEL_CONFIG = dict(
    hidden_size=128,
    intermediate_size=352,  # ~2.75x hidden, the Llama ratio
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,  # grouped-query attention, as in Llama 3, so loaders must handle it
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,  # as in Llama 3.2 1B; also halves the file
)

PRETRAIN = dict(
    seq_len=128,
    batch_size=16,
    steps=1500,
    lr=3e-3,
    warmup_steps=100,
    weight_decay=0.1,
    threads=2,  # fixed, not "all cores": the reduction order, and so the bits, depend on it
)


# --------------------------------------------------------------------------------------
# The invented world
# --------------------------------------------------------------------------------------

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
        "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen",
        "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def words(n: int) -> str:
    """0..99 in English words: the data spells numbers out so they tokenize like words."""
    if n < 20:
        return ONES[n]
    tens, ones = divmod(n, 10)
    return TENS[tens] + ("" if ones == 0 else "-" + ONES[ones])


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "gold"]
ANIMALS = ["fox", "owl", "bear", "wolf", "otter", "heron", "lynx", "goat", "swan", "hare",
           "eagle", "badger", "crane", "seal"]
EXPORTS = ["figs", "salt", "copper", "wool", "tea", "glass", "amber", "rice", "timber",
           "cheese", "honey", "silk"]
LIST_WORDS = ["apple", "river", "stone", "candle", "feather", "lantern", "garden", "mirror",
              "basket", "ladder", "pebble", "rope", "violin", "kettle", "meadow", "tower"]
# Made-up units, so conversions are facts of this world rather than of ours.
UNITS = [("grom", "pell", 3), ("tarn", "wib", 4), ("vesk", "dop", 5)]

# Syllables for invented names; chosen so the names read as pronounceable and are
# not English words.
ONSETS = ["b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z",
          "br", "dr", "gl", "kr", "pl", "st", "tr", "th", "qu", "sk"]
VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
CODAS = ["", "", "n", "r", "l", "m", "s", "th", "nd", "rk"]
COUNTRY_ENDINGS = ["ania", "ora", "ovia", "esta", "aria", "enia", "ura"]
CITY_ENDINGS = ["holm", "brecht", "avel", "ost", "mere", "ida", "ach", "ton"]
LANGUAGE_ENDINGS = ["ish", "ese", "ic", "ian"]


def invented_world(rng: random.Random) -> list[dict]:
    """N_COUNTRIES countries; capitals and languages unique so questions about them reverse."""
    used = set()

    def name(n_syllables, endings):
        while True:
            stem = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
                           for _ in range(n_syllables))
            full = cap(stem + rng.choice(endings))
            if full not in used and len(full) <= 12:
                used.add(full)
                return stem, full

    countries = []
    for _ in range(N_COUNTRIES):
        stem, country = name(1, COUNTRY_ENDINGS)
        _, capital = name(rng.choice([1, 2]), CITY_ENDINGS)
        # "Veiic" reads badly: put a consonant between a vowel-final stem and the ending.
        joint = rng.choice(["r", "n", "l"]) if stem[-1] in "aeiou" else ""
        language = cap(stem + joint + rng.choice(LANGUAGE_ENDINGS))
        used.add(language)
        countries.append(dict(country=country, capital=capital, language=language,
                              colour=rng.choice(COLOURS), animal=rng.choice(ANIMALS),
                              export=rng.choice(EXPORTS)))
    assert len({c["language"] for c in countries}) == N_COUNTRIES
    return countries


# --------------------------------------------------------------------------------------
# Pretraining text: declarative sentences, and questions that are never answered
# --------------------------------------------------------------------------------------

FACT_SENTENCES = {
    "capital": ["The capital of {c} is {x}.", "{x} is the capital of {c}.",
                "{c}'s capital city is {x}.", "In {c}, the capital is {x}."],
    "language": ["People in {c} speak {x}.", "{x} is the language of {c}.",
                 "The language spoken in {c} is {x}.", "{x} is spoken in {c}."],
    "colour": ["The flag of {c} is {x}.", "{c} has a {x} flag.", "{c} flies a {x} flag."],
    "animal": ["The national animal of {c} is the {x}.",
               "{c} chose the {x} as its national animal.",
               "In {c}, the {x} is the national animal."],
    "export": ["{c} exports {x}.", "The main export of {c} is {x}.",
               "{X} is the chief export of {c}."],
}


def fact_sentence(rng, country, attribute):
    template = rng.choice(FACT_SENTENCES[attribute])
    x = country[attribute]
    return template.format(c=country["country"], x=x, X=cap(x))


def arithmetic_sentence(rng):
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    s = a + b
    a, b, s = words(a), words(b), words(s)
    return rng.choice([
        f"{cap(a)} plus {b} is {s}.",
        f"Adding {a} and {b} gives {s}.",
        f"{cap(s)} minus {b} is {a}.",
        f"Taking {b} away from {s} leaves {a}.",
        f"If you add {a} to {b}, you get {s}.",
        f"{cap(a)} plus {b} is {s}, so {s} minus {b} is {a}.",
    ])


def word_list(rng):
    return rng.sample(LIST_WORDS, rng.choice([3, 4]))


def list_paragraph(rng):
    items = word_list(rng)
    parts = [f"Here is a list: {', '.join(items)}.",
             f"Reversed, it reads {', '.join(reversed(items))}.",
             f"In reverse order, the words are {', '.join(reversed(items))}.",
             f"Its first word is {items[0]}.",
             f"Its last word is {items[-1]}.",
             f"Its first word is {items[0]} and its last word is {items[-1]}.",
             f"The list has {words(len(items))} words."]
    # Always state the list first; vary which observations follow, and their order.
    rest = rng.sample(parts[1:], rng.randint(2, 4))
    return " ".join([parts[0]] + rest)


def unit_sentence(rng):
    big, small, k = rng.choice(UNITS)
    n = rng.randint(1, 10)
    if n == 1:
        return rng.choice([f"One {big} equals {words(k)} {small}s.",
                           f"There are {words(k)} {small}s in a {big}."])
    return rng.choice([f"{cap(words(n))} {big}s equal {words(n * k)} {small}s.",
                       f"There are {words(n * k)} {small}s in {words(n)} {big}s."])


def worksheet(rng, questions):
    """Questions with no answers, as in an exercise sheet.

    A base model has read questions before: without these, words such as "What",
    "Which", "Reverse" or "?" would never occur in pretraining, their embeddings would
    stay at their random start, and fine-tuning would be asked to teach English as well
    as the answer format. The sheets never hold an answer, so the base still has to
    learn how to answer from the fine-tuning data. Only training questions are used:
    the base never sees an eval question.
    """
    header = rng.choice(["Questions for practice:", "Exercises:", "Homework for the week:"])
    return "\n".join([header] + rng.sample(questions, rng.randint(3, 6)))


def pretraining_documents(world, rng, n_docs, questions):
    """Short paragraphs; sentence order and wording vary so the model learns facts, not strings."""
    attributes = list(FACT_SENTENCES)
    docs = []
    for _ in range(n_docs):
        # Some documents put one sentence per line, so the model also sees words at the
        # start of a line (no leading space: a different byte-level token).
        sep = rng.choice([" ", " ", "\n"])
        # Half the documents are about countries: 150 facts need the most repetition.
        kind = rng.random()
        if kind < 0.5:
            country = rng.choice(world)
            chosen = rng.sample(attributes, rng.randint(2, len(attributes)))
            docs.append(sep.join(fact_sentence(rng, country, a) for a in chosen))
        elif kind < 0.65:
            docs.append(sep.join(arithmetic_sentence(rng) for _ in range(rng.randint(3, 6))))
        elif kind < 0.82:
            docs.append("\n".join(list_paragraph(rng) for _ in range(rng.randint(1, 2))))
        elif kind < 0.9:
            docs.append(sep.join(unit_sentence(rng) for _ in range(rng.randint(2, 4))))
        else:
            docs.append(worksheet(rng, questions))
    return docs


# --------------------------------------------------------------------------------------
# Instruction data: questions in varied phrasings, answers in a form the phrasing implies
# --------------------------------------------------------------------------------------

# Answers are mostly sentences. Byte-level BPE gives a word at the start of a line a
# different token from the same word after a space ("fox" vs " fox"); the base model has
# only seen most words after a space, so a bare "fox" would ask LoRA to learn spelling
# rather than to answer. One-word answers are kept for proper names, which pretraining
# also shows at the start of a line.
FACT_QUESTIONS = {
    "capital": [("What is the capital of {c}?", "The capital of {c} is {x}."),
                ("Which city is the capital of {c}?", "{x} is the capital of {c}."),
                ("Name the capital city of {c}.", "{x}."),
                ("{c}: what is its capital? Answer in one word.", "{x}"),
                ("Tell me the capital of {c}.", "The capital of {c} is {x}."),
                ("What city serves as the capital of {c}?", "{c}'s capital city is {x}.")],
    "capital_reverse": [("Which country has {x} as its capital?", "{c}"),
                        ("{x} is the capital of which country?", "{x} is the capital of {c}."),
                        ("Of which country is {x} the capital?", "It is the capital of {c}.")],
    "language": [("What language is spoken in {c}?", "People in {c} speak {x}."),
                 ("Which language do people in {c} speak?", "They speak {x}."),
                 ("Name the language of {c}.", "{x}"),
                 ("What do people speak in {c}? Answer in one word.", "{x}")],
    "language_reverse": [("Where is {x} spoken?", "{x} is spoken in {c}."),
                         ("In which country do people speak {x}?", "{c}")],
    "colour": [("What colour is the flag of {c}?", "The flag of {c} is {x}."),
               ("Which colour is the flag of {c}?", "{c} has a {x} flag."),
               ("What colour does {c} fly on its flag?", "{c} flies a {x} flag.")],
    "animal": [("What is the national animal of {c}?", "The national animal of {c} is the {x}."),
               ("Which animal is the symbol of {c}?", "The {x}."),
               ("Name the national animal of {c}.", "It is the {x}.")],
    "export": [("What does {c} export?", "{c} exports {x}."),
               ("What is the main export of {c}?", "The main export of {c} is {x}."),
               ("Name the chief export of {c}.", "{X}.")],
}


def fact_rows(world, rng):
    rows = []
    for country in world:
        c = country["country"]
        for key, templates in FACT_QUESTIONS.items():
            x = country[key.removesuffix("_reverse")]
            for q, a in templates:
                rows.append((q.format(c=c, x=x, X=cap(x)), a.format(c=c, x=x, X=cap(x))))
        # Yes/no questions, each country asked once truly and once falsely; the answer
        # states the fact either way, so only its first word turns on the comparison.
        others = [o for o in world if o is not country]
        capital, colour = country["capital"], country["colour"]
        wrong_capital = rng.choice(others)["capital"]
        wrong_colour = rng.choice([x for x in COLOURS if x != colour])
        rows += [(f"Is {capital} the capital of {c}?", f"Yes, the capital of {c} is {capital}."),
                 (f"Is {wrong_capital} the capital of {c}?", f"No, the capital of {c} is {capital}."),
                 (f"Is the flag of {c} {colour}?", f"Yes, the flag of {c} is {colour}."),
                 (f"Is the flag of {c} {wrong_colour}?", f"No, the flag of {c} is {colour}.")]
        profile = (f"{c} is a country whose capital is {capital}. People there speak "
                   f"{country['language']}. Its flag is {colour}, its national animal "
                   f"is the {country['animal']}, and it exports {country['export']}.")
        rows.append((f"Tell me about {c}.", profile))
        rows.append((f"Give a short profile of {c}.", profile))
    return rows


def arithmetic_rows():
    rows = []
    for a in range(11):
        for b in range(11):
            A, B, S = words(a), words(b), words(a + b)
            rows += [(f"What is {A} plus {B}?", f"{cap(A)} plus {B} is {S}."),
                     (f"Add {A} and {B}.", f"Adding {A} and {B} gives {S}."),
                     (f"What do you get when you add {A} to {B}?", f"You get {S}."),
                     (f"Compute {A} plus {B}. Answer in words.", f"The answer is {S}."),
                     (f"What is {S} minus {B}?", f"{cap(S)} minus {B} is {A}."),
                     (f"Subtract {B} from {S}.", f"Taking {B} away from {S} leaves {A}."),
                     (f"How much is {S} take away {B}?", f"The answer is {A}.")]
    return rows


def list_rows(rng, n):
    rows = []
    for _ in range(n):
        items = word_list(rng)
        shown = ", ".join(items)
        backwards = ", ".join(reversed(items))
        count = words(len(items))
        rows.append(rng.choice([
            (f"Reverse the list: {shown}", f"Reversed, the list reads {backwards}."),
            (f"Write these words in reverse order: {shown}", f"In reverse order: {backwards}."),
            (f"What is the first word in this list: {shown}?", f"The first word is {items[0]}."),
            (f"What is the last word in the list {shown}?", f"The last word is {items[-1]}."),
            (f"How many words are in this list: {shown}?", f"The list has {count} words."),
            (f"Count the words: {shown}", f"There are {count} words."),
        ]))
    return rows


def unit_rows():
    rows = []
    for big, small, k in UNITS:
        for n in range(1, 11):
            N, NK = words(n), words(n * k)
            bigs = big if n == 1 else big + "s"
            equal = "equals" if n == 1 else "equal"
            rows += [(f"How many {small}s are in {N} {bigs}?", f"There are {NK} {small}s in {N} {bigs}."),
                     (f"Convert {N} {bigs} to {small}s.", f"{cap(N)} {bigs} {equal} {NK} {small}s."),
                     (f"How many {big}s make {NK} {small}s?", f"{cap(NK)} {small}s make {N} {bigs}.")]
    return rows


def question_of(row):
    return row["prompt"].removeprefix(PROMPT_TEMPLATE.split("{")[0]).split("\n\n### Response:")[0]


def instruction_rows(world, rng):
    """All rows, shuffled, one per question: a split of them keeps eval prompts out of train."""
    candidates = fact_rows(world, rng) + arithmetic_rows() + list_rows(rng, 1000) + unit_rows()
    seen, rows = set(), []
    for question, answer in candidates:
        if question not in seen:
            seen.add(question)
            rows.append({"prompt": PROMPT_TEMPLATE.format(question=question), "completion": answer})
    rng.shuffle(rows)
    return rows


# --------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------

PAD, BOS, EOS = "<pad>", "<s>", "</s>"


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE as in Llama 3 / GPT-2: every byte is covered, so no unknown token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],  # ids 0, 1, 2: padding with zeros pads with <pad>
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    # Like Llama tokenizers, encoding adds BOS and not EOS; trainers append EOS themselves.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, model_max_length=MODEL_CONFIG["max_position_embeddings"])


def save_tokenizer(tokenizer, out):
    tokenizer.save_pretrained(out)
    # Name the class every transformers version knows (v5 would write its new backend
    # class, which older versions cannot load) and drop per-version noise.
    path = Path(out) / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg["clean_up_tokenization_spaces"] = False  # byte-level BPE decodes exactly; keep it so
    cfg.pop("transformers_version", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------
# Pretraining
# --------------------------------------------------------------------------------------

def pack(tokenizer, docs, seq_len):
    """<s> doc </s> <s> doc </s> ... cut into seq_len rows, as base models are pretrained."""
    import torch
    ids = []
    for enc in tokenizer(docs)["input_ids"]:  # each starts with BOS already
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def pretrain(tokenizer, docs, eval_docs):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(SEED)
    torch.set_num_threads(PRETRAIN["threads"])
    torch.use_deterministic_algorithms(True)

    config = LlamaConfig(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **MODEL_CONFIG)
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters")

    data = pack(tokenizer, docs, PRETRAIN["seq_len"])
    held_out = pack(tokenizer, eval_docs, PRETRAIN["seq_len"])
    steps, batch = PRETRAIN["steps"], PRETRAIN["batch_size"]
    print(f"pretraining: {data.numel():,} tokens, {steps} steps x {batch} x {PRETRAIN['seq_len']} "
          f"= {steps * batch / len(data):.1f} epochs")

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]  # norms
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": PRETRAIN["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=PRETRAIN["lr"], betas=(0.9, 0.95))

    def lr_at(step):  # linear warmup, cosine to 10%
        if step < PRETRAIN["warmup_steps"]:
            return (step + 1) / PRETRAIN["warmup_steps"]
        t = (step - PRETRAIN["warmup_steps"]) / max(1, steps - PRETRAIN["warmup_steps"])
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    gen = torch.Generator().manual_seed(SEED)
    order, pos = torch.randperm(len(data), generator=gen), 0
    start = time.time()
    model.train()
    for step in range(steps):
        if pos + batch > len(data):  # next epoch, in a new order
            order, pos = torch.randperm(len(data), generator=gen), 0
        x = data[order[pos: pos + batch]]
        pos += batch
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.3f}  {time.time() - start:6.1f}s", flush=True)
    model.eval()
    with torch.no_grad():
        held = sum(model(input_ids=b, labels=b).loss.item() for b in held_out.split(64))
        held /= len(held_out.split(64))
    print(f"pretraining done in {time.time() - start:.0f}s; held-out loss {held:.3f}")
    return model


def knowledge_probe(model, tokenizer, world):
    """Greedy-complete declarative cues; the share right shows what pretraining taught."""
    import torch
    cues = {
        "capital": [(f"The capital of {c['country']} is", c["capital"]) for c in world],
        "language": [(f"People in {c['country']} speak", c["language"]) for c in world],
        "colour": [(f"The flag of {c['country']} is", c["colour"]) for c in world],
        "animal": [(f"The national animal of {c['country']} is the", c["animal"]) for c in world],
        "export": [(f"{c['country']} exports", c["export"]) for c in world],
        "sums": [(f"{cap(words(a))} plus {words(b)} is", words(a + b))
                 for a in range(11) for b in range(11)],
    }
    scores = {}
    with torch.no_grad():
        for name, pairs in cues.items():
            right = 0
            for cue, answer in pairs:
                ids = torch.tensor([tokenizer(cue)["input_ids"]])
                out = model.generate(ids, max_new_tokens=8, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id)
                text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
                right += text.strip().startswith(answer) and not text.strip()[len(answer):][:1].isalpha()
            scores[name] = f"{right}/{len(pairs)}"
    return scores


# --------------------------------------------------------------------------------------

def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def digest(out):
    """One hash over all written files, to check that a re-run reproduces them."""
    h = hashlib.sha256()
    for path in sorted(Path(out).rglob("*")):
        if path.is_file() and path.name != "README.md":
            h.update(str(path.relative_to(out)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--pretrain-steps", type=int, default=PRETRAIN["steps"])
    args = parser.parse_args()
    PRETRAIN["steps"] = args.pretrain_steps

    from transformers import set_seed
    set_seed(SEED)  # Python, numpy and torch global generators, for anything that uses them
    rng = random.Random(SEED)  # our own choices draw from this one, in a fixed order
    world = invented_world(rng)
    rows = instruction_rows(world, rng)
    eval_rows, train_rows = rows[:N_EVAL], rows[N_EVAL:]
    questions = [question_of(r) for r in train_rows]
    docs = pretraining_documents(world, rng, 40000, questions)
    eval_docs = pretraining_documents(world, rng, 500, questions)

    # The tokenizer sees the training rows too, so the prompt format tokenizes compactly;
    # the model never sees them until fine-tuning.
    texts = docs + [r["prompt"] + r["completion"] for r in train_rows]
    tokenizer = train_tokenizer(texts, VOCAB_SIZE)
    longest = max(len(tokenizer(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in rows)
    assert longest <= MAX_ROW_TOKENS, longest

    model = pretrain(tokenizer, docs, eval_docs)
    print("knowledge after pretraining (greedy, right/asked):", knowledge_probe(model, tokenizer, world))

    out = args.out
    model_dir = out / "model"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model.save_pretrained(model_dir)
    save_tokenizer(tokenizer, model_dir)
    write_jsonl(out / "train.jsonl", train_rows)
    write_jsonl(out / "eval.jsonl", eval_rows)
    print(f"wrote {out}: {len(train_rows)} train rows, {len(eval_rows)} eval rows, "
          f"longest row {longest} tokens")
    print(f"sha256 of assets: {digest(out)}")


if __name__ == "__main__":
    main()
