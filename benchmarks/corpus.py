"""Synthetic, deterministic texts: users' memories, users' questions, and the needle test.

Everything here is generated from templates with a seeded random generator, so every run (and
every machine) sees the same texts, and cached embeddings of them stay valid.
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from headroom_memory_integrations.keys import MAX_KEYS, clean_keys, lenient_keys

NAMES = (
    "Alice Bruno Chen Dana Elif Farah Goran Hana Ivan Jamal Keiko Liam Maya Nikos Olu Priya "
    "Quinn Rosa Sven Tariq Uma Viktor Wen Ximena Yusuf Zara Boris Carmen Diego Esther Felix "
    "Greta Hugo Ingrid Jonas Kira Lars Mina Noah Oskar Paula Rafael Sara Tomas Vera Yara "
    "Marta Kenji Amara Tomasz Ines Dev Leila Oscar Yuki Farid Anika Mateo Sofia Emeka Lucia "
    "Aaron Beatriz Callum Dmitri Eun-ji Fatima Gabriel Helga Imran Jun Kofi Leon Malik Nadia "
    "Orla Pedro Rania Stefan Tenzin Ulrich Valentina Wiktor Xavier Yasmin Zoltan Ahmed Bianca "
    "Cyrus Delia Ebony Fergus Gustavo Heidi Isaac Jana Kwame Lena Mohammed Nora Otto Pilar "
    "Rui Sanjay Thea Ugo Vanessa Wanjiru Youssef Zeynep Ayumi Bastian Chiara Dario Eleni Finn "
    "Gia Hamid Ilse Joaquin Katya Lorenzo Mei Nils Ottilie Petra Reza Saoirse Teo Vikram"
).split()
RELATIONS = (
    "sister",
    "brother",
    "mother",
    "father",
    "cousin",
    "aunt",
    "uncle",
    "grandmother",
    "grandfather",
    "best friend",
    "roommate",
    "neighbour",
    "colleague",
    "manager",
    "partner",
    "son",
    "daughter",
    "niece",
    "nephew",
    "mentor",
    "landlord",
    "wife",
    "husband",
    "college roommate",
    "stepfather",
)
JOBS = (
    "nurse",
    "pilot",
    "architect",
    "dentist",
    "software engineer",
    "chef",
    "primary school teacher",
    "lawyer",
    "firefighter",
    "accountant",
    "journalist",
    "electrician",
    "pharmacist",
    "veterinarian",
    "photographer",
    "plumber",
    "librarian",
    "physiotherapist",
    "data analyst",
    "carpenter",
    "barista",
    "translator",
    "marine biologist",
    "paramedic",
    "florist",
    "tax advisor",
    "graphic designer",
    "social worker",
    "baker",
    "surgeon",
    "beekeeper",
    "jazz pianist",
    "air traffic controller",
    "glassblower",
    "sommelier",
    "pediatric surgeon",
    "locksmith",
    "violin maker",
    "volcanologist",
    "park ranger",
)
CITIES = tuple(
    city.replace("_", " ")
    for city in (
        "Lisbon Berlin Osaka Toronto Nairobi Lima Oslo Seoul Austin Lyon Porto Krakow Denver "
        "Melbourne Dublin Madrid Boston Hanoi Munich Seattle Athens Vienna Prague Bogota Montreal "
        "Glasgow Tallinn Kyoto Chicago Warsaw Venice Honolulu Reykjavik Cremona Napa Marseille "
        "Edinburgh Valencia Zurich Helsinki New_Orleans Accra Auckland Bangalore Barcelona "
        "Bilbao Brisbane Budapest Cairo Copenhagen Dakar Florence Geneva Hamburg Istanbul "
        "Jakarta Lagos Manila Medellin Milan Mumbai Nantes Nashville Ottawa Perth Portland "
        "Quito Riga Rotterdam Santiago Sapporo Seville Singapore Taipei Tbilisi Utrecht "
        "Vancouver Wellington Winnipeg"
    ).split()
)
FOODS = (
    "sushi",
    "oat porridge",
    "spicy ramen",
    "Greek salad",
    "dark chocolate",
    "black coffee",
    "green tea",
    "falafel wraps",
    "sourdough bread",
    "mushroom risotto",
    "tacos al pastor",
    "lentil soup",
    "pad thai",
    "blueberry pancakes",
    "grilled salmon",
    "kimchi fried rice",
    "vegan burgers",
    "espresso",
    "mango smoothies",
    "paneer tikka",
)
HOBBIES = (
    "bouldering",
    "trail running",
    "watercolour painting",
    "chess",
    "birdwatching",
    "sourdough baking",
    "salsa dancing",
    "woodworking",
    "astrophotography",
    "knitting",
    "sailing",
    "board games",
    "pottery",
    "cycling",
    "gardening",
    "yoga",
    "scuba diving",
    "calligraphy",
    "fly fishing",
    "stand-up comedy",
)
PETS = ("dog", "cat", "parrot", "rabbit", "tortoise", "hamster", "corgi", "goldfish")
PET_NAMES = (
    "Biscuit Pepper Luna Milo Nala Olive Rocket Mochi Pickle Ziggy Hazel Toffee Basil Juno".split()
)
LANGUAGES = (
    "Spanish Portuguese Japanese Korean German French Italian Mandarin Arabic Swahili Polish "
    "Dutch Turkish Hindi Greek"
).split()
TECH = (
    "Python",
    "Rust",
    "TypeScript",
    "Go",
    "Kotlin",
    "PostgreSQL",
    "Kubernetes",
    "React",
    "Django",
    "FastAPI",
    "Terraform",
    "Swift",
    "Elixir",
    "Spark",
    "dbt",
)
PROJECTS = (
    "billing service",
    "mobile app",
    "data pipeline",
    "internal dashboard",
    "search feature",
    "authentication system",
    "recommendation engine",
    "reporting tool",
    "payments API",
    "migration to the cloud",
)
COMPANIES = (
    "a fintech startup",
    "a hospital",
    "a logistics company",
    "a game studio",
    "a university lab",
    "an insurance firm",
    "a climate nonprofit",
    "a bakery chain",
    "a law firm",
    "a marketing agency",
)
MONTHS = (
    "January February March April May June July August September October November December"
).split()
SPORTS = ("marathon", "half marathon", "triathlon", "10k run", "cycling sportive", "swim meet")
INSTRUMENTS = ("piano", "cello", "guitar", "drums", "violin", "saxophone", "ukulele", "flute")
GROUPS = ("community band", "jazz trio", "church choir", "rock band", "string quartet")
GENRES = ("science fiction", "historical", "crime", "fantasy", "literary", "romance", "horror")
AUTHORS = (
    "Ursula K. Le Guin",
    "Agatha Christie",
    "Haruki Murakami",
    "Toni Morrison",
    "Terry Pratchett",
    "Kazuo Ishiguro",
    "Octavia Butler",
    "Hilary Mantel",
)
ALLERGENS = ("peanuts", "shellfish", "gluten", "lactose", "pollen", "cat hair", "penicillin")
CARS = ("hatchback", "pickup truck", "electric SUV", "station wagon", "vintage Beetle", "minivan")
COLOURS = ("red", "blue", "silver", "green", "white", "black", "yellow")
SEASONS = ("spring", "summer", "autumn", "winter")
MEALS = ("breakfast", "lunch", "dinner", "late-night snacks")
WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()


def a(noun: str) -> str:
    """``noun`` with its indefinite article: "a nurse", "an architect"."""
    return f"{'an' if noun[0].lower() in 'aeiou' else 'a'} {noun}"


def _pick(rng: random.Random, options: Sequence[str]) -> str:
    return options[rng.randrange(len(options))]


@dataclass(frozen=True)
class Drawn:
    """One generated memory: its text, its template family (0-15) and the slot values drawn
    for it, in order, as (list drawn from, value) pairs."""

    text: str
    family: int
    picks: tuple[tuple[Sequence[str], str], ...]


def _draw_memory(rng: random.Random) -> Drawn:
    """One plausible long-term memory about a user, in the style the wrappers store. Every
    template has several independent slots, so that few generated texts are near-duplicates
    (which the engine would merge). The draws are recorded (keys follow them); recording
    takes nothing from ``rng``."""
    picks: list[tuple[Sequence[str], str]] = []

    def p(options: Sequence[str]) -> str:
        value = _pick(rng, options)
        picks.append((options, value))
        return value

    family = rng.randrange(16)
    return Drawn(_template(family, p, rng), family, tuple(picks))


def _template(family: int, p: Callable[[Sequence[str]], str], rng: random.Random) -> str:
    """The text of template ``family``, its slots filled with ``p(options)``."""
    if family == 0:
        return f"Their {p(RELATIONS)} {p(NAMES)} works as {a(p(JOBS))} in {p(CITIES)}"
    if family == 1:
        return f"Prefers {p(FOODS)} for {p(MEALS)} when visiting {p(NAMES)} in {p(CITIES)}"
    if family == 2:
        return f"Has {a(p(PETS))} named {p(PET_NAMES)} that {p(NAMES)} looks after in {p(CITIES)}"
    if family == 3:
        return (
            f"Plays {p(INSTRUMENTS)} in a {p(GROUPS)} in {p(CITIES)} every {p(WEEKDAYS)} "
            f"with {p(NAMES)}"
        )
    if family == 4:
        return f"Is training for a {p(SPORTS)} in {p(CITIES)} with their {p(RELATIONS)} {p(NAMES)}"
    if family == 5:
        return (
            f"Uses {p(TECH)} and {p(TECH)} for the {p(PROJECTS)} at {p(COMPANIES)} in {p(CITIES)}"
        )
    if family == 6:
        return (
            f"Is planning a {p(HOBBIES)} trip to {p(CITIES)} with their {p(RELATIONS)} "
            f"{p(NAMES)} in {p(MONTHS)}"
        )
    if family == 7:
        return (
            f"Is allergic to {p(ALLERGENS)} and carries medication when visiting their "
            f"{p(RELATIONS)} {p(NAMES)} in {p(CITIES)}"
        )
    if family == 8:
        return (
            f"Lived in {p(CITIES)} near their {p(RELATIONS)} {p(NAMES)} before moving to "
            f"{p(CITIES)} for a job at {p(COMPANIES)}"
        )
    if family == 9:
        return (
            f"Reads {p(GENRES)} novels by {p(AUTHORS)} with a book club that {p(NAMES)} "
            f"runs in {p(CITIES)}"
        )
    if family == 10:
        return (
            f"Speaks {p(LANGUAGES)} with their {p(RELATIONS)} {p(NAMES)} and is learning "
            f"{p(LANGUAGES)} for a move to {p(CITIES)}"
        )
    if family == 11:
        return (
            f"Drives a {p(COLOURS)} {p(CARS)} to visit their {p(RELATIONS)} {p(NAMES)} "
            f"in {p(CITIES)}"
        )
    if family == 12:
        return (
            f"Their {p(RELATIONS)} {p(NAMES)} has a birthday on {p(MONTHS)} "
            f"{rng.randint(1, 28)} and loves {p(HOBBIES)}"
        )
    if family == 13:
        return (
            f"Wants to switch careers from {p(JOBS)} to {p(JOBS)} after talking to "
            f"{p(NAMES)} in {p(CITIES)}"
        )
    if family == 14:
        return f"Spends {p(WEEKDAYS)} evenings on {p(HOBBIES)} with {p(NAMES)} in {p(CITIES)}"
    return (
        f"Is migrating the {p(PROJECTS)} at {p(COMPANIES)} from {p(TECH)} to {p(TECH)} "
        f"with {p(NAMES)}"
    )


def memory_texts(count: int, seed: int = 7) -> list[str]:
    """``count`` distinct memory texts; a longer list starts with the shorter one (same seed)."""
    draws = _distinct_draws(seed)
    return [next(draws).text for _ in range(count)]


def _distinct_draws(seed: int) -> Iterator[Drawn]:
    rng = random.Random(seed)
    seen: set[str] = set()
    while True:
        drawn = _draw_memory(rng)
        if drawn.text not in seen:
            seen.add(drawn.text)
            yield drawn


# -- memory keys -------------------------------------------------------------------------------

MEMORY_KEYS = Path(__file__).with_name("memory_keys.json")
"""Keys for the synthetic memories, written by a model that saw only the templates' texts and
slot values (never a question of the benchmark): ``{"families": {"0".."15": keys}, "values":
{list: {value: keys}}, "asks": {"0".."15": question}}``, each ``keys`` a comma-separated string,
each question a template in the user's voice with slots named after the lists
(:data:`SLOT_NAMES`: "What does my {relation} {name} do for work?"). See
``benchmarks/paraphrase.py``."""

KEYED_LISTS: dict[str, Sequence[str]] = {
    "FOODS": FOODS,
    "HOBBIES": HOBBIES,
    "JOBS": JOBS,
    "PETS": PETS,
    "LANGUAGES": LANGUAGES,
    "TECH": TECH,
    "PROJECTS": PROJECTS,
    "SPORTS": SPORTS,
    "INSTRUMENTS": INSTRUMENTS,
    "GROUPS": GROUPS,
    "GENRES": GENRES,
    "ALLERGENS": ALLERGENS,
    "CARS": CARS,
    "CITIES": CITIES,
}
"""The slot lists whose values have keys of their own, by their name in :data:`MEMORY_KEYS`
(names, relations, months, companies and the like have none)."""

SLOT_NAMES: dict[int, str] = {
    id(options): name
    for options, name in (
        (RELATIONS, "relation"),
        (NAMES, "name"),
        (JOBS, "job"),
        (CITIES, "city"),
        (FOODS, "food"),
        (MEALS, "meal"),
        (PETS, "pet"),
        (PET_NAMES, "pet_name"),
        (INSTRUMENTS, "instrument"),
        (GROUPS, "group"),
        (WEEKDAYS, "weekday"),
        (SPORTS, "sport"),
        (TECH, "tech"),
        (PROJECTS, "project"),
        (COMPANIES, "company"),
        (HOBBIES, "hobby"),
        (MONTHS, "month"),
        (GENRES, "genre"),
        (AUTHORS, "author"),
        (LANGUAGES, "language"),
        (ALLERGENS, "allergen"),
        (COLOURS, "colour"),
        (CARS, "car"),
    )
}
"""The name of each slot list in the question templates of :data:`MEMORY_KEYS` (by the list's
id); the second value drawn from a list is ``{city2}``, and so on."""


def with_question(topics: Sequence[str], question: str) -> tuple[str, ...]:
    """Keys as the model writes them: topic words, then one question the memory answers, at
    most :data:`~headroom_memory_integrations.keys.MAX_KEYS` phrases in all (the question is
    always kept)."""
    return with_questions(topics, [question])


def with_questions(topics: Sequence[str], questions: Sequence[str]) -> tuple[str, ...]:
    """Keys as the model writes them: topic words, then questions (the one the memory answers,
    then those about situations where it matters), at most
    :data:`~headroom_memory_integrations.keys.MAX_KEYS` phrases in all (every question kept)."""
    return clean_keys([*lenient_keys(topics)[: MAX_KEYS - len(questions)], *questions])


def _slots(drawn: Drawn) -> dict[str, str]:
    """The values a generated memory drew, by slot name (a repeated slot: ``city2``, ...)."""
    slots: dict[str, str] = {}
    for options, value in drawn.picks:
        base = SLOT_NAMES[id(options)]
        name, n = base, 2
        while name in slots:
            name, n = f"{base}{n}", n + 1
        slots[name] = value
    return slots


def question_of(drawn: Drawn) -> str:
    """The question of a generated memory: its family's template with the values it drew."""
    template: str = memory_keys()["asks"][str(drawn.family)]
    return template.format(**_slots(drawn))


def situations_of(drawn: Drawn) -> list[str]:
    """The questions about situations where a generated memory matters: its family's
    templates with the values it drew."""
    templates: list[str] = memory_keys()["situations"][str(drawn.family)]
    return [template.format(**_slots(drawn)) for template in templates]


@functools.cache
def memory_keys() -> dict[str, Any]:
    """The contents of :data:`MEMORY_KEYS`."""
    loaded: dict[str, Any] = json.loads(MEMORY_KEYS.read_text(encoding="utf-8"))
    return loaded


def keys_of(drawn: Drawn) -> tuple[str, ...]:
    """The keys of a generated memory: its family's, then those of each value it drew from
    :data:`KEYED_LISTS` in the order drawn, tidied and without repeats
    (:func:`~headroom_memory_integrations.keys.clean_keys`), as many as fit beside its
    questions in :data:`~headroom_memory_integrations.keys.MAX_KEYS`; then its question
    (:func:`question_of`) and those about situations where it matters (:func:`situations_of`)."""
    table = memory_keys()
    names = {id(options): name for name, options in KEYED_LISTS.items()}
    parts = [table["families"][str(drawn.family)]]
    parts += [
        table["values"][names[id(options)]][value]
        for options, value in drawn.picks
        if id(options) in names
    ]
    topics = [phrase for part in parts for phrase in clean_keys(part)]
    return with_questions(topics, [question_of(drawn), *situations_of(drawn)])


def keyed_memory_texts(count: int, seed: int = 7) -> list[tuple[str, tuple[str, ...]]]:
    """:func:`memory_texts` (the same texts, in the same order) with each one's keys
    (:func:`keys_of`)."""
    draws = _distinct_draws(seed)
    return [(drawn.text, keys_of(drawn)) for drawn in (next(draws) for _ in range(count))]


QUERY_TEMPLATES = (
    "What should I get my {relation} for their birthday this year?",
    "Can you recommend somewhere to eat {food} in {city}?",
    "Help me plan a long weekend in {city} with my {relation}.",
    "Any tips for getting better at {hobby} as a busy {job}?",
    "What should I pack for a trip to {city} in {month}?",
    "How do I ask my {relation} for advice about becoming {a_job}?",
    "Write a short message congratulating my {relation} on their new job as {a_job}.",
    "Which {tech} libraries would help with our {project}?",
    "Suggest a weekly plan to fit {hobby} around my work at {company}.",
    "Is {food} a good idea for {meal} before a {sport}?",
    "How can I practise {language} while cooking {food}?",
    "What is a good gift for someone who loves {hobby} and lives in {city}?",
    "Should I rewrite the {project} in {tech} or keep the current stack?",
    "Remind me what I told you about my {relation}'s plans in {month}.",
    "Draft an email to my {relation} about visiting {city} together.",
    "What books would you suggest if I enjoy {genre} stories?",
    "How do I prepare my {pet} for a move to {city}?",
    "Can you help me budget for a {car} and a trip to {city}?",
    "Which {instrument} pieces are good for a beginner who plays on {weekday}s?",
    "Give me a {language} phrase to greet my {relation}'s friends in {city}.",
)


def _query(rng: random.Random) -> str:
    job = _pick(rng, JOBS)
    slots = {
        "relation": _pick(rng, RELATIONS),
        "food": _pick(rng, FOODS),
        "city": _pick(rng, CITIES),
        "hobby": _pick(rng, HOBBIES),
        "job": job,
        "a_job": a(job),
        "month": _pick(rng, MONTHS),
        "tech": _pick(rng, TECH),
        "project": _pick(rng, PROJECTS),
        "company": _pick(rng, COMPANIES),
        "meal": _pick(rng, MEALS),
        "sport": _pick(rng, SPORTS),
        "language": _pick(rng, LANGUAGES),
        "genre": _pick(rng, GENRES),
        "pet": _pick(rng, PETS),
        "car": _pick(rng, CARS),
        "instrument": _pick(rng, INSTRUMENTS),
        "weekday": _pick(rng, WEEKDAYS),
    }
    return _pick(rng, QUERY_TEMPLATES).format(**slots)


class QueryPool:
    """Distinct user questions, handed out once each, so that no measured query was seen
    before by any store (the engine caches query vectors: a reused query would be warm)."""

    def __init__(self, seed: int = 11) -> None:
        self._stream = _distinct_stream(_query, seed)

    def take(self, count: int) -> list[str]:
        return [next(self._stream) for _ in range(count)]


def _distinct_stream(make: Callable[[random.Random], str], seed: int) -> Iterator[str]:
    rng = random.Random(seed)
    seen: set[str] = set()
    while True:
        text = make(rng)
        if text not in seen:
            seen.add(text)
            yield text


def _distinct(make: Callable[[random.Random], str], count: int, seed: int) -> list[str]:
    stream = _distinct_stream(make, seed)
    return [next(stream) for _ in range(count)]


# -- the needle test ---------------------------------------------------------------------------

NEEDLES = (  # (planted memory, a reworded question that should find it)
    (
        "Marta's grandfather works as a beekeeper in Porto",
        "Which city is home to the honey business run by Marta's grandpa?",
    ),
    (
        "Kenji's sister works as a marine biologist in Honolulu",
        "Where does Kenji's sibling study ocean life for a living?",
    ),
    (
        "Amara's landlord works as a jazz pianist in New Orleans",
        "The man who rents Amara her flat: what music does he perform?",
    ),
    (
        "Tomasz's wife works as an air traffic controller in Warsaw",
        "What does Tomasz's spouse do at the airport?",
    ),
    (
        "Ines's uncle works as a glassblower in Venice",
        "Which relative of Ines shapes molten glass for a living in Italy?",
    ),
    (
        "Dev's college roommate works as a sommelier in Napa",
        "The guy Dev shared a dorm with at university: is he the wine expert?",
    ),
    (
        "Leila's daughter works as a pediatric surgeon in Montreal",
        "What kind of doctor did Leila's kid become, and in which Canadian city?",
    ),
    (
        "Oscar's neighbour works as a locksmith in Glasgow",
        "Who lives next door to Oscar and repairs keys and locks?",
    ),
    (
        "Yuki's mentor works as a violin maker in Cremona",
        "Who taught Yuki, the person who builds string instruments by hand?",
    ),
    (
        "Farid's best friend works as a volcanologist in Reykjavik",
        "What does Farid's closest pal research in Iceland?",
    ),
)

_NEEDLE_PAIRS = {
    ("Marta", "grandfather"),
    ("Kenji", "sister"),
    ("Amara", "landlord"),
    ("Tomasz", "wife"),
    ("Ines", "uncle"),
    ("Dev", "college roommate"),
    ("Leila", "daughter"),
    ("Oscar", "neighbour"),
    ("Yuki", "mentor"),
    ("Farid", "best friend"),
}

_DISTRACTOR_TEMPLATES = (
    "{name}'s {relation} works as {job} in {city}",
    "{name}'s {relation} used to be {job} before moving to {city}",
    "{name}'s {relation} is studying to become {job} in {city}",
    "{name}'s {relation} visited {city} last {season} for {job} conference",
    "{name}'s {relation} married {job} from {city}",
    "{name}'s {relation} retired from being {job} and now lives in {city}",
)


def _distractor(rng: random.Random) -> str:
    while True:
        name, relation = _pick(rng, NAMES), _pick(rng, RELATIONS)
        if (name, relation) not in _NEEDLE_PAIRS:  # the planted facts stay the only answers
            break
    return _pick(rng, _DISTRACTOR_TEMPLATES).format(
        name=name,
        relation=relation,
        job=a(_pick(rng, JOBS)),
        city=_pick(rng, CITIES),
        season=_pick(rng, SEASONS),
    )


def distractor_texts(count: int, seed: int = 13) -> list[str]:
    """``count`` distinct facts about people's relatives' jobs and cities, sharing names,
    relations, jobs and cities with the needles but never a needle's (name, relation)."""
    return _distinct(_distractor, count, seed)
