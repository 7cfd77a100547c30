"""Vietnamese sign text for the synthetic world: syllables spelled by the orthography's rules, real
phrases and place names, and their train/val split.

- ``syllable``: a random Vietnamese syllable, onset + rhyme + tone, spelled by the orthography's rules
  (c/k/q, g/gh, ng/ngh, gi, tone on the right vowel, stop codas only with the sắc and nặng tones).
- ``PHRASES`` and ``PLACES``: real road-sign, festival and place-name text; ``split_of`` assigns each
  to ``"train"`` or ``"val"`` by a hash of its toneless upper-case form (``key``), so a phrase and its
  variants (upper/lower case, printed without tones) always land in the same split. The texts the synthetic
  world prints (``synth.INFO_TEXTS``) always train: validation measures phrases never seen at all.
- ``sample_text``: one line of sign text for a split; a training line never contains a validation
  phrase as a run of words.

Plain module: no torch, no Ray. Letters and tones come from the recognizer's ``charset``.
"""

from __future__ import annotations

import hashlib
import unicodedata
from functools import lru_cache

import numpy as np

from festival_serve.models.sign_reader.charset import DICTIONARY, STOP_TONES, TONES, VOWELS, nfc, strip_tones, toned


def key(text: str) -> str:
    """What makes two texts the same phrase: toneless, upper case, single-spaced."""
    return strip_tones(nfc(text)).upper()


# --------------------------------------------------------------------------------------------------
# Syllables

#: Onsets with their written forms; "k"/"gh"/"ngh" are chosen by ``_spell_onset`` before front vowels.
ONSETS = ("", "b", "c", "ch", "d", "đ", "g", "gi", "h", "kh", "l", "m", "n", "ng", "nh", "ph", "qu", "r", "s",
          "t", "th", "tr", "v", "x")
#: Rhymes (vowel nucleus with its glides and coda) as written after a consonant, toneless.
OPEN_RHYMES = ("a", "e", "ê", "i", "o", "ô", "ơ", "u", "ư", "y", "ai", "ao", "au", "ay", "âu", "ây", "eo", "êu",
               "ia", "iu", "iêu", "oa", "oai", "oay", "oe", "oi", "ôi", "ơi", "ua", "uê", "ui", "uy", "uôi", "ươi",
               "ưa", "ưi", "ưu", "ươu", "uây", "oeo")
_CODA_RHYMES = {
    "a": "m n ng p t c nh ch", "ă": "m n ng p t c", "â": "m n ng p t c", "e": "m n ng p t c", "ê": "m n nh p t ch",
    "i": "m n nh p t ch", "o": "m n ng p t c", "ô": "m n ng p t c", "ơ": "m n p t", "u": "m n ng p t c",
    "ư": "n ng t c", "oa": "n ng t c nh ch", "oă": "n ng t c", "uâ": "n ng t", "oe": "n t", "uê": "nh ch",
    "uy": "n t nh ch", "uyê": "n t", "iê": "m n ng p t c", "uô": "m n ng t c", "ươ": "m n ng p t c",
}
CLOSED_RHYMES = tuple(nucleus + coda for nucleus, codas in _CODA_RHYMES.items() for coda in codas.split())
RHYMES = OPEN_RHYMES + CLOSED_RHYMES
_MARKED = "ăâêôơư"
_FRONT = ("e", "ê", "i", "y")
#: Rhymes that begin with the labial glide (written o/u): after /k/ they are spelled "qu" + the rest.
_GLIDE = ("oa", "oă", "oe", "uâ", "uê", "uy", "uyê")


def tone_position(rhyme: str) -> int:
    """The index of the vowel in ``rhyme`` that carries the tone mark.

    The last vowel with a diacritic of its own (ươ -> ơ, uyê -> ê) takes it; otherwise the last vowel of
    a closed rhyme ("oan" -> á), the first of an open "oa/oe/uy" (the classic "hòa", "thủy" that signs
    print), the middle of three vowels ("oai" -> á) and the first of two ("ai" -> á)."""
    vowels = [i for i, c in enumerate(rhyme) if c in VOWELS]
    marked = [i for i in vowels if rhyme[i] in _MARKED]
    if marked:
        return marked[-1]
    if vowels[-1] < len(rhyme) - 1:
        return vowels[-1]
    if len(vowels) == 3:
        return vowels[1]
    return vowels[0]


def _spell_onset(onset: str, rhyme: str) -> tuple[str, str] | None:
    """(written onset, written rhyme) by the orthography's rules, or None for a combination it has no
    spelling for."""
    if onset == "c":
        if rhyme.startswith(_GLIDE):  # /kw/ is written "qu": "qua", "quyết"
            return "qu", rhyme[1:]
        return ("k" if rhyme.startswith(_FRONT) else "c"), rhyme
    if onset == "qu":
        return None if rhyme.startswith(("o", "u", "ư")) else ("qu", rhyme)
    if onset in ("g", "ng"):
        return (onset + "h" if rhyme.startswith(_FRONT[:3]) else onset), rhyme
    if onset == "gi":
        return ("g", rhyme) if rhyme.startswith("i") else ("gi", rhyme)
    if onset == "" and rhyme.startswith("iê"):  # an initial /iə/ is written "yê": "yên", "yêu"
        return "", "y" + rhyme[1:]
    return onset, rhyme


def syllable(rng: np.random.Generator) -> str:
    """A random Vietnamese syllable in lower case, tone mark on the right vowel, NFC."""
    while True:
        spelled = _spell_onset(str(rng.choice(ONSETS)), str(rng.choice(RHYMES)))
        if spelled is not None:
            break
    onset, rhyme = spelled
    stop = rhyme.endswith(("p", "t", "c", "ch"))
    tone = str(rng.choice(STOP_TONES if stop else TONES))
    at = tone_position(rhyme)
    return nfc(onset + rhyme[:at] + toned(rhyme[at], tone) + rhyme[at + 1:])


# --------------------------------------------------------------------------------------------------
# Phrases, places, numbers

#: Real road-sign, public-place and festival text, as printed (upper case, with tones).
PHRASES: tuple[str, ...] = (
    # the synthetic world's information signs (synth.INFO_TEXTS, toned)
    "ĐƯỜNG CAO TỐC", "TRƯỜNG HỌC", "BẾN XE", "CẤM ĐỖ XE", "HẾT HẠN CHẾ TỐC ĐỘ", "KHU DÂN CƯ", "CHỢ",
    "BỆNH VIỆN", "NGÃ TƯ", "LỐI RA", "TRẠM XĂNG", "BÃI ĐỖ XE", "LỐI VÀO", "SÂN BAY", "NHÀ GA", "CẦU",
    "TRUNG TÂM", "LỄ HỘI", "SÂN KHẤU", "LỐI THOÁT HIỂM", "ĐƯỜNG CỤT", "ĐI CHẬM", "TRẠM Y TẾ", "BẾN PHÀ",
    "CÔNG VIÊN",
    # prohibitions and warnings
    "CẤM DỪNG XE VÀ ĐỖ XE", "ĐƯỜNG CẤM", "ĐƯỜNG MỘT CHIỀU", "CẤM ĐI NGƯỢC CHIỀU", "CẤM RẼ TRÁI",
    "CẤM RẼ PHẢI", "CẤM QUAY ĐẦU", "CẤM VƯỢT", "CẤM XE TẢI", "CẤM XE MÁY", "CẤM Ô TÔ", "CẤM BÓP CÒI",
    "CẤM XE KHÁCH", "CẤM NGƯỜI ĐI BỘ", "GIẢM TỐC ĐỘ", "CHÚ Ý", "NGUY HIỂM", "ĐƯỜNG TRƠN", "CÔNG TRƯỜNG",
    "ĐANG THI CÔNG", "ĐƯỜNG ĐANG SỬA CHỮA", "CÔNG TRÌNH ĐANG THI CÔNG", "ĐƯỜNG HẸP", "CẦU HẸP",
    "ĐƯỜNG NGƯỜI ĐI BỘ", "NGƯỜI ĐI BỘ CẮT NGANG", "TRẺ EM", "CHÚ Ý TRẺ EM", "GIAO NHAU VỚI ĐƯỜNG SẮT",
    "ĐƯỜNG SẮT", "DỪNG LẠI", "NHƯỜNG ĐƯỜNG", "ĐƯỜNG ƯU TIÊN", "HẾT ĐƯỜNG ƯU TIÊN", "BẮT ĐẦU ĐƯỜNG CAO TỐC",
    "HẾT ĐƯỜNG CAO TỐC", "TỐC ĐỘ TỐI ĐA", "TỐC ĐỘ TỐI THIỂU", "GIỮ KHOẢNG CÁCH AN TOÀN", "KIỂM TRA KHOẢNG CÁCH",
    "ĐƯỜNG GỒ GHỀ", "DỐC NGUY HIỂM", "DỐC CAO", "KHÚC CUA NGUY HIỂM", "ĐÁ LỞ", "VÙNG HAY XẢY RA TAI NẠN",
    "HẾT KHU DÂN CƯ", "KHU VỰC TRƯỜNG HỌC", "ĐI ĐƯỜNG VÒNG", "ĐƯỜNG TRÁNH", "CẨN THẬN", "NƯỚC SÂU NGUY HIỂM",
    "CẤM BƠI", "CẤM HÚT THUỐC", "CẤM LỬA", "KHU VỰC CẤM", "KHÔNG PHẬN SỰ MIỄN VÀO", "CẤM CHỤP ẢNH",
    "CẤM XẢ RÁC", "TẮT MÁY", "XUỐNG XE DẮT BỘ", "BẬT ĐÈN", "DỪNG XE KIỂM TRA",
    # directions and road furniture
    "RẼ TRÁI", "RẼ PHẢI", "ĐI THẲNG", "HƯỚNG ĐI", "PHÍA TRƯỚC", "NGÃ BA", "NGÃ NĂM", "VÒNG XUYẾN",
    "QUAY ĐẦU XE", "LÀN XE MÁY", "LÀN Ô TÔ", "LÀN XE BUÝT", "LÀN KHẨN CẤP", "LỐI ĐI BỘ", "LỐI ĐI",
    "TRẠM THU PHÍ", "TRẠM DỪNG NGHỈ", "TRẠM CẢNH SÁT GIAO THÔNG", "TRẠM KIỂM SOÁT", "NƠI ĐỖ XE", "BÃI GIỮ XE",
    "GỬI XE MÁY", "ĐIỂM DỪNG XE BUÝT", "BẾN XE BUÝT", "BẾN XE KHÁCH", "BẾN TÀU", "CẢNG HÀNG KHÔNG",
    "SÂN BAY QUỐC TẾ", "CẢNG BIỂN", "CÂY XĂNG", "TRẠM SẠC XE ĐIỆN", "CẦU VƯỢT", "HẦM CHUI", "ĐƯỜNG HẦM",
    # public places
    "CẤP CỨU", "NHÀ THUỐC", "ĐỒN CÔNG AN", "ỦY BAN NHÂN DÂN", "TRƯỜNG TIỂU HỌC", "TRƯỜNG MẦM NON",
    "BƯU ĐIỆN", "NGÂN HÀNG", "KHÁCH SẠN", "NHÀ NGHỈ", "NHÀ HÀNG", "QUÁN CÀ PHÊ", "SIÊU THỊ",
    "TRUNG TÂM THƯƠNG MẠI", "TRUNG TÂM THÀNH PHỐ", "BẢO TÀNG", "NHÀ VĂN HÓA", "SÂN VẬN ĐỘNG", "KHU DU LỊCH",
    "BÃI BIỂN", "NHÀ VỆ SINH", "NHÀ VỆ SINH CÔNG CỘNG", "WC NAM", "WC NỮ", "THÔNG TIN DU LỊCH", "PHỐ ĐI BỘ",
    "PHỐ CỔ", "CHỢ NỔI", "CHỢ ĐÊM", "HỘI CHỢ", "CHÙA", "NHÀ THỜ", "ĐỀN", "LĂNG", "KHU CÔNG NGHIỆP",
    # festival
    "LỄ HỘI ÂM NHẠC", "LỄ HỘI ÁNH SÁNG", "LỄ HỘI ẨM THỰC", "LỄ HỘI HOA", "SÂN KHẤU CHÍNH", "KHU ẨM THỰC",
    "KHU VUI CHƠI", "KHU VỰC VIP", "KHU VỰC KHÁN GIẢ", "QUẦY VÉ", "BÁN VÉ", "SOÁT VÉ", "CỔNG VÀO",
    "CỔNG CHÍNH", "BAN TỔ CHỨC", "TÌNH NGUYỆN VIÊN", "HỖ TRỢ KHÁCH HÀNG", "ĐIỂM PHÁT NƯỚC",
    "NƯỚC UỐNG MIỄN PHÍ", "WIFI MIỄN PHÍ", "KHU VỰC HÚT THUỐC", "THẤT LẠC ĐỒ", "TRẺ LẠC", "BẮN PHÁO HOA",
    "CHƯƠNG TRÌNH BIỂU DIỄN", "CHÀO MỪNG QUÝ KHÁCH", "XIN CẢM ƠN", "HẸN GẶP LẠI", "CHÚC MỪNG NĂM MỚI",
    "TẾT NGUYÊN ĐÁN", "TẾT TRUNG THU", "ĐIỂM HẸN", "ĐIỂM TẬP TRUNG", "LỐI THOÁT NẠN", "CỬA THOÁT HIỂM",
    "SƠ CỨU", "XE ĐIỆN", "XE ĐƯA ĐÓN", "ĐIỂM ĐÓN TAXI", "TAXI", "BUS", "PARKING", "EXIT", "STOP", "INFO",
    "FOOD COURT", "KARAOKE", "MINI MART", "PIZZA", "JAZZ", "ZONE B",
)

#: Provinces, cities, districts, landmarks and street names, as printed (with tones).
PLACES: tuple[str, ...] = (
    "HÀ NỘI", "HỒ CHÍ MINH", "ĐÀ NẴNG", "HẢI PHÒNG", "CẦN THƠ", "HUẾ", "NHA TRANG", "ĐÀ LẠT", "VŨNG TÀU",
    "QUẢNG NINH", "HẠ LONG", "LÀO CAI", "SA PA", "ĐIỆN BIÊN", "LAI CHÂU", "SƠN LA", "HÀ GIANG", "CAO BẰNG",
    "BẮC KẠN", "LẠNG SƠN", "TUYÊN QUANG", "THÁI NGUYÊN", "PHÚ THỌ", "BẮC GIANG", "BẮC NINH", "VĨNH PHÚC",
    "HẢI DƯƠNG", "HƯNG YÊN", "THÁI BÌNH", "NAM ĐỊNH", "NINH BÌNH", "HÀ NAM", "HÒA BÌNH", "THANH HÓA",
    "NGHỆ AN", "VINH", "HÀ TĨNH", "QUẢNG BÌNH", "ĐỒNG HỚI", "QUẢNG TRỊ", "ĐÔNG HÀ", "QUẢNG NAM", "HỘI AN",
    "TAM KỲ", "QUẢNG NGÃI", "BÌNH ĐỊNH", "QUY NHƠN", "PHÚ YÊN", "TUY HÒA", "KHÁNH HÒA", "NINH THUẬN",
    "PHAN RANG", "BÌNH THUẬN", "PHAN THIẾT", "KON TUM", "GIA LAI", "PLEIKU", "ĐẮK LẮK", "BUÔN MA THUỘT",
    "ĐẮK NÔNG", "LÂM ĐỒNG", "BÌNH PHƯỚC", "TÂY NINH", "BÌNH DƯƠNG", "THỦ DẦU MỘT", "ĐỒNG NAI", "BIÊN HÒA",
    "LONG AN", "TÂN AN", "TIỀN GIANG", "MỸ THO", "BẾN TRE", "TRÀ VINH", "VĨNH LONG", "ĐỒNG THÁP",
    "CAO LÃNH", "AN GIANG", "LONG XUYÊN", "CHÂU ĐỐC", "KIÊN GIANG", "RẠCH GIÁ", "PHÚ QUỐC", "HẬU GIANG",
    "SÓC TRĂNG", "BẠC LIÊU", "CÀ MAU", "MÓNG CÁI", "CỬA LÒ", "MŨI NÉ", "CÔN ĐẢO", "TAM ĐẢO", "MỘC CHÂU",
    "CÁT BÀ", "PHONG NHA", "BÀ RỊA", "LONG THÀNH", "NỘI BÀI", "TÂN SƠN NHẤT", "CAM RANH", "HOÀN KIẾM",
    "BA ĐÌNH", "CẦU GIẤY", "ĐỐNG ĐA", "TÂY HỒ", "LONG BIÊN", "THỦ ĐỨC", "GÒ VẤP", "BÌNH THẠNH", "PHÚ NHUẬN",
    "CHỢ LỚN", "SƠN TRÀ", "NGŨ HÀNH SƠN", "HẢI CHÂU", "LIÊN CHIỂU", "HÒA VANG", "LÊ LỢI", "TRẦN HƯNG ĐẠO",
    "NGUYỄN HUỆ", "HAI BÀ TRƯNG", "LÝ THƯỜNG KIỆT", "ĐIỆN BIÊN PHỦ", "NGUYỄN TRÃI", "LÊ DUẨN", "QUANG TRUNG",
    "HÙNG VƯƠNG", "VÕ NGUYÊN GIÁP", "PHAN CHU TRINH", "BẠCH ĐẰNG", "LÊ THÁNH TÔNG", "NGUYỄN VĂN LINH",
    "HÀM NGHI", "TRƯỜNG CHINH", "HỒ GƯƠM", "HỒ TÂY", "SÔNG HÀN", "SÔNG HƯƠNG", "BÀ NÀ", "MỸ KHÊ",
)

#: Words printed before a place name ("ĐI HÀ NỘI", "TP. HUẾ").
PLACE_PREFIXES = ("ĐI", "VỀ", "ĐẾN", "HƯỚNG", "TP.", "THÀNH PHỐ", "TỈNH", "HUYỆN", "QUẬN", "PHƯỜNG", "XÃ",
                  "THỊ TRẤN", "ĐƯỜNG", "PHỐ", "CẦU", "NGÕ", "KIỆT", "HẺM", "CHỢ", "BẾN", "GA")
UNITS = ("km", "m", "km/h", "t", "tấn", "phút", "giờ", "%", "KM", "M", "T")

#: Share of the phrases and places held out for validation.
VAL_FRACTION = 0.2
SPLITS = ("train", "val")


@lru_cache(maxsize=1)
def _world_keys() -> frozenset[str]:
    from festival_serve.world.synth.truth import INFO_TEXTS  # plain data; synth's drawing code is not imported

    return frozenset(key(text) for text in INFO_TEXTS) | {key("HÀ NỘI"), key("ĐÀ NẴNG")}


def _hashed_out(k: str) -> bool:
    digest = hashlib.sha256(k.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < VAL_FRACTION


@lru_cache(maxsize=1)
def held_out_keys() -> tuple[str, ...]:
    """``key`` of every phrase and place held out: those of two words or more whose hash falls in the
    first ``VAL_FRACTION``, except the texts the synthetic world prints and their parts (a single word is
    a syllable the generator makes anyway, never held out)."""
    world = [f" {w} " for w in _world_keys()]
    keys = (key(t) for t in (*PHRASES, *PLACES))
    return tuple(k for k in keys if " " in k and _hashed_out(k) and not any(f" {k} " in w for w in world))


def contains_held_out(text: str) -> bool:
    """Whether ``text`` holds a held-out phrase or place as a run of whole words (in any case, with or
    without tones)."""
    padded = f" {key(text)} "
    return any(f" {k} " in padded for k in held_out_keys())


def split_of(text: str) -> str:
    """``"val"`` for a text that holds a held-out phrase or place (``held_out_keys``), else ``"train"``.

    The split follows a hash of the toneless upper-case form, so a phrase in any case, with or without
    tones, lands in one split on every machine and run; a longer phrase that contains a held-out one
    ("CẤM RẼ PHẢI" around "RẼ PHẢI") is held out with it, so no training line ever shows it."""
    return "val" if contains_held_out(text) else "train"


def phrases(split: str) -> tuple[str, ...]:
    """``PHRASES`` of one split."""
    _check_split(split)
    return tuple(p for p in PHRASES if split_of(p) == split)


def places(split: str) -> tuple[str, ...]:
    """``PLACES`` of one split."""
    _check_split(split)
    return tuple(p for p in PLACES if split_of(p) == split)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; splits: {', '.join(SPLITS)}")


def number(rng: np.random.Generator) -> str:
    """A number as signs print it: integers, "3,5" decimals (comma), sometimes "1.200" thousands."""
    kind = rng.random()
    if kind < 0.45:
        return str(int(rng.choice([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])))
    if kind < 0.7:
        return str(int(rng.integers(0, 1000)))
    if kind < 0.9:
        return f"{int(rng.integers(0, 20))},{int(rng.integers(0, 10))}"
    return f"{int(rng.integers(1, 100))}.{int(rng.integers(0, 1000)):03d}"


def speed_limit(rng: np.random.Generator) -> str:
    """A speed limit's bare numerals ("50", "120"): the most-read text on a road, alone on its disc."""
    if rng.random() < 0.8:
        return str(10 * int(rng.integers(1, 13)))
    return str(5 * int(rng.integers(1, 27)))


def measure(rng: np.random.Generator) -> str:
    """Numbers with units, times, road numbers and other figures printed on signs."""
    kind = rng.random()
    if kind < 0.35:
        gap = " " if rng.random() < 0.6 else ""
        return f"{number(rng)}{gap}{rng.choice(UNITS)}"
    if kind < 0.5:
        h1, h2 = sorted(int(h) for h in rng.integers(0, 24, size=2))
        if rng.random() < 0.5:
            return f"{h1}:{rng.choice(['00', '30'])} - {h2}:{rng.choice(['00', '30'])}"
        return f"{h1}h-{h2}h"
    if kind < 0.65:
        road = str(rng.choice(["QL", "QL.", "ĐT", "ĐT.", "TL", "CT.", "AH", "HL"]))
        return f"{road}{' ' if rng.random() < 0.3 else ''}{int(rng.integers(1, 1000))}{rng.choice(['', '', 'A', 'B', 'C'])}"
    if kind < 0.75:
        return f"Km {int(rng.integers(0, 2000))}+{int(rng.integers(0, 1000)):03d}"
    if kind < 0.85:
        return f"{int(rng.integers(1, 32))}/{int(rng.integers(1, 13))}"
    if kind < 0.92:
        return f"({number(rng)} {rng.choice(['m', 'km', 'giờ', 'phút', 't'])})"
    return str(rng.choice(["113", "114", "115", "1900 1234", "24/7", "0-24h", "10%", "100%", "A1", "B2", "F1"]))


def _case(text: str, rng: np.random.Generator) -> str:
    """Signs are mostly upper case; some print title or lower case, some drop the tone marks."""
    u = rng.random()
    if u < 0.68:
        out = text.upper()
    elif u < 0.82:
        out = " ".join(w[:1].upper() + w[1:].lower() for w in text.split())
    elif u < 0.88:
        out = text.lower()
    else:
        out = strip_tones(text).upper()
    return out


def random_characters(rng: np.random.Generator) -> str:
    """1-3 "words" of dictionary characters drawn uniformly: every class is seen in training, tone-marked
    letters no phrase happens to use and the Latin letters Vietnamese lacks (f, j, w, z) included."""
    words = ["".join(rng.choice(DICTIONARY, size=int(rng.integers(1, 7)))) for _ in range(int(rng.integers(1, 4)))]
    return " ".join(words)


#: Share of training lines that are a speed limit's bare numerals (without them the recognizer, having seen
#: numbers only beside units and words, read a lone "50" as nothing and "60" as "6O").
SPEED_LIMIT_P = 0.06


def _draw(rng: np.random.Generator, split: str) -> str:
    if rng.random() < SPEED_LIMIT_P:
        return speed_limit(rng)
    source = rng.random()
    if source < 0.28:
        return _case(str(rng.choice(phrases(split))), rng)
    if source < 0.42:
        place = str(rng.choice(places(split)))
        u = rng.random()
        if u < 0.35:
            place = f"{rng.choice(PLACE_PREFIXES)} {place}"
        elif u < 0.6:
            place = f"{place} {number(rng)} {rng.choice(['km', 'KM', 'Km'])}"
        return _case(place, rng)
    if source < 0.66:
        return _case(" ".join(syllable(rng) for _ in range(int(rng.integers(1, 5)))), rng)
    if source < 0.8:
        return measure(rng)
    if source < 0.9:
        head = str(rng.choice(phrases(split) if rng.random() < 0.6 else places(split)))
        return f"{_case(head, rng)} {measure(rng)}"
    return random_characters(rng)


def sample_text(rng: np.random.Generator, split: str = "train", max_chars: int = 32) -> str:
    """One line of sign text (NFC, single-spaced, at most ``max_chars``).

    ``"val"`` draws the held-out phrases and places (the validation set measures text never trained on);
    ``"train"`` draws everything else and rejects any line that contains a held-out phrase or place."""
    _check_split(split)
    if split == "val":
        pool = (*phrases("val"), *places("val"))
        return nfc(_case(str(rng.choice(pool)), rng))
    while True:
        text = nfc(_draw(rng, split))
        if 0 < len(text) <= max_chars and not contains_held_out(text):
            return text


#: A text line's characters must all be classes of the recognizer (checked once at import).
assert all(c in DICTIONARY or c == " " for text in (*PHRASES, *PLACES, *PLACE_PREFIXES, *UNITS) for c in nfc(text)), \
    "a phrase uses a character outside DICTIONARY"
assert all(unicodedata.is_normalized("NFC", t) for t in (*PHRASES, *PLACES)), "phrases must be NFC"
