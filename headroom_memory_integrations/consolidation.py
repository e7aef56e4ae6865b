"""Consolidation: how a new memory relates to an existing, similar one of the same user.

An embedding model says two texts are *about* the same thing; it barely notices that they
disagree on exactly what matters. With all-MiniLM-L6-v2, "Dentist appointment on Tuesday at
3pm" and "... Thursday at 3pm" are 0.977 similar, "User is allergic to peanuts" and "User is
not allergic to peanuts" 0.979. Merging by similarity alone therefore throws away corrections.
:func:`relate` compares the two texts word by word instead, and answers one of:

- :attr:`Relation.DUPLICATE`: the new text says nothing the old one does not: the same words
  up to case, punctuation and spacing, articles and a few empty words ("really", "is", "has
  been"), number words ("seven" = "7", "3pm" = "3 pm" = "15:00"), British spellings, the
  order of an "A and B" list or of phrases that keep their prepositions ("Works at Stripe as
  an engineer"), and names spelled as one word ("VS Code" = "VSCode"). Symbols are words ("$"
  and "€", ">" and "<", "%", emoji: "Likes 🍕 but hates 🍣" is not "Likes 🍣 but hates 🍕",
  though the model reads each emoji as one unknown token and gives the two texts one vector),
  and so are quote marks right after a number, units there
  ("6'" and '6"': feet and inches); a number written without its leading zero is that number
  (".5" = "0.5", never "5"). Every duplicate passes :func:`says_nothing_new`, which
  compares the words as written: a word replaced by another, even a word form ("Lived" for
  "Lives", "daughters" for "daughter"), a word left out ("Is allergic to apples" after "... to
  raw apples") or an acronym for a name ("SF" may be San Francisco or Santa Fe) is never a
  duplicate, however similar the texts.
- :attr:`Relation.UPDATE`: the same statement with a changed value, which makes the old one
  no longer current: a number, date or time ("daughter is 7" -> "9"), a negation or tense
  ("is allergic" -> "is not allergic", "likes" -> "dislikes", "is unpaid" -> "was paid"),
  a word replaced by another in a text at least ``duplicate_threshold`` similar that keeps
  every number, date, name, negation and tense ("Is left-handed" -> "Is right-handed", 0.958;
  "Deploys with Docker" -> "Deploys using Docker", 0.988: the embedding cannot tell a
  synonym from an opposite, so the newer wording supersedes and the older stays in
  ``history``), more detail ("Has a dog" -> "Has a dog named Max"), a qualifier left out
  ("Eats only fish" -> "Eats fish"), a name for an acronym ("SF" -> "Santa Fe"), a word that
  announces a change ("now", "moved", "finished", "cancelled", "married"), a status that
  progressed, told of the same goal and nothing else ("Is training for the Boston Marathon" ->
  "Has finished the Boston Marathon", "Plans to move to Berlin" -> "Has moved to Berlin", "Is
  single" -> "Is in a relationship": :func:`_status_reached`), a count with the things named
  ("Has one cat named Luna" -> "Has two cats named Luna and Nico"), a value or a time said of
  all that "only" now restricts ("Is allergic to all nuts" -> "Is allergic only to peanuts",
  "Drinks coffee every morning" -> "... only on weekend mornings"), a time zone ("at 10 am
  Eastern" -> "... Pacific"), a role's level after "is" ("Is a senior engineer at Stripe" ->
  "Is a staff engineer ..."), or a new value of something a person has one of: where they
  live or work, their preference, their favourite, their manager, an attribute stated as
  "<thing> is <value>" ("Bank is Chase" -> "Bank is Wells Fargo"). A text that opens with a
  verb's third person no list names ("Saves 10% of each paycheck") has its predicate there.
  A new text written as a question ("Has finished the Boston Marathon?") states no new fact,
  and is never an update.
- :attr:`Relation.DISTINCT`: both can be true: a different subject, i.e. a change before the
  verb ("Teammate 59 ..." vs "Teammate 62 ...", "User's daughter ..." vs "User's son ...";
  a text with no verb or preposition, "fact number 3", is all subject); a second value of
  something a person can have several of ("allergic to peanuts" and "... to shellfish", "plays
  guitar" and "... piano", "likes language number 3" and "... 5"), or another form of the
  thing ("Likes fishing" and "Likes fish"); one more companion ("lives with their wife Carmen"
  and "... stepfather Carmen"); a value changed together with another word ("Lived in Paris
  from 2010" and "... Rome from 2015"); words left out that qualify nothing ("Wears glasses"
  and "Wears glasses for reading", "Enjoys jazz" and "Enjoys jazz music"), or added after a
  verb of several things ("Likes board games" and "Likes cooperative board games"); one past
  occasion of a habit ("Bikes to work" and "Biked to work yesterday"); a negation changed
  together with the thing it is about ("Is not allergic to cats" and "Is allergic to dogs");
  a different verb; or texts that share less than half of the shorter one's words.

Mistakes are not equal. Calling an update or a distinct fact a duplicate discards new
information, so the duplicate rule is the strictest. Calling a distinct fact an update retires
a true memory to ``history``; calling an update distinct keeps a stale memory next to the new
one. When unsure, :func:`relate` says DISTINCT. The rules and their measured error rates, on a
labelled set of 338 pairs, are in ``docs/benchmarks.md`` (``benchmarks/consolidation.py``).

Everything here is plain Python on the two texts and their cosine similarity: no model, no
storage, no framework.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from difflib import SequenceMatcher
from enum import Enum
from functools import lru_cache

from .embeddings.symbols import EMOJI_JOINERS as _JOINERS
from .lexical import LETTERS, QUESTION_MARKS, WORD, stem


class Relation(str, Enum):
    """How a new memory relates to an existing one (see the module docstring)."""

    DUPLICATE = "duplicate"
    UPDATE = "update"
    DISTINCT = "distinct"

    def __str__(self) -> str:
        return self.value


UPDATE_MIN_SHARED = 0.5
"""An update keeps the statement: at least this share of the tokens of both texts together
(2 x shared / (old + new)) are the same, in the same order."""

MAX_CHANGED_WORDS = 3
"""A duplicate or an update changes at most this many content words on either side (helper
words, negations, prepositions and pronouns not counted): one slot of the statement. More is
another statement that shares a frame ("[17 July 2023] Melanie enjoys unplugging ..." and
"[17 July 2023] Melanie and her kids finished a painting ...")."""

MIN_SHARED_OF_SHORTER = 0.5
"""Two texts that share fewer than this share of the shorter one's tokens are distinct, unless
one rewords the other (at or above the duplicate threshold); a negation or tense flip must keep
this share too."""


# -- word lists (stems, see lexical.stem) -----------------------------------------------------


def _stems(words: str) -> frozenset[str]:
    return frozenset(stem(word) for word in words.split())


def _verb_forms(bases: str, irregular: str) -> frozenset[str]:
    """The stems of each verb's regular forms (lives, lived, living, planned, ...)."""
    forms = irregular.split()
    for base in bases.split():
        root = base[:-1] if base.endswith("e") else base
        forms += [base, base + "s", base + "es", root + "ed", root + "ing"]
        forms += [base + base[-1] + "ed", base + base[-1] + "ing"]  # planned, quitting
    return frozenset(stem(form) for form in forms)


_ARTICLES = frozenset({"a", "an", "the"})
_POSSESSIVES = frozenset({"their", "his", "her", "my", "your", "our"})
_LEADING_SUBJECTS = _POSSESSIVES | {"user"}
"""Dropped at the start of a text: "User's mother lives in Lisbon" = "Mother lives in Lisbon"."""

_FILLER = _stems("been being really very also just actually originally always still currently")
_EMPTY_WORDS = frozenset("is are am has have been being really actually also".split())
"""The words :func:`says_nothing_new` sets aside: their presence or absence changes nothing
("Has been vegetarian" = "Vegetarian"; "Really hates cilantro" = "Hates cilantro")."""
_QUALIFIERS = frozenset(
    """
    only just except but unless until till during while when whenever if otherwise instead
    possibly probably maybe perhaps likely unlikely apparently reportedly allegedly supposedly
    suspected suspects might may could would should will shall can
    almost nearly mostly mainly largely partly partially half quarter somewhat slightly bit
    little mildly barely hardly rarely seldom sometimes occasionally often usually frequently
    always never generally typically normally ever still currently originally formerly
    previously once already yet soon now temporarily temporary
    plan plans planning planned want wants wanting wanted hope hopes hoping intend intends
    intending going try tries trying tried consider considers considering thinking learning
    quit quits quitting stop stops stopped finish finishes finished former ex non pre decaf
    vice assistant deputy acting interim part time semi borderline free less low light zero
    pseudo quasi mock faux fake imitation anti sub mini
    summer winter spring autumn fall weekend weekends weekday weekdays morning mornings
    afternoon afternoons evening evenings night nights daily weekly monthly yearly
    hundred hundreds thousand thousands million millions billion billions dozen dozens
    more less fewer than least most up other few couple double triple alternate extra another
    step late trainee intern junior replica future prospective potential possible alleged
    supposed presumed apparent rumored rumoured socially needed
    """.split()
)
"""Words that narrow, hedge, time or undo a statement: a text that leaves one out lifts the
restriction, and supersedes ("Eats fish" after "Eats only fish", "Lives in Denver" after "...
in the summer", "Is a smoker" after "Is a non-smoker"); other words left out leave a second
statement beside the first."""

_NEGATIONS = frozenset(
    "not no never none nothing nobody neither nor without cannot anymore longer".split()
)
_TENSE = frozenset("was were used former formerly previously ex".split())
"""A tense marker added or removed changes what is current ("Used to live in Boston")."""

_ANTONYM_PREFIXES = ("dis", "un", "non", "in", "im", "ir", "il")

_CHANGE_WORDS = _stems(
    "now moved move switched switch changed change finished finish quit stopped stop left "
    "cancelled canceled cancel became become married divorced engaged separated widowed retired "
    "graduated rescheduled postponed sold paid"
)
"""A word of the new text, not in the old one, that announces a change of state."""

_AUXILIARIES = _stems(
    "is are am be been has have had does do did will would can could should must might shall "
    "gets got"
)

_VERBS = _verb_forms(
    "live move relocate reside work prefer like love enjoy hate dislike use drive own speak play "
    "study take eat drink want need visit start join leave buy run swim read watch write code "
    "manage lead report "
    "meet see go walk feed sleep wake weigh commute pay owe earn cost expire launch turn knit "
    "coach volunteer collect practice practise climb teach learn deploy finish quit smoke wear "
    "grow know plan travel fly attend sing cook bake keep call name rent book cancel switch "
    "change become marry retire graduate avoid follow support carry pick share host belong "
    "celebrate cycle hike date divorce wish hope miss expect stay",
    irregular="took ate drank left bought ran swam wrote led met saw goes went fed slept woke "
    "paid taught grew knew flew kept became spoke",
)
"""Verbs that start the predicate ("Sister Anna | lives in Berlin"): what comes before them
is the subject."""

_IRREGULAR_PAST = frozenset(
    "took ate drank left bought ran swam wrote led met saw went fed slept woke paid taught grew "
    "knew flew kept became spoke had did got made came gave found told thought sent spent won "
    "lost sold built felt heard held brought began broke chose drove forgot rode sang sat stood "
    "wore".split()
)

_PREPOSITIONS = _stems(
    "in at on to for with from by as into near since until after before during via per about "
    "over under than through within around across"
)

_NOT_CONTENT = _FILLER | _NEGATIONS | _TENSE | _AUXILIARIES | _PREPOSITIONS | _POSSESSIVES
"""Words that do not count as changed content (see :data:`MAX_CHANGED_WORDS`)."""

_ONE_VALUE = _stems(
    "live lives lived move moved based located resides reside work works job title role position "
    "employer salary earn earns age born birthday name named called id email address "
    "phone weigh weighs weight height tall type dose favourite favorite prefer prefers preferred "
    "married engaged partner husband wife girlfriend boyfriend timezone drive drives rent budget "
    "commute commutes wake wakes bedtime report reports manager boss hometown grade level rating "
    "score goal price plate version"
)
"""Things a person has one of at a time, named before the changed value: a new value replaces
the old ("Lives in Boston" -> "Lives in Denver")."""

_ONE_VALUE_ROLES = _stems(
    "editor shell browser ide layout status bank doctor dentist vet manager language"
)
"""Roles named after the changed value ("Uses VS Code as their editor")."""

_MANY_VALUES = _stems(
    "like likes love loves enjoy enjoys allergic allergy speak speaks play plays visit visited "
    "learn learning study studying read reading watch collect collects know knows own owns "
    "friend friends want wants hate hates dislike dislikes avoid avoids volunteer volunteers "
    "knit knits write writes wrote written"
)
"""Things a person can have several of: a second value is a second fact ("Is allergic to
peanuts", "Is allergic to shellfish")."""

_COMPANY = _stems("with and alongside")
"""A changed value right after these is one more companion or tool ("Lives with their wife
Carmen", "Lives with their stepfather Carmen"), not a replacement."""

_SPANS = _stems(
    "second seconds minute minutes hour hours day days week weeks month months year years"
)
"""Spans of time: what a number before one counts is time ("in 2 years"), a when."""

_UNITS = _SPANS | _stems(
    "time times mg g kg lb lbs pound pounds km mile miles m cm mm inch inches foot feet liter "
    "liters litre litres ml percent dollar dollars euro euros"
)

_NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70"})
_NUMBER_WORDS.update({"eighty": "80", "ninety": "90", "hundred": "100", "dozen": "12"})
_ORDINALS = {
    word: str(value)
    for value, word in enumerate(
        "zeroth first second third fourth fifth sixth seventh eighth ninth tenth eleventh "
        "twelfth".split()
    )
    if value
}
_MULTIPLES = {"once": "1", "twice": "2", "thrice": "3"}  # ... times
_ORDINAL_SUFFIXES = frozenset({"st", "nd", "rd", "th"})
_DAY_WORDS = frozenset(
    "monday tuesday wednesday thursday friday saturday sunday today tomorrow tonight yesterday "
    "weekday weekend".split()
)
_MONTHS = frozenset(
    "january february march april may june july august september october november december".split()
)  # dates only when capitalised: "may" and "march" are verbs too

_BRITISH_OUR = re.compile(
    r"^(col|flav|fav|behavi|neighb|hon|hum|lab|harb|rum|vap|arm|splend|sav)our"
)
_BRITISH_TRE = re.compile(r"^(cen|thea|me|li|fib)tre")
_BRITISH_ISE = re.compile(r"^(organ|real|recogn|special|apolog|optim|minim|summar|analy)is")
_IDENTIFIER = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+|https?://\S+|www\.\S+")
_WORD_OR_NUMBER = rf"\d+(?:[.,:]\d+)*|{LETTERS}(?:{WORD})?"
_TOKEN = re.compile(rf"{_IDENTIFIER.pattern}|{_WORD_OR_NUMBER}")
_PLAIN_TOKEN = re.compile(_WORD_OR_NUMBER)
"""For a text that holds no address: the address pattern, tried at every position, costs time
that grows with the square of a long run of letters and dots."""
_CONTRACTIONS = (
    (re.compile(r"\bcan't\b", re.IGNORECASE), "can not"),
    (re.compile(r"\bwon't\b", re.IGNORECASE), "will not"),
    (re.compile(r"n't\b", re.IGNORECASE), " not"),
    (re.compile(r"'(re|ve|ll|m|d)\b", re.IGNORECASE), " "),
    (re.compile(r"'s\b", re.IGNORECASE), ""),
)
_THOUSANDS = re.compile(r"\d{1,3}(?:,\d{3})+")
_CLOCK = re.compile(r"(\d{1,2})(?::(\d{2}))?")


_CURRENCY = r"[A-Z]{0,3}[$€£¥₹₩₽¢₺₪₫₱₦₴₸₿฿]\s?|[A-Z]{3}\s"
"""A currency sign, maybe after a country's letters ("C$", "US$"), or a currency's code
("CHF "), between a minus and its number."""
_SIGNS = (
    (re.compile(r"(?<=\w)\+"), " signplus "),  # C++, A+, UTC+2, 5+ years
    (re.compile(r"(?<=\w)#"), " signsharp "),  # C#, F#
    # -18 degrees, -200, -.5, -$300, -C$300, -US$ 300, -CHF 300, "–" and "−" too
    (
        re.compile(rf"(?<![\w.\-\u2013\u2212])[-\u2013\u2212](?=(?:{_CURRENCY})?\.?\d)"),
        " signminus ",
    ),
    (re.compile(r"(?<=[^\W\d_])-(?=[\s,.;:!?)]|$)"), " signminus "),  # A-, Rh-
)
"""Signs that change a value, made words before the punctuation goes ("Blood type is A+" and
"Blood type is A-" say different things); as tokens they are values, like numbers. Not inside
an e-mail or web address, and not a hyphen between a word and a number ("COVID-19", "Model-3"
read the same as "COVID 19"; "UTC+2" / "UTC-2" still differ by the "+")."""
_SIGN_WORDS = frozenset({"signplus", "signsharp", "signminus", "signprime", "signdoubleprime"})
_LEADING_POINT = re.compile(r"(?<![\w.,])[.,](?=\d)")
"""The point of a number written without its leading zero (".5", "$.50", "-.5", ",5"): a zero
is put before it (".5" = "0.5"), so that the point is kept with the number and ".5" never reads
as "5"."""
_PRIMES = (
    ('"\u201d\u2033', '"\u201c\u201d', " signdoubleprime "),
    ("'\u2019\u2032", "'\u2018\u2019", " signprime "),
)
"""Quote marks (and primes) right after a number are units (6' = 6 feet, 6" = 6 inches; minutes
and seconds of arc or time): made words as signs are, unless they close a quotation opened
before them ('Favourite song is "Take 5"'), or start a word ("1990's"). Each with the quote
marks of its kind, which open and close quotations."""


def _spelled_out(text: str) -> str:
    """``text`` with its signs spelled as words (:data:`_SIGNS`, "20%" = "20 percent", quote
    marks that are units: :data:`_PRIMES`), a zero before a number's leading point (".5" =
    "0.5") and its dotted abbreviations written without dots ("Ph.D." = "PhD", "U.K." = "UK",
    "11 p.m." = "11 pm"), outside e-mail and web addresses."""
    if not any(mark in text for mark in "+#-.,%'\"\u2013\u2212\u2019\u201d\u2032\u2033"):
        return text
    if not _may_hold_address(text):
        return _spell(text)
    spelled, start = [], 0
    for address in _IDENTIFIER.finditer(text):
        spelled += [_spell(text[start : address.start()]), address.group()]
        start = address.end()
    return "".join([*spelled, _spell(text[start:])])


_DOTTED = re.compile(r"\b(?:[^\W\d_]{1,2}\.){2,}")


_PERCENT = re.compile(r"(?<=\d)\s*%")


_UNIT_MARK = re.compile(rf"(?<=\d)[{''.join(units for units, _, _ in _PRIMES)}](?![^\W\d_])")
_ELISION = r"(?!\d+[^\W\d_])"  # a single mark before a decade is no quotation: "the '80s"
_QUOTES = {
    unit: (
        re.compile(  # opens a quotation
            rf"(?:^|(?<=[\s(\[{{]))[{marks}](?=\S)" + (_ELISION if "'" in marks else "")
        ),
        re.compile(rf"(?<=\S)[{marks}](?![^\W\d_])"),  # closes one
        word,
    )
    for units, marks, word in _PRIMES
    for unit in units
}
_TWO_PRIMES = re.compile("(?<=\\d)(?:''|\u2032\u2032|\u2019\u2019)")
"""Two single marks after a number, as inches are often typed (27'' = 27")."""


def _unit_mark(mark: re.Match[str]) -> str:
    """The word for a quote mark after a number (:data:`_PRIMES`), or the mark itself where it
    closes a quotation opened before it and not closed since."""
    opening, closing, word = _QUOTES[mark.group()]
    opened = [found.end() for found in opening.finditer(mark.string, 0, mark.start())]
    if opened and not closing.search(mark.string, opened[-1], mark.start()):
        return mark.group()
    return word


def _may_hold_address(text: str) -> bool:
    """Whether ``text`` may hold an e-mail or web address (:data:`_IDENTIFIER`)."""
    return "@" in text or "://" in text or "www." in text


def _spell(text: str) -> str:
    if "." in text:
        text = _DOTTED.sub(lambda dotted: dotted.group().replace(".", ""), text)
    if "." in text or "," in text:
        text = _LEADING_POINT.sub(lambda point: "0" + point.group(), text)  # ".5" = "0.5"
    if "%" in text:
        text = _PERCENT.sub(" percent", text)  # "20%" = "20 percent"
    if _UNIT_MARK.search(text):
        text = _TWO_PRIMES.sub('"', text)  # 27'' = 27"
        text = _UNIT_MARK.sub(_unit_mark, text)  # 6' = 6 feet, 6" = 6 inches
    for pattern, word in _SIGNS:
        text = pattern.sub(word, text)
    return text


# -- one text as tokens -----------------------------------------------------------------------


@lru_cache(maxsize=4096)
def same_wording_key(text: str) -> str:
    """``text`` without case, punctuation and extra spacing: equal keys mean the same memory.
    Read in one Unicode form (NFC: "José" typed as "Jose" and a combining accent is "José").
    Signs that change a value are kept as words ("A+" and "A-"), and so are symbols
    ("$1500" and "€1500", ">100" and "<100", "20%", emoji), quote marks that are units ("6'"
    and '6"') and the separators inside a number ("2015-06-07", "120/80", "1.500" and "1,500",
    ".5" written "0.5")."""
    text = unicodedata.normalize("NFC", text)
    return " ".join(word.casefold() for word in _surface_words(_spelled_out(text)))


def same_wording(old: str, new: str) -> bool:
    """Whether two texts have the same wording (:func:`same_wording_key`) and write alike each
    word whose case is part of its value: one with a digit or a capital past its first letter
    ("Wi-Fi password is Tr0ub4dor" / "... tr0ub4dor", "Username is JohnDoe" / "johndoe" are a
    correction, never a duplicate; "Likes Python" / "likes python" are the same)."""
    old, new = unicodedata.normalize("NFC", old), unicodedata.normalize("NFC", new)
    if same_wording_key(old) != same_wording_key(new):
        return False
    if (_NAMES_A_SECRET.search(old) or _NAMES_A_SECRET.search(new)) and _as_written(
        old
    ) != _as_written(new):
        return False  # "Wi-Fi password is sunshine!" -> "... sunshine": every mark counts
    a, b = _CASED_WORD.findall(old), _CASED_WORD.findall(new)
    return len(a) != len(b) or all(
        x == y or not (_case_matters(x) or _case_matters(y)) for x, y in zip(a, b, strict=True)
    )


_NAMES_A_SECRET = re.compile(
    r"\b(?:pass(?:word|code|phrase)?s?|pins?|codes?|user ?names?|logins?|handles?|ids?|keys?"
    r"|tokens?|secrets?|e-?mails?|urls?|ssids?|wi-?fi|accounts?)\b",
    re.IGNORECASE,
)
"""Words that name a value spelled exactly (a password, a code, a user name, an address): in a
text with one, a mark anywhere is part of what it says ("alex_" is not "alex", "*1234" not
"1234")."""


def _as_written(text: str) -> str:
    """``text`` as written, but for case, spacing and a final full stop."""
    return " ".join(text.split()).removesuffix(".").casefold()


def _case_matters(word: str) -> bool:
    return any(c.isdigit() for c in word) or any(c.isupper() for c in word[1:])


_CASED_WORD = re.compile(WORD)


def _surface_words(text: str) -> list[str]:
    """The words, numbers (with their inner separators) and symbols of ``text``, in order."""
    return [
        word.replace(",", "") if _THOUSANDS.fullmatch(word) else word
        for word in _SURFACE.findall(text)
        if word[0].isalnum() or word[0] in _VALUE_MARKS or unicodedata.category(word[0])[0] == "S"
    ]


_JOINER = r"(?:[_/@#&+]|\.(?![A-Z]))"
"""Marks that join letters and digits into one value. Not "-" ("follow-up" is "follow up",
"COVID-19" is "COVID 19"), nor a "." before a capital, which ends a sentence or an
abbreviation written without its space ("tea.Also", "Dr.Smith")."""
_SURFACE = re.compile(
    r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"  # an e-mail address, whole (its case is no part of it)
    rf"|[@#]{WORD}(?:{_JOINER}{WORD})*"  # a handle or a tag: "@alex" is not "#alex"
    r"|\d+(?:[.,:/-]\d+)*"  # a number with its inner separators
    rf"|{WORD}(?:{_JOINER}{WORD})+"  # one value spelled with marks: "jane.smith", "db-01"
    rf"|(?:{WORD})?\d(?:{WORD})?[!#$&*@]+"  # a value that ends in marks: "hunter2!"
    rf"|{WORD}|[^\w\s]"
)
"""A text's words, numbers and marks as its wording is compared. The marks inside a run of
letters and digits belong to it, but for a hyphen, which writes a space ("jane_smith" is not
"jane.smith" or "jane-smith", "feature/login" not "feature-login", "tiger&lion" not "tiger
lion"), and so do those around a word with a digit ("hunter2!") and a leading "@" or "#": a
value corrected by one mark is a correction, never a duplicate."""
_SENTENCE_ENDS = frozenset(".!?;:")
_SENTENCE_MARKS = _SENTENCE_ENDS | {"\n"}
_CLAUSE_WORDS = frozenset(stem(w) for w in "who whose which that named called with".split())
"""Words that start a clause about the side of an "A and B" just before them."""
_OWNERS = frozenset({"his", "her"})
"""A leading owner that is someone else's, maybe ("Her son is 7"); "their" is the user's, in a
third-person memory ("Lives with their wife")."""
_VALUE_MARKS = frozenset("%‰?#@&")
"""Punctuation that is part of a value (``20%``) or of what is stated ("Pregnant?"): kept as
symbols are."""


def says_nothing_new(old: str, new: str) -> bool:
    """Whether ``new`` says nothing that ``old`` does not, judged on the words as written (no
    stemming, no filler word dropped, no acronym read as a name): the last check before
    :func:`relate` calls a text a duplicate, which is the one verdict that loses information.
    It holds when, after case, punctuation, articles, a leading "User"/"User's" and a few
    empty words (:data:`_EMPTY_WORDS`: "really", "is", "has been", ...) are set aside and
    number words are written as digits:

    - the words are the same, in the same order; or
    - the same words are reordered harmlessly: each preposition keeps the words it governs,
      and the words outside those phrases keep their order, but for the two sides of an "A
      and B" ("Plays guitar and piano" = "Plays piano and guitar"; "Works at Stripe as an
      engineer" = "Works as an engineer at Stripe"; not "Likes dogs but hates cats" ->
      "Likes cats but hates dogs", "Tom is 7, Ann is 9" -> "Tom is 9, Ann is 7").

    Anything else says something new: a changed word form ("Lived" for "Lives", "daughters"
    for "daughter"), an acronym for a name ("SF" may be San Francisco or Santa Fe), and a
    word left out, whatever it is ("Is allergic to apples" after "... to raw apples", "Is
    shy" after "Is kind of shy"): no list of the words that narrow a statement is ever
    complete, and a word missed there would drop a new fact."""
    a, b = _plain_words(old), _plain_words(new)
    if _owner(a) != _owner(b):
        return False
    if a == b:
        return _values(tokens(old), tokens(new)) is None
    return Counter(a) == Counter(b) and _harmless_order(old, new)


def _qualifies(word: str) -> bool:
    """Whether ``word``, left out, changes what a statement says: a number, a symbol, a unit
    ("Budget is 20" after "Budget is 20%") or a word of :data:`_QUALIFIERS`."""
    return not word.isalpha() or word in _QUALIFIERS or stem(word) in _UNITS


def _left_out(a: tuple[str, ...], b: tuple[str, ...]) -> list[str] | None:
    """The words of ``a`` that ``b`` leaves out, if ``b`` is ``a`` in order with words left out
    (none: an empty list); else None."""
    if Counter(b) - Counter(a):
        return None
    kept = iter(a)
    if not all(word in kept for word in b):
        return None
    return list((Counter(a) - Counter(b)).elements())


@lru_cache(maxsize=16384)  # asked for again when the words do not agree
def _plain_words(text: str) -> tuple[str, ...]:
    """The words of ``text`` as :func:`says_nothing_new` compares them (names left out:
    :func:`relate` calls it only where its tokens, names included, agreed)."""
    text = _spelled_out(text.replace("\u2019", "'").replace("\n", ".\n"))  # as tokens() reads it
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    words: list[str] = []
    sentence_start = True
    for match in _SURFACE.finditer(text):
        word = match.group()
        if word in _SENTENCE_ENDS:
            sentence_start = True
            if word == "?":  # "Pregnant?" is not "Pregnant."
                words.append(word)
            continue
        surface = _surface_words(word)
        if not surface:
            continue  # punctuation
        word = surface[0]
        if word[0].isupper() and not sentence_start:
            continue  # a name: the tokens compared names already ("NYC" = "New York City")
        sentence_start = False
        lower = word.casefold()
        if lower in _MULTIPLES:
            words += [_MULTIPLES[lower], "times"]  # "twice" = "2 times"
        else:
            words.append(_NUMBER_WORDS.get(lower, _american(lower)))
    while words and words[0] in ("user", *_ARTICLES):  # not "his" / "her": whose it is
        words.pop(0)
    return tuple(w for w in words if w not in _ARTICLES and w not in _EMPTY_WORDS)


def _owner(words: tuple[str, ...]) -> str | None:
    """Whose fact ``words`` state: "his" or "her" when they lead, else the user's (None)."""
    return words[0] if words and words[0] in _OWNERS else None


def _harmless_order(old: str, new: str) -> bool:
    """Whether the same words of ``old`` and ``new`` are in orders that say the same thing
    (see :func:`says_nothing_new`)."""
    a, b = tokens(old), tokens(new)
    return (  # each preposition keeps its words, the frame and the values their order
        _reordered(a, b) and _frame(a) == _frame(b) and _values(a, b) is None
    )


def _values(old: tuple[Token, ...], new: tuple[Token, ...]) -> tuple[list[str], ...] | None:
    """None if the names, numbers, dates and times of ``old`` and ``new`` come in the same
    order, the two sides of each "A and B" sorted ("Python and TypeScript" = "TypeScript and
    Python", "at 7am and 6pm" = "at 6pm and 7am"; not "from 9am till 5pm" = "from 5pm till
    9am", "Wife drives the Tesla, user drives the Honda" = "... the Honda, ... the Tesla");
    else both sequences."""
    both = []
    for sequence in (old, new):
        values: list[str] = []
        for index, token in enumerate(sequence):
            if not token.is_detail:
                continue
            clause = index + 1 < len(sequence) and sequence[index + 1].text in _CLAUSE_WORDS
            paired = index >= 2 and sequence[index - 1].text == "and" and values and not clause
            if paired and sequence[index - 2].text == values[-1] and values[-1] > token.text:
                values.insert(len(values) - 1, token.text)
            else:
                values.append(token.text)
        both.append(values)
    return None if both[0] == both[1] else (both[0], both[1])


def _frame(sequence: tuple[Token, ...]) -> list[str]:
    """The words outside every preposition's phrase, in order, the two sides of each "A and
    B" sorted."""
    outside: list[str] = []
    governed = False
    for token in sequence:
        if token.text in _PREPOSITIONS:
            governed = True
        elif governed and _starts_predicate(token):
            governed = False
        if not governed:
            outside.append(token.text)
    for index in range(1, len(outside) - 1):
        if outside[index + 2 : index + 3] and outside[index + 2] in _CLAUSE_WORDS:
            continue  # "a son and a daughter who has asthma": the clause names one side
        if outside[index] == "and" and outside[index - 1] > outside[index + 1]:
            outside[index - 1], outside[index + 1] = outside[index + 1], outside[index - 1]
    return outside


def _american(word: str) -> str:
    """One spelling for British and American variants ("colour", "favourite", "organise")."""
    if "our" in word:
        word = _BRITISH_OUR.sub(r"\1or", word)
    if "tre" in word:
        word = _BRITISH_TRE.sub(r"\1ter", word)
    if "is" in word:
        word = _BRITISH_ISE.sub(r"\1iz", word)
    return word


@dataclass(frozen=True, eq=False)  # hashed by identity: cached, compared by text
class Token:
    """A word of a memory, compared by ``text`` (case-folded, stemmed, numbers normalised).

    Attributes:
        kind: ``word``, ``number``, ``date``, ``name`` (capitalised), ``symbol`` (an emoji, a
            dingbat: :func:`_symbols`), ``negation`` or ``tense``.
        initials: For a name, its initials ("newyorkcity" -> "nyc"); an all-capitals name is
            its own initials, so an acronym can match the name it stands for.
    """

    text: str
    kind: str
    initials: str = ""
    continues_name: bool = False  # a capitalised word right after another ("York" in "New York")
    past: bool = False  # a verb's past form ("lived", "took", "was")
    s_form: bool = False  # ends in a single "s" ("saves", "bikes"): maybe a verb's third person

    @property
    def is_detail(self) -> bool:
        """Numbers, dates, names and symbols (emoji): the words an embedding model barely
        tells apart, or not at all (all-MiniLM-L6-v2 reads most emoji as one unknown token)."""
        return self.kind in ("number", "date", "name", "symbol")


# ~300 bytes an entry: 16k texts (~5 MB) cover an add_many of 8,000 and the stored memories
# it is compared with; at 4,096 a large batch tokenised its texts ~1.5 times each
@lru_cache(maxsize=16384)
def tokens(text: str) -> tuple[Token, ...]:
    """The comparable tokens of ``text`` (see the module docstring for what is normalised)."""
    text = _spelled_out(text.replace("\u2019", "'"))
    for pattern, replacement in _CONTRACTIONS:
        text = pattern.sub(replacement, text)
    found: list[Token] = []
    previous_end = 0
    for match in (_TOKEN if _may_hold_address(text) else _PLAIN_TOKEN).finditer(text):
        gap = text[previous_end : match.start()]
        plain_gap = gap in ("", " ")  # most gaps: nothing to look at
        mark = "" if plain_gap else gap.strip()
        short_name = bool(found) and found[-1].kind == "name" and len(found[-1].text) <= 3
        title = mark == "." and short_name  # "Dr. Patel"
        sentence_start = not found or (
            not plain_gap and not _SENTENCE_MARKS.isdisjoint(gap) and not title
        )
        if not gap.isascii():
            found.extend(_symbols(gap))  # "Likes 🍕 but hates 🍣"
        classified = list(_classify(match.group(), sentence_start))
        if (
            found
            and found[-1].kind == "name"
            and classified[0].kind == "name"
            and (mark in ("", "-") or title)
        ):  # "New York", "Pre-Check", "Dr. Patel"; not "Lopez, the VP"
            classified[0] = replace(classified[0], continues_name=True)
        found.extend(classified)
        previous_end = match.end()
    if not text.isascii():
        found.extend(_symbols(text[previous_end:]))
    found = _times_and_ordinals(found)
    while found and found[0].text in _LEADING_SUBJECTS | _ARTICLES:
        found.pop(0)
    kept = [t for t in found if not (t.text in _ARTICLES and t.kind == "word")]
    return tuple(_join_names(kept))


@lru_cache(maxsize=16384)
def _classify(word: str, sentence_start: bool) -> tuple[Token, ...]:
    lower = word.casefold()
    if _IDENTIFIER.fullmatch(word):
        return (Token(lower.rstrip(".,;:!?"), "name"),)  # an email address or a web address
    if any(ch.isdigit() for ch in word):
        return (Token(lower.replace(",", "") if _THOUSANDS.fullmatch(word) else lower, "number"),)
    if lower in _NUMBER_WORDS:
        return (Token(_NUMBER_WORDS[lower], "number"),)
    if lower in _SIGN_WORDS:
        return (Token(lower, "number"),)
    if lower in _ORDINALS:
        return (Token(_ORDINALS[lower], "number"),)
    if lower in _MULTIPLES:
        return (
            Token(_MULTIPLES[lower], "number"),
            Token(stem("time"), "word"),
        )
    if lower in _NEGATIONS:
        return (Token(lower, "negation"),)
    if lower in _TENSE:
        return (Token(lower, "tense", past=lower in ("was", "were", "used")),)
    stemmed = stem(_american(lower))
    capitalised = word[0].isupper()
    for day in (lower, stemmed, lower[:-1]):
        if day in _DAY_WORDS or (capitalised and day in _MONTHS):
            return (Token(day, "date"),)
    acronym = len(word) >= 2 and word.isupper()
    if capitalised and (not sentence_start or acronym):
        return (Token(lower, "name", lower if acronym else lower[0]),)
    return (Token(stemmed, "word", past=_past_form(lower), s_form=_s_form(lower)),)


def _s_form(word: str) -> bool:
    """Whether ``word`` (lower case) ends as a verb's third person does ("saves", "bikes",
    "teaches"): in a single "s", not "ss", "us", "is" or "ics" ("glass", "status", "basis",
    "physics")."""
    return (
        len(word) > 3
        and word.endswith("s")
        and not word.endswith(("ss", "us", "is", "ics"))
        and word.isalpha()
    )


def _symbols(gap: str) -> list[Token]:
    """The symbols between two words (or after the last), a token each run of them written
    together ("⭐⭐⭐", "👍🏽", "👨‍👩‍👧"; joiners and variation selectors left out): emoji,
    dingbats, "°", "©" (Unicode's "other symbols", and an emoji's skin tone). Before they
    were tokens, a text read as though they were not there, and "Likes 🍕 but hates 🍣" and
    "Likes 🍣 but hates 🍕" were the same words in the same order: a duplicate."""
    found: list[Token] = []
    run: list[str] = []
    for char in gap + " ":
        if char in _JOINERS:
            continue
        if unicodedata.category(char) == "So" or "\U0001f3fb" <= char <= "\U0001f3ff":
            run.append(char)
        elif run:
            found.append(Token("".join(run), "symbol"))
            run = []
    return found


def _times_and_ordinals(found: list[Token]) -> list[Token]:
    """``3 pm`` -> ``15:00``, ``9:30 am`` -> ``09:30``; ``3 rd`` -> ``3``."""
    out: list[Token] = []
    for token in found:
        previous = out[-1] if out else None
        if previous is not None and previous.kind == "number":
            clock = _CLOCK.fullmatch(previous.text)
            if token.text in ("am", "pm") and clock:
                hour = int(clock.group(1)) % 12 + (12 if token.text == "pm" else 0)
                out[-1] = Token(f"{hour:02d}:{clock.group(2) or '00'}", "number")
                continue
            if token.text in _ORDINAL_SUFFIXES:
                continue
        out.append(token)
    return out


def _join_names(found: list[Token]) -> list[Token]:
    """Consecutive capitalised words are one name: "New York City" -> ``newyorkcity``."""
    out: list[Token] = []
    for token in found:
        if token.continues_name and out and out[-1].kind == "name":
            last = out[-1]
            out[-1] = Token(last.text + token.text, "name", last.initials + token.text[0])
        else:
            out.append(token)
    return out


# -- comparing two texts ----------------------------------------------------------------------


@dataclass(frozen=True)
class Change:
    """Where two token sequences differ.

    Attributes:
        before / after: The old and the new tokens of the changed spans.
        prefix / suffix: The shared tokens before the first change and after the last one.
        shared: How many tokens are the same, in the same order.
        first_old / first_new: Index of the first changed token in each sequence.
        changed_old / changed_new: Indexes of the changed tokens in each sequence.
        spans: How many separate places changed.
    """

    before: tuple[Token, ...]
    after: tuple[Token, ...]
    prefix: tuple[Token, ...]
    suffix: tuple[Token, ...]
    shared: int
    first_old: int
    first_new: int
    changed_old: frozenset[int]
    changed_new: frozenset[int]
    spans: int  # how many separate places changed


def _diff(old: Sequence[Token], new: Sequence[Token]) -> Change:
    old_words = [t.text for t in old]
    new_words = [t.text for t in new]
    head = 0  # the common beginning and end are matched directly: the middle is usually short
    while head < min(len(old), len(new)) and old_words[head] == new_words[head]:
        head += 1
    tail = 0
    while (
        tail < min(len(old), len(new)) - head
        and old_words[len(old) - 1 - tail] == new_words[len(new) - 1 - tail]
    ):
        tail += 1
    old_middle = old_words[head : len(old) - tail]
    new_middle = new_words[head : len(new) - tail]
    opcodes: Sequence[tuple[str, int, int, int, int]] = (
        [("replace", 0, len(old_middle), 0, len(new_middle))]  # one changed span
        if old_middle or new_middle
        else []
    )
    if old_middle and new_middle and set(old_middle) & set(new_middle):
        opcodes = SequenceMatcher(None, old_middle, new_middle, autojunk=False).get_opcodes()
    before: list[Token] = []
    after: list[Token] = []
    shared = head + tail
    spans: list[tuple[int, int, int, int]] = []
    for op, i1, i2, j1, j2 in opcodes:
        i1, i2, j1, j2 = i1 + head, i2 + head, j1 + head, j2 + head
        if op == "equal":
            shared += i2 - i1
        else:
            before.extend(old[i1:i2])
            after.extend(new[j1:j2])
            spans.append((i1, i2, j1, j2))
    first_old = spans[0][0] if spans else len(old)
    last_old = spans[-1][1] if spans else len(old)
    return Change(
        before=tuple(before),
        after=tuple(after),
        prefix=tuple(old[:first_old]),
        suffix=tuple(old[last_old:]),
        shared=shared,
        first_old=first_old,
        first_new=spans[0][2] if spans else len(new),
        changed_old=frozenset(i for i1, i2, _, _ in spans for i in range(i1, i2)),
        changed_new=frozenset(j for _, _, j1, j2 in spans for j in range(j1, j2)),
        spans=len(spans),
    )


_VERB_ADVERBS = frozenset(
    """
    only just rarely seldom sometimes occasionally often usually frequently always never
    generally typically normally ever still currently originally formerly previously once
    already now soon mostly mainly largely partly barely hardly almost nearly probably possibly
    maybe perhaps apparently reportedly allegedly supposedly likely temporarily also
    """.split()
)
"""Adverbs that, just before a verb, belong to the predicate: "Rarely drinks alcohol" is about
the same person as "Drinks alcohol" (a qualifier of the statement, not a subject)."""


@lru_cache(maxsize=4096)
def _predicate_start(sequence: tuple[Token, ...]) -> int:
    """Index where the predicate begins: the first auxiliary, verb or negation, with the
    adverbs just before it ("Sister Anna | lives in Berlin"; "| Prefers dark mode"; "| Rarely
    drinks alcohol"); else the first word, where it reads as a verb's third person ("| Saves
    10% of salary": a memory leaves the user out, and no list names every verb); else the
    first preposition ("Dentist appointment | on Tuesday"). A text with none of these only
    names something ("fact number 3"): all subject. After such a first word, a listed verb
    right after a preposition is its object ("| Bikes 10 km to work"), but one elsewhere is
    the verb, and the first word a plural noun ("Classes on Monday | start at 6 pm")."""
    first = next((t for t in sequence if t.text not in _VERB_ADVERBS | _FILLER), None)
    opens_with_verb = first is not None and first.kind == "word" and first.s_form
    for index, token in enumerate(sequence):
        after_preposition = index > 0 and sequence[index - 1].text in _PREPOSITIONS
        if _starts_predicate(token) and not (opens_with_verb and after_preposition):
            while index > 0 and sequence[index - 1].text in _VERB_ADVERBS:
                index -= 1
            return index
    if opens_with_verb:
        return 0  # "| Usually saves 10%", "| Really bikes 10 km"
    for index, token in enumerate(sequence):
        if token.text in _PREPOSITIONS:
            return index
    return len(sequence)


def _starts_predicate(token: Token) -> bool:
    return token.kind in ("negation", "tense") or (
        token.kind == "word" and (token.text in _AUXILIARIES or token.text in _VERBS)
    )


@lru_cache(maxsize=4096)
def _subject(sequence: tuple[Token, ...]) -> tuple[str, ...]:
    """The words before the predicate (filler left out), sorted: compared as a multiset."""
    return tuple(
        sorted(t.text for t in sequence[: _predicate_start(sequence)] if t.text not in _FILLER)
    )


def _with_acronyms(
    old: tuple[Token, ...], new: tuple[Token, ...]
) -> tuple[tuple[Token, ...], tuple[Token, ...]]:
    """Where one text has an acronym and the other a name with those initials, write the
    acronym in both ("Lives in NYC" and "Lives in New York City")."""
    acronyms = {t.text for t in (*old, *new) if t.kind == "name" and t.initials == t.text}
    if not acronyms:
        return old, new

    def shorten(sequence: tuple[Token, ...]) -> tuple[Token, ...]:
        return tuple(
            Token(t.initials, "name", t.initials)
            if t.kind == "name" and len(t.initials) > 1 and t.initials in acronyms
            else t
            for t in sequence
        )

    return shorten(old), shorten(new)


def _polarity(sequence: Sequence[Token]) -> Counter[str]:
    return Counter(t.text for t in sequence if t.kind in ("negation", "tense"))


def _antonyms(change: Change) -> bool:
    """A changed word and its opposite by prefix: "likes" / "dislikes", "paid" / "unpaid"."""
    before = {t.text for t in change.before if t.kind == "word"}
    after = {t.text for t in change.after if t.kind == "word"}
    for one, other in ((before, after), (after, before)):
        for word in one:
            if any(prefix + word in other for prefix in _ANTONYM_PREFIXES):
                return True
    return False


def _links(sequence: Sequence[Token]) -> Counter[tuple[str, frozenset[str]]]:
    """Each preposition with the words it governs (up to the next preposition or verb):
    what a reordering must keep. "in Python and TypeScript" = "in TypeScript and Python"."""
    links: Counter[tuple[str, frozenset[str]]] = Counter()
    for index, token in enumerate(sequence):
        if token.text not in _PREPOSITIONS:
            continue
        governed = []
        for following in sequence[index + 1 :]:
            if following.text in _PREPOSITIONS or _starts_predicate(following):
                break
            governed.append(following.text)
        links[(token.text, frozenset(governed))] += 1
    return links


def _reordered(old: tuple[Token, ...], new: tuple[Token, ...]) -> bool:
    """Whether the same words, in another order, keep the subject and what each preposition
    governs ("Plays guitar and piano" = "Plays piano and guitar"; "Prefers tea over coffee"
    is not "Prefers coffee over tea")."""
    return _subject(old) == _subject(new) and _links(old) == _links(new)


def _details(sequence: Sequence[Token]) -> Counter[str]:
    return Counter(t.text for t in sequence if t.is_detail)


def relate(
    old: str,
    new: str,
    similarity: float,
    *,
    duplicate_threshold: float,
    text_similarity: Callable[[], float] | None = None,
) -> Relation:
    """How memory text ``new`` relates to the existing ``old`` (see the module docstring).

    Args:
        old: The text of a memory already stored.
        new: The text about to be stored.
        similarity: Their cosine similarity (the engine has it from the vector search).
        text_similarity: The two texts' own cosine similarity, when ``similarity`` is that of
            vectors holding more than the texts (a memory's keys and questions, which two
            conversations word differently): asked for only where a rewording is judged.
        duplicate_threshold: The similarity from which a text with words replaced, but no
            number, date, name, negation or tense changed, is the same statement reworded: an
            update (never a duplicate: the similarity cannot tell a synonym from an opposite).
    """
    relation = _relate(old, new, similarity, duplicate_threshold, text_similarity)
    if relation is Relation.UPDATE and _is_question(new):
        return Relation.DISTINCT  # "Has finished the Boston Marathon?" states no new fact
    return relation


def _is_question(text: str) -> bool:
    """Whether ``text`` ends as a question does ("Has finished the marathon?"): it asks, and
    states nothing that could retire a memory."""
    return text.rstrip().rstrip("\"'\u201d\u2019\u00bb)]").endswith(tuple(QUESTION_MARKS))


def _relate(
    old: str,
    new: str,
    similarity: float,
    duplicate_threshold: float,
    text_similarity: Callable[[], float] | None,
) -> Relation:
    """:func:`relate`, questions aside."""
    if same_wording_key(old) == same_wording_key(new):
        return Relation.DUPLICATE if same_wording(old, new) else Relation.UPDATE
    a, b = _with_acronyms(tokens(old), tokens(new))
    if not a or not b:
        return _duplicate_unless_new(old, new) if a == b else Relation.DISTINCT
    words_a, words_b = Counter(t.text for t in a), Counter(t.text for t in b)
    if _words(a) == _words(b) or (words_a == words_b and _reordered(a, b)):
        # the same words, maybe with other symbols ("Team mascot is 🐶" / "... 🐱"): the
        # words as written decide
        return _duplicate_unless_new(old, new)
    if _status_reached(a, b):
        return Relation.UPDATE  # "Is training for the marathon" -> "Has finished the marathon"
    common = words_a & words_b
    if (
        sum(common.values()) < MIN_SHARED_OF_SHORTER * min(len(a), len(b))
        and similarity < duplicate_threshold
    ):
        return Relation.DISTINCT  # too different to be the same statement
    if _has_verb(a) and _has_verb(b) and _subject(a) != _subject(b):
        return Relation.DISTINCT  # "Sister Anna lives ..." / "Sister Maria lives ..."
    if max(_content_count(words_a - common), _content_count(words_b - common)) > MAX_CHANGED_WORDS:
        return Relation.DISTINCT  # (the words no alignment can match: a quick first count)
    change = _diff(a, b)
    if _subject_changed(a, b, change):
        return Relation.DISTINCT  # "Teammate 59 ..." / "Teammate 62 ..."
    if max(_content_words(change.before), _content_words(change.after)) > MAX_CHANGED_WORDS:
        return Relation.DISTINCT  # another statement in the same frame ("[date] Name ...")
    removed = [t for t in change.before if t.text not in _FILLER]
    added = [t for t in change.after if t.text not in _FILLER]
    announced = _announces_change(added, a) and not _is_origin(a)
    if _one_off_after_habit(a, b) and not announced:
        return Relation.DISTINCT  # "Bikes to work" and "Biked to work yesterday"
    antonyms = _antonyms(change)
    if _polarity(a) != _polarity(b) or antonyms:
        covered = change.shared >= MIN_SHARED_OF_SHORTER * min(len(a), len(b))
        another = not antonyms and _replaces_content(removed, added)
        if not covered or (another and not announced):
            return Relation.DISTINCT  # "Is not allergic to cats" and "Is allergic to dogs"
        return Relation.UPDATE
    if not added:  # the new text says less
        fewer_values = any(t.kind in ("number", "date") for t in removed)
        if fewer_values:
            return Relation.UPDATE  # "every week" after "every 2 weeks"
        return _duplicate_unless_new(old, new)
    if not removed:
        narrows = not any(_is_value(t) or t.text in _QUALIFIERS for t in added)
        if narrows and {t.text for t in change.prefix} & _MANY_VALUES:
            return Relation.DISTINCT  # "Likes board games" and "Likes cooperative board games"
        return Relation.UPDATE  # the same statement with more detail
    moved = {t.text for t in removed} & {t.text for t in added}
    if (
        _details(a) == _details(b)
        and not (announced or moved)
        and (
            similarity >= duplicate_threshold
            or (text_similarity is not None and text_similarity() >= duplicate_threshold)
        )
    ):
        # words replaced by others: a synonym or an opposite, which the similarity cannot
        # tell apart ("before" / "after" midnight, 0.96): the newer wording supersedes
        return Relation.UPDATE
    if _narrowed_to_only(a, b) and not (_in_the_past(a) and _in_the_past(b)):
        return Relation.UPDATE  # "Is allergic to all nuts" -> "Is allergic only to peanuts"
    if 2 * change.shared < UPDATE_MIN_SHARED * (len(a) + len(b)):
        return Relation.DISTINCT  # too different to be the same statement
    if announced:
        return Relation.UPDATE  # "now", "moved", "finished", "cancelled", ...
    if _in_the_past(a) and _in_the_past(b):
        return Relation.DISTINCT  # "Lived in Paris ..." and "Lived in Rome ...": both were true
    kinds = {
        "value" if _value_at(sequence, index) else sequence[index].kind
        for sequence, changed in ((a, change.changed_old), (b, change.changed_new))
        for index in changed
        if sequence[index].text not in _FILLER
    }
    context = {t.text for t in change.prefix}
    if kinds == {"value"}:  # only numbers, dates or times changed
        if context & _MANY_VALUES and _names_things(a, change.changed_old):
            return Relation.DISTINCT  # "Likes language number 3" / "... number 5"
        return Relation.UPDATE
    if "value" in kinds:
        if _recounted(a, b, change):
            return Relation.UPDATE  # "Has one cat named Luna" -> "Has two cats named Luna ..."
        return Relation.DISTINCT  # a value and something else: another occasion
    swapped = Counter(t.text for t in removed) == Counter(t.text for t in added)
    if change.spans > 1 and not swapped:
        return Relation.DISTINCT  # changed in several places: another statement
    if {t.kind for t in removed} != {t.kind for t in added}:
        return Relation.DISTINCT  # a name for a common noun: another slot ("Lives in a house")
    if context & _MANY_VALUES or _after_company(change.prefix):
        return Relation.DISTINCT  # "allergic to peanuts" / "shellfish"; "lives with X" / "Y"
    if context & _ONE_VALUE or {t.text for t in change.suffix} & _ONE_VALUE_ROLES:
        return Relation.UPDATE
    if _attribute_is(a, change) or _level_changed(a, change):
        return Relation.UPDATE
    return Relation.DISTINCT


def _words(sequence: tuple[Token, ...]) -> list[str]:
    """The tokens of ``sequence`` but its symbols (:func:`_symbols`), in order."""
    return [t.text for t in sequence if t.kind != "symbol"]


def _is_origin(sequence: tuple[Token, ...]) -> bool:
    """Whether a memory tells where the user is from, which no move changes ("Is from Seoul"
    and "Moved from Seoul to Toronto" are both true; "Hometown is Dayton"; not "Works from
    home")."""
    start = _predicate_start(sequence)
    words = [t.text for t in sequence[start : start + 2]]
    return words in (["is", "from"], ["are", "from"], ["come", "from"]) or any(
        t.text in _ORIGINS for t in sequence
    )


_ORIGINS = _stems("hometown native born raised grew")
"""Words of where a person comes from."""


def _duplicate_unless_new(old: str, new: str) -> Relation:
    """DUPLICATE where the comparison of stems found nothing new, if the words as written
    agree (:func:`says_nothing_new`); else UPDATE: "Lived in Boston" after "Lives in Boston",
    "Has daughters" after "Has a daughter", "Lives in Santa Fe" after "Lives in SF", "Eats
    fish" after "Eats only fish" supersede. Another owner ("His son is 7" / "Her son is 7") is
    another person's, and words left out that qualify nothing ("Wears glasses" after "Wears
    glasses for reading", "Is allergic to apples" after "... to raw apples") leave a statement
    that can be true beside the other: DISTINCT."""
    if says_nothing_new(old, new):
        return Relation.DUPLICATE
    a, b = _plain_words(old), _plain_words(new)
    if _owner(a) != _owner(b):
        return Relation.DISTINCT  # another person's fact, maybe: keep both
    if _another_of_several(a, b):
        return Relation.DISTINCT  # "Likes fishing" and "Likes fish": two things liked
    left_out = _left_out(a, b)
    if left_out is None or any(map(_qualifies, left_out)):
        return Relation.UPDATE
    if left_out or _details(tokens(new)) < _details(tokens(old)):
        # a phrase, a modifier or a name left out, qualifying nothing: both can be true
        return Relation.DISTINCT  # "Wears glasses" and "Wears glasses for reading"
    if _of_several(a):
        return Relation.DISTINCT  # "Visited SF" and "Visited Santa Fe": maybe two places
    return Relation.UPDATE  # the same words, another name or value: "SF" / "Santa Fe"


def _another_of_several(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether ``b`` is ``a`` with the form of words changed after a verb of something a
    person can have several of (:data:`_MANY_VALUES`), and no tense changed: another thing,
    not a correction ("Likes fishing" / "Likes fish", "Collects stamps" / "... a stamp")."""
    if len(a) != len(b):
        return False
    changed = [index for index, (x, y) in enumerate(zip(a, b)) if x != y]
    if not changed or any(_past_form(word) for i in changed for word in (a[i], b[i])):
        return False
    return _of_several(a[: changed[0]])


def _of_several(words: Sequence[str]) -> bool:
    """Whether ``words`` (as written) name something a person can have several of
    (:data:`_MANY_VALUES`: "likes", "visited", "collects", ...)."""
    return any(stem(word) in _MANY_VALUES for word in words)


def _past_form(word: str) -> bool:
    """Whether ``word`` (lower case) is a verb's past form ("lived", "took")."""
    return word.endswith("ed") or word in _IRREGULAR_PAST


def _one_off_after_habit(old: tuple[Token, ...], new: tuple[Token, ...]) -> bool:
    """Whether ``new`` tells of one past occasion of what ``old`` says is usual: a verb in
    the past and a word that dates it ("yesterday", "last", "ago", "this"), where ``old`` has
    neither ("Calls mom on Sundays" / "Called mom this Sunday"). :func:`relate` asks it only
    where no word announces a change ("Stopped taking metformin last week")."""
    if any(t.past for t in old) or not any(t.past for t in new):
        return False
    had = {t.text for t in old}
    return any(t.text in _ONE_OFF and t.text not in had for t in new)


_ONE_OFF = _stems("yesterday last ago this today tonight")
"""Words that date one occasion ("Biked to work yesterday", "... last Friday")."""


def _replaces_content(removed: Sequence[Token], added: Sequence[Token]) -> bool:
    """Whether a word was taken out and another put in (negations, tense, helper words, values
    and units aside): with a negation changed too, another thing is meant ("Is not allergic
    to cats" and "Is allergic to dogs"; not "Owes Alex 50 dollars" -> "No longer owes Alex
    money")."""

    def words(changed: Sequence[Token]) -> bool:
        return any(
            t.kind == "word" and t.text not in _NOT_CONTENT and t.text not in _UNITS
            for t in changed
        )

    return words(removed) and words(added)


def _content_words(changed: Sequence[Token]) -> int:
    return sum(1 for t in changed if t.text not in _NOT_CONTENT)


def _content_count(words: Counter[str]) -> int:
    return sum(count for word, count in words.items() if word not in _NOT_CONTENT)


def _in_the_past(sequence: tuple[Token, ...]) -> bool:
    """Whether the statement's verb is in the past tense ("Lived in Paris", "Was a nurse")."""
    start = _predicate_start(sequence)
    return start < len(sequence) and sequence[start].past


def _has_verb(sequence: tuple[Token, ...]) -> bool:
    return any(_starts_predicate(t) for t in sequence)


def _subject_changed(old: tuple[Token, ...], new: tuple[Token, ...], change: Change) -> bool:
    """Whether a word before the predicate changed: another person or thing. Helper and
    filler words do not count ("Has been vegetarian" = "Vegetarian"). (When both texts have
    a verb, :func:`relate` has compared the words before it already.)"""
    for sequence, changed in ((old, change.changed_old), (new, change.changed_new)):
        start = _predicate_start(sequence)
        if any(
            index < start
            and sequence[index].text not in _FILLER
            and not _starts_predicate(sequence[index])
            for index in changed
        ):
            return True
    return False


def _names_things(sequence: tuple[Token, ...], changed: frozenset[int]) -> bool:
    """Whether each changed number follows a noun, naming a thing ("room 12", "language
    number 3") rather than counting or measuring it ("12 rooms", "at 3pm", "is 7", "level 2")."""
    numbers = [i for i in changed if sequence[i].kind == "number"]

    def after_noun(index: int) -> bool:
        while index > 0 and sequence[index - 1].kind == "number":
            index -= 1  # "fact 0 3": the whole run of numbers follows "fact"
        before = sequence[index - 1] if index > 0 else None
        return (
            before is not None
            and before.kind == "word"
            and before.text not in _PREPOSITIONS | _FILLER | _UNITS | _ONE_VALUE
            and not _starts_predicate(before)
        )

    return bool(numbers) and all(after_noun(i) for i in numbers)


def _after_company(prefix: Sequence[Token]) -> bool:
    """Whether the change follows "with" or "and" (possessives skipped: "with their ...")."""
    words = [t.text for t in prefix if t.text not in _POSSESSIVES]
    return bool(words) and words[-1] in _COMPANY


def _is_value(token: Token) -> bool:
    """Numbers, dates, times and units of measure ("30 minutes" -> "1 hour")."""
    return token.kind in ("number", "date") or token.text in _UNITS


def _value_at(sequence: tuple[Token, ...], index: int) -> bool:
    """Whether the token at ``index`` is a value (:func:`_is_value`), or a time zone
    (:data:`_TIME_ZONES`) right after a time of day ("at 10 am Eastern", "at 9:00 CET"; not
    "the 7:45 Caltrain" or "a 9 am Pilates class")."""
    token = sequence[index]
    if _is_value(token):
        return True
    before = sequence[index - 1] if index else None
    return (
        token.text in _TIME_ZONES
        and before is not None
        and before.kind == "number"
        and _TIME_OF_DAY.fullmatch(before.text) is not None
    )


_TIME_OF_DAY = re.compile(r"\d{1,2}:\d{2}")
"""A time of day as a token writes it ("10 am" and "10:00" are ``10:00``)."""

_TIME_ZONES = frozenset(
    "eastern central mountain pacific atlantic alaska hawaii utc gmt est edt cst cdt mst mdt "
    "pst pdt akst akdt hst ast bst cet cest eet eest wet west ist jst kst hkt sgt aest aedt "
    "awst acst nzst nzdt".split()
)
"""Time zones as they follow a time of day (a token's text: lower case, not stemmed)."""


def _recounted(old: tuple[Token, ...], new: tuple[Token, ...], change: Change) -> bool:
    """Whether ``new`` counts again the things ``old`` counts and names, and nothing else
    changed: the number before the same word changed, and names joined with "and" added or
    left out, one for each thing counted, every name of the shorter list kept ("Has one cat
    named Luna" -> "Has two cats named Luna and Nico"). Not "... two cats named Nico and
    Max" (Luna's fate untold), nor "... two dogs ...", nor a count the names do not match."""
    counts = []
    for sequence, changed in ((old, change.changed_old), (new, change.changed_new)):
        numbers = [i for i in changed if sequence[i].kind == "number"]
        others = [sequence[i] for i in changed if i not in numbers]
        if len(numbers) != 1 or numbers[0] + 1 >= len(sequence):
            return False
        if any(t.kind != "name" and t.text != "and" for t in others):
            return False
        names = [t.text for t in sequence if t.kind == "name"]
        if sequence[numbers[0]].text != str(len(names)):
            return False  # the count must be that of the names listed
        counts.append((sequence[numbers[0] + 1].text, names))
    (thing, names_old), (thing_new, names_new) = counts
    fewer, more = sorted((names_old, names_new), key=len)
    return thing == thing_new and set(fewer) < set(more)


_ALL = _stems("all every each any daily always everything everywhere")
"""Words that say a value holds for all, which "only" may narrow."""

_WHEN_WORDS = _stems(
    "every each daily weekly monthly yearly nightly morning mornings afternoon afternoons "
    "evening evenings night nights summer summers winter winters spring autumn fall"
)
"""Words of when a habit happens, beside dates and numbers ("every morning", "only on
weekend mornings"; both forms, whose stems differ: "morn", "morning")."""


def _narrowed_to_only(old: tuple[Token, ...], new: tuple[Token, ...]) -> bool:
    """Whether ``new`` is ``old`` with one slot given another value that "only" restricts it
    to, nothing else changed, which leaves the old value no longer true: what is meant ("Is
    allergic to all nuts" -> "Is allergic only to peanuts") or when ("Drinks coffee every
    morning" -> "Drinks coffee only on weekend mornings"). The old value must be said of all
    (:data:`_ALL`: "Studies at the library" and "Studies only at night" can both be true),
    and the new one must replace it where "only" stands and add no phrase of its own
    ("Speaks Spanish" and "Speaks only English at home"), unless both tell when of the same
    kind ("Goes running every morning" and "... only in the summer" can both be true). Not
    "not only"."""
    if any(t.text == "only" for t in old) or _polarity(old) != _polarity(new):
        return False
    at = [index for index, token in enumerate(new) if token.text == "only"]
    if len(at) != 1 or (at[0] and new[at[0] - 1].kind == "negation"):
        return False
    rest = new[: at[0]] + new[at[0] + 1 :]
    change = _diff(old, rest)
    if change.spans != 1 or not change.after or not {t.text for t in change.before} & _ALL:
        return False
    opens = change.first_new == at[0] or (
        change.first_new == at[0] + 1 and rest[at[0]].text in _PREPOSITIONS
    )
    if not opens:
        return False

    def tells_when(changed: Sequence[Token]) -> bool:
        return all(_is_when(t) or t.text in _WHEN_WORDS or t.text in _PREPOSITIONS for t in changed)

    def when_words(changed: Sequence[Token]) -> set[str]:
        # stemmed again: the light stemmer takes "morning" to "morn", "mornings" to "morning"
        return {stem(t.text) for t in changed if _is_when(t) or t.text in _WHEN_WORDS} - _ALL

    prepositions = {t.text for t in change.after if t.text in _PREPOSITIONS}
    if not prepositions - {t.text for t in change.before}:
        return True  # no phrase of its own
    return (
        tells_when(change.before)
        and tells_when(change.after)
        and bool(when_words(change.before) & when_words(change.after))
    )


def _announces_change(added: Sequence[Token], old: Sequence[Token]) -> bool:
    had = {t.text for t in old}
    return any(t.text in _CHANGE_WORDS and t.text not in had for t in added)


def _attribute_is(old: tuple[Token, ...], change: Change) -> bool:
    """ "<thing> is [preposition] <value>" with the value changed: "Bank is Chase" -> "Bank is
    Wells Fargo"."""
    start = _predicate_start(old)
    if not 0 < start < len(old) or old[start].text not in ("is", "are"):
        return False
    value = start + 1
    if value < len(old) and old[value].text in _PREPOSITIONS:
        value += 1  # "Gym is near the office" -> "Gym is near home"
    return change.first_old == value


_LEVELS = _stems(
    "junior senior staff principal distinguished entry mid beginner novice intermediate "
    "advanced expert elementary"
)
"""The levels of a role, a class or a skill: one at a time of the same one."""


def _level_changed(old: tuple[Token, ...], change: Change) -> bool:
    """Whether one level of :data:`_LEVELS` replaced another right after "is" (and a
    preposition), before the same role: "Is a senior engineer at Stripe" -> "Is a staff
    engineer at Stripe", "Is in the beginner pottery class" -> "Is in the intermediate pottery
    class". (With a subject before "is", :func:`_attribute_is` says so already; after
    another verb, "Mentors a junior engineer" and "Mentors a senior engineer" can both be
    true.)"""
    start = _predicate_start(old)
    if start >= len(old) or old[start].text not in ("is", "are", "am"):
        return False
    value = start + 1
    if value < len(old) and old[value].text in _PREPOSITIONS:
        value += 1
    return (
        change.first_old == value
        and change.spans == 1
        and len(change.before) == len(change.after) == 1
        and change.before[0].text in _LEVELS
        and change.after[0].text in _LEVELS
        and bool(change.suffix)
    )


# -- a status that progressed ------------------------------------------------------------------

_PURSUITS = _stems("training studying preparing waiting saving applying looking searching pursuing")
"""Verbs of working toward something: "Is training for | the marathon"."""
_INTENTS = _stems("plans planning wants hopes intends going trying aims")
"""Verbs of a plan, before "to" and the verb planned: "Plans to | move to Berlin"."""
_REACHED = _stems(
    "finished completed passed received got earned obtained won ran has holds bought found "
    "landed started accepted achieved reached graduated owns"
)
"""Verbs that tell a pursuit reached its end: "Has finished | the marathon", "Has | a master's
in biology", "Started | a new job at Stripe"."""
_PERFECT = _stems("has have had")
_HAD = _stems("has holds owns")
_WHEN = _stems("next last this soon later eventually someday ago early earlier up") | _UNITS
"""Words of when (and "up", of "saving up for"): a plan's time is no part of what is planned
("Plans to move to Berlin next year" -> "Has moved to Berlin")."""
_PARTNERED = _stems("single dating engaged married relationship")
"""The states of a person's love life, each of which a later one ends."""
_PARTNER_ENDS = _stems("divorced separated widowed broke split")
"""What ends a relationship ("Broke up with Chris"), the only change after "married"."""
_PARTNER_EVENTS = _PARTNERED | _PARTNER_ENDS | _stems("called engagement marriage")
"""Words of which the new text must have one: a state or what changed it."""
_PARTNER_WORDS = _PARTNER_EVENTS | _stems("someone named now got became up off")


def _status_reached(old: tuple[Token, ...], new: tuple[Token, ...]) -> bool:
    """Whether ``new`` tells that the status of ``old`` progressed, the same subject and the
    same goal, nothing else said:

    - a pursuit reached: "Is training for the Boston Marathon" -> "Has finished the Boston
      Marathon", "Is studying for a master's in biology" -> "Has a master's in biology", "Is
      looking for a new job" -> "Started a new job at Stripe";
    - a plan carried out: "Plans to move to Berlin next year" -> "Has moved to Berlin";
    - the same verb, done: "Is learning to drive" -> "Has learned to drive";
    - a love life's next state: "Is single" -> "Is in a relationship", "Is engaged to Priya"
      -> "Married Priya in June", "Is married to Tom" -> "Divorced Tom";
    - a death: "Dog Biscuit is 3 years old" -> "Dog Biscuit passed away last month".

    The new text must name the whole goal, and add nothing but names after a preposition,
    numbers and words of when: "Passed the first of four CPA exam sections" after "Is
    studying for the CPA exam", or "Completed the first solo flight toward the private pilot
    license", is progress, and both memories are kept."""
    if any(t.kind == "negation" for t in new):
        return False
    if _died(old, new):
        return True
    (whose, before), (whose_new, after) = _subject_and_predicate(old), _subject_and_predicate(new)
    if whose != whose_new:
        return False
    if any(t.kind == "negation" for t in before):
        return _partner_changed(before, after)
    if len(before) < 2 or not after:
        return _partner_changed(before, after)
    verb, rest = before[0], before[1:]
    if verb.text in _INTENTS and rest[0].text == "to" and len(rest) > 1:
        verb, rest = rest[1], rest[2:]  # "plans to | move | to Berlin"
        done = _done(after, verb.text)
    elif verb.text in _PURSUITS and rest[0].text in ("for", "toward", "up"):
        done = _done(after, verb.text) or _reached(after, verb.text)
        rest = tuple(t for t in rest if t.text not in ("for", "toward", "up"))
    elif _progressive(old) and verb.kind == "word" and not verb.past:
        done = _done(after, verb.text)  # "Is learning to drive" -> "Has learned to drive"
    else:
        done = None
    if done is not None and _same_goal(rest, done) and not _earlier(before, after):
        return True
    return _partner_changed(before, after)


def _died(old: tuple[Token, ...], new: tuple[Token, ...]) -> bool:
    """Whether ``new`` tells that the someone ``old`` tells of in the present died, and
    nothing else: "Dog Biscuit is 3 years old" -> "Dog Biscuit passed away last month",
    "Grandma lives in Ohio" -> "Grandma died in March" (not after the user's own memory, or
    one in the past: "Dog Biscuit was adopted in 2019" stays true)."""
    for index, token in enumerate(new):
        away = index + 1 < len(new) and new[index + 1].text == "away"
        if token.text == "died" or (token.text == stem("passed") and token.past and away):
            rest = new[index + 1 + away :]
            break
    else:
        return False
    whose = tuple(sorted(t.text for t in new[:index] if t.text not in _FILLER))
    start = _predicate_start(old)
    return (
        bool(whose)
        and whose == _subject(old)
        and all(_is_when(t) or t.text in _PREPOSITIONS for t in rest)
        and start < len(old)
        and not old[start].past
        and not any(t.kind == "tense" for t in old)
    )


_EARLIER = _stems("ago before previously times")
"""Words that date what a text tells to an earlier time, or count its occasions ("Finished
the marathon years ago", "Has moved to Berlin twice", read "2 times"): the status may be
newer."""


def _earlier(before: tuple[Token, ...], after: tuple[Token, ...]) -> bool:
    """Whether ``after`` may tell of a time before the status ``before`` tells: it names a
    year ``before`` did not ("Moved to Berlin in 2015" after "Plans to move to Berlin";
    "Divorced in 2010" after "Is married"), or a word of :data:`_EARLIER`."""
    return bool(_years(after) - _years(before)) or any(t.text in _EARLIER for t in after)


def _years(sequence: tuple[Token, ...]) -> set[str]:
    return {t.text for t in sequence if t.kind == "number" and _YEAR.fullmatch(t.text)}


_YEAR = re.compile(r"(?:19|20)\d\d")


def _progressive(sequence: tuple[Token, ...]) -> bool:
    """Whether the predicate opens with "is", "are" or "am" ("Is learning to drive"; not
    "Works from home on Fridays", a habit, of which "Worked from home last Friday" is one
    occasion)."""
    start = _predicate_start(sequence)
    return start < len(sequence) and sequence[start].text in ("is", "are", "am")


def _subject_and_predicate(
    sequence: tuple[Token, ...],
) -> tuple[tuple[str, ...], tuple[Token, ...]]:
    """The subject of ``sequence`` and its predicate without a leading "is", "are", "am" and
    filler. A text with no verb of :data:`_VERBS` is all predicate, the user's own, when it
    opens with a word ("Received a kidney transplant", "Broke up with Chris"): its verb is one
    the list does not name."""
    if _has_verb(sequence):
        subject, words = _subject(sequence), sequence[_predicate_start(sequence) :]
    elif sequence and sequence[0].kind == "word":
        subject, words = (), sequence
    else:
        return _subject(sequence), ()
    while words and (words[0].text in ("is", "are", "am") or words[0].text in _FILLER):
        words = words[1:]
    return subject, words


def _done(after: tuple[Token, ...], verb: str) -> tuple[Token, ...] | None:
    """What follows ``verb`` in ``after`` where ``after`` opens with it in the past or after
    "has": "Has moved | to Berlin", "Moved | to Berlin" (else None)."""
    perfect = after[0].text in _PERFECT and len(after) > 1
    head = after[1] if perfect else after[0]
    if head.text == verb and (perfect or head.past):
        return after[2:] if perfect else after[1:]
    return None


def _reached(after: tuple[Token, ...], pursuit: str) -> tuple[Token, ...] | None:
    """What follows a verb of :data:`_REACHED` that opens ``after`` ("Has finished | the
    marathon", "Passed | the bar exam"). "Has", "holds" and "owns" only after studying for a
    degree ("Has | a master's in biology"), and without a time: a thing had after preparing
    or waiting for it, or had at a time, is an appointment, not a goal reached ("Has a job
    interview at Google", "Has the bar exam on Friday")."""
    if len(after) > 1 and after[0].text in _PERFECT and after[1].text in _REACHED:
        return after[2:]
    if after[0].text not in _REACHED:
        return None
    if after[0].text in _HAD and (pursuit != stem("studying") or any(map(_is_when, after))):
        return None
    return after[1:]


def _same_goal(goal: tuple[Token, ...], told: tuple[Token, ...]) -> bool:
    """Whether ``told`` names every word of ``goal`` and adds nothing but numbers, dates,
    words of when and names after a preposition ("a new job" -> "a new job at Stripe")."""
    wanted = Counter(t.text for t in goal if _names_goal(t))
    if not wanted:
        return False
    said = Counter(t.text for t in told if _names_goal(t))
    added = said - wanted
    after_preposition = {  # not "for": "Found a new apartment for Mom" is her apartment
        t.text
        for i, t in enumerate(told)
        if i and told[i - 1].text in _PREPOSITIONS and told[i - 1].text != "for"
    }
    if _amounts(goal) - _amounts(told):  # "Is waiting for the iPhone 16" -> "Got the iPhone 15"
        return False
    return not wanted - said and all(
        next(t for t in told if t.text == word).kind == "name" and word in after_preposition
        for word in added
    )


def _amounts(sequence: tuple[Token, ...]) -> Counter[str]:
    """The numbers of ``sequence`` that name something rather than a time: not a year, nor
    followed by a span of time ("iPhone 16", "a 5 km race"; not "in 2 years")."""
    return Counter(
        t.text
        for i, t in enumerate(sequence)
        if t.kind == "number"
        and not _YEAR.fullmatch(t.text)
        and (i + 1 == len(sequence) or sequence[i + 1].text not in _SPANS)
    )


def _is_when(token: Token) -> bool:
    """Numbers, dates and words of when (:data:`_WHEN`)."""
    return token.kind in ("number", "date") or token.text in _WHEN


def _names_goal(token: Token) -> bool:
    return not (
        _is_when(token)
        or token.text in _PREPOSITIONS
        or token.text in _FILLER
        or token.text in _POSSESSIVES
    )


def _partner_changed(before: tuple[Token, ...], after: tuple[Token, ...]) -> bool:
    """Whether both predicates tell the user's love life and nothing else (:data:`_PARTNERED`),
    the new one another state or its end (after "married", only its end), with the same
    partner if the old one named one ("Is engaged to Priya" -> "Married Priya in June"; "Is
    single" -> "Is dating someone named Alex"; "Is married to Tom" -> "Divorced Tom"; not "Is
    dating Alex" -> "Is dating Sam", nor "Is married to Tom" -> "Got married to Tom in
    2015")."""
    if any(t.kind == "negation" for t in after) or _earlier(before, after):
        return False
    states = {t.text for t in before if t.text in _PARTNERED}
    if not states or not all(_partner_word(t) for t in before):
        return False
    if not all(_partner_word(t) for t in after):
        return False
    later = _PARTNER_ENDS if states == {stem("married")} else _PARTNER_EVENTS
    if not {t.text for t in after} & later:
        return False
    names = {t.text for t in before if t.kind == "name"}
    return names <= {t.text for t in after if t.kind == "name"}


def _partner_word(token: Token) -> bool:
    return (
        token.kind in ("name", "negation", "number", "date")
        or token.text in _PARTNER_WORDS
        or token.text in _PREPOSITIONS
        or token.text in _WHEN
        or token.text in _AUXILIARIES
        or token.text in _FILLER
        or token.text in _POSSESSIVES
        or token.text in ("and", "anyone", "seeing", "summer", "winter", "spring", "fall")
    )
