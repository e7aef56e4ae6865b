"""Emoji written as words before a text is embedded.

all-MiniLM-L6-v2's vocabulary has no emoji: its tokenizer reads each as one unknown token, so
"Favourite fruit emoji is 🍎" and "... is 🍌" had one vector, and no search could tell them
apart or find either by "banana". :class:`~.local.LocalEmbedder` of this model reads each
emoji by its Unicode name instead (:func:`named_symbols`: "... is red apple", "... is
banana"); other embedders read emoji themselves. The memory's text is stored as written; only
what the model reads changes.
"""

from __future__ import annotations

import re
import unicodedata

_EMOJI_BLOCKS = "\u2300-\u2bff\U0001f000-\U0001faff"
"""Miscellaneous technical and symbols, dingbats, arrows and stars (⌚, ☕, ✅, ⭐), and the
emoji planes' blocks (🍎, 😂, 🇫🇷, 🏽). The symbols the model knows by name ("©", "°", "™", "→",
"€") come before them and are left as they are."""
EMOJI_JOINERS = "\u200d\ufe0e\ufe0f\u20e3"
"""What joins or styles the characters of one emoji: a zero-width joiner ("👨‍👩‍👧"), the text
and emoji variation selectors ("❤️" = "❤"), a keycap's enclosing square."""
_EMOJI_RUN = re.compile(f"[{_EMOJI_BLOCKS}][{_EMOJI_BLOCKS}{EMOJI_JOINERS}]*")
"""Emoji written together, with the joiners and variation selectors between them."""
_SKIN_TONES = {
    "\U0001f3fb": "light skin tone",
    "\U0001f3fc": "medium-light skin tone",
    "\U0001f3fd": "medium skin tone",
    "\U0001f3fe": "medium-dark skin tone",
    "\U0001f3ff": "dark skin tone",
}
_REGIONAL_A = 0x1F1E6  # REGIONAL INDICATOR SYMBOL LETTER A: two of them write a flag


def named_symbols(text: str) -> str:
    """``text`` with each emoji (other symbols of :data:`_EMOJI_BLOCKS`) written as its
    Unicode name in lower case, between spaces: "Likes 🍕" -> "Likes slice of pizza ",
    "👍🏽" -> "thumbs up sign medium skin tone", "🇫🇷" -> "flag FR". Joiners and variation
    selectors are left out ("👨‍👩‍👧" -> "man woman girl"). A text without one is returned as
    it is."""
    if text.isascii():
        return text
    return _EMOJI_RUN.sub(_names, text)


def _names(run: re.Match[str]) -> str:
    words: list[str] = []
    flag: list[str] = []
    for char in run.group():
        if _REGIONAL_A <= ord(char) < _REGIONAL_A + 26:
            flag.append(chr(ord(char) - _REGIONAL_A + ord("A")))
            if len(flag) == 2:
                words.append("flag " + "".join(flag))
                flag = []
        elif char in _SKIN_TONES:
            words.append(_SKIN_TONES[char])
        elif unicodedata.category(char) == "So":
            words.append(unicodedata.name(char, "symbol").lower())
    if flag:
        words.append("regional indicator " + flag[0])
    return f" {' '.join(words)} " if words else run.group()
