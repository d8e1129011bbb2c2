"""IndexTTS-2.5's text front-end (torch-free): language prefix and id, clean map, normalization, case rules,
pronunciation annotations, Japanese word splitting, the token-budget splitter and the tiktoken BPE.

upstream: indextts/infer_v2_5.py:700-727 (the order of the stages), :411-464 (the splitter), :39-73 (the
annotations), indextts/utils/tokenizer.py (the encoding and the languages), indextts/utils/ja_g2p.py (UPSTREAM-2.5
§1 "text front-end", "Quirks pinned by fixtures-2.5"). The stages are in `frontend.py`; each helper in its own
module.
"""
