"""A small, documented text-normalization subset used when WeTextProcessing is not installed.

upstream: none — upstream requires WeTextProcessing (tn.chinese / tn.english). This module stands in
for those two engines only; everything around them (language choice, contractions, protections,
punctuation map) is `runtime.frontend.text.normalize` and identical for both engines.

What the subset does (and nothing more):
- English: `$12` -> "twelve dollars"; `50%` -> "fifty percent"; `3rd` -> "third"; `12.5` -> "twelve
  point five"; `1,234` / `1234` -> "one thousand two hundred and thirty four" (British "and", no
  hyphens, the style WeTextProcessing writes); integers of more than 15 digits are read digit by digit.
- Chinese: fullwidth ASCII forms U+FF01-FF5E -> ASCII, `。` -> `.`, `“ ”` -> `"` (WeTextProcessing's
  full-to-half table); `50%` -> 百分之五十; `3.5` -> 三点五; a 4-digit number before 年 is read digit
  by digit (二零二四年); other integers -> Chinese numerals (一万零五, 十二), numbers with a leading
  zero or more than 16 digits digit by digit.
Known differences from WeTextProcessing: no dates, times, fractions, units, money in Chinese, years
in English, traditional-to-simplified conversion, negative numbers, or its quirks (it reads `12.5` in
Chinese text as the date 十二月五日). Numbers are verbalized the same way wherever they appear.
"""

from __future__ import annotations

import re

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
         "sixteen seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
_SCALES = ("", " thousand", " million", " billion", " trillion")
_ORDINAL_WORDS = {"one": "first", "two": "second", "three": "third", "five": "fifth", "eight": "eighth",
                  "nine": "ninth", "twelve": "twelfth"}

_ZH_DIGITS = "零一二三四五六七八九"
_ZH_SMALL_UNITS = ("", "十", "百", "千")
_ZH_BIG_UNITS = ("", "万", "亿", "万亿")


# ---------------------------------------------------------------------------------------------- English

def _en_below_thousand(n: int) -> str:
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest:
        if hundreds:
            words.append("and")
        words.append(_ONES[rest] if rest < 20 else
                     _TENS[rest // 10] + (f" {_ONES[rest % 10]}" if rest % 10 else ""))
    return " ".join(words)


def en_cardinal(digits: str) -> str:
    """'1234' -> 'one thousand two hundred and thirty four'; more than 15 digits: digit by digit."""
    if len(digits) > 15:
        return " ".join(_ONES[int(d)] for d in digits)
    n = int(digits)
    if n == 0:
        return "zero"
    groups: list[str] = []
    for scale in _SCALES:
        n, group = divmod(n, 1000)
        if group:
            groups.append(_en_below_thousand(group) + scale)
        if n == 0:
            break
    return " ".join(reversed(groups))


def en_ordinal(digits: str) -> str:
    words = en_cardinal(digits).split(" ")
    last = words[-1]
    if last in _ORDINAL_WORDS:
        words[-1] = _ORDINAL_WORDS[last]
    elif last.endswith("y"):
        words[-1] = last[:-1] + "ieth"
    else:
        words[-1] = last + "th"
    return " ".join(words)


def en_decimal(integer: str, fraction: str) -> str:
    return f"{en_cardinal(integer)} point " + " ".join(_ONES[int(d)] for d in fraction)


_EN_NUMBER = re.compile(
    r"\$(?P<money>\d[\d,]*(?:\.\d+)?)"
    r"|(?P<percent>\d+(?:\.\d+)?)%"
    r"|(?P<ordinal>\d+)(?:st|nd|rd|th)\b"
    r"|(?P<number>\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?)"
)


def _en_number(text: str) -> str:
    integer, _, fraction = text.replace(",", "").partition(".")
    return en_decimal(integer, fraction) if fraction else en_cardinal(integer)


def _en_replace(m: re.Match) -> str:
    if m.group("money") is not None:
        amount = m.group("money")
        return f"{_en_number(amount)} dollar" + ("" if amount == "1" else "s")
    if m.group("percent") is not None:
        return f"{_en_number(m.group('percent'))} percent"
    if m.group("ordinal") is not None:
        return en_ordinal(m.group("ordinal"))
    return _en_number(m.group("number"))


class FallbackEnglish:
    """Stand-in for `tn.english.normalizer.Normalizer`: numbers to words, everything else kept."""

    def normalize(self, text: str) -> str:
        return _spaced_sub(_EN_NUMBER, _en_replace, text)


# ---------------------------------------------------------------------------------------------- Chinese

def _zh_group(n: int) -> str:
    """0 < n < 10000 in Chinese numerals, with 零 for inner gaps (1005 -> 一千零五)."""
    out, pending_zero = [], False
    for power in (3, 2, 1, 0):
        digit = n // 10 ** power % 10
        if digit == 0:
            pending_zero = bool(out)
            continue
        if pending_zero:
            out.append("零")
            pending_zero = False
        out.append(_ZH_DIGITS[digit] + _ZH_SMALL_UNITS[power])
    return "".join(out)


def zh_digits(digits: str) -> str:
    return "".join(_ZH_DIGITS[int(d)] for d in digits)


def zh_cardinal(digits: str) -> str:
    """'10005' -> 一万零五, '12' -> 十二; leading zero or more than 16 digits: digit by digit."""
    if len(digits) > 16 or (len(digits) > 1 and digits[0] == "0"):
        return zh_digits(digits)
    n = int(digits)
    if n == 0:
        return "零"
    groups = []
    while n:
        n, group = divmod(n, 10000)
        groups.append(group)
    out, pending_zero = [], False
    for index in range(len(groups) - 1, -1, -1):
        group = groups[index]
        if group == 0:
            pending_zero = bool(out)
            continue
        if out and (pending_zero or group < 1000):
            out.append("零")
        out.append(_zh_group(group) + _ZH_BIG_UNITS[index])
        pending_zero = False
    text = "".join(out)
    return text[1:] if text.startswith("一十") else text


def _zh_number(text: str) -> str:
    integer, _, fraction = text.partition(".")
    return f"{zh_cardinal(integer)}点{zh_digits(fraction)}" if fraction else zh_cardinal(integer)


_ZH_NUMBER = re.compile(r"(?P<percent>\d+(?:\.\d+)?)%|(?P<year>\d{4})(?=年)|(?P<number>\d+(?:\.\d+)?)")
_ZH_FULL_TO_HALF = {**{chr(c): chr(c - 0xFEE0) for c in range(0xFF01, 0xFF5F)}, "。": ".", "“": '"', "”": '"'}
_ZH_FULL_PATTERN = re.compile("|".join(re.escape(k) for k in _ZH_FULL_TO_HALF))


def _zh_replace(m: re.Match) -> str:
    if m.group("percent") is not None:
        return "百分之" + _zh_number(m.group("percent"))
    if m.group("year") is not None:
        return zh_digits(m.group("year"))
    return _zh_number(m.group("number"))


class FallbackChinese:
    """Stand-in for `tn.chinese.normalizer.Normalizer`: fullwidth to ASCII, numbers to Chinese numerals."""

    def normalize(self, text: str) -> str:
        text = _ZH_FULL_PATTERN.sub(lambda m: _ZH_FULL_TO_HALF[m.group()], text)
        return _ZH_NUMBER.sub(_zh_replace, text)


def _spaced_sub(pattern: re.Pattern, repl, text: str) -> str:
    """`pattern.sub` that keeps a replaced number from gluing to an adjacent letter ('F5' -> 'F five')."""
    out, last = [], 0
    for m in pattern.finditer(text):
        words = repl(m)
        if m.start() > 0 and text[m.start() - 1].isalpha():
            words = " " + words
        if m.end() < len(text) and text[m.end()].isalpha():
            words = words + " "
        out.append(text[last:m.start()])
        out.append(words)
        last = m.end()
    out.append(text[last:])
    return "".join(out)
