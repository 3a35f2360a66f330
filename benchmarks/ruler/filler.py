"""Varied filler for the RULER-style prompts, from a seeded generator: prose sentences (templates x
word lists), tool-output lines (logs, listings, grep hits, test reports, JSON records, git logs,
process tables) and pseudo-words. One generator never yields the same sentence or line twice, so
a prompt repeats none; nothing is downloaded or read from disk.
"""

from __future__ import annotations

import random


def _split(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split("|"))


PEOPLE = _split(
    "the engineer|a young teacher|my neighbour|the old fisherman|our manager|the librarian|"
    "a nurse on the night shift|the baker on the corner|my grandmother|a retired pilot|"
    "the new intern|the mayor|a visiting botanist|the ferry captain|her younger brother|"
    "the carpenter|a local historian|the night watchman|two of the students|the gardener|"
    "a travelling musician|the postman|an architect from the city|the shopkeeper|my cousin|"
    "the museum guide|a quiet accountant|the head chef|a geologist|the school principal|"
    "the beekeeper|a photographer|the tailor|our landlord|the station master|a painter"
)
PLACES = _split(
    "in the harbour|near the station|at the edge of town|behind the old mill|"
    "in the basement of the library|on the third floor|along the river path|"
    "under the railway bridge|in the village square|at the back of the shop|"
    "on the hill above the farm|inside the greenhouse|by the lighthouse|"
    "in the east wing of the museum|at the bus depot|near the bakery|in the cellar|"
    "on the roof terrace|at the end of the pier|in the small park|beside the canal|"
    "in the workshop|at the market|in the old observatory|near the football ground|"
    "on a quiet side street|in the valley|by the reservoir|in the reading room|on the island"
)
TIMES = _split(
    "every Tuesday|before dawn|late in the autumn|after the storm|during the long winter|"
    "on most weekends|in early spring|at the end of each month|on the first warm day of the year|"
    "shortly after midnight|during the harvest|on rainy afternoons|once a year|"
    "in the middle of summer|twice a week|after the festival|at sunset|in the dry season|"
    "on public holidays|just before the exams"
)
VERBS = _split(
    "repaired|painted|measured|photographed|carried|cleaned|sorted|studied|described|sketched|"
    "rebuilt|catalogued|inspected|moved|restored|counted|labelled|polished|mapped|tested|"
    "weighed|wrapped|guarded|decorated|examined|collected|replaced|borrowed|delivered|planted"
)
OBJECTS = _split(
    "the wooden fence|a stack of old letters|the broken radio|an old map of the coast|"
    "the garden gate|a box of seeds|the brass telescope|a pile of bricks|"
    "the stained glass window|a crate of apples|the rusty bicycle|a collection of shells|"
    "the clock tower|a set of blueprints|the cracked mirror|a basket of wool|"
    "the small fishing boat|a row of lanterns|the iron stove|a drawer full of keys|"
    "the piano in the hall|a jar of buttons|the stone wall|a bundle of newspapers|"
    "the copper kettle|a roll of canvas|the weather vane|a tray of seedlings|"
    "the leather armchair|a chest of tools|the printing press|a shelf of atlases"
)
ADJECTIVES = _split(
    "quiet|crowded|narrow|bright|dusty|cold|noisy|peaceful|damp|sunny|colourful|empty|busy|"
    "elegant|shabby|spacious|gloomy|cheerful|remote|tidy|windy|fragrant"
)
THINGS = _split(
    "rivers|bridges|libraries|orchards|glaciers|markets|lighthouses|bees|volcanoes|old trains|"
    "wind farms|tide pools|mountain huts|paper mills|street lamps|coral reefs|sand dunes|"
    "canal locks|city parks|migrating geese|clock makers|apple trees|small harbours|stone circles"
)
TOPICS = _split(
    "the price of timber|the new bus timetable|the history of the town|"
    "the best way to bake bread|whether the bridge should be widened|the meaning of an old song|"
    "the rules of chess|the migration of swallows|the colour of the new school|"
    "the road to the coast|the flooding in the lower fields|the plans for the museum|"
    "the origin of the town's name|the quality of the well water|the layout of the garden"
)
SMELLS = _split(
    "fresh bread|wet earth|pine resin|salt and seaweed|wood smoke|cut grass|old paper|coffee|"
    "oranges|machine oil|lavender|rain"
)
SKILLS = _split(
    "sail a small boat|bind books|repair clocks|read old maps|keep bees|carve wood|"
    "play the violin|bake sourdough|identify birds by their songs|build dry stone walls|"
    "sharpen knives|weave baskets|restore paintings|forecast the weather from the clouds"
)
FEELINGS = _split("proud|tired|surprised|relieved|curious|nervous|delighted|puzzled|calm|restless")
WEATHER = _split(
    "a thick fog|a light drizzle|a strong wind from the west|a clear sky|heavy snow|"
    "a sudden hailstorm|warm sunshine|a low grey cloud"
)
CITIES = _split(
    "Lisbon|Oslo|Krakow|Valencia|Dublin|Tallinn|Porto|Ghent|Bergen|Turin|Seville|Utrecht|"
    "Bruges|Galway|Lyon|Graz"
)
TEMPLATES = (
    "{time}, {person} {verb} {object} {place}.",
    "{person} said that {object} {place} had not been {verb} since {year}.",
    "Nobody expected {object} to be so {adj}, but {person} insisted on keeping it.",
    "The {adj} streets {place} were a favourite subject of {person}.",
    "If you walk {place}, you will notice {object} and, a little farther on, {object2}.",
    "{person} kept a notebook about {things} and filled {n} pages of it {time}.",
    "It was {adj} {place} {time}, so {person} {verb} {object} instead.",
    "According to {person}, {things} are at their best {time}.",
    "There used to be a small museum {place} that displayed {object}.",
    "{person} and {person2} argued about {topic} until late in the evening.",
    "Most visitors never notice {object} {place}.",
    "The report on {topic} ran to {n} pages and took {person} {n2} weeks to finish.",
    "{time}, the air {place} smelled of {smell}.",
    "{person} learned to {skill} from {person2} in {year}.",
    "A letter from {person} described {object} in surprising detail.",
    "Years later, {person} still remembered {object} {place}.",
    "When there was {weather} {time}, {person} {verb} {object}.",
    "{person} felt {feeling} when {person2} {verb} {object}.",
    "On a trip to {city}, {person} bought {object} for almost nothing.",
    "The guidebook says that the {things} {place} are worth a detour.",
    "{person} once spent a whole afternoon {place}, reading about {things}.",
    "Some say {object} came from {city}, but {person} doubts it.",
    "In {year}, {person} {verb} {object} for the first time.",
    "{person} wrote {n} short essays about {topic}.",
    "A photograph of {object} hangs above the desk of {person}.",
    "Every so often {person} would stop {place} to look at {object}.",
    "Few people know that {things} were once common {place}.",
    "The conversation turned to {topic}, and {person} had a lot to say.",
    "{person} asked {person2} to keep an eye on {object} {time}.",
    "Because of {topic}, {person} postponed the visit to {city}.",
    "{person} has {verb} {object} more than {n} times.",
    "The children {place} liked to watch {person} at work.",
    "A small sign {place} asks visitors not to touch {object}.",
    "{person} suspects that the {things} {place} are not as {adj} as they used to be.",
    "After {n2} years in {city}, {person} came back and {verb} {object}.",
    "The story of {object} was told differently by {person} and by {person2}.",
)


class Prose:
    """Sentences and paragraphs of plain prose, seeded, each sentence at most once."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()

    def sentence(self) -> str:
        rng = self.rng
        while True:
            people = rng.sample(PEOPLE, 2)
            objects = rng.sample(OBJECTS, 2)
            text = rng.choice(TEMPLATES).format(
                person=people[0], person2=people[1], object=objects[0], object2=objects[1],
                place=rng.choice(PLACES), time=rng.choice(TIMES), verb=rng.choice(VERBS),
                adj=rng.choice(ADJECTIVES), things=rng.choice(THINGS), topic=rng.choice(TOPICS),
                smell=rng.choice(SMELLS), skill=rng.choice(SKILLS), feeling=rng.choice(FEELINGS),
                weather=rng.choice(WEATHER), city=rng.choice(CITIES),
                n=rng.randint(2, 300), n2=rng.randint(2, 12), year=rng.randint(1850, 2020),
            )  # fmt: skip
            text = text[0].upper() + text[1:]
            if text not in self.seen:
                self.seen.add(text)
                return text

    def paragraph(self) -> list[str]:
        return [self.sentence() for _ in range(self.rng.randint(3, 7))]


COMPONENTS = _split(
    "scheduler|api|worker|cache|db|auth|billing|indexer|mailer|storage|gateway|search|notifier"
)
WORDS = _split(
    "alpha|orders|invoices|sessions|users|reports|uploads|thumbnails|metrics|events|carts|"
    "tokens|exports|webhooks|profiles|backups|ledger|catalog|shipments|audit|coupons|tenants"
)
NAMES = _split(
    "load_config|parse_header|fetch_rows|build_index|resolve_path|send_batch|retry_later|"
    "open_store|flush_queue|render_page|check_quota|merge_ranges|split_chunks|encode_row|"
    "validate_user|compute_hash|close_cursor|read_manifest|schedule_job|refresh_token"
)
MODULES = _split(
    "src/app|src/core|src/api|src/store|src/jobs|src/auth|src/web|lib/util|lib/io|tools/ci"
)
FILES = _split(
    "main|config|models|views|routes|handlers|queue|cache|client|server|schema|utils|tasks|cli"
)
USERS = _split("build|deploy|www-data|postgres|root|ci|alice|bob|svc-api|backup")
LEVELS = ("INFO",) * 6 + ("DEBUG",) * 2 + ("WARN", "ERROR")
MESSAGES = (
    "request {method} /{word}/{id} completed with status {status} in {ms} ms",
    "cache miss for key {word}:{id}",
    "retrying connection to db-{k}.internal:{port} (attempt {k} of 5)",
    "worker {k} picked up job {id}",
    "flushed {n} records to table {word}",
    "user {id} logged in from 10.0.{k}.{n}",
    "queue {word} has {n} pending messages",
    "slow query on {word} took {ms} ms",
    "config reloaded from /etc/{component}/{file}.yaml",
    "health check passed for {component}-{k}",
    "disk usage on /var is at {pct}%",
    "scheduled task {name} finished",
    "rate limit reached for client {id}",
    "sent {n} notifications in batch {id}",
    "index {word}_{file} rebuilt in {sec} s",
    "evicted {n} entries from the {word} cache",
    "opened {n} connections to the {component} pool",
)
CODE = (
    "return {name}({word})",
    "if {word} is None:",
    "self.{word} = {name}({file})",
    "for item in {word}:",
    'raise ValueError("bad {word} in {file}")',
    'logger.info("{name} done in %s ms", {word})',
    '{word} = options.get("{file}", {n})',
    "def {name}(self, {word}, timeout={n}):",
    "assert {name}({word}) == {n}",
    "# TODO: {name} should not block on {word}",
)
SUBJECTS = (
    "Fix {word} handling in {file}",
    "Add {word} option to {name}",
    "Refactor {file} around {name}",
    "Bump {word} client to 2.{k}.{n}",
    "Document {name} in the {file} guide",
    "Speed up {name} for large {word}",
    "Revert change to {file} {word} defaults",
)
STATUSES = ("PASSED",) * 8 + ("FAILED", "SKIPPED")
MONTHS = _split("Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec")
FOOTERS = (
    "exit code {code} after {ms} ms",
    "{n} lines shown, exit code {code}",
    "done in {ms} ms",
    "{n} more lines not shown",
    "command finished with status {code} in {ms} ms",
)
KINDS = ("log", "ls", "grep", "pytest", "json", "git", "ps")


DRAWS = {
    "method": lambda rng: rng.choice(("GET", "POST", "PUT", "DELETE")),
    "word": lambda rng: rng.choice(WORDS),
    "id": lambda rng: rng.randint(100, 99999),
    "status": lambda rng: rng.choice((200, 200, 201, 204, 404, 500)),
    "ms": lambda rng: rng.randint(1, 9999),
    "k": lambda rng: rng.randint(1, 9),
    "port": lambda rng: rng.randint(1024, 65535),
    "n": lambda rng: rng.randint(1, 9999),
    "component": lambda rng: rng.choice(COMPONENTS),
    "file": lambda rng: rng.choice(FILES),
    "pct": lambda rng: rng.randint(1, 99),
    "name": lambda rng: rng.choice(NAMES),
    "sec": lambda rng: f"{rng.uniform(0.1, 99):.2f}",
}


class _Fields(dict):
    """A line template's values, each drawn when the template first asks for it."""

    def __init__(self, rng: random.Random) -> None:
        super().__init__()
        self.rng = rng

    def __missing__(self, name: str) -> object:
        value = self[name] = DRAWS[name](self.rng)
        return value


class ToolText:
    """Lines of tool output (logs, listings, grep hits, test reports, JSON records, git logs,
    process tables) and the commands that print them, seeded, each line at most once. Numbers stay
    below 7 digits and hashes hold a letter, so a 7-digit needle value never occurs by chance."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.seen: set[str] = set()
        self.clock = rng.randint(0, 10**6)  # seconds since 2026-03-01 00:00:00, only ever grows

    def _fields(self) -> _Fields:
        return _Fields(self.rng)

    def _stamp(self) -> str:
        self.clock += self.rng.randint(1, 40)
        day, rest = divmod(self.clock, 86400)
        hour, rest = divmod(rest, 3600)
        month, day = divmod(day, 28)
        return (
            f"2026-{month % 12 + 1:02d}-{day + 1:02d} {hour:02d}:{rest // 60:02d}:{rest % 60:02d}"
            f".{self.rng.randint(0, 999):03d}"
        )

    def log_line(self, message: str | None = None) -> str:
        """A log line; with `message`, that message (a needle) in a line of the same form."""
        component = self.rng.choice(COMPONENTS)
        level = "INFO" if message is not None else self.rng.choice(LEVELS)
        text = message or self.rng.choice(MESSAGES).format_map(self._fields())
        return f"{self._stamp()} {level:<5} [{component}] {text}"

    def _line(self, kind: str) -> str:
        rng, f = self.rng, self._fields()
        if kind == "log":
            return self.log_line()
        path = f"{rng.choice(MODULES)}/{f['file']}_{f['word']}.py"
        if kind == "ls":
            perm = rng.choice(("-rw-r--r--", "-rwxr-xr-x", "drwxr-xr-x", "-rw-------"))
            user = rng.choice(USERS)
            return (
                f"{perm} 1 {user:<8} {user:<8} {rng.randint(0, 999999):>7} "
                f"{rng.choice(MONTHS)} {rng.randint(1, 28):>2} {rng.randint(0, 23):02d}:"
                f"{rng.randint(0, 59):02d} {path}"
            )
        if kind == "grep":
            return f"{path}:{rng.randint(1, 2999)}:    {rng.choice(CODE).format_map(f)}"
        if kind == "pytest":
            test = f"tests/test_{f['file']}.py::test_{f['name']}_{f['word']}"
            return f"{test} {rng.choice(STATUSES)} [{rng.randint(0, 100):>3}%]"
        if kind == "json":
            return (
                f'{{"id": {f["id"]}, "name": "{f["word"]}-{f["file"]}", "status": '
                f'"{rng.choice(("ok", "pending", "failed", "archived"))}", "owner": '
                f'"{rng.choice(USERS)}", "size": {f["n"]}, "updated": "{self._stamp()}"}}'
            )
        if kind == "git":
            sha = "".join(rng.choice("0123456789abcdef") for _ in range(6))
            return f"{rng.choice('abcdef')}{sha} {rng.choice(SUBJECTS).format_map(f)}"
        if kind == "ps":
            cpu, mem = rng.uniform(0, 99), rng.uniform(0, 40)
            return (
                f"{rng.choice(USERS):<9}{rng.randint(2, 99999):>6} {cpu:4.1f} {mem:4.1f} "
                f"{rng.randint(1000, 999999):>7} {rng.randint(100, 99999):>6} ?  S  "
                f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}  python -m {f['file']}."
                f"{f['name']} --{f['word']}"
            )
        raise ValueError(f"unknown tool output kind '{kind}'")

    def line(self, kind: str) -> str:
        while True:
            text = self._line(kind)
            if text not in self.seen:
                self.seen.add(text)
                return text

    def footer(self) -> str:
        """A closing line that ends in a letter or a digit: byte-level BPE joins a line's final
        punctuation with the newline after it, which would make the pieces' counts disagree with
        the text's where the chat template follows."""
        rng = self.rng
        while True:
            text = rng.choice(FOOTERS).format(
                n=rng.randint(2, 9999), ms=rng.randint(1, 99999), code=rng.choice((0, 0, 0, 1, 2))
            )
            if text not in self.seen:
                self.seen.add(text)
                return text

    def command(self, kind: str) -> str:
        rng, f = self.rng, self._fields()
        return {
            "log": f"tail -n {rng.randint(100, 5000)} /var/log/{f['component']}/current.log",
            "ls": f"ls -l {rng.choice(MODULES)}/{f['word']}",
            "grep": f'grep -rn "{f["word"]}" {rng.choice(MODULES)}',
            "pytest": f"pytest -q tests/test_{f['file']}.py -k {f['word']}",
            "json": f"curl -s localhost:{f['port']}/api/{f['word']}?page={f['k']}",
            "git": f"git log --oneline -n {rng.randint(50, 900)} -- {rng.choice(MODULES)}",
            "ps": f"ps aux --sort=-%mem | head -n {rng.randint(50, 900)}",
        }[kind]


INTROS = (
    "Let me check with",
    "Next I'll run",
    "Running",
    "I'll look at the output of",
    "To narrow it down, I'm running",
    "Checking with",
    "Now let's try",
    "Let's see what we get from",
)
CONSONANTS = "bdfgklmnprstvz"
VOWELS = "aeiou"
SYLLABLES = tuple(c + v for c in CONSONANTS for v in VOWELS)  # 70


def pseudo_words(rng: random.Random, n: int) -> list[str]:
    """n distinct pronounceable pseudo-words of three syllables ('kodamu'), seeded."""
    size = len(SYLLABLES)
    if n > size**3:
        raise ValueError(f"at most {size**3} distinct pseudo-words")
    out = []
    for index in rng.sample(range(size**3), n):
        a, rest = divmod(index, size * size)
        b, c = divmod(rest, size)
        out.append(SYLLABLES[a] + SYLLABLES[b] + SYLLABLES[c])
    return out
