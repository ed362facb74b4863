"""The dream diary in a browser (`reverie diary html`) and the transcript written as the
night goes. The diary is built step by step as the night's graph records it (same step
ids, candidate ids and verdicts), so no model runs; one test loads the page in headless
Chromium when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import pytest
from typer.testing import CliRunner

from reverie.cli import app
from reverie.graphs.night import memory_id
from reverie.memory.diary import Diary, DiaryStep, read_steps, render_markdown
from reverie.memory.diary_html import memory_id_of, render_html, threads, write_html

from conftest import REPO

NIGHT = "20261102-030000"
T0 = datetime(2026, 11, 2, 3, 0, tzinfo=timezone.utc)
KEPT, REJECTED, VETOED, OLD_STYLE = (f"s1:w0:b0:{n}" for n in range(4))
SCRIPT = "<script>alert('dreamt')</script>"
DRAFTS = [{"kind": "fact", "question": q, "answer": a, "phrasings": [], "statement": "",
           "turns": [t]} for q, a, t in [("Where does the user live?", "Lisbon", "t1"),
                                          ("What is the user's dog called?", "Biscuit", "t3"),
                                          ("What is the user's cat called?", "Miso", "t5"),
                                          ("What does the user work as?", "nurse", "t7")]]


def prompt(text: str) -> list[dict]:
    return [{"role": "system", "content": "You check notes."}, {"role": "human", "content": text}]


def night_steps() -> list[DiaryStep]:
    """A night as the graph records it: four candidates (kept; rejected after a reshape and
    parked; vetoed and parked; kept, its consolidation step written the older way, with
    the memory id only), plus gather, route and hand-off."""
    rows = [
        dict(step_id="gather", agent="gather", verdict="1 sessions", parsed=["s1"]),
        dict(step_id="route:s1", agent="router", session_id="s1", verdict="routed"),
        dict(step_id="dream:s1:w0:b0", agent="dreamer", session_id="s1", verdict="4 candidates",
             prompt=prompt("Dream about: I moved to Lisbon."),
             raw_output=json.dumps({"memories": DRAFTS}),
             parsed={"memories": DRAFTS}, model="tiny", temperature=1.0, input_tokens=90,
             output_tokens=120),
    ]
    for cid, d in zip((KEPT, REJECTED, VETOED, OLD_STYLE), DRAFTS):
        note = f"Q: {d['question']} A: {d['answer']}"
        rows.append(dict(step_id=f"verify:{cid}:0", agent="verifier", candidate_id=cid,
                         session_id="s1", prompt=prompt(f"Is this grounded? {note}"),
                         verdict="failed" if cid == REJECTED else "passed",
                         scores={"grounding": 1.0, "novelty": 0.7},
                         reasons=["not in the cited turns: dog"] if cid == REJECTED else []))
    rows += [
        dict(step_id=f"persona:{KEPT}", agent="persona", candidate_id=KEPT, verdict="approve",
             reasons=["about the user"]),
        dict(step_id=f"reshape:{REJECTED}:0", agent="reshaper", candidate_id=REJECTED,
             verdict="reshaped", raw_output=f"I rewrote it {SCRIPT}"),
        dict(step_id=f"verify:{REJECTED}:1", agent="verifier", candidate_id=REJECTED, round=1,
             verdict="rejected", reasons=["not in the cited turns: dog"]),
        dict(step_id=f"persona:{VETOED}", agent="persona", candidate_id=VETOED, verdict="veto",
             reasons=["a pet is <b>not</b> me"]),
        dict(step_id=f"persona:{OLD_STYLE}", agent="persona", candidate_id=OLD_STYLE,
             verdict="approve"),
        dict(step_id=f"consolidate:add:{memory_id(KEPT)}", agent="consolidate",
             candidate_id=KEPT, memory_id=memory_id(KEPT), verdict="add",
             raw_output="Where does the user live? Lisbon"),
        dict(step_id=f"consolidate:supersede:{memory_id(OLD_STYLE)}", agent="consolidate",
             memory_id=memory_id(OLD_STYLE), verdict="supersede", reasons=["supersedes mem-old"]),
        dict(step_id="park:parked:park-1", agent="subconscious", candidate_id=REJECTED,
             verdict="parked"),
        dict(step_id="park:parked:park-2", agent="subconscious", candidate_id=VETOED,
             verdict="parked"),
        dict(step_id="handoff", agent="handoff", verdict="9 training examples"),
    ]
    return [DiaryStep(night_id=NIGHT, at=T0 + timedelta(seconds=i), **r)
            for i, r in enumerate(rows)]


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """A data folder whose diary holds the finished night (and its summary)."""
    diary = Diary(tmp_path / "data" / "diary", NIGHT)
    for step in night_steps():
        diary.record(step)
    diary.finish({"sessions": 1, "candidates": 4, "rejected": 1, "vetoed": 1,
                  "memories_added": 2, "seconds": 1.5})
    return tmp_path / "data"


class Threads(HTMLParser):
    """Thread and step elements of a page: their attributes, in document order."""

    def __init__(self, html: str):
        super().__init__()
        self.threads, self.steps, self.tags = [], [], []
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if "thread" in (a.get("class") or "").split():
            self.threads.append(a)
        elif "step" in (a.get("class") or "").split():
            self.steps.append({**a, "thread": self.threads[-1]})

    def candidates(self, shown_only=False) -> list[str]:
        return [t["data-candidate"] for t in self.threads if "data-candidate" in t
                and not (shown_only and "hidden" in t)]


def test_the_page_shows_every_candidate_and_verdict_escaped_and_fetches_nothing(data_dir):
    night_dir = data_dir / "diary" / NIGHT
    page = write_html(night_dir).read_text()
    parsed = Threads(page)
    assert parsed.candidates() == [KEPT, REJECTED, VETOED, OLD_STYLE]
    # every step's verdict, in its candidate's thread (the dream in each it produced)
    for step in read_steps(night_dir / "steps.jsonl"):
        where = [s for s in parsed.steps if s["data-step"] == step.step_id]
        assert where and all(s["data-verdict"] == step.verdict for s in where)
        if step.candidate_id:
            assert [s["thread"].get("data-candidate") for s in where] == [step.candidate_id]
    dream = [s["thread"].get("data-candidate") for s in parsed.steps
             if s["data-step"] == "dream:s1:w0:b0"]
    assert dream == [KEPT, REJECTED, VETOED, OLD_STYLE]
    # model and user text is escaped, never markup
    assert SCRIPT not in page and "<b>not</b>" not in page
    assert "I rewrote it &lt;script&gt;alert(&#39;dreamt&#39;)&lt;/script&gt;" in page
    assert "a pet is &lt;b&gt;not&lt;/b&gt; me" in page
    assert sum(tag == "script" for tag, _ in parsed.tags) == 1  # the page's own
    # self-contained: nothing to fetch
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.IGNORECASE)
    assert not any(tag in ("link", "img", "iframe") for tag, _ in parsed.tags)
    # the summary, and no word of an unfinished night
    assert '<div class="k">memories added</div>' in page and 'id="unfinished"' not in page


def test_threads_follow_each_candidate_to_its_outcome():
    by_id = {t.candidate_id: t for t in threads(night_steps())}
    assert by_id[KEPT].outcomes == ["kept"]
    assert by_id[REJECTED].outcomes == ["rejected", "reshaped", "parked"]
    assert by_id[VETOED].outcomes == ["vetoed", "parked"]
    # an older diary's consolidation step (no candidate id) finds its candidate by memory id
    assert by_id[OLD_STYLE].outcomes == ["kept"]
    assert memory_id_of(OLD_STYLE) == memory_id(OLD_STYLE)
    assert [v.step.agent for v in by_id[REJECTED].steps] == [
        "dreamer", "verifier", "reshaper", "verifier", "subconscious"]
    assert by_id[REJECTED].title == "What is the user's dog called? → Biscuit"
    assert [v.step.step_id for v in by_id[""].steps] == ["gather", "route:s1", "handoff"]


def test_an_unfinished_night_says_so_and_counts_from_its_steps(tmp_path):
    diary = Diary(tmp_path, NIGHT)
    for step in night_steps()[:5]:
        diary.record(step)
    page = write_html(diary.dir).read_text()
    assert 'id="unfinished"' in page and "reverie night --resume --night " + NIGHT in page
    assert Threads(page).candidates() == [KEPT, REJECTED]


def test_the_transcript_is_written_as_the_night_goes(tmp_path):
    diary = Diary(tmp_path, NIGHT)
    steps = night_steps()
    for step in steps[:4]:
        diary.record(step)
    live = diary.transcript_file.read_text()
    assert not (diary.dir / "summary.json").exists()
    assert live.startswith(f"# Dream diary — night {NIGHT}")
    assert "### 03:00:02 dreamer — **4 candidates**" in live
    assert "### 03:00:03 verifier — **passed**" in live and "candidate `s1:w0:b0:0`" in live
    assert "reshaper" not in live  # not recorded yet
    diary.record(steps[4])
    assert "### 03:00:04 verifier — **failed**" in diary.transcript_file.read_text()
    for step in steps[5:]:
        diary.record(step)
    summary = diary.finish({"sessions": 1})
    # the finished night's transcript is the whole render, as before
    assert diary.transcript_file.read_text() == render_markdown(NIGHT, diary.steps(), summary)


def test_a_malformed_step_line_is_named(tmp_path):
    diary = Diary(tmp_path, NIGHT)
    diary.record(night_steps()[0])
    with open(diary.steps_file, "a") as f:
        f.write('{"step_id": "x", "agent": \n')
    with pytest.raises(ValueError, match=r"steps\.jsonl:2: not a diary step"):
        write_html(diary.dir)


def cli(data_dir, *args):
    return CliRunner().invoke(app, ["--config", str(REPO / "config.yaml"), "--data-dir",
                                    str(data_dir), *args])


def test_the_commands(data_dir, tmp_path):
    out = cli(data_dir, "diary", "html", NIGHT)
    assert out.exit_code == 0, out.output
    page = data_dir / "diary" / NIGHT / "diary.html"
    assert out.output.strip() == str(page) and KEPT in page.read_text()
    other = tmp_path / "pages" / "night.html"
    out = cli(data_dir, "diary", "html", NIGHT, "--out", str(other))
    assert out.exit_code == 0 and out.output.strip() == str(other) and other.exists()
    missing = cli(data_dir, "diary", "html", "19990101-000000")
    assert missing.exit_code == 1 and "no diary for night '19990101-000000'" in missing.output
    assert "Traceback" not in missing.output
    listed = cli(data_dir, "diary", "list", "--json")
    assert listed.exit_code == 0
    nights = json.loads(listed.stdout)
    assert [n["night_id"] for n in nights] == [NIGHT] and nights[0]["candidates"] == 4
    assert json.loads(cli(tmp_path / "empty", "diary", "list", "--json").stdout) == []


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def dump_dom(page: Path, fragment: str, profile: Path) -> str:
    """The page's DOM after its script ran, from headless Chromium (bounded: 90 s)."""
    done = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                           f"--user-data-dir={profile}", "--dump-dom",
                           page.resolve().as_uri() + fragment],
                          capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install "
                                              "chromium); the browser check needs it")
def test_chromium_loads_the_page_and_the_filter_in_its_address_applies(data_dir, tmp_path):
    page = write_html(data_dir / "diary" / NIGHT)
    everything = Threads(dump_dom(page, "", tmp_path / "profile"))
    assert ("body", {"data-filtered": "yes"}) in everything.tags  # the script ran
    assert everything.candidates(shown_only=True) == [KEPT, REJECTED, VETOED, OLD_STYLE]
    # a filter in the address: the vetoed candidate alone, and of its steps the persona's
    vetoed = Threads(dump_dom(page, "#outcome=vetoed&agent=persona", tmp_path / "profile"))
    assert vetoed.candidates() == [KEPT, REJECTED, VETOED, OLD_STYLE]
    assert vetoed.candidates(shown_only=True) == [VETOED]
    shown = [s["data-agent"] for s in vetoed.steps
             if s["thread"].get("data-candidate") == VETOED and "hidden" not in s]
    assert shown == ["persona"]
    counter = next(a for tag, a in vetoed.tags if a.get("id") == "shown")
    assert counter["data-shown"] == "1"


def test_a_notes_thread_holds_its_reading_and_leads_with_the_note():
    """A note's candidate (``<session>:<turn>:n<k>``) gets the note-taker's step of its turn
    at its head, and its title is the note, then its question and answer."""
    from reverie.memory.diary_html import threads

    cid = "s1:t1:n0"
    made = {"id": cid, "text": "The user's dog is called Biscuit.",
            "question": "What's my dog called?", "answer": "Your dog is called Biscuit."}
    steps = [DiaryStep(step_id="read:s1:t1", night_id="n", agent="notetaker", session_id="s1",
                       verdict="1 note", raw_output="- The user's dog is called Biscuit."),
             DiaryStep(step_id=f"verify:{cid}:0", night_id="n", agent="verifier",
                       candidate_id=cid, verdict="passed", produced=[made])]
    [thread] = threads(steps)
    assert [v.step.agent for v in thread.steps] == ["notetaker", "verifier"]
    assert thread.title == ("The user's dog is called Biscuit. — What's my dog called? "
                            "→ Your dog is called Biscuit.")
