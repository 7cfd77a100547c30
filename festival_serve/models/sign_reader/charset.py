"""The Vietnamese characters the sign-text recognizer reads: its dictionary, NFC labels, CTC coding.

``DICTIONARY``: the recognizer's characters, one class each, in PP-OCR's layout: the CTC classes are
``["blank", *DICTIONARY, " "]`` (rapidocr's ``CTCLabelDecode`` puts the blank first and appends the space),
so the space is not in the dictionary file. Every Vietnamese letter in both cases with each of the five tone
marks and without (precomposed, NFC), Đ/đ, the rest of the Latin alphabet, digits and sign punctuation.
Every entry is one NFC code point, so any decoded sequence is NFC. ``strip_tones`` is the one toneless form
that the eval, the world's phrase splits and the tests compare by.

Plain module: no torch, no Ray.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence


# --------------------------------------------------------------------------------------------------
# The dictionary

#: The twelve vowel letters (precomposed where they carry a breve, circumflex or horn).
VOWELS = "aăâeêioôơuưy"
#: Combining tone marks, in the orthography's order: ngang (none), sắc, huyền, hỏi, ngã, nặng.
TONES = ("", "\u0301", "\u0300", "\u0309", "\u0303", "\u0323")
#: Tones a syllable closed by a stop (-p, -t, -c, -ch) can carry: sắc and nặng.
STOP_TONES = ("\u0301", "\u0323")
CONSONANTS = "bcdfghjklmnpqrstvwxz"
DIGITS = "0123456789"
#: Punctuation printed on signs: distances "1,5 km", times "6:00-22:00", "km/h", "QL.1A", "(8 giờ)", "10%".
PUNCTUATION = ".,:;/-%()!?'\"&+#*=°"


def nfc(text: str) -> str:
    """NFC, every whitespace run (en spaces, non-breaking spaces, tabs) one ASCII space, trimmed."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def toned(vowel: str, tone: str) -> str:
    """One vowel letter with a tone mark, precomposed ("ơ" + sắc -> "ớ")."""
    return unicodedata.normalize("NFC", vowel + tone)


def _dictionary() -> tuple[str, ...]:
    lower = [toned(v, t) for v in VOWELS for t in TONES] + ["đ"] + list(CONSONANTS)
    chars = list(DIGITS) + [c.upper() for c in lower] + lower + list(PUNCTUATION)
    assert len(set(chars)) == len(chars) and all(len(c) == 1 for c in chars)
    return tuple(chars)


#: The recognizer's dictionary: class ``k + 1`` is ``DICTIONARY[k]``; 0 is the CTC blank, the last is " ".
DICTIONARY: tuple[str, ...] = _dictionary()
SPACE_CLASS = len(DICTIONARY) + 1
NUM_CLASSES = len(DICTIONARY) + 2
_INDEX = {c: k + 1 for k, c in enumerate(DICTIONARY)} | {" ": SPACE_CLASS}


def encode(text: str) -> list[int]:
    """A label (already ``nfc``) -> CTC class indices; a character outside the dictionary is an error."""
    try:
        return [_INDEX[c] for c in text]
    except KeyError as e:
        raise ValueError(f"{text!r}: character {e.args[0]!r} is not in the recognizer's dictionary") from None


def decode(indices: Sequence[int]) -> str:
    """Best-path CTC decoding, as rapidocr's ``CTCLabelDecode``: merge repeats, then drop blanks."""
    chars, previous = [], None
    for k in indices:
        k = int(k)
        if k != previous and k != 0:
            chars.append(" " if k == SPACE_CLASS else DICTIONARY[k - 1])
        previous = k
    return "".join(chars)


def strip_tones(text: str) -> str:
    """Vietnamese without diacritics ("ĐƯỜNG" -> "DUONG"): what the toneless scores compare."""
    bare = "".join(ch for ch in unicodedata.normalize("NFD", text) if not unicodedata.combining(ch))
    # Đ/đ are letters of their own (a stroke, not a combining mark), so NFD keeps them.
    return unicodedata.normalize("NFC", bare.replace("Đ", "D").replace("đ", "d"))
