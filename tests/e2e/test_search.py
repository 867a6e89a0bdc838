"""Search end to end against a real `postroom serve`: findable right after SMTP delivery, the
REST endpoint, user isolation, malformed queries, import and reindex while serving, and IMAP
SEARCH on 2,000 corpus messages equal to a brute-force scan this test computes itself."""

from __future__ import annotations

import asyncio
import imaplib
import re
import smtplib
import subprocess
import time
from pathlib import Path

import httpx

from postroom.core.models import Flags, HeaderSummary, MessageRecord
from postroom.imap import mime
from postroom.imap.parser import Cursor, RawCommand
from postroom.imap.search import Candidate, Context, parse_program
from tests.corpus import messages
from tests.e2e.conftest import PASSWORD_A, PASSWORD_B
from tests.e2e.server import ServerProcess, postroom_cmd

ALICE = ("alice@example.test", PASSWORD_A)
BOB = ("bob@example.test", PASSWORD_B)
CORPUS_SIZE = 2000


def api(server: ServerProcess, auth: tuple[str, str] = ALICE) -> httpx.Client:
    return httpx.Client(base_url=server.base_url, auth=auth, timeout=30)


def search(c: httpx.Client, q: str, **params: object) -> dict[str, object]:
    r = c.get("/v1/search", params={"q": q, **params})
    assert r.status_code == 200, r.text
    return dict(r.json())


def poll(c: httpx.Client, q: str, timeout: float = 30.0) -> tuple[list[dict[str, object]], float]:
    start = time.monotonic()
    while True:
        results = search(c, q)["results"]
        assert isinstance(results, list)
        if results or time.monotonic() - start > timeout:
            return results, time.monotonic() - start
        time.sleep(0.05)


def test_findable_right_after_smtp_delivery(server: ServerProcess) -> None:
    word = f"zebrafish{time.monotonic_ns()}"
    data = (f"From: Carol <carol@example.org>\r\nTo: alice@example.test\r\n"
            f"Subject: Field notes\r\nMessage-ID: <{word}@example.org>\r\n\r\n"
            f"We saw a {word} near the reef.\r\n").encode()
    with api(server) as c:
        with smtplib.SMTP("127.0.0.1", server.smtp_port, timeout=30) as smtp:
            smtp.sendmail("carol@example.org", ["alice@example.test"], data)
        results, waited = poll(c, f"in:anywhere {word}")
        assert len(results) == 1, f"not findable after {waited:.1f}s"
        hit = results[0]
        assert isinstance(hit, dict)
        assert f"<mark>{word}</mark>" in str(hit["highlight"])
        # the same summary the folder listing gives, plus the snippet
        listing = c.get(f"/v1/folders/{hit['folder_id']}/messages").json()["messages"]
        same = next(m for m in listing if m["id"] == hit["id"])
        assert {k: v for k, v in hit.items() if k not in ("highlight", "score")} == same
        # a flag change shows at once
        r = c.patch(f"/v1/messages/{hit['id']}", json={"flagged": True})
        assert r.status_code == 200, r.text
        assert [m["id"] for m in search(c, f"in:anywhere is:starred {word}")["results"]
                ] == [hit["id"]]  # type: ignore[index]
    with api(server, BOB) as c:
        assert search(c, f"in:anywhere {word}")["results"] == []


def test_malformed_queries_answer_400_with_the_position(server: ServerProcess) -> None:
    with api(server) as c:
        for q, position in (("(oops", 0), ("is:nothing", 3), ("a OR", 4), ("in:nowhere", 3)):
            r = c.get("/v1/search", params={"q": q})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["code"] == "bad_query" and error["position"] == position, error
        assert c.get("/v1/search", params={"q": "x", "sort": "size"}).status_code == 400
        assert c.get("/v1/search", params={"q": "x", "limit": 0}).status_code == 400
        assert c.get("/v1/search", params={"q": "x", "cursor": "!!"}).status_code == 400
    assert httpx.get(f"{server.base_url}/v1/search", params={"q": "x"}).status_code == 401


def test_reindex_rebuilds_while_serving(server: ServerProcess) -> None:
    with api(server) as c:
        before = [m["id"] for m in search(c, "in:anywhere", limit=500)["results"]]
        assert before
        # lose alice's index entries behind the server's back, as a damaged index would
        lost = asyncio.run(_drop_index_of(server, ALICE[0]))
        assert lost and search(c, "in:anywhere")["results"] == []
        out = cli(server, "search", "reindex", "--user", ALICE[0])
        assert out.returncode == 0 and f"reindexed {len(before)} messages" in out.stdout, (
            out.stdout, out.stderr)
        after = [m["id"] for m in search(c, "in:anywhere", limit=500)["results"]]
        assert after == before
    assert cli(server, "search", "reindex", "--user", "nobody@example.test").returncode == 2


# ---- IMAP SEARCH on the corpus --------------------------------------------------------------

QUERIES = [
    'SUBJECT "money"',
    'SUBJECT "re: "',
    'FROM "yahoo"',
    'TO "zzzz-nobody"',
    'BODY "click here"',
    'BODY "unsubscribe"',
    'TEXT "linux"',
    'TEXT "spamassassin"',
    'BODY "=20"',  # an encoded form, found in the undecoded body
    'BODY "</td>"',
    'BODY "ab"',  # too short for a trigram: scanned
    'HEADER "X-Mailer" "outlook"',
    'HEADER "List-Id" ""',
    'OR SUBJECT "free" BODY "guarantee"',
    'NOT BODY "the"',
    'SUBJECT "re" BODY "thanks"',
    'UNSEEN TEXT "http://"',
    'LARGER 20000 BODY "html"',
    'OR FROM "@" NOT SUBJECT "a"',
]


def _scan(raws: list[bytes], query: str) -> list[int]:
    """Brute force: every message checked against the query, no index involved."""
    program = parse_program(Cursor(RawCommand((query.encode(),))))
    ctx = Context(len(raws), len(raws))
    out = []
    for i, raw in enumerate(raws):
        record = MessageRecord("", "", "", i + 1, 1, Flags(), 0.0, len(raw), "",
                               HeaderSummary(), "", False, "")
        c = Candidate(i + 1, record, False, raw=raw, part=mime.parse(raw))
        if program.key.match(c, ctx):
            out.append(i + 1)
    return out


def _raw_body(raw: bytes) -> bytes:
    ends = [i for i in (raw.find(b"\r\n\r\n"), raw.find(b"\n\n")) if i >= 0]
    return raw[min(ends):] if ends else b""


def cli(server: ServerProcess, *args: str, timeout: float = 600
        ) -> subprocess.CompletedProcess[str]:
    """A management command on the server's data directory while it serves."""
    return subprocess.run([*postroom_cmd(), "--data-dir", str(server.data_dir), *args],
                          capture_output=True, text=True, env=server._env(), timeout=timeout)


def _uids(client: imaplib.IMAP4, *criteria: str) -> list[int]:
    typ, data = client.uid("SEARCH", *criteria)
    assert typ == "OK", data
    return [int(n) for n in (data[0] or b"").split()]


def test_imap_search_equals_a_full_scan_on_the_corpus(server: ServerProcess,
                                                      tmp_path: Path) -> None:
    corpus = [raw for _, raw in messages()][::3][:CORPUS_SIZE]
    assert len(corpus) == CORPUS_SIZE
    maildir = tmp_path / "corpus-md"
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True)
    for i, raw in enumerate(corpus):
        (maildir / "cur" / f"{i:05d}.corpus:2,").write_bytes(raw)
    started = time.monotonic()
    out = cli(server, "import", "maildir", str(maildir), "--user", ALICE[0], "--folder",
              "Corpus")
    assert out.returncode == 0, out.stderr
    assert f"imported {CORPUS_SIZE} messages into Corpus" in out.stdout, out.stdout
    print(f"import: {CORPUS_SIZE / (time.monotonic() - started):.0f} msg/s")

    client = imaplib.IMAP4("127.0.0.1", server.imap_port, timeout=120)
    client.login(*ALICE)
    typ, data = client.select("Corpus", readonly=True)
    assert typ == "OK" and int(data[0] or 0) == CORPUS_SIZE
    # the import kept the order and the bytes: uid i holds corpus message i
    typ, fetched = client.uid("FETCH", "1:*", "(RFC822.SIZE)")
    sizes = {}
    for line in fetched:
        assert isinstance(line, bytes)
        uid, size = re.search(rb"UID (\d+)", line), re.search(rb"RFC822.SIZE (\d+)", line)
        assert uid and size, line
        sizes[int(uid[1])] = int(size[1])
    assert sizes == {i + 1: len(raw) for i, raw in enumerate(corpus)}

    for query in QUERIES:
        expected = _scan(corpus, query)
        assert _uids(client, query) == expected, query
        typ, _ = client.uid("SEARCH", "RETURN", "(COUNT)", query)
        _, data = client.response("ESEARCH")
        assert typ == "OK" and data[-1] is not None, (query, data)
        assert data[-1].endswith(b"COUNT %d" % len(expected)), (query, data)
    # a needle outside ASCII, sent as a literal
    client.literal = "é".encode()  # type: ignore[attr-defined]
    typ, data = client.uid("SEARCH", "CHARSET", "UTF-8", "BODY")
    assert typ == "OK"
    found = [int(n) for n in (data[0] or b"").split()]
    assert found == _scan(corpus, 'CHARSET UTF-8 BODY "é"')
    # independent of the server's code: a needle in the raw body is always found by BODY
    for needle in (b"click here", b"unsubscribe", b"=20"):
        raw_hits = {i + 1 for i, raw in enumerate(corpus) if needle in _raw_body(raw).lower()}
        assert raw_hits <= set(_uids(client, f'BODY "{needle.decode()}"')), needle
    client.logout()


async def _drop_index_of(server: ServerProcess, address: str) -> int:
    """Remove a user's documents from the server's index file, from this process."""
    from postroom.app import Postroom
    from postroom.config import load_settings

    settings = load_settings(None, data_dir=str(server.data_dir), hostname="mx.example.test")
    node = Postroom(settings)
    await node.metadata.open()
    await node.search.open()
    try:
        user = await node.service.resolve_recipient(address)
        assert user is not None
        count = len(await node.search.indexed_ids(user.user_id))
        await node.search.remove_user(user.user_id)
        return count
    finally:
        await node.search.close()
        await node.metadata.close()
