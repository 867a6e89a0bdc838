"""Snippets: the matched words marked, everything escaped, accents and case folded."""

from __future__ import annotations

from postroom.search.snippet import fold, highlight, term_words


def test_fold_removes_case_and_accents() -> None:
    assert fold("Résumé") == "resume"
    assert fold("STRASSE") == fold("straße")
    assert term_words("Café, au-lait!") == ("cafe", "au", "lait")


def test_marks_words_and_phrases_and_escapes_the_rest() -> None:
    text = "Tom & Jerry <b>said</b>: the résumé is ready, RESUME later."
    out = highlight(text, [("resume",), ("tom", "jerry")])
    assert out == ("<mark>Tom &amp; Jerry</mark> &lt;b&gt;said&lt;/b&gt;: the "
                   "<mark>résumé</mark> is ready, <mark>RESUME</mark> later.")


def test_the_window_starts_near_the_first_match() -> None:
    text = " ".join(f"w{i}" for i in range(500)) + " needle " + "tail " * 10
    out = highlight(text, [("needle",)], length=80)
    assert out.startswith("…w494 w495")
    assert "<mark>needle</mark>" in out
    assert out.endswith("…")
    assert len(out) < 140


def test_no_match_gives_the_start_of_the_text() -> None:
    assert highlight("first words\n\nof   the body", [("zzz",)]) == "first words of the body"
    assert highlight("", [("x",)]) == ""
    assert highlight("a b", []) == "a b"
