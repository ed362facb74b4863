"""The note-taker's and the dreamer's plain lines, and the checks made on them by code
(no model: the parsing, the kind, the answer said to the user, the dream's checks)."""

import pytest

from reverie.agents.dreamer import parse_dream, second_person
from reverie.agents.notetaker import note_kind, parse_notes, restates_context
from reverie.agents.verifier import dream_checks, user_voice
from reverie.memory.manage import forget_keys
from reverie.memory.records import Candidate, Message


def test_notes_are_read_from_bullets_numbers_and_none():
    text = ("Here are my notes:\n- The user's name is Maya.\n2. the user lives in Porto\n"
            "* User's dog is a beagle.\n- The user's name is Maya.\n- The user thanks the "
            "assistant.\n- The user wants a Python function for leap years.\n"
            "- The user asks the assistant to keep answers short.\n- The user.\n"
            "Example 3\n- The user is a pilot.")
    notes, dropped = parse_notes(text)
    assert notes == ["The user's name is Maya.", "The user lives in Porto.",
                     "The user's dog is a beagle.",
                     "The user asks the assistant to keep answers short."]
    assert dropped == [
        "not a note about the user: 'Here are my notes:'",
        "a request or courtesy, not a fact: 'The user thanks the assistant.'",
        "a request or courtesy, not a fact: 'The user wants a Python function for leap years.'",
        "says nothing: 'The user.'"]  # and nothing after the model began another example
    assert parse_notes("none") == ([], []) and parse_notes("- none") == ([], [])
    # the user's rabbit, said without the user: "The user's" is put back
    assert parse_notes("- The rabbit Clementine is eight.\n- My sister lives in Leeds.")[0] == [
        "The user's rabbit Clementine is eight.", "The user's sister lives in Leeds."]
    assert parse_notes("- The user has a cat.\n- The user has a dog.", most=1)[0] == [
        "The user has a cat."]


def test_the_kind_is_decided_by_code_from_the_notes_words():
    assert note_kind("The user wants the assistant to keep answers short.") == "rule"
    assert note_kind("The user prefers short answers.") == "rule"
    assert note_kind("The user prefers green tea to coffee.") == "preference"
    assert note_kind("The user's favourite colour is teal.") == "preference"
    assert note_kind("The user's sister likes horses.") == "fact"  # the sister's, not a preference
    assert note_kind("The user lives in Lisbon.") == "fact"


@pytest.mark.parametrize("note, said", [
    ("The user's dog is called Biscuit.", "Your dog is called Biscuit."),
    ("The user lives in Lisbon.", "You live in Lisbon."),
    ("The user is allergic to hazelnuts.", "You are allergic to hazelnuts."),
    ("The user has a sister named Ana.", "You have a sister named Ana."),
    ("The user often watches films.", "You often watch films."),
    ("The user studies law.", "You study law."),
    ("The user moved from Porto to Lisbon.", "You moved from Porto to Lisbon."),
    ("The user wants the assistant to keep answers short.", "You want me to keep answers short."),
])
def test_the_answer_is_the_note_said_to_the_user(note, said):
    assert second_person(note) == said


def test_a_dream_is_read_by_its_tags():
    text = "Q: What's my dog called?\n- S: Remind me of my dog's name.\n2) N: Who owned Snoopy?\nok"
    assert parse_dream(text) == {"Q": ["What's my dog called?"],
                                 "S": ["Remind me of my dog's name."], "N": ["Who owned Snoopy?"]}


def dreamt(note, question, phrasings=(), neighbours=()):
    return Candidate(id="c", night_id="n", user_id="me", session_id="s", kind="fact",
                     text=note, question=question, phrasings=list(phrasings),
                     neighbours=list(neighbours), answer=second_person(note))


def test_the_dream_check_keeps_what_asks_for_the_note_and_neighbours_not_about_the_user():
    c = dreamt("The user's dog is called Biscuit.", "What breed is Pepper, my dog?",
               ["What's my dog called?", "Where do you live?", "Remind me of my dog's name.",
                "What is the capital of France?"],
               ["Who owned Snoopy?", "What is my dog's breed?", "Why is Biscuit so cute?",
                "What do dogs eat?", "How do planes fly?", "Dogs are loyal."])
    checked, dropped = dream_checks(c)
    assert checked.question == "What's my dog called?"  # the first question that passed
    assert checked.phrasings == ["Remind me of my dog's name."]
    assert checked.neighbours == ["What do dogs eat?"]
    assert any("Pepper" in d and "invents" in d for d in dropped)
    assert any("'Where do I live?': shares no word" in d for d in dropped)  # put in the user's voice
    assert any("capital of France" in d and "user's voice" in d for d in dropped)
    assert any("Snoopy" in d and "topic" in d for d in dropped)
    assert any("Biscuit so cute" in d and "holds the note's biscuit" in d for d in dropped)
    assert any("my dog's breed" in d and "about the user" in d for d in dropped)
    assert any("Dogs are loyal" in d and "not a question" in d for d in dropped)


def test_a_question_in_the_second_person_is_put_in_the_users_voice():
    assert user_voice("Where do you live?") == "Where do I live?"
    assert user_voice("What's your dog's name?") == "What's my dog's name?"
    assert user_voice("Do you remember my dog?") == "Do you remember my dog?"  # already mine


def test_a_note_that_restates_the_turns_before_it_is_found():
    turn = Message(turn_id="t3", role="user", content="I work as a data engineer. We live in Porto.")
    earlier = [Message(turn_id="t1", role="user", content="I'm Maya. My dog is a two-year-old beagle."),
               Message(turn_id="t2", role="assistant", content="Good morning, Maya!")]
    assert restates_context("The user's name is Maya.", turn, earlier) == ["Maya"]
    assert restates_context("The user's dog is a two-year-old beagle.", turn, earlier) == [
        "beagle", "dog", "two-year-old"]
    assert restates_context("The user lives in Porto.", turn, earlier) == []


def test_a_forget_request_names_numbers_by_their_digits_and_names_as_words():
    assert forget_keys("my old phone number 555-0142") == {"5550142"}
    assert forget_keys("about my friend Kenji") == {"kenji"}
    assert forget_keys("that I like jazz") == set()


def test_a_note_of_what_the_turn_corrects_is_found():
    from reverie.agents.notetaker import corrected

    turn = Message(turn_id="t3", role="user", content="Earlier I said we live in Porto. "
                   "Actually, we moved from Porto to Lisbon last month.")
    assert corrected("The user lives in Porto.", turn) == ["Porto"]
    assert corrected("The user moved from Porto to Lisbon last month.", turn) == []
    assert corrected("The user lives in Lisbon.", turn) == []
    age = Message(turn_id="t1", role="user", content="I'm 34. Sorry, I mean 35 since March.")
    assert corrected("The user is 34 years old.", age) == ["34"]
    assert corrected("The user is 35 years old.", age) == []
    plain = Message(turn_id="t1", role="user", content="I live in Porto and work at Acme.")
    assert corrected("The user lives in Porto.", plain) == []


def test_notes_about_one_attribute_share_a_slot_and_differ_in_values():
    from reverie.graphs.night import slot_and_values

    assert slot_and_values("The user lives in Lisbon now.") == ("The user lives in X now.",
                                                                {"Lisbon"})
    assert slot_and_values("The user is 35 years old.") == ("The user is X years old.", {"35"})
    assert slot_and_values("The user likes tea.") == ("The user likes tea.", set())


def test_a_request_to_forget_a_kind_of_value_means_the_values_of_that_kind():
    from reverie.agents.router import forget_requests, values_meant
    from reverie.memory.manage import asks_to_forget
    from reverie.memory.records import Session

    day = Session(session_id="s1", user_id="me", messages=[
        Message(turn_id="t1", role="user", content="They pay me £52,000, not enough."),
        Message(turn_id="t2", role="assistant", content="Noted."),
        Message(turn_id="t3", role="user", content="Please forget the salary I mentioned.")])
    [request] = forget_requests(day)
    assert values_meant(request, [day]) == ["£52,000"]
    note = Candidate(id="c", night_id="n", user_id="me", session_id="s1", kind="fact",
                     text="The user is paid £52,000 a year.")
    unlike = lambda a, b: 0.0  # noqa: E731  (no embedding similarity: the value decides)
    assert asks_to_forget(request.target, note, unlike, 0.45, ["£52,000"]) == 1.0
    assert asks_to_forget(request.target, note, unlike, 0.45) == 0.0
    other = note.model_copy(update={"text": "The user walks 1,000 steps a day."})
    assert asks_to_forget(request.target, other, unlike, 0.45, ["£52,000"]) == 0.0
