"""Cross-session search: KV search (FAISS), BM25 and their fusion on planted facts.

24 stored sessions of one tenant, each of five messages: filler turns and two facts of its own.
Every fact has a paraphrased question that avoids its key words where it can, and a keyword
question that shares some. A question's hit is the right session and the message holding the
fact; hit@1 and hit@3 per method and question set:

- `kv`: `Store.search(method="kv")`, the query's vectors at the global layers searched in each
  session's FAISS index (one inner product per unit slot, see `agentmem.search.QueryEncoder`);
- `kv-exact`: retrieval's own per-head scoring (`agentmem.search.exact_scores`, a softmax per
  query over every unit of the tenant), in torch, as a reference for what the index approximates;
- `bm25`: `Store.search(method="bm25")` over the message texts;
- `hybrid`: `Store.search(method="hybrid")`, reciprocal-rank fusion of kv and bm25.

It also reports the FAISS index's recall@k of units against exact scoring, and against the brute
inner product it computes (1.0 for a flat index: a check of the id and merge bookkeeping).

    python -m benchmarks.search --models gemma-3-270m,qwen2.5-coder-0.5b-instruct \
        --out benchmarks/results/search_cpu_gemma3_270m.json
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np

import agentmem
from agentmem.persistence.search import id_span, session_index
from agentmem.search import QueryEncoder, exact_scores, index_contents

# Small units and windows: a few hundred tokens per session still make units to search.
MEMORY = agentmem.MemoryConfig(
    n_init=4, unit_size=32, n_local=64, exec_chunk=32, topk=4, repr_topk=4
)
TENANT = "bench"
KS = (1, 3, 5, 10)

# (fact, paraphrased question)
FACTS = [
    ("My sister Priya lives in Lisbon and teaches marine biology at the university there.",
     "Which city is my sibling based in, and what does she lecture on?"),
    ("The wifi password for the beach house is seagull-77-orange.",
     "What do I type to get online at the holiday cottage by the shore?"),
    ("I'm allergic to penicillin; it gave me hives when I was twelve.",
     "Which antibiotic must doctors avoid giving me?"),
    ("Our quarterly budget review got moved to Thursday at 3 pm in room B12.",
     "When is the meeting about spending for this period now scheduled?"),
    ("The dog's vet is Dr. Okafor at the Maple Street clinic.",
     "Who takes care of my pet when it is sick?"),
    ("I planted tomatoes, basil and three rows of garlic in the back garden in April.",
     "What vegetables and herbs did I sow behind the house this spring?"),
    ("The staging server runs on port 8443 and its admin user is deploybot.",
     "Which port does the pre-production machine listen on?"),
    ("My flight to Nairobi leaves at 6:40 in the morning from gate 22.",
     "What time does my plane to Kenya depart?"),
    ("Grandma's lasagna recipe uses nutmeg in the béchamel and four layers of pasta.",
     "What spice goes into the white sauce of the old family dish?"),
    ("I sold my old bicycle to a neighbour for 180 euros.",
     "How much money did I get for the bike I got rid of?"),
    ("The lease on my apartment ends on the 31st of August next year.",
     "When does my rental contract for the flat expire?"),
    ("My favourite band is a Finnish folk metal group called Korpiklaani.",
     "Which musicians do I like listening to the most?"),
    ("The printer on the third floor jams unless you use the 80 gram paper.",
     "How do I stop the office copier upstairs from getting stuck?"),
    ("I run ten kilometres every Sunday along the canal towpath.",
     "What exercise routine do I do at the weekend by the water?"),
    ("Our daughter's school play is on the evening of May 14th and she plays the fox.",
     "What role does my child have in the performance, and when is it?"),
    ("The database backup job failed because the disk on db-03 was full.",
     "Why did last night's data snapshot not complete?"),
    ("I keep the spare house key under the blue flowerpot by the shed.",
     "Where is the extra way to get into my home hidden?"),
    ("My blood type is O negative.",
     "What would a transfusion for me need to match?"),
    ("The kitchen renovation quote from Bauer & Sons came to 14,500 dollars.",
     "How expensive did the builders say redoing the cooking area would be?"),
    ("I learned to play the cello when I lived in Vienna as a student.",
     "Which string instrument did I pick up during my university years abroad?"),
    ("The client in Osaka prefers to be contacted by email, never by phone.",
     "How should we reach the Japanese customer?"),
    ("My car insurance renews in March and costs 620 pounds a year.",
     "When is the cover for my vehicle due again and what is the price?"),
    ("We named the new kitten Biscuit because of her light brown fur.",
     "What is the young cat called and why?"),
    ("The API rate limit is 500 requests per minute per token.",
     "How many calls can one key make to the service each minute?"),
    ("My passport expires on 2 February 2027, so I need to renew it soon.",
     "When does my travel document run out?"),
    ("I drink my coffee black with no sugar, just a little cinnamon.",
     "How do I take my morning brew?"),
    ("The bug in the checkout page came from a rounding error in the tax calculation.",
     "What caused the problem when customers paid online?"),
    ("My brother Tomas is getting married in Seville in October.",
     "In which Spanish city is the family wedding this autumn?"),
    ("The solar panels on our roof produced 410 kilowatt hours last month.",
     "How much electricity did the house generate from sunlight recently?"),
    ("I was born in a small village near Kraków called Zabierzów.",
     "What is the name of the place I come from?"),
    ("The conference talk is limited to twenty minutes plus five for questions.",
     "How long may my presentation at the event last?"),
    ("My therapist suggested journaling every night before bed to reduce anxiety.",
     "What did the counsellor recommend for my stress?"),
    ("The repository's main branch is protected; merges need two approvals.",
     "What is required before code can land on the default line of development?"),
    ("I lent my drill and a box of screws to Marcus last weekend.",
     "Who has my power tool right now?"),
    ("Our team's offsite will be at a lodge in the Scottish Highlands.",
     "Where is the group retreat going to take place?"),
    ("My glasses prescription is minus 2.25 in the left eye and minus 2.5 in the right.",
     "How strong are my lenses?"),
    ("The pasta factory shipment of 300 crates arrives on pallet 9 at dock C.",
     "Where will the delivery of noodles be unloaded?"),
    ("I stopped eating meat three years ago, but I still eat fish.",
     "What is my diet like?"),
    ("The cron job for invoices runs at 2 am UTC every day.",
     "When does the billing task start each night?"),
    ("My mortgage interest rate is fixed at 3.1 percent for ten years.",
     "What do I pay the bank on my home loan, and for how long is it locked?"),
    ("The laptop's battery swells, so the technician will replace it on Friday.",
     "What is wrong with my computer and when is the repair?"),
    ("My son is learning Mandarin with a tutor on Tuesday evenings.",
     "Which language does my boy study, and when are his lessons?"),
    ("The greenhouse thermostat should stay between 18 and 24 degrees.",
     "What temperature range do the plants under glass need?"),
    ("I booked a table for six at the Ethiopian restaurant on Friday night.",
     "Where are we having dinner at the end of the week, and for how many?"),
    ("The museum pass gives free entry to eleven galleries until December.",
     "How many art venues can I visit without paying, and until when?"),
    ("My neighbour's parrot can whistle the first bars of a Beethoven symphony.",
     "What tune does the bird next door know?"),
    ("The hiking trail to the waterfall is closed after the landslide in June.",
     "Why can't we walk to the falls this summer?"),
    ("I keep my tax documents in the grey folder in the second drawer of my desk.",
     "Where did I file the papers for the revenue office?"),
]  # fmt: skip

# For each fact, a question that shares key words with it (how users often ask).
KEYWORD_QUESTIONS = [
    "Where does Priya live and teach?",
    "What is the beach house wifi password?",
    "What am I allergic to?",
    "When is the quarterly budget review?",
    "What is the name of the dog's vet?",
    "What did I plant in the back garden?",
    "Which port does the staging server run on?",
    "When does my flight to Nairobi leave?",
    "What goes into grandma's lasagna béchamel?",
    "How much did I sell my old bicycle for?",
    "When does the lease on my apartment end?",
    "What is my favourite band?",
    "Which paper stops the third floor printer from jamming?",
    "How far do I run on Sundays?",
    "When is our daughter's school play?",
    "Why did the database backup job fail?",
    "Where is the spare house key?",
    "What is my blood type?",
    "How much was the kitchen renovation quote?",
    "Where did I learn to play the cello?",
    "How does the client in Osaka want to be contacted?",
    "When does my car insurance renew?",
    "What did we name the new kitten?",
    "What is the API rate limit?",
    "When does my passport expire?",
    "How do I drink my coffee?",
    "What caused the bug in the checkout page?",
    "Where is my brother Tomas getting married?",
    "How much did the solar panels produce last month?",
    "In which village near Kraków was I born?",
    "How long is the conference talk?",
    "What did my therapist suggest?",
    "How many approvals do merges to the main branch need?",
    "Who did I lend my drill to?",
    "Where will our team's offsite be?",
    "What is my glasses prescription?",
    "Where does the pasta factory shipment arrive?",
    "When did I stop eating meat?",
    "When does the invoices cron job run?",
    "What is my mortgage interest rate?",
    "When will the technician replace the laptop battery?",
    "When does my son learn Mandarin?",
    "Which range should the greenhouse thermostat stay in?",
    "Where did I book a table for six?",
    "How many galleries does the museum pass cover?",
    "What can my neighbour's parrot whistle?",
    "Why is the hiking trail to the waterfall closed?",
    "Where do I keep my tax documents?",
]

FILLER = [
    "Sure, I can help with that. Let me know if there is anything else you want me to keep.",
    "Thanks. I have a few errands to run this afternoon and some emails to answer before dinner.",
    "Noted. I will remember this for later and remind you when it becomes relevant again.",
    "The weather has been grey and rainy all week, so most plans have been moved indoors.",
    "Good morning! Here is a short summary of what we discussed yesterday and what is still open.",
    "I am going to grab a coffee and then we can continue with the rest of the list.",
    "Understood. Is there anything specific you want me to prepare before we talk next time?",
    "Let me think about that for a moment; there are a few options and each has trade-offs.",
]


def build_sessions(lm, store, n_sessions: int, seed: int) -> list[dict]:
    """Stores the sessions; returns one record per fact: session, message index, question."""
    rng = random.Random(seed)
    questions = []
    for s in range(n_sessions):
        sid = f"session-{s:02d}"
        session = lm.session(
            sid, store=store, tenant=TENANT, memory=MEMORY, progress=False, autosave=False
        )
        (fact_a, q_a), (fact_b, q_b) = FACTS[2 * s], FACTS[2 * s + 1]
        turns = [
            ("user", rng.choice(FILLER)),
            ("user", f"{fact_a} {rng.choice(FILLER)}"),
            ("assistant", rng.choice(FILLER)),
            ("user", f"{rng.choice(FILLER)} {fact_b}"),
            ("assistant", rng.choice(FILLER)),
        ]
        for n, (role, text) in enumerate(turns):
            session.append(text, role=role)
            if n in (2, len(turns) - 1):  # two segments: the index is merged across saves
                session.save()
        questions += [
            {
                "session": sid,
                "message": 1,
                "fact": fact_a,
                "paraphrased": q_a,
                "keyword": KEYWORD_QUESTIONS[2 * s],
            },
            {
                "session": sid,
                "message": 3,
                "fact": fact_b,
                "paraphrased": q_b,
                "keyword": KEYWORD_QUESTIONS[2 * s + 1],
            },
        ]
    return questions


def _is_hit(hit, want: dict, texts: dict) -> bool:
    return hit.session_id == want["session"] and hit.message[1] == texts[want["session"]]


def units_of(store, infos) -> tuple[list, list, np.ndarray, np.ndarray]:
    """Every session's index: (indexes, unit keys (session, start, end), rows' vectors, rows'
    unit)."""
    indexes, keys, vectors, owner = [], [], [], []
    for info in infos:
        index = session_index(store, info.id, tenant=TENANT)
        indexes.append(index)
        ids, rows = index_contents(index)
        starts, ends = id_span(ids)
        for start, end, row in zip(starts.tolist(), ends.tolist(), rows, strict=True):
            key = (info.id, start, end)
            if not keys or keys[-1] != key:
                if key in keys:
                    raise AssertionError("a unit's slots are not contiguous in its index")
                keys.append(key)
            vectors.append(row)
            owner.append(len(keys) - 1)
    return indexes, keys, np.stack(vectors), np.asarray(owner)


def faiss_units(indexes, infos, vector: np.ndarray, k: int) -> list[tuple[str, int, int]]:
    """The tenant's top-k units by the FAISS search: each session's top-k units, merged."""
    found = []
    for info, index in zip(infos, indexes, strict=True):
        scores, ids = index.search(vector[None], min(index.ntotal, 8 * k))
        starts, ends = id_span(ids[0])
        seen = set()
        for score, start, end in zip(
            scores[0].tolist(), starts.tolist(), ends.tolist(), strict=True
        ):
            if start not in seen and len(seen) < k:
                seen.add(start)
                found.append((score, (info.id, start, end)))
    return [key for _, key in sorted(found, key=lambda f: -f[0])[:k]]


def message_of(key, messages) -> str:
    """The text of the message a unit (session, start, end) overlaps most."""
    sid, start, end = key
    best = max(messages[sid], key=lambda m: min(end, m.end) - max(start, m.start))
    return best.text


SETS = ("paraphrased", "keyword")
METHODS = ("kv", "kv-exact", "bm25", "hybrid")


def _exact_top(encoder, text, memory, vectors, owner, heads, keys, messages):
    """Units by exact scoring (best first), and the first 3 messages they fall in."""
    queries, scale = encoder.queries(text, memory)
    order = np.argsort(-exact_scores(queries, scale, vectors, owner, heads))
    found = []
    for u in order:
        where = (keys[u][0], message_of(keys[u], messages))
        if where not in found:
            found.append(where)
        if len(found) == 3:
            break
    return order, found


def run(model_name: str, n_sessions: int, seed: int) -> dict:
    started = time.perf_counter()
    lm = agentmem.load(model_name, MEMORY, device="cpu")
    load_s = time.perf_counter() - started
    root = Path(tempfile.mkdtemp(prefix="agentmem-search-"))
    store = agentmem.Store(root=root)
    started = time.perf_counter()
    questions = build_sessions(lm, store, n_sessions, seed)
    build_s = time.perf_counter() - started
    infos = store.sessions(tenant=TENANT)
    memory = infos[0].memory
    messages = {info.id: store.messages(info.id, tenant=TENANT) for info in infos}
    indexes, keys, vectors, owner = units_of(store, infos)
    heads = lm.model.config.num_key_value_heads
    hits = {qset: {m: {1: 0, 3: 0} for m in METHODS} for qset in SETS}
    recall = {k: [] for k in KS}
    brute = {k: [] for k in KS}
    search_s = {m: 0.0 for m in ("read", "kv", "bm25", "hybrid")}
    rows = []
    for q in questions:
        want = (q["session"], messages[q["session"]][q["message"]].text)
        for qset in SETS:
            text = q[qset]
            row = {"set": qset, "question": text, "session": q["session"]}
            encoder = QueryEncoder(lm)  # a fresh one: the model reads the query (timed) once
            t0 = time.perf_counter()
            encoder.queries(text, memory)
            search_s["read"] += time.perf_counter() - t0
            for method in ("kv", "bm25", "hybrid"):
                t0 = time.perf_counter()
                model = None if method == "bm25" else encoder
                found = store.search(text, tenant=TENANT, k=3, model=model, method=method)
                search_s[method] += time.perf_counter() - t0
                ranks = [(f.session_id, f.message[1]) == want for f in found]
                row[method] = [f"{f.session_id}: {f.text[:48]}" for f in found]
                hits[qset][method][1] += bool(ranks[:1] and ranks[0])
                hits[qset][method][3] += any(ranks)
            order, found = _exact_top(encoder, text, memory, vectors, owner, heads, keys, messages)
            hits[qset]["kv-exact"][1] += found[0] == want
            hits[qset]["kv-exact"][3] += want in found
            vector = encoder.vector(text, memory)
            inner = vectors @ vector  # brute force over every slot; a unit's score its best slot's
            best = np.full(len(keys), -np.inf)
            np.maximum.at(best, owner, inner)
            for k in KS:
                got = set(faiss_units(indexes, infos, vector, k))
                recall[k].append(len(got & {keys[u] for u in order[:k]}) / k)
                brute[k].append(len(got & {keys[u] for u in np.argsort(-best)[:k]}) / k)
            rows.append(row)
    n = len(questions)
    return {
        "model": model_name,
        "memory": MEMORY.model_dump(),
        "sessions": n_sessions,
        "questions_per_set": n,
        "messages": sum(len(m) for m in messages.values()),
        "units": len(keys),
        "index_rows": len(owner),
        "dim": int(vectors.shape[1]),
        "hit": {
            qset: {m: {f"@{k}": v / n for k, v in h.items()} for m, h in per.items()}
            for qset, per in hits.items()
        },
        "faiss_recall_vs_exact": {f"@{k}": float(np.mean(v)) for k, v in recall.items()},
        "faiss_recall_vs_brute_ip": {f"@{k}": float(np.mean(v)) for k, v in brute.items()},
        "search_ms": {m: 1000 * s / (n * len(SETS)) for m, s in search_s.items()},
        "load_s": load_s,
        "build_s": build_s,
        "rows": rows,
    }


def table(result: dict) -> str:
    lines = [
        f"{result['model']}: {result['sessions']} sessions ({result['messages']} messages), "
        f"{result['questions_per_set']} facts, {result['units']} units "
        f"({result['index_rows']} index rows of {result['dim']} dims)",
        "| method | paraphrased hit@1 | hit@3 | keyword hit@1 | hit@3 | search ms |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in METHODS:
        p, w = result["hit"]["paraphrased"][method], result["hit"]["keyword"][method]
        ms = result["search_ms"].get(method)
        shown = f"{ms:.0f}" if ms is not None else "-"
        lines.append(
            f"| {method} | {p['@1']:.2f} | {p['@3']:.2f} | {w['@1']:.2f} | {w['@3']:.2f} "
            f"| {shown} |"
        )
    lines.append(f"Reading a query (model forward): {result['search_ms']['read']:.0f} ms.")
    recall = result["faiss_recall_vs_exact"]
    brute = result["faiss_recall_vs_brute_ip"]
    lines.append(
        "FAISS recall@k of units vs exact scoring: "
        + ", ".join(f"{k} {v:.2f}" for k, v in recall.items())
        + "; vs brute-force inner product: "
        + ", ".join(f"{k} {v:.2f}" for k, v in brute.items())
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gemma-3-270m")
    parser.add_argument("--sessions", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if not 20 <= args.sessions <= len(FACTS) // 2:
        parser.error(f"--sessions must lie in [20, {len(FACTS) // 2}]")
    results = []
    for name in args.models.split(","):
        result = run(name, args.sessions, args.seed)
        print(table(result), flush=True)
        results.append(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
