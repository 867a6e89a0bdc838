"""Body addresses and link hosts are found without trying a regex at every offset, with
exactly the regex's results."""

from __future__ import annotations

import random
import re
import time

from postroom.core.message import parse_message
from postroom.spam.features import _URL, _email_domains, _url_hosts, extract

# what the content features were trained with
_EMAIL = re.compile(r"[\w.+-]+@([a-z0-9.-]+\.[a-z]{2,})", re.I)


def test_email_domains_match_the_regex() -> None:
    rng = random.Random(5)
    alphabet = "@@..aZb_-+ 1\u017f\u00e9\n"
    samples = ["mail bob@example.com or x.y+z@sub.example.org.", "a@b.com@c.org", "@x.com",
               "a@@b.com", "a@b.c", "first@one.example_second@two.example"]
    samples += ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                for _ in range(20_000)]
    for text in samples:
        assert _email_domains(text) == [m.group(1) for m in _EMAIL.finditer(text)], text


def test_long_runs_without_at_sign_cost_little() -> None:
    # the regex over the text backtracks quadratically here (seconds of CPU per message)
    raw = (b"From: a@example.com\r\nTo: b@example.com\r\nSubject: x\r\n\r\n"
           + b"a" * 30_000 + b"\r\n" + (b"X" * 78 + b"\r\n") * 600)
    parsed = parse_message(raw)
    started = time.process_time()
    extract(parsed)
    assert time.process_time() - started < 0.25


def test_url_hosts_match_the_regex() -> None:
    rng = random.Random(7)
    pieces = ["http", "HTTP", "https://", "://", "www.", "WwW.", "w", "h", "a", ".", "-", "/",
              " ", "\u0130", "\u00e9", "1", "\n"]
    samples = ["see http://example.com/x and WWW.Foo.org, https://a.b/c", "httphttp://x.y",
               "www.www.a", "http://", "\u0130 http://x.org"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
                for _ in range(20_000)]
    for text in samples:
        assert _url_hosts(text) == [m.group(1) for m in _URL.finditer(text)], text


def test_words_as_the_loop_counted_them() -> None:
    from postroom.spam.features import _words

    rng = random.Random(11)
    pieces = ["word", "12", "123456789", "é", "$", "!!", "_", " ", "\n", "ab_cd", "x" * 30]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        for prefix, limit in (("", 3000), ("s:", 5)):
            fast: set[str] = set()
            slow: set[str] = set()
            count = 0
            for match in re.finditer(r"[^\W_]{2,24}|[$€£!]+", text):
                word = match.group()
                slow.add(prefix + ("#" * min(len(word), 6) if word.isdigit() else word))
                count += 1
                if count >= limit:
                    break
            assert _words(text, prefix, fast, limit) == count and fast == slow, text


def _shape_features(body: str) -> set[str]:
    raw = ("From: a@example.com\r\nTo: b@example.com\r\nSubject: x\r\n"
           "Content-Type: text/plain; charset=utf-8\r\n\r\n" + body).encode()
    return {f for f in extract(parse_message(raw)) if f.startswith("b:")}


def test_shape_shortcuts_give_the_regexes_results() -> None:
    """The text-shape regexes are skipped where a quick test says they cannot match; where
    they can, and for digits of other scripts (\\d matches those too), they still run."""
    plain = _shape_features("the quick brown fox jumps over the lazy dog\r\n" * 800)
    assert {"b:money", "b:percent", "b:phone"} & plain == set()
    assert "b:bangs0" in plain and "b:capswords0" in plain
    marked = _shape_features("CALL NOW at 555-123-4567!! only $5, 50% off\r\n")
    assert {"b:money", "b:percent", "b:phone", "b:bangs1", "b:capswords1"} <= marked
    # nine ASCII digits cannot make a phone number; Arabic-Indic ones can
    assert "b:phone" not in _shape_features("call 555-123-456 today\r\n")
    assert "b:phone" in _shape_features("call \u0665\u0665\u0665-\u0661\u0662\u0663-"
                                        "\u0664\u0665\u0666\u0667 today\r\n")


def test_caps_ratio_as_the_loop_counted_it() -> None:
    from postroom.spam.features import _caps_ratio

    def counted(text: str) -> int:  # what the classifier was trained with
        letters = [c for c in text[:2000] if c.isalpha()]
        if len(letters) < 10:
            return -1
        return int(10 * sum(1 for c in letters if c.isupper()) / len(letters))

    rng = random.Random(13)
    # capitals that are not letters (circled A: isupper but not isalpha), other scripts' cases
    pieces = ["A", "b", "É", "ß", "\u24b6", "Σ", "σ", "1", " ", "!", "\u0665", "ǅ", "x" * 30]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 120)))
        assert _caps_ratio(text) == counted(text), text
    assert _caps_ratio("ABCDEFGHIJ" * 300) == 10  # only the first 2,000 characters count


def test_address_as_the_regex_found_it() -> None:
    from postroom.spam.features import _address

    addr_rx = re.compile(r"<?([^<>\s@]+@[^<>\s@]+?)>?\s*$")  # what the model was trained with

    def by_regex(value: str) -> tuple[str, str]:
        value = value.strip()
        if "," in value:
            value = value.split(",", 1)[0]
        match = addr_rx.search(value)
        if match is None:
            return value, ""
        return (value[: match.start()].strip().strip('"').strip(),
                match.group(1).lower().strip("<>\"' "))

    rng = random.Random(29)
    pieces = ["a", "B", "@", "<", ">", " ", "\t", '"', "'", ",", ":", ".", "é", "\n", "x@y"]
    samples = ["Ann <ann@example.org>", "bob@example.org", '"Doe" <J@X.ORG> ', "<a@b>", "a@b>>",
               "no address", "@", "a@", "@b", "x <a@b> y", "a@b@c"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 14)))
                for _ in range(30_000)]
    for value in samples:
        assert _address(value) == by_regex(value), value
    started = time.process_time()
    for value in ("a:" * 50_000, '\\"' * 50_000, "a" * 100_000 + "@b c"):
        _address(value)
    assert time.process_time() - started < 0.5


def test_tracking_tail_as_the_regexes_found_it() -> None:
    from postroom.spam.features import _tracking_tail

    def by_regex(subject: str) -> bool:  # what the model was trained with
        return bool(re.search(r"\s{3,}\S+$", subject)
                    or re.search(r"[#\[(]?\d{3,}[\])]?\s*$", subject))

    rng = random.Random(31)
    pieces = ["a", " ", "  ", "\t", "\n", "1", "22", "\u0665", "]", ")", "(", "[", "#", "x y"]
    samples = ["Your order   ABC123", "Invoice [12345]", "hello 12", "re: x (2024) ", "a\n"]
    samples += ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
                for _ in range(30_000)]
    for subject in samples:
        assert _tracking_tail(subject) == by_regex(subject), repr(subject)
    started = time.process_time()
    for subject in ("x" + " " * 100_000 + "y z", "1" * 100_000 + "x", "\t" * 100_000 + "y z"):
        _tracking_tail(subject)
    assert time.process_time() - started < 0.5
