"""The 2.5 language table: the `<|xx|> ` prefix each segment starts with and the `lang_embedding` row.

upstream: indextts/utils/tokenizer.py LANGUAGES (106 codes: Whisper's 99, then yue, minnan, wuyu, dialect, zh/en,
en/zh, common), LANGUAGE_DICT (code -> index) and lang_to_token (lower-cased code, anything unknown -> common).
Only the first 99 codes are special tokens of the encoding, so the prefix of yue, minnan, common, zh/en, an unknown
code (and zhen, which is not in the table) is byte-encoded text while its id still comes from the table
(fixtures-2.5 text25/lang_ids).
"""

from __future__ import annotations

LANGUAGE_CODES: tuple[str, ...] = (
    "en", "zh", "de", "es", "ru", "ko", "fr", "ja", "pt", "tr", "pl", "ca", "nl", "ar", "sv", "it", "id", "hi",
    "fi", "vi", "he", "uk", "el", "ms", "cs", "ro", "da", "hu", "ta", "no", "th", "ur", "hr", "bg", "lt", "la",
    "mi", "ml", "cy", "sk", "te", "fa", "lv", "bn", "sr", "az", "sl", "kn", "et", "mk", "br", "eu", "is", "hy",
    "ne", "mn", "bs", "kk", "sq", "sw", "gl", "mr", "pa", "si", "km", "sn", "yo", "so", "af", "oc", "ka", "be",
    "tg", "sd", "gu", "am", "yi", "lo", "uz", "fo", "ht", "ps", "tk", "nn", "mt", "sa", "lb", "my", "bo", "tl",
    "mg", "as", "tt", "haw", "ln", "ha", "ba", "jw", "su",
    "yue", "minnan", "wuyu", "dialect", "zh/en", "en/zh", "common",
)
#: How many leading codes are special tokens of the encoding (get_encoding's num_languages).
SPECIAL_LANGUAGES = 99
COMMON = "common"
_INDEX = {code: i for i, code in enumerate(LANGUAGE_CODES)}

#: Languages the front-end normalizes with the 2.0 normalizer (zh, zhen, en), passes through NeMo's (ja, es: the
#: text unchanged without nemo_text_processing, as a standard upstream install), lower-cases, upper-cases.
NORMALIZED = ("zh", "zhen", "en")
NEMO_NORMALIZED = ("ja", "es")
LOWER_CASED = ("ja", "zh", "zhen", "en")
UPPER_CASED = ("es",)


def lang_id(lang: str) -> int:
    """The `lang_embedding` row: the code's index, `common` (105) for a code not in the table."""
    return _INDEX.get(lang.lower(), _INDEX[COMMON])


def lang_prefix(lang: str) -> str:
    """The text every segment is encoded after: `<|code|> ` with the code lower-cased as given."""
    return f"<|{lang.lower()}|> "


def is_known(lang: str) -> bool:
    return lang.lower() in _INDEX
